//! What gdb asks of the target, answered from the parked CPUs: registers from each CPU's VMCB,
//! its saved general registers and what it captured when it parked; memory through that CPU's
//! page tables (the hv's identity map reaches guest-physical memory); INT3 patching; the
//! DR0-3 slots the kernel does not use; `monitor` commands.

use super::regs::{gpr, sys, X86Regs, X86_64Sys};
use crate::arch::parts;
use crate::cpu_state::CpuState;
use crate::paging;
use crate::rendezvous::Release;
use crate::vcpu::Parked;
use crate::vmm::{self, Hv, COUNTERS};
use core::fmt::Write;
use core::num::NonZeroUsize;
use core::sync::atomic::Ordering::*;
use gdbstub::common::{Signal, Tid};
use gdbstub::outputln;
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps,
    SwBreakpoint, SwBreakpointOps, WatchKind,
};
use gdbstub::target::ext::monitor_cmd::{ConsoleOutput, MonitorCmd, MonitorCmdOps};
use gdbstub::target::ext::section_offsets::{Offsets, SectionOffsets, SectionOffsetsOps};
use gdbstub::target::ext::thread_extra_info::{ThreadExtraInfo, ThreadExtraInfoOps};
use gdbstub::target::{Target, TargetError, TargetResult};

/// Most software breakpoints at once.
pub const MAX_SW: usize = 64;

/// What detach does with the hv.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Devirt {
    /// Every CPU leaves guest mode: the kernel runs on bare metal again (the default).
    Deactivate,
    /// The hv stays active (no debug intercepts) until the agent deactivates it.
    Stay,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HwKind {
    Exec,
    Write,
    ReadWrite,
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

/// The DR7 access kind for a gdb watchpoint: x86 has no read-only data breakpoint, so reads
/// and writes both fire for `rwatch`.
fn hw_kind(kind: WatchKind) -> HwKind {
    match kind {
        WatchKind::Write => HwKind::Write,
        WatchKind::Read | WatchKind::ReadWrite => HwKind::ReadWrite,
    }
}

impl HwSlot {
    /// The DR7 bits that arm this slot as `n`: G`n`, R/W`n`, LEN`n` (APM vol. 2, 13.1.1.5).
    pub fn dr7_bits(&self, n: usize) -> u64 {
        let rw = match self.kind {
            HwKind::Exec => 0b00,
            HwKind::Write => 0b01,
            HwKind::ReadWrite => 0b11,
        };
        let len = match self.len {
            2 => 0b01,
            4 => 0b11,
            8 => 0b10,
            _ => 0b00,
        };
        (1 << (2 * n + 1)) | (rw << (16 + 4 * n)) | (len << (18 + 4 * n))
    }
}

/// All DR7 bits that belong to slot `n`.
pub fn dr7_fields(n: usize) -> u64 {
    (0b11 << (2 * n)) | (0b1111 << (16 + 4 * n))
}

/// The target state of a session.
pub struct Debugger {
    hv: &'static Hv,
    /// The leader's access to the parked CPUs, lent by `session::lead` while it serves gdb
    /// (and taken back before the CPUs are released).
    pub parked: Option<Parked>,
    sw: [Option<(u64, u8)>; MAX_SW],
    pub hw: [Option<HwSlot>; 4],
    /// Slots the kernel had enabled when the session began (never touched).
    pub kernel_slots: u8,
    /// Slots gdb used in this session (given back to the kernel's values at detach).
    pub touched: u8,
    scheduler_lock: bool,
    pub policy: Devirt,
    pub killed: bool,
}

fn cpu_index(tid: Tid) -> u32 {
    tid.get() as u32 - 1
}

impl Debugger {
    /// A new session's target, with every parked CPU's debug state reset: the kernel's DR0-3
    /// are recorded (put back at detach), its enabled slots left alone.
    pub fn new(hv: &'static Hv, mut p: Parked) -> Debugger {
        let mut kernel_slots = 0u8;
        for i in 0..hv.cpus {
            let Some(st) = p.get(i) else { continue };
            st.dbg.kernel_dr = st.state.dr;
            st.dbg.reason = super::Reason::None;
            for n in 0..4 {
                if st.state.dr7 & (0b11 << (2 * n)) != 0 {
                    kernel_slots |= 1 << n;
                }
            }
        }
        Debugger {
            hv,
            parked: Some(p),
            sw: [None; MAX_SW],
            hw: [None; 4],
            kernel_slots,
            touched: 0,
            scheduler_lock: false,
            policy: Devirt::Deactivate,
            killed: false,
        }
    }

    /// Number of CPUs gdb sees (the parked ones).
    pub fn threads(&self) -> u32 {
        self.parked.as_ref().map_or(0, |p| p.parked().count() as u32)
    }

    /// The CPU of `tid`, if it is parked.
    fn parked_cpu(&self, tid: Tid) -> Option<u32> {
        let i = cpu_index(tid);
        self.parked.as_ref()?.is_parked(i).then_some(i)
    }

    /// The CR3 memory accesses go through: the thread's CPU's, or the first parked one's.
    fn cr3(&self, tid: Option<Tid>) -> Option<u64> {
        let p = self.parked.as_ref()?;
        let i = tid
            .and_then(|t| self.parked_cpu(t))
            .or_else(|| p.parked().next())?;
        Some(p.peek(i)?.state.cr3)
    }

    /// Tells every parked CPU gdb's resume action (`Stay` keeps it parked).
    fn set_action(&mut self, i: u32, r: Release, step: bool) {
        if let Some(p) = self.parked.as_mut() {
            p.set_release(i, r);
            if let Some(st) = p.get(i) {
                st.dbg.step = step;
            }
        }
    }

    pub fn sw_breakpoint_at(&self, addr: u64) -> bool {
        self.sw.iter().flatten().any(|&(a, _)| a == addr)
    }

    pub fn armed_slots(&self) -> u8 {
        (0..4)
            .filter(|&n| self.hw[n].is_some())
            .fold(0, |m, n| m | 1 << n)
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
        self.hw = [None; 4];
        if left > 0 {
            COUNTERS.breakpoints_left.fetch_add(left as u64, Relaxed);
        }
        left
    }
}

/// The guest-physical address of `va` through `cr3`, refusing the hv's own memory.
fn translate(hv: &Hv, cr3: u64, va: u64) -> Option<u64> {
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
fn write_virt(hv: &Hv, cr3: u64, va: u64, data: &[u8]) -> bool {
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
fn patch(hv: &Hv, cr3: u64, va: u64, expect: u8, new: u8) -> Option<u8> {
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

fn canonical(a: u64) -> bool {
    let top = a >> 47;
    top == 0 || top == 0x1_FFFF
}

/// gdb's view of a CPU's state (the `g` packet).
pub fn registers_from_state(st: &CpuState, r: &mut X86Regs) {
    let g = &st.gprs;
    r.gpr = [
        st.rax, g.rbx, g.rcx, g.rdx, g.rsi, g.rdi, g.rbp, st.rsp, g.r8, g.r9, g.r10, g.r11,
        g.r12, g.r13, g.r14, g.r15,
    ];
    r.rip = st.rip;
    r.eflags = st.rflags as u32;
    r.seg = [st.cs, st.ss, st.ds, st.es, st.fs, st.gs].map(|s| s.selector as u32);
    let fx = st.xsave.legacy();
    for (n, reg) in r.st.iter_mut().enumerate() {
        reg.copy_from_slice(&fx[32 + 16 * n..42 + 16 * n]);
    }
    let w16 = |o: usize| u16::from_le_bytes([fx[o], fx[o + 1]]) as u32;
    let w32 = |o: usize| u32::from_le_bytes([fx[o], fx[o + 1], fx[o + 2], fx[o + 3]]);
    // FXSAVE keeps an abridged tag (1 bit per register, 1 = valid); gdb wants the full one
    // (2 bits, 11 = empty). Valid registers are reported as valid (00).
    let abridged = fx[4];
    let ftag = (0..8).fold(0u32, |t, n| {
        t | if abridged & (1 << n) == 0 {
            3 << (2 * n)
        } else {
            0
        }
    });
    r.fpu = [
        w16(0),
        w16(2),
        ftag,
        w16(12),
        w32(8),
        w16(20),
        w32(16),
        w16(6) & 0x7FF,
    ];
    for (n, x) in r.xmm.iter_mut().enumerate() {
        let o = 160 + 16 * n;
        *x = u128::from_le_bytes(fx[o..o + 16].try_into().unwrap_or([0; 16]));
    }
    r.mxcsr = w32(24);
    r.fs_base = st.fs.base;
    r.gs_base = st.gs.base;
    r.sys = [
        st.msrs.kernel_gs_base,
        st.cr0,
        st.cr2,
        st.cr3,
        st.cr4,
        st.cr8,
        st.msrs.efer,
    ];
}

/// gdb's `G` packet into a CPU's state: which parts changed (`arch::parts`), or `None` for
/// a value the CPU would refuse (a non-canonical RIP or base). Selectors, CR0/CR3/CR4 and EFER
/// are shown, not written: changing them under a running kernel is not a debugger's job. CR2
/// is harmless.
pub fn registers_into_state(r: &X86Regs, st: &mut CpuState) -> Option<u8> {
    let bases = [r.fs_base, r.gs_base, r.sys[sys::K_GS_BASE]];
    if !canonical(r.rip) || !bases.iter().all(|&b| canonical(b)) {
        return None;
    }
    let v = &r.gpr;
    // What a `G` may change besides the FPU (compared after, without copying the XSAVE area).
    let regs = |st: &CpuState| {
        (
            st.rax,
            st.rsp,
            st.gprs,
            st.rip,
            st.rflags,
            st.cr2,
            [st.fs.base, st.gs.base, st.msrs.kernel_gs_base],
        )
    };
    let before = regs(st);
    st.rax = v[gpr::RAX];
    st.rsp = v[gpr::RSP];
    let g = &mut st.gprs;
    [g.rbx, g.rcx, g.rdx, g.rsi, g.rdi, g.rbp] = [
        v[gpr::RBX],
        v[gpr::RCX],
        v[gpr::RDX],
        v[gpr::RSI],
        v[gpr::RDI],
        v[gpr::RBP],
    ];
    [g.r8, g.r9, g.r10, g.r11, g.r12, g.r13, g.r14, g.r15] =
        [v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]];
    st.rip = r.rip;
    // Reserved bit 1 stays set; VM and VIF/VIP cannot be chosen in long mode.
    st.rflags = (r.eflags as u64 & 0x3F_7FD5) | 2;
    st.cr2 = r.sys[sys::CR2];
    [st.fs.base, st.gs.base, st.msrs.kernel_gs_base] = bases;
    let mut fx = st.xsave.legacy();
    let old_fx = fx;
    for (n, reg) in r.st.iter().enumerate() {
        fx[32 + 16 * n..42 + 16 * n].copy_from_slice(reg);
    }
    fx[0..2].copy_from_slice(&(r.fpu[0] as u16).to_le_bytes());
    fx[2..4].copy_from_slice(&(r.fpu[1] as u16).to_le_bytes());
    for (n, x) in r.xmm.iter().enumerate() {
        fx[160 + 16 * n..176 + 16 * n].copy_from_slice(&x.to_le_bytes());
    }
    // Reserved MXCSR bits make XRSTOR fault: keep the architectural ones only.
    fx[24..28].copy_from_slice(&(r.mxcsr & 0xFFFF).to_le_bytes());
    let mut changed = 0;
    if fx != old_fx {
        st.xsave.set_legacy(&fx);
        changed |= parts::XSAVE;
    }
    if regs(st) != before {
        changed |= parts::REGS;
    }
    Some(changed)
}

impl Target for Debugger {
    type Arch = X86_64Sys;
    type Error = &'static str;

    fn base_ops(&mut self) -> BaseOps<'_, X86_64Sys, &'static str> {
        BaseOps::MultiThread(self)
    }
    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }
    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }
    fn support_section_offsets(&mut self) -> Option<SectionOffsetsOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadBase for Debugger {
    fn read_registers(&mut self, r: &mut X86Regs, tid: Tid) -> TargetResult<(), Self> {
        let i = self.parked_cpu(tid).ok_or(TargetError::NonFatal)?;
        let st = self
            .parked
            .as_ref()
            .and_then(|p| p.peek(i))
            .ok_or(TargetError::NonFatal)?;
        registers_from_state(&st.state, r);
        Ok(())
    }

    fn write_registers(&mut self, r: &X86Regs, tid: Tid) -> TargetResult<(), Self> {
        let i = self.parked_cpu(tid).ok_or(TargetError::NonFatal)?;
        let st = self
            .parked
            .as_mut()
            .and_then(|p| p.get(i))
            .ok_or(TargetError::NonFatal)?;
        let changed = registers_into_state(r, &mut st.state).ok_or(TargetError::NonFatal)?;
        st.dirty |= changed;
        Ok(())
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        let cr3 = self.cr3(Some(tid)).ok_or(TargetError::NonFatal)?;
        match read_virt(self.hv, cr3, start, data) {
            0 if !data.is_empty() => Err(TargetError::Errno(14)),
            n => Ok(n),
        }
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        let cr3 = self.cr3(Some(tid)).ok_or(TargetError::NonFatal)?;
        if write_virt(self.hv, cr3, start, data) {
            Ok(())
        } else {
            Err(TargetError::Errno(14))
        }
    }

    fn list_active_threads(&mut self, active: &mut dyn FnMut(Tid)) -> Result<(), &'static str> {
        for i in self.parked.iter().flat_map(|p| p.parked()) {
            if let Some(t) = NonZeroUsize::new(i as usize + 1) {
                active(t);
            }
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }

    fn support_thread_extra_info(&mut self) -> Option<ThreadExtraInfoOps<'_, Self>> {
        Some(self)
    }
}

impl ThreadExtraInfo for Debugger {
    fn thread_extra_info(&self, tid: Tid, buf: &mut [u8]) -> Result<usize, &'static str> {
        let mut w = Buf { buf, len: 0 };
        let _ = write!(w, "CPU {}", cpu_index(tid));
        Ok(w.len)
    }
}

/// A `fmt::Write` into a byte slice (cut at its end).
struct Buf<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Write for Buf<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl MultiThreadResume for Debugger {
    fn resume(&mut self) -> Result<(), &'static str> {
        if self.scheduler_lock {
            return Ok(());
        }
        // gdb's "the rest continue": every CPU it said nothing about.
        for i in 0..self.hv.cpus {
            let stays = self
                .parked
                .as_ref()
                .is_some_and(|p| p.is_parked(i) && p.release_of(i) == Release::Stay);
            if stays {
                self.set_action(i, Release::Run, false);
            }
        }
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), &'static str> {
        self.scheduler_lock = false;
        for i in 0..self.hv.cpus {
            self.set_action(i, Release::Stay, false);
        }
        Ok(())
    }

    fn set_resume_action_continue(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), &'static str> {
        let i = self.parked_cpu(tid).ok_or("no such CPU")?;
        self.set_action(i, Release::Run, false);
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadSingleStep for Debugger {
    fn set_resume_action_step(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), &'static str> {
        let i = self.parked_cpu(tid).ok_or("no such CPU")?;
        self.set_action(i, Release::Run, true);
        Ok(())
    }
}

impl MultiThreadSchedulerLocking for Debugger {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), &'static str> {
        self.scheduler_lock = true;
        Ok(())
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

impl Debugger {
    fn add_slot(&mut self, slot: HwSlot) -> bool {
        if self
            .hw
            .iter()
            .flatten()
            .any(|h| h.addr == slot.addr && h.kind == slot.kind)
        {
            return true;
        }
        match (0..4).find(|&n| self.kernel_slots & (1 << n) == 0 && self.hw[n].is_none()) {
            Some(n) => {
                self.hw[n] = Some(slot);
                self.touched |= 1 << n;
                true
            }
            None => false,
        }
    }

    fn remove_slot(&mut self, addr: u64, kind: HwKind) -> bool {
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
}

impl HwBreakpoint for Debugger {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.add_slot(HwSlot {
            addr,
            len: 1,
            kind: HwKind::Exec,
            watch: WatchKind::ReadWrite,
        }))
    }
    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.remove_slot(addr, HwKind::Exec))
    }
}

impl HwWatchpoint for Debugger {
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        // A slot watches 1, 2, 4 or 8 aligned bytes (APM vol. 2, 13.1.1.5).
        if !matches!(len, 1 | 2 | 4 | 8) || !addr.is_multiple_of(len) {
            return Ok(false);
        }
        Ok(self.add_slot(HwSlot {
            addr,
            len,
            kind: hw_kind(kind),
            watch: kind,
        }))
    }
    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        _len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        Ok(self.remove_slot(addr, hw_kind(kind)))
    }
}

impl SectionOffsets for Debugger {
    /// The KASLR offset for gdb: the runtime address of the kernel's first segment (`_text`),
    /// so that `gdb vmlinux` needs no manual relocation.
    fn get_section_offsets(&mut self) -> Result<Offsets<u64>, &'static str> {
        Ok(match self.hv.kernel_text {
            0 => Offsets::Sections {
                text: 0,
                data: 0,
                bss: None,
            },
            text => Offsets::Segments {
                text_seg: text,
                data_seg: None,
            },
        })
    }
}

const HELP: &str = "Quicksilver monitor commands:
  status               the hv, the CPUs, the session
  stats                exits and refusals per CPU
  kaslr                the kernel's KASLR offset and the gdb command that uses it
  cpus                 each CPU: APIC ID, where it stopped, why
  devirt [deactivate|stay]  what detach does: leave guest mode (default) or keep the hv active
  phys ADDR [LEN]      read guest-physical memory (hex, up to 256 bytes)
  help                 this list";

impl MonitorCmd for Debugger {
    fn handle_monitor_cmd(
        &mut self,
        cmd: &[u8],
        mut out: ConsoleOutput<'_>,
    ) -> Result<(), &'static str> {
        let cmd = core::str::from_utf8(cmd).unwrap_or("");
        let mut words = cmd.split_whitespace();
        let hv = self.hv;
        match words.next().unwrap_or("help") {
            "help" => outputln!(out, "{}", HELP),
            "status" => {
                outputln!(
                    out,
                    "hv active on {} of {} CPUs; {} stopped for gdb",
                    COUNTERS.active_cpus.load(Relaxed),
                    hv.cpus,
                    self.threads()
                );
                outputln!(
                    out,
                    "breakpoints: {} software, {} of {} hardware slots (the kernel uses {})",
                    self.sw.iter().flatten().count(),
                    self.armed_slots().count_ones(),
                    4 - self.kernel_slots.count_ones(),
                    self.kernel_slots.count_ones()
                );
                outputln!(
                    out,
                    "on detach: {}",
                    match self.policy {
                        Devirt::Deactivate => "every CPU leaves guest mode (devirt deactivate)",
                        Devirt::Stay => "the hv stays active (devirt stay)",
                    }
                );
                outputln!(out, "hv code intact: {}", hv.code_intact());
                let us = crate::vcpu::STOP.last_gather_ticks() * 1000 / (hv.tsc_khz as u64).max(1);
                outputln!(out, "last stop gathered every CPU in {us} us");
            }
            "stats" => {
                outputln!(
                    out,
                    "activations {}, deactivations {}, unexpected exits {}, hv memory refusals {}",
                    COUNTERS.activations.load(Relaxed),
                    COUNTERS.deactivations.load(Relaxed),
                    COUNTERS.unexpected.load(Relaxed),
                    COUNTERS.hv_refusals.load(Relaxed)
                );
                for i in 0..hv.cpus {
                    let Some(s) = hv.cpu(i).map(|c| c.shared.stats()) else {
                        continue;
                    };
                    if s.seen == 0 {
                        continue;
                    }
                    let e = &s.exits;
                    outputln!(
                        out,
                        "cpu {i}: cpuid {} msr {} vmmcall {} npf {} debug {} other {}",
                        e[0],
                        e[1],
                        e[2],
                        e[5],
                        e[8],
                        e[7]
                    );
                }
            }
            "kaslr" => match hv.kernel_text {
                0 => outputln!(
                    out,
                    "the agent could not find the kernel's text (no kprobes?): KASLR offset unknown; \
                     read _text from /proc/kallsyms on the machine and use symbol-file vmlinux -o <_text - {:#x}>",
                    hv.kernel_text_link
                ),
                text => {
                    let off = text.wrapping_sub(hv.kernel_text_link);
                    outputln!(
                        out,
                        "KASLR offset {off:#x}: _text at {text:#x}, linked at {:#x}",
                        hv.kernel_text_link
                    );
                    outputln!(
                        out,
                        "gdb already relocated vmlinux from qOffsets; by hand: symbol-file vmlinux -o {off:#x}"
                    );
                }
            },
            "cpus" => {
                for i in 0..hv.cpus {
                    let Some(c) = hv.cpu(i).filter(|c| c.shared.is_active()) else {
                        continue;
                    };
                    let apic = c.shared.apic_id();
                    match self.parked.as_ref().and_then(|p| p.peek(i)) {
                        Some(st) => {
                            let s = &st.state;
                            outputln!(
                                out,
                                "cpu {i} (thread {}): apic {apic} stopped rip {:#x} cpl {} cr3 {:#x} dr7 {:#x} dr0-3 {:x?}",
                                i + 1,
                                s.rip,
                                s.cpl,
                                s.cr3,
                                s.dr7,
                                s.dr
                            );
                        }
                        None => outputln!(out, "cpu {i}: apic {apic} running"),
                    }
                }
            }
            "devirt" => {
                match words.next() {
                    Some("deactivate") => self.policy = Devirt::Deactivate,
                    Some("stay") => self.policy = Devirt::Stay,
                    Some(other) => {
                        outputln!(out, "unknown policy {other:?}: use devirt deactivate or devirt stay");
                        return Ok(());
                    }
                    None => {}
                }
                outputln!(
                    out,
                    "devirt policy: {}",
                    match self.policy {
                        Devirt::Deactivate => "deactivate (detach leaves guest mode on every CPU)",
                        Devirt::Stay => "stay (detach keeps the hv active; qsctl deactivate ends it)",
                    }
                );
            }
            "phys" => {
                let num = |w: Option<&str>| {
                    w.and_then(|w| {
                        let w = w.trim_start_matches("0x");
                        u64::from_str_radix(w, 16).ok()
                    })
                };
                let Some(addr) = num(words.next()) else {
                    outputln!(out, "usage: monitor phys ADDR [LEN] (hex)");
                    return Ok(());
                };
                let len = num(words.next()).unwrap_or(16).min(256) as usize;
                let mut buf = [0u8; 256];
                let end = addr.checked_add(len as u64);
                if end.is_none_or(|e| hv.owns(addr) || hv.owns(e - 1))
                    || !vmm::read_guest_phys(hv, addr, &mut buf[..len])
                {
                    outputln!(out, "cannot read {len} bytes at physical {addr:#x}: outside RAM the hv maps, or the hv's own memory");
                    return Ok(());
                }
                for (row, chunk) in buf[..len].chunks(16).enumerate() {
                    let mut line = Buf { buf: &mut [0u8; 80], len: 0 };
                    let _ = write!(line, "{:#012x}:", addr + 16 * row as u64);
                    for b in chunk {
                        let _ = write!(line, " {b:02x}");
                    }
                    let n = line.len;
                    outputln!(out, "{}", core::str::from_utf8(&line.buf[..n]).unwrap_or(""));
                }
            }
            other => outputln!(out, "unknown command {other:?}: monitor help lists the commands"),
        }
        Ok(())
    }
}
