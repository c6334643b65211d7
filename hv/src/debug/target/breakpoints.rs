//! gdb's breakpoints: software ones as INT3 bytes patched into the kernel's text, hardware
//! breakpoints and watchpoints in the debug-address registers DR0-3 the kernel does not use.
//!
//! A slot is armed by its fields in DR7 (AMD APM vol. 2, 13.1.1.5, "Debug-Control Register
//! (DR7)"): the local and global enables L`n`/G`n` at bits 2n and 2n+1, the access kind R/W`n`
//! at bits 16+4n (00 execute, 01 write, 11 read or write), the length LEN`n` at bits 18+4n
//! (00 one byte, 01 two, 11 four, 10 eight; an execute breakpoint must say one byte). Which
//! slots gdb holds is [`Slots`], plain data; loading them into a CPU is `run`'s job.

use super::memory::{patch, read_virt, write_virt};
use super::Debugger;
use crate::vmm::COUNTERS;
use core::sync::atomic::Ordering::*;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps, SwBreakpoint,
    SwBreakpointOps, WatchKind,
};
use gdbstub::target::{TargetError, TargetResult};

/// Most software breakpoints at once.
pub const MAX_SW: usize = 64;

/// The DR7 access kind (R/W`n`) of a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HwKind {
    Exec,
    Write,
    ReadWrite,
}

/// The DR7 access kind for a gdb watchpoint: x86 has no read-only data breakpoint, so reads
/// and writes both fire for `rwatch`.
fn hw_kind(kind: WatchKind) -> HwKind {
    match kind {
        WatchKind::Write => HwKind::Write,
        WatchKind::Read | WatchKind::ReadWrite => HwKind::ReadWrite,
    }
}

/// One of gdb's DR0-3 slots.
#[derive(Clone, Copy, Debug)]
pub struct HwSlot {
    pub addr: u64,
    pub len: u64,
    pub kind: HwKind,
    /// What gdb asked for (a read watch is armed as read/write), for the stop report.
    pub watch: WatchKind,
}

impl HwSlot {
    /// An instruction breakpoint at `addr`.
    pub fn breakpoint(addr: u64) -> HwSlot {
        HwSlot {
            addr,
            len: 1,
            kind: HwKind::Exec,
            watch: WatchKind::ReadWrite,
        }
    }

    /// A watchpoint on `len` bytes at `addr`, or `None` where no slot can watch them: a slot
    /// watches 1, 2, 4 or 8 bytes aligned to their length (APM vol. 2, 13.1.1.5).
    pub fn watchpoint(addr: u64, len: u64, kind: WatchKind) -> Option<HwSlot> {
        (matches!(len, 1 | 2 | 4 | 8) && addr.is_multiple_of(len)).then_some(HwSlot {
            addr,
            len,
            kind: hw_kind(kind),
            watch: kind,
        })
    }

    /// The DR7 bits that arm this slot as `n`: G`n`, R/W`n`, LEN`n`.
    pub fn dr7_bits(&self, n: usize) -> u64 {
        dr7_bits(self.kind, self.len, n)
    }
}

/// The DR7 bits that arm slot `n` (0-3) for `kind` on `len` bytes: G`n` (global enable: the
/// kernel's context switches do not clear it), R/W`n`, LEN`n`. An execute breakpoint and any
/// length but 2, 4 or 8 encode LEN as one byte.
pub fn dr7_bits(kind: HwKind, len: u64, n: usize) -> u64 {
    let rw = match kind {
        HwKind::Exec => 0b00,
        HwKind::Write => 0b01,
        HwKind::ReadWrite => 0b11,
    };
    let len = match (kind, len) {
        (HwKind::Exec, _) => 0b00,
        (_, 2) => 0b01,
        (_, 4) => 0b11,
        (_, 8) => 0b10,
        _ => 0b00,
    };
    (1 << (2 * n + 1)) | (rw << (16 + 4 * n)) | (len << (18 + 4 * n))
}

/// All DR7 bits that belong to slot `n`: L`n`, G`n`, R/W`n`, LEN`n`.
pub fn dr7_fields(n: usize) -> u64 {
    (0b11 << (2 * n)) | (0b1111 << (16 + 4 * n))
}

/// The slots `dr7` enables (L`n` or G`n` set), as a mask.
pub fn enabled_slots(dr7: u64) -> u8 {
    (0..4)
        .filter(|&n| dr7 & (0b11 << (2 * n)) != 0)
        .fold(0, |m, n| m | 1 << n)
}

/// gdb's DR0-3 slots in a session: which it armed, and which it may not touch.
#[derive(Clone, Copy, Debug, Default)]
pub struct Slots {
    /// What gdb armed in each slot.
    pub hw: [Option<HwSlot>; 4],
    /// Slots the kernel had enabled when the session began (never touched).
    pub kernel: u8,
    /// Slots gdb used in this session (given back to the kernel's values at detach).
    pub touched: u8,
}

impl Slots {
    /// A session's slots: none armed, those in `kernel` the kernel's.
    pub fn new(kernel: u8) -> Slots {
        Slots {
            hw: [None; 4],
            kernel: kernel & 0xF,
            touched: 0,
        }
    }

    /// Arms `slot` in the first slot neither the kernel nor gdb uses. Asking again for what is
    /// armed (same address and kind) is granted without a second slot; false when every slot
    /// is taken.
    pub fn add(&mut self, slot: HwSlot) -> bool {
        if self
            .hw
            .iter()
            .flatten()
            .any(|h| h.addr == slot.addr && h.kind == slot.kind)
        {
            return true;
        }
        match (0..4).find(|&n| self.kernel & (1 << n) == 0 && self.hw[n].is_none()) {
            Some(n) => {
                self.hw[n] = Some(slot);
                self.touched |= 1 << n;
                true
            }
            None => false,
        }
    }

    /// Disarms the slot that holds `addr` for `kind`; false if none does.
    pub fn remove(&mut self, addr: u64, kind: HwKind) -> bool {
        match self
            .hw
            .iter()
            .position(|h| h.is_some_and(|h| h.addr == addr && h.kind == kind))
        {
            Some(n) => {
                self.hw[n] = None;
                true
            }
            None => false,
        }
    }

    /// Disarms every slot (`touched` stays: their kernel values go back at detach).
    pub fn clear(&mut self) {
        self.hw = [None; 4];
    }

    /// Mask of the slots gdb has armed.
    pub fn armed(&self) -> u8 {
        (0..4)
            .filter(|&n| self.hw[n].is_some())
            .fold(0, |m, n| m | 1 << n)
    }

    /// Mask of the slots neither the kernel nor gdb uses (a step may borrow one).
    pub fn free(&self) -> u8 {
        !(self.kernel | self.armed()) & 0xF
    }
}

impl Debugger {
    pub fn sw_breakpoint_at(&self, addr: u64) -> bool {
        self.sw.iter().flatten().any(|&(a, _)| a == addr)
    }

    /// Mask of the DR slots gdb has armed.
    pub fn armed_slots(&self) -> u8 {
        self.slots.armed()
    }

    /// Takes every INT3 out of the kernel's text for a moment, keeping gdb's list: a
    /// checkpoint taken meanwhile holds the kernel's own bytes, so a rollback to it never
    /// brings back an INT3 that gdb has removed since (the kernel would oops on it).
    /// [`Debugger::reinsert_all`] puts them back. `cr3`: page tables that map the kernel's
    /// text, where the debugger does not hold the CPUs itself (another client leads the stop).
    pub fn lift_all(&mut self, cr3: Option<u64>) {
        let Some(cr3) = cr3.or_else(|| self.cr3(None)) else {
            return;
        };
        for &(addr, orig) in self.sw.iter().flatten() {
            let _ = patch(self.hv, cr3, addr, 0xCC, orig);
        }
    }

    /// Patches every INT3 of gdb's list into the text again: after [`Debugger::lift_all`], or
    /// after a rollback put back text without them. The byte under each is read afresh (the
    /// kernel may have patched its text since: a jump label). Returns how many could not be
    /// put back (counted as breakpoints left, the statistic a detach reports).
    pub fn reinsert_all(&mut self, cr3: Option<u64>) -> u32 {
        let hv = self.hv;
        let cr3 = cr3.or_else(|| self.cr3(None));
        let mut failed = 0;
        for (addr, orig) in self.sw.iter_mut().flatten() {
            let mut now = [0u8];
            let ok = cr3.is_some_and(|cr3| {
                read_virt(hv, cr3, *addr, &mut now) == 1
                    && (now[0] == 0xCC || write_virt(hv, cr3, *addr, &[0xCC]))
            });
            if !ok {
                failed += 1;
            } else if now[0] != 0xCC {
                *orig = now[0];
            }
        }
        failed
    }

    /// Takes every INT3 out and disarms every slot (detach, or a session replaced). A removal
    /// that fails is tried once more; returns how many INT3s are left in the kernel's memory
    /// (counted in the statistics: a clean detach is never claimed with one left).
    pub fn remove_all(&mut self) -> u32 {
        let cr3 = self.cr3(None);
        let mut left = 0;
        for bp in self.sw.iter_mut() {
            if let Some((addr, orig)) = *bp {
                let undo = |cr3| patch(self.hv, cr3, addr, 0xCC, orig);
                let removed = cr3.is_some_and(|cr3| undo(cr3).is_some() || undo(cr3).is_some());
                if !removed {
                    left += 1;
                }
            }
            *bp = None;
        }
        self.slots.clear();
        if left > 0 {
            COUNTERS.breakpoints_left.fetch_add(left as u64, Relaxed);
        }
        left
    }
}

impl Breakpoints for Debugger {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }
    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }
    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

impl SwBreakpoint for Debugger {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.sw_breakpoint_at(addr) {
            return Ok(true);
        }
        let Some(free) = self.sw.iter().position(Option::is_none) else {
            return Ok(false);
        };
        let cr3 = self.cr3(None).ok_or(TargetError::NonFatal)?;
        let mut orig = [0u8];
        if read_virt(self.hv, cr3, addr, &mut orig) != 1 || orig[0] == 0xCC {
            // Unmapped, or someone else's INT3 (a kprobe): not ours to patch.
            return Ok(false);
        }
        if !write_virt(self.hv, cr3, addr, &[0xCC]) {
            return Ok(false);
        }
        self.sw[free] = Some((addr, orig[0]));
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let Some(slot) = self
            .sw
            .iter()
            .position(|b| b.is_some_and(|(a, _)| a == addr))
        else {
            return Ok(false);
        };
        let Some((_, orig)) = self.sw[slot].take() else {
            return Ok(false);
        };
        let cr3 = self.cr3(None).ok_or(TargetError::NonFatal)?;
        Ok(patch(self.hv, cr3, addr, 0xCC, orig).is_some())
    }
}

impl HwBreakpoint for Debugger {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.slots.add(HwSlot::breakpoint(addr)))
    }
    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.slots.remove(addr, HwKind::Exec))
    }
}

impl HwWatchpoint for Debugger {
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        Ok(HwSlot::watchpoint(addr, len, kind).is_some_and(|s| self.slots.add(s)))
    }
    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        _len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        Ok(self.slots.remove(addr, hw_kind(kind)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(addr: u64, len: u64) -> HwSlot {
        HwSlot::watchpoint(addr, len, WatchKind::Write).unwrap()
    }

    #[test]
    fn dr7_arms_a_slot_globally_with_its_kind_and_length_as_the_apm_encodes_them() {
        // APM vol. 2, 13.1.1.5: G`n` at 2n+1, R/W`n` at 16+4n, LEN`n` at 18+4n.
        assert_eq!(
            HwSlot::breakpoint(0x1000).dr7_bits(0),
            0b10,
            "exec: R/W 00, LEN 00"
        );
        assert_eq!(
            dr7_bits(HwKind::Write, 1, 0),
            0b10 | 0b01 << 16,
            "write one byte"
        );
        assert_eq!(
            dr7_bits(HwKind::Write, 2, 2),
            1 << 5 | 0b01 << 24 | 0b01 << 26,
            "two bytes: LEN 01"
        );
        assert_eq!(
            dr7_bits(HwKind::Write, 4, 1),
            1 << 3 | 0b01 << 20 | 0b11 << 22,
            "four bytes: LEN 11"
        );
        assert_eq!(
            dr7_bits(HwKind::ReadWrite, 8, 3),
            1 << 7 | 0b11 << 28 | 0b10 << 30,
            "eight bytes: LEN 10; read or write: R/W 11"
        );
        assert_eq!(
            dr7_bits(HwKind::Exec, 8, 1),
            1 << 3,
            "an execute breakpoint always says one byte"
        );
    }

    #[test]
    fn a_read_watch_is_armed_as_read_or_write_but_reported_as_gdb_asked() {
        let s = HwSlot::watchpoint(0x2000, 4, WatchKind::Read).unwrap();
        assert_eq!(s.kind, HwKind::ReadWrite);
        assert_eq!(s.watch, WatchKind::Read);
        assert_eq!(s.dr7_bits(0), 0b10 | 0b11 << 16 | 0b11 << 18);
    }

    #[test]
    fn each_slots_dr7_fields_cover_its_bits_and_nothing_of_another_slot_or_dr7s_other_bits() {
        assert_eq!(dr7_fields(0), 0x000F_0003);
        assert_eq!(dr7_fields(3), 0xF000_00C0);
        let mut all = 0;
        for n in 0..4 {
            for kind in [HwKind::Exec, HwKind::Write, HwKind::ReadWrite] {
                for len in [1, 2, 4, 8] {
                    let bits = dr7_bits(kind, len, n);
                    assert_eq!(bits & !dr7_fields(n), 0, "slot {n} {kind:?} {len}");
                }
            }
            assert_eq!(all & dr7_fields(n), 0, "slot {n} overlaps another");
            all |= dr7_fields(n);
        }
        // LE, GE, RTM, GD and bits 32-63 are not any slot's.
        assert_eq!(all, 0xFFFF_00FF);
    }

    #[test]
    fn the_kernels_slots_are_those_its_dr7_enables_locally_or_globally() {
        assert_eq!(enabled_slots(0), 0);
        assert_eq!(enabled_slots(0x400), 0, "bit 10 is reserved, not a slot");
        assert_eq!(enabled_slots(0b01), 0b0001, "L0");
        assert_eq!(enabled_slots(0b1000_0100), 0b1010, "L1 and G3");
        assert_eq!(
            enabled_slots(0x000F_0000),
            0,
            "kind and length without an enable"
        );
    }

    #[test]
    fn a_watchpoint_never_takes_a_slot_the_kernel_uses() {
        let mut s = Slots::new(0b0101);
        assert!(s.add(watch(0x1000, 8)));
        assert!(s.add(watch(0x2000, 8)));
        assert_eq!(s.armed(), 0b1010);
        assert!(!s.add(watch(0x3000, 8)), "slots 0 and 2 are the kernel's");
        assert_eq!(s.armed(), 0b1010);
        assert_eq!(s.touched, 0b1010);
    }

    #[test]
    fn asking_twice_for_the_same_breakpoint_uses_one_slot() {
        let mut s = Slots::new(0);
        assert!(s.add(HwSlot::breakpoint(0xffff_ffff_8100_0000)));
        assert!(s.add(HwSlot::breakpoint(0xffff_ffff_8100_0000)));
        assert_eq!(s.armed(), 0b0001);
        assert!(
            s.add(watch(0xffff_ffff_8100_0000, 1)),
            "a watch on the same address is another slot"
        );
        assert_eq!(s.armed(), 0b0011);
    }

    #[test]
    fn a_fifth_slot_is_refused_and_a_removal_frees_one() {
        let mut s = Slots::new(0);
        for n in 0..4 {
            assert!(s.add(watch(0x1000 * (n + 1), 4)));
        }
        assert_eq!(s.free(), 0);
        assert!(!s.add(HwSlot::breakpoint(0x9000)));
        assert!(s.remove(0x2000, HwKind::Write));
        assert!(
            !s.remove(0x2000, HwKind::Write),
            "a slot is removed only once"
        );
        assert!(!s.remove(0x3000, HwKind::Exec), "the kind must match");
        assert_eq!(s.free(), 0b0010);
        assert!(s.add(HwSlot::breakpoint(0x9000)));
        assert_eq!(s.hw[1].map(|h| h.addr), Some(0x9000));
    }

    #[test]
    fn a_slot_gdb_used_stays_touched_after_it_is_removed_or_cleared() {
        let mut s = Slots::new(0b1000);
        assert!(s.add(HwSlot::breakpoint(0x1000)));
        assert!(s.add(watch(0x2000, 2)));
        assert!(s.remove(0x1000, HwKind::Exec));
        assert_eq!(s.touched, 0b0011);
        s.clear();
        assert_eq!(s.armed(), 0);
        assert_eq!(s.touched, 0b0011, "their kernel values go back at detach");
        assert_eq!(s.free(), 0b0111);
    }

    #[test]
    fn a_watchpoint_on_unaligned_or_odd_length_memory_is_refused() {
        for (addr, len) in [
            (0x1001, 2),
            (0x1002, 4),
            (0x1004, 8),
            (0x1000, 3),
            (0x1000, 16),
        ] {
            assert!(
                HwSlot::watchpoint(addr, len, WatchKind::Write).is_none(),
                "{addr:#x} {len}"
            );
        }
        assert!(HwSlot::watchpoint(0x1000, 0, WatchKind::Write).is_none());
        for (addr, len) in [(0x1001, 1), (0x1002, 2), (0x1004, 4), (0x1008, 8)] {
            assert!(HwSlot::watchpoint(addr, len, WatchKind::Write).is_some());
        }
    }
}
