//! Memory the NIC reaches by DMA: a static arena in the image, handed out page by page and
//! taken back as a whole when the device is reset. In the image because its one virtual
//! address works in both of the hv's address spaces (the kernel's while dormant, the hv's
//! own while active) and its physical address is the block's offset away; the frame pool's
//! store chunks are reached only in host mode.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use quicksilver_proto::link::net::MAX_FRAME;

/// Pages in the arena: each virtqueue of 16 descriptors takes two (its driver and device
/// areas); room for an e1000e's two rings too.
const PAGES: usize = 8;

#[repr(C, align(4096))]
struct Arena([[u8; 4096]; PAGES]);

/// Frames' buffers: the driver's header (virtio's 12 bytes) and a 1514-byte frame, rounded up
/// (virtio-drivers wants receive buffers of at least 1526 bytes; the 82574L's smallest
/// receive buffer size is 2048).
pub const BUF: usize = 2048;
const _: () = assert!(BUF >= 12 + MAX_FRAME);
/// Buffers each way: one per descriptor of a 16-entry ring.
pub const BUFS: usize = 16;

/// Receive and transmit buffers, for whichever driver runs (the hv drives one NIC).
#[repr(C, align(4096))]
pub struct Buffers {
    pub rx: [[u8; BUF]; BUFS],
    pub tx: [[u8; BUF]; BUFS],
}

/// Only the one driver (behind the net lock) touches them.
static mut BUFFERS: Buffers = Buffers {
    rx: [[0; BUF]; BUFS],
    tx: [[0; BUF]; BUFS],
};

/// The buffers. Only the driver behind the net lock may dereference it, and only a buffer
/// the device does not own at that moment.
pub fn buffers() -> *mut Buffers {
    core::ptr::addr_of_mut!(BUFFERS)
}

/// Pages are handed out once each (`NEXT` only grows) until `reset`.
static mut ARENA: Arena = Arena([[0; 4096]; PAGES]);
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// `pages` zeroed, contiguous pages: their physical and virtual address.
pub fn alloc(pages: usize) -> Option<(u64, NonNull<u8>)> {
    let first = NEXT.fetch_add(pages, Relaxed);
    if first + pages > PAGES {
        NEXT.fetch_sub(pages, Relaxed);
        return None;
    }
    // SAFETY: pages [first, first + pages) were handed to nobody since the last reset, so
    // this is the only reference to them.
    let va = unsafe { core::ptr::addr_of_mut!(ARENA.0[first]) }.cast::<u8>();
    // SAFETY: as above; `va` spans `pages` pages of the arena.
    unsafe { core::ptr::write_bytes(va, 0, pages * 4096) };
    Some((pa_of(va as u64), NonNull::new(va)?))
}

/// Takes every page back (the device that used them was reset: no DMA is in flight).
pub fn reset() {
    NEXT.store(0, Relaxed);
}

/// The physical address of `va`, a byte of the image (the block is physically contiguous and
/// mapped at one offset). 0 outside the image, which no device is given: behind an IOMMU the
/// agent maps only the image into the NIC's domain, so a DMA address elsewhere in the block
/// (page tables, per-CPU areas) would fault, and should never be handed out.
pub fn pa_of(va: u64) -> u64 {
    let Some(hv) = crate::vmm::get() else {
        return 0;
    };
    let image = hv.header.map_or(0, |h| h.image_size);
    if (hv.base_va..hv.base_va + image).contains(&va) {
        va - hv.base_va + hv.base_pa
    } else {
        0
    }
}

/// The first [`MAX_FRAME`] bytes of a buffer, where a frame is built in place.
pub fn frame_room(buf: &mut [u8]) -> &mut [u8; MAX_FRAME] {
    (&mut buf[..MAX_FRAME])
        .try_into()
        .expect("every buffer holds a whole frame after the device's header")
}
