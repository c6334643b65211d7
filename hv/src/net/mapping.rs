//! Where the NIC's registers are, for the hv and for the guest: mapped (uncached) at the
//! agent's `ioremap` addresses in the hv's own tables, so that one pointer reaches them in
//! both modes; and taken out of the guest's nested tables, so that Linux cannot reprogram a
//! device that writes to memory by DMA (a read or write there is refused with the scratch
//! page, like one of the hv's own memory: `Hv::owns`).
//!
//! Both changes are made while dormant, when no CPU uses either table. The tables the host
//! mapping needs come from a small arena in the image; the nested tables split a large page
//! with frames of the pool's first region, which the kernel's tables map too (a store chunk is
//! reached only in host mode).

use crate::npt::Perms;
use crate::paging::{self, Frames, Gpa, Hpa, NX, P, PCD, PWT, RW, SIZE_4K};
use crate::vmm::{Hv, NPT_TLB};
use core::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use quicksilver_proto::abi::{NetConfig, Status, NET_BARS};

/// Page-table pages for the host mappings: a PDPT, a PD and a PT for each of three memory BARs
/// (the 82574L has three: registers, flash, MSI-X), in the worst case that they share nothing
/// with the block's own mapping, and one more PT for a BAR that straddles 2 MiB.
const TABLES: usize = 10;

#[repr(C, align(4096))]
struct Tables([[u64; 512]; TABLES]);

/// Handed out once each (`USED` only grows), only while dormant, by `map`.
static mut TABLES_ARENA: Tables = Tables([[0; 512]; TABLES]);
static USED: AtomicUsize = AtomicUsize::new(0);

/// The hv's own tables as `paging` builds them: every existing table is in the block (built
/// by `init` from the pool's first region); new ones come from the arena.
struct HostTables<'a>(&'a Hv);

// SAFETY: `alloc` returns distinct zeroed frames of the image's arena (never handed out
// again); `table` turns any frame of the block, which is where every table of the hv's own
// tree lies, into its address in the block's mapping, valid in the kernel's tables (dormant,
// where this runs) and in the hv's.
unsafe impl Frames for HostTables<'_> {
    fn alloc(&mut self) -> Option<u64> {
        let i = USED.fetch_add(1, Relaxed);
        if i >= TABLES {
            return None;
        }
        // SAFETY: page `i` of the arena was handed to nobody before.
        let va = unsafe { core::ptr::addr_of_mut!(TABLES_ARENA.0[i]) } as u64;
        Some(super::dma::pa_of(va))
    }

    fn table(&self, pa: u64) -> *mut [u64; 512] {
        (pa - self.0.base_pa + self.0.base_va) as *mut [u64; 512]
    }
}

/// The memory BARs the agent mapped: physical address, length (whole pages), its address.
pub fn bars(cfg: &NetConfig) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
    (0..NET_BARS)
        .filter(|&i| cfg.bar_pa[i] != 0 && cfg.bar_va[i] != 0 && cfg.bar_len[i] != 0)
        .map(|i| {
            let pa = cfg.bar_pa[i] & !(SIZE_4K - 1);
            let end = (cfg.bar_pa[i] + cfg.bar_len[i]).next_multiple_of(SIZE_4K);
            (pa, end - pa, cfg.bar_va[i] & !(SIZE_4K - 1))
        })
}

/// Maps each BAR in the hv's tables and hides it from the guest. Dormant only.
pub fn map(hv: &Hv, cfg: &NetConfig) -> Result<(), Status> {
    let mut npt = hv.npt.lock();
    // Splitting a 1 GiB page down to 4 KiB takes two frames per BAR.
    if npt.frames().free_in_first_region() < 8 {
        return Err(Status::NotEnoughMemory);
    }
    let mut host = HostTables(hv);
    for (pa, len, va) in bars(cfg) {
        if hv.overlaps_own(pa..pa + len) || pa.checked_add(len).is_none_or(|e| e > hv.map_limit) {
            return Err(Status::BadArgument);
        }
        paging::map_4k(
            &mut host,
            hv.host.cr3,
            va,
            pa,
            len,
            P | RW | NX | PCD | PWT,
            P | RW,
        )
        .map_err(|_| Status::NotEnoughMemory)?;
        let flush = npt
            .unmap(Gpa(pa), len)
            .map_err(|_| Status::NotEnoughMemory)?;
        NPT_TLB.publish(flush);
    }
    Ok(())
}

/// Gives each BAR back to the guest and takes it out of the hv's tables. Dormant only.
pub fn unmap(hv: &Hv, cfg: &NetConfig) {
    let mut npt = hv.npt.lock();
    let host = HostTables(hv);
    for (pa, len, va) in bars(cfg) {
        if let Ok(flush) = npt.map(Gpa(pa), Hpa(pa), len, Perms::RWX) {
            NPT_TLB.publish(flush);
        }
        for off in (0..len).step_by(SIZE_4K as usize) {
            if let Some(e) = paging::leaf_4k(&host, hv.host.cr3, va + off) {
                // SAFETY: a leaf entry of the hv's own tables, which no CPU uses while
                // dormant (each activation loads CR3 afresh).
                unsafe { e.write(0) };
            }
        }
    }
}
