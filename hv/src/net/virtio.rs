//! The fast link's virtio-net driver: `virtio-drivers`' polled `VirtIONetRaw` over its modern
//! PCI transport (virtio 1.0, 4.1 "Virtio Over PCI Bus"), with the hv's [`Hal`]: DMA memory
//! from a static arena in the image (so one address reaches it in the kernel's tables while
//! dormant and in the hv's own while active), BARs at the addresses the agent mapped them, and
//! configuration space read from the agent's snapshot ([`ShadowConfig`]).

use super::dma::{self, buffers};
use super::Nic;
use core::ptr::NonNull;
use quicksilver_proto::abi::NetConfig;
use quicksilver_proto::link::net::{Build, MAX_FRAME};
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

/// Descriptors per queue. QEMU's virtio-net sends from a bottom half of its main loop (its
/// default `tx=bh`), so a transmit completes some time after the notifying write, not in it
/// (the 82574L's does, in the vCPU's thread); 16 in flight cover a 128 KiB gdb reply's pace,
/// and 16 receive buffers absorb a burst from the bridge while the hv is busy.
const QUEUE: usize = dma::BUFS;

/// The hv's side of `virtio-drivers`.
pub struct HvHal;

// SAFETY: `dma_alloc` hands out zeroed, page-aligned, physically contiguous pages of the
// image's own arena, never twice until `dma::reset`; `share` returns the physical address of
// a buffer that lies in the image (the only buffers the driver is given: this file's
// statics); `mmio_phys_to_virt` returns the agent's uncached mapping of a BAR, which the hv
// also maps at the same address in its own tables.
unsafe impl Hal for HvHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        match dma::alloc(pages) {
            Some((pa, va)) => (pa, va),
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        // The arena is reset as a whole when the device is (`dma::reset`).
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        // `ShadowConfig` reports only the BARs the agent mapped, so every region the
        // transport asks for lies in one; `dangling` is never returned for a real region.
        super::BARS
            .va(paddr, size as u64)
            .and_then(|va| NonNull::new(va as *mut u8))
            .unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        dma::pa_of(buffer.cast::<u8>().as_ptr() as u64)
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// Configuration space as the agent read it. The hv never issues a configuration cycle:
/// Linux's own accesses (0xCF8/0xCFC under a lock the hv cannot take) would race it. Writes
/// land in the copy only; the one sequence the transport writes, BAR sizing (write all ones,
/// read the size mask, write the address back), is answered from the BAR lengths the agent
/// gave.
#[derive(Clone)]
pub struct ShadowConfig {
    words: [u32; 64],
    bar_len: [u64; 6],
    /// BAR registers (0-5) written with all ones and not yet written back.
    sizing: u8,
}

impl ShadowConfig {
    pub fn new(cfg: &NetConfig) -> ShadowConfig {
        let mut words = [0u32; 64];
        for (i, w) in words.iter_mut().enumerate() {
            *w = (cfg.config[i / 2] >> (32 * (i % 2))) as u32;
        }
        ShadowConfig {
            words,
            bar_len: cfg.bar_len,
            sizing: 0,
        }
    }

    /// Vendor and device ID.
    pub fn ids(&self) -> (u16, u16) {
        (self.words[0] as u16, (self.words[0] >> 16) as u16)
    }

    /// The size mask a BAR register reads back after all ones were written: the low
    /// half of a 64-bit BAR from its length, the high half all ones above the length.
    fn size_mask(&self, reg: usize) -> u32 {
        let low_of_64 = reg > 0 && self.words[4 + reg - 1] & 0b111 == 0b100;
        let (len, flags, high) = if low_of_64 {
            // The high half of the BAR pair that starts one register below.
            (self.bar_len[reg - 1], 0, true)
        } else {
            (self.bar_len[reg], self.words[4 + reg] & 0xF, false)
        };
        if len == 0 {
            return 0;
        }
        let mask = !(len - 1);
        if high {
            (mask >> 32) as u32
        } else {
            (mask as u32 & !0xF) | flags
        }
    }
}

impl ConfigurationAccess for ShadowConfig {
    fn read_word(&self, _df: DeviceFunction, offset: u8) -> u32 {
        let reg = (offset as usize) / 4;
        if (4..10).contains(&reg) && self.sizing & (1 << (reg - 4)) != 0 {
            return self.size_mask(reg - 4);
        }
        self.words[reg % 64]
    }

    fn write_word(&mut self, _df: DeviceFunction, offset: u8, data: u32) {
        let reg = (offset as usize) / 4;
        if (4..10).contains(&reg) {
            let bit = 1 << (reg - 4);
            if data == u32::MAX {
                self.sizing |= bit;
                return;
            }
            self.sizing &= !bit;
        }
        self.words[reg % 64] = data;
    }

    unsafe fn unsafe_clone(&self) -> Self {
        self.clone()
    }
}

/// The device, its receive buffers posted, transmit slots in a ring.
pub struct VirtioNet {
    dev: VirtIONetRaw<HvHal, PciTransport, QUEUE>,
    /// The descriptor token of each posted receive buffer.
    rx_token: [Option<u16>; QUEUE],
    /// The descriptor token of each transmit buffer still with the device.
    tx_token: [Option<u16>; QUEUE],
    tx_next: usize,
    /// Frames the device did not take in time (dropped).
    pub tx_dropped: u64,
}

/// Why the device could not be brought up.
#[derive(Debug)]
pub enum Error {
    /// Not a modern virtio-net function.
    Unsupported,
    /// The transport or the device refused.
    Device,
}

impl VirtioNet {
    /// Resets the device, negotiates, sets up both queues and posts every receive buffer.
    pub fn new(cfg: &NetConfig) -> Result<VirtioNet, Error> {
        let shadow = ShadowConfig::new(cfg);
        // 0x1AF4: virtio; 0x1000 (transitional) or 0x1041 (modern) is a network device.
        if !matches!(shadow.ids(), (0x1AF4, 0x1000 | 0x1041)) {
            return Err(Error::Unsupported);
        }
        let df = DeviceFunction {
            bus: (cfg.bdf >> 8) as u8,
            device: ((cfg.bdf >> 3) & 0x1F) as u8,
            function: (cfg.bdf & 7) as u8,
        };
        let mut root = PciRoot::new(shadow);
        let transport =
            PciTransport::new::<HvHal, _>(&mut root, df).map_err(|_| Error::Unsupported)?;
        let dev = VirtIONetRaw::new(transport).map_err(|_| Error::Device)?;
        let mut me = VirtioNet {
            dev,
            rx_token: [None; QUEUE],
            tx_token: [None; QUEUE],
            tx_next: 0,
            tx_dropped: 0,
        };
        for i in 0..QUEUE {
            me.post(i)?;
        }
        // The interrupt is the agent's doorbell while the kernel runs (`Op::NetPoll`).
        me.dev.enable_interrupts();
        Ok(me)
    }

    fn post(&mut self, i: usize) -> Result<(), Error> {
        // SAFETY: receive buffer `i` is not with the device (its token is None), and only
        // this driver touches the buffers; it stays valid (a static) until completed.
        let token = unsafe { self.dev.receive_begin(&mut (*buffers()).rx[i]) }
            .map_err(|_| Error::Device)?;
        self.rx_token[i] = Some(token);
        Ok(())
    }

    /// Takes back every transmit buffer the device is done with.
    fn reclaim(&mut self) {
        while let Some(token) = self.dev.poll_transmit() {
            let Some(i) = self.tx_token.iter().position(|t| *t == Some(token)) else {
                break;
            };
            // SAFETY: buffer `i` was given to the device with `token`, which it returned.
            let _ = unsafe { self.dev.transmit_complete(token, &(*buffers()).tx[i]) };
            self.tx_token[i] = None;
        }
    }
}

impl Nic for VirtioNet {
    fn mac(&self) -> [u8; 6] {
        self.dev.mac_address()
    }

    fn send_in_place(&mut self, build: &mut Build<'_>) -> bool {
        let i = self.tx_next;
        // Completions are taken back only when the slot is wanted again, not after every
        // send: each one taken moves the ring's `used_event` (EVENT_IDX, virtio 1.1 2.7.10),
        // which asks the device for an interrupt at its next completion, and each interrupt
        // costs the kernel an interrupt and the hv a hypercall. So a ring's worth of sends
        // raises one. The device gives a buffer back as soon as QEMU has sent it; wait for
        // this slot a bounded while (a backend that stopped reading must not hang the hv).
        for _ in 0..1_000_000 {
            if self.tx_token[i].is_none() {
                break;
            }
            self.reclaim();
            core::hint::spin_loop();
        }
        if self.tx_token[i].is_some() {
            self.tx_dropped += 1;
            return false;
        }
        // SAFETY: buffer `i` is not with the device; only this driver touches it.
        let buf = unsafe { &mut (*buffers()).tx[i] };
        let Ok(hdr) = self.dev.fill_buffer_header(buf) else {
            return false;
        };
        let n = build(dma::frame_room(&mut buf[hdr..])).min(MAX_FRAME);
        // SAFETY: the buffer stays untouched until `reclaim` sees its token come back.
        match unsafe { self.dev.transmit_begin(&buf[..hdr + n]) } {
            Ok(token) => {
                self.tx_token[i] = Some(token);
                self.tx_next = (i + 1) % QUEUE;
                true
            }
            Err(_) => {
                self.tx_dropped += 1;
                false
            }
        }
    }

    fn receive(&mut self, f: &mut dyn FnMut(&[u8])) -> bool {
        let Some(token) = self.dev.poll_receive() else {
            return false;
        };
        let Some(i) = self.rx_token.iter().position(|t| *t == Some(token)) else {
            return false;
        };
        self.rx_token[i] = None;
        // SAFETY: the device returned buffer `i`'s token: the buffer is ours again.
        let buf = unsafe { &mut (*buffers()).rx[i] };
        // SAFETY: as above; `token` is the one `receive_begin` gave for this buffer.
        if let Ok((hdr, len)) = unsafe { self.dev.receive_complete(token, buf) } {
            f(&buf[hdr..hdr + len]);
        }
        let _ = self.post(i);
        true
    }

    fn ack_interrupt(&mut self) -> bool {
        !self.dev.ack_interrupt().is_empty()
    }
}
