//! Guest-virtual memory as gdb reads and writes it: through a parked CPU's page tables (its
//! CR3), a page at a time, to guest-physical memory through the hv's identity map. The hv's
//! own memory is never reached: a translation that lands there is refused.

use crate::paging;
use crate::vmm::{self, Hv};

/// The guest-physical address of `va` through `cr3`, refusing the hv's own memory.
pub(super) fn translate(hv: &Hv, cr3: u64, va: u64) -> Option<u64> {
    let read_u64 = |pa: u64| {
        let mut b = [0u8; 8];
        vmm::read_guest_phys(hv, pa, &mut b).then(|| u64::from_le_bytes(b))
    };
    let pa = paging::translate(cr3, va, read_u64).ok()?;
    (!hv.owns(pa)).then_some(pa)
}

/// Reads guest-virtual memory; returns how many bytes could be read.
pub fn read_virt(hv: &Hv, cr3: u64, va: u64, out: &mut [u8]) -> usize {
    let mut done = 0;
    while done < out.len() {
        let at = va.wrapping_add(done as u64);
        let n = (4096 - (at & 0xFFF) as usize).min(out.len() - done);
        match translate(hv, cr3, at) {
            Some(pa) if vmm::read_guest_phys(hv, pa, &mut out[done..done + n]) => done += n,
            _ => break,
        }
    }
    done
}

/// Writes guest-virtual memory (read-only kernel text included: through the physical map).
pub(super) fn write_virt(hv: &Hv, cr3: u64, va: u64, data: &[u8]) -> bool {
    let mut done = 0;
    while done < data.len() {
        let at = va.wrapping_add(done as u64);
        let n = (4096 - (at & 0xFFF) as usize).min(data.len() - done);
        let Some(pa) = translate(hv, cr3, at) else {
            return false;
        };
        if !vmm::write_guest_phys(hv, pa, &data[done..done + n]) {
            return false;
        }
        done += n;
    }
    true
}

/// Replaces the byte at `va` by `new` if it is `expect`; returns the byte found.
pub(super) fn patch(hv: &Hv, cr3: u64, va: u64, expect: u8, new: u8) -> Option<u8> {
    let mut b = [0u8];
    if read_virt(hv, cr3, va, &mut b) != 1 {
        return None;
    }
    if b[0] == expect && !write_virt(hv, cr3, va, &[new]) {
        return None;
    }
    Some(b[0])
}

/// Is the byte at `va` an INT3?
pub fn is_int3(hv: &Hv, cr3: u64, va: u64) -> bool {
    let mut b = [0u8];
    read_virt(hv, cr3, va, &mut b) == 1 && b[0] == 0xCC
}
