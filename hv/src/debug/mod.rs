//! The debugger: a gdbstub (the `gdbstub` crate's state machine) inside the hv, fed by the
//! serial link, serving the live kernel with one GDB thread per CPU.
//!
//! - [`stop`]: stopping every CPU (NMI) and parking them in host mode; resuming them.
//! - [`session`]: the gdb session: the stub, driven by the link while CPUs are parked (the
//!   leader polls the UART) and by the agent's link hypercalls while they run (Ctrl-C).
//! - [`target`]: what gdb asks of the target: registers, memory, breakpoints, monitor.
//! - [`regs`]: the register file and its target description.
//!
//! Exits the debugger handles (see [`handle_exit`]): NMI (ours: park; foreign: reflect),
//! INTn/#BP (ours: a breakpoint stop; the kernel's own INT3s, kprobes, static calls, text
//! poking: reflected), #DB (our step or hardware slot: a stop; the kernel's: reflected).

pub mod regs;
pub mod session;
pub mod stop;
pub mod target;

use crate::arch::instr;
use crate::arch::svm::{
    self,
    vmcb::{self, event, Vmcb},
};
use crate::exit::VmExit;
use crate::vcpu::Cpu;
use crate::vmm::Hv;
use core::sync::atomic::{AtomicBool, Ordering::*};
pub use stop::Resume;

/// Why a CPU stopped.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Reason {
    /// Stopped by an NMI from the leader, or parked at activation: nothing to report.
    #[default]
    None,
    /// gdb attached (the attention request).
    Attach,
    /// gdb's Ctrl-C arrived on this CPU.
    Interrupt,
    SwBreak,
    HwBreak,
    Watch {
        slot: u8,
    },
    /// A single step finished.
    Step,
}

/// One CPU's debugger state (in its `CpuState`): what it saved when it parked, what the
/// leader tells it to do next.
#[repr(C, align(16))]
pub struct PerCpu {
    /// FXSAVE image of the guest's x87/SSE state (host mode never touches it).
    pub fx: [u8; 512],
    pub parked: AtomicBool,
    pub go: AtomicBool,
    /// The leader sent this CPU an NMI that is not consumed yet.
    pub nmi_expected: AtomicBool,
    /// Parked and about to halt (or halted): `go` needs an NMI to be seen; the releaser sent
    /// that NMI and it is not taken yet (see stop::wait_for_go).
    pub asleep: AtomicBool,
    pub wake_sent: AtomicBool,
    pub apic_id: u32,
    pub reason: Reason,
    pub action: Resume,
    /// Registers VMRUN does not switch, read on this CPU when it parks.
    pub fs: u16,
    pub gs: u16,
    pub fs_base: u64,
    pub gs_base: u64,
    pub kernel_gs_base: u64,
    pub cr8: u64,
    pub dr: [u64; 4],
    /// DR0-3 as the kernel had them when the session began (put back at detach).
    pub kernel_dr: [u64; 4],
    /// gdb wrote the FXSAVE image / the base registers: put them back before running.
    pub fx_dirty: bool,
    pub bases_dirty: bool,
    /// Single-stepping: the hv set TF (and held interrupts) for this step.
    pub stepping: bool,
    pub tf_was_set: bool,
    /// A DR slot lent to this step (0-3), or NO_SLOT: see `step_target`.
    pub step_slot: u8,
    /// The last stop was an instruction breakpoint: resume with RF so it does not hit again.
    pub resume_rf: bool,
}

impl PerCpu {
    /// Saves what VMRUN leaves in the CPU (on this CPU, host mode).
    fn capture(&mut self) {
        // SAFETY: `fx` is 512 bytes and 16-byte aligned (repr align 16, at offset 0); Linux
        // runs with CR0.TS clear (eager FPU), and host mode has the guest's CR0.
        unsafe { instr::fxsave(&mut self.fx) };
        // SAFETY: these MSRs exist on every x86-64 CPU.
        unsafe {
            self.fs_base = instr::rdmsr(instr::msr::FS_BASE);
            self.gs_base = instr::rdmsr(instr::msr::GS_BASE);
            self.kernel_gs_base = instr::rdmsr(instr::msr::KERNEL_GS_BASE);
        }
        self.fs = instr::read_fs();
        self.gs = instr::read_gs();
        self.cr8 = instr::read_cr8();
        for (n, d) in self.dr.iter_mut().enumerate() {
            *d = instr::read_dr(n as u8);
        }
        self.fx_dirty = false;
        self.bases_dirty = false;
    }

    /// Puts back what gdb changed (on this CPU, host mode).
    fn restore(&mut self) {
        if self.fx_dirty {
            // SAFETY: an image FXSAVE made; gdb's writes keep MXCSR's reserved bits clear
            // (target::write_registers masks them).
            unsafe { instr::fxrstor(&self.fx) };
        }
        if self.bases_dirty {
            // SAFETY: canonical addresses (target::write_registers refuses others).
            unsafe {
                instr::wrmsr(instr::msr::FS_BASE, self.fs_base);
                instr::wrmsr(instr::msr::GS_BASE, self.gs_base);
                instr::wrmsr(instr::msr::KERNEL_GS_BASE, self.kernel_gs_base);
            }
        }
    }
}

/// Readies this CPU's debug state at activation (on the CPU itself): records its local APIC
/// ID, which the leader's NMIs need (CPUID leaf 0xB has the full x2APIC ID; leaf 1 the 8-bit
/// one).
pub fn prepare_cpu(dbg: &mut PerCpu) {
    dbg.step_slot = NO_SLOT;
    let max = instr::cpuid(0, 0)[0];
    dbg.apic_id = if max >= 0xB && instr::cpuid(0xB, 0)[1] != 0 {
        instr::cpuid(0xB, 0)[3]
    } else {
        instr::cpuid(1, 0)[1] >> 24
    };
}

/// What the run loop does after the debugger handled an exit.
pub enum After {
    /// Run the guest (events to inject are already in the VMCB).
    Run,
    /// Leave guest mode on this CPU (detach with the deactivate policy).
    Leave,
    /// Not the debugger's: apply the unexpected-exit policy.
    Unexpected,
}

/// Handles an exit the debugger owns on this CPU.
///
/// # Safety
/// `cpu` is this CPU's own area, in host mode after its exit; the caller holds no reference.
pub unsafe fn handle_exit(hv: &Hv, cpu: *mut Cpu, exit: VmExit) -> After {
    // SAFETY: our own area (caller).
    let c = unsafe { &mut *cpu };
    match exit {
        VmExit::Nmi => {
            // The NMI stays pending until GIF is set: take it into the hv's own handler.
            // SAFETY: host mode with RFLAGS.IF = 0: only the NMI can arrive, and the hv's IDT
            // sends it to its handler, which returns.
            unsafe { svm::qs_take_nmi() };
            if c.state.dbg.nmi_expected.swap(false, AcqRel) {
                if stop::stopping() {
                    // SAFETY: forwarded.
                    return unsafe { park(hv, cpu, Reason::None) };
                }
                return straggler(hv, c);
            }
            c.vmcb.control.event_inj = event::VALID | event::TYPE_NMI | event::VECTOR_NMI;
            After::Run
        }
        VmExit::SoftwareInterrupt | VmExit::Breakpoint => {
            // SAFETY: forwarded.
            unsafe { software_interrupt(hv, cpu, exit == VmExit::Breakpoint) }
        }
        VmExit::DebugException { dr6 } => {
            // SAFETY: forwarded.
            unsafe { debug_exception(hv, cpu, dr6) }
        }
        _ => After::Unexpected,
    }
}

/// INT3 / INT n. Ours (a gdb breakpoint at RIP): stop. Anyone else's: deliver it to the
/// guest as the instruction would have (RIP past it, the event injected).
///
/// # Safety
/// As [`handle_exit`].
unsafe fn software_interrupt(hv: &Hv, cpu: *mut Cpu, hw_bp: bool) -> After {
    // SAFETY: our own area (caller).
    let c = unsafe { &mut *cpu };
    let mut bytes = [0u8; 15];
    let s = &mut c.vmcb.save;
    if hw_bp && !target::is_int3(hv, s.cr3, s.rip) && target::is_int3(hv, s.cr3, s.rip - 1) {
        // Hardware reports #BP as a trap: RIP after the INT3. Point at it, as TCG does.
        s.rip -= 1;
    }
    if !crate::vmm::read_guest_insn(hv, s.cr3, s.rip, &mut bytes) {
        return After::Unexpected;
    }
    if bytes[0] == 0xCC && session::owns_breakpoint(s.rip) {
        // SAFETY: forwarded.
        return unsafe { park(hv, cpu, Reason::SwBreak) };
    }
    let (len, inj) = match bytes {
        // The INT3 was removed while this CPU was on its way here (text poking): run what
        // is there now, as the kernel's own INT3 handler would.
        [b, ..] if b != 0xCC && b != 0xCD && b != 0xCE && b != 0xF1 => return After::Run,
        [0xCC, ..] => (1, event::VALID | event::TYPE_EXCEPTION | event::VECTOR_BP),
        [0xCD, n, ..] => (2, event::VALID | event::TYPE_SOFTWARE_INT | n as u64),
        [0xCE, ..] => (1, event::VALID | event::TYPE_SOFTWARE_INT | 4),
        _ => (1, event::VALID | event::TYPE_EXCEPTION | event::VECTOR_DB),
    };
    s.rip += len;
    c.vmcb.control.event_inj = inj;
    c.vmcb.control.interrupt_shadow &= !1;
    After::Run
}

/// #DB: our single step or one of our hardware slots: stop. Otherwise the kernel's own
/// (its hw_breakpoint users, a user-space single step): reflect it with DR6 as it is.
///
/// # Safety
/// As [`handle_exit`].
unsafe fn debug_exception(hv: &Hv, cpu: *mut Cpu, dr6: u64) -> After {
    // SAFETY: our own area (caller).
    let c = unsafe { &mut *cpu };
    const BS: u64 = 1 << 14;
    let ours = session::our_slots() as u64 & dr6 & 0xF;
    let d = &c.state.dbg;
    let step_bit = if d.step_slot < 4 {
        1u64 << d.step_slot
    } else {
        0
    };
    let ours = ours & !step_bit;
    let stepped = d.stepping && dr6 & (BS | step_bit) != 0;
    if stepped {
        end_step(c);
    }
    if ours == 0 && !stepped {
        let kernel = session::KERNEL_SLOTS.load(Acquire) as u64;
        if dr6 & 0xF & !kernel != 0 {
            // A slot gdb armed on this CPU in a session that is over (this CPU missed the
            // stop that ended it): not the kernel's to see. Disarm it and run on.
            c.vmcb.save.dr6 &= !(dr6 & 0xF & !kernel);
            c.vmcb.save.rflags |= 1 << 16;
            return straggler(hv, c);
        }
        c.vmcb.control.event_inj = event::VALID | event::TYPE_EXCEPTION | event::VECTOR_DB;
        return After::Run;
    }
    c.vmcb.save.dr6 &= !(ours | if stepped { BS | step_bit } else { 0 });
    let reason = if ours != 0 {
        let slot = ours.trailing_zeros() as u8;
        if session::slot_is_exec(slot) {
            Reason::HwBreak
        } else {
            Reason::Watch { slot }
        }
    } else {
        Reason::Step
    };
    // SAFETY: forwarded.
    unsafe { park(hv, cpu, reason) }
}

/// A CPU that missed the stop that ended a session: it gets what the others got (its debug
/// registers back, no debug intercepts) and, if they left guest mode, leaves too.
fn straggler(hv: &Hv, c: &mut Cpu) -> After {
    if session::attached() {
        return After::Run;
    }
    let action = if session::LEAVE_AFTER_DETACH.load(Acquire) {
        Resume::Leave
    } else {
        Resume::Continue
    };
    resume(hv, c, action)
}

/// No DR slot lent to a step.
pub const NO_SLOT: u8 = 0xFF;

/// Undoes what a step set up: TF (unless the guest had it), held interrupts, a lent slot.
pub fn end_step(c: &mut Cpu) {
    let d = &mut c.state.dbg;
    if d.stepping {
        d.stepping = false;
        if !d.tf_was_set {
            c.vmcb.save.rflags &= !(1 << 8);
        }
        c.vmcb.control.vintr &= !vmcb::V_INTR_MASKING;
    }
    if d.step_slot < 4 {
        c.vmcb.save.dr7 &= !target::dr7_fields(d.step_slot as usize);
        // SAFETY: the slot was lent to the step (free of the kernel's and gdb's use).
        unsafe { instr::write_dr(7, c.vmcb.save.dr7) };
        d.step_slot = NO_SLOT;
    }
}

/// Where an instruction that reloads RFLAGS continues: POPF, IRETQ and SYSRET take TF away
/// with the old RFLAGS, so no single-step #DB would follow them. For those, a step also puts
/// an instruction breakpoint where the CPU goes next (the next instruction, the RIP on the
/// interrupt frame, RCX).
fn step_target(hv: &Hv, c: &Cpu) -> Option<u64> {
    let s = &c.vmcb.save;
    let mut b = [0u8; 15];
    if !crate::vmm::read_guest_insn(hv, s.cr3, s.rip, &mut b) {
        return None;
    }
    // Legacy prefixes and REX.
    let i = b
        .iter()
        .take(4)
        .take_while(|&&x| {
            matches!(
                x,
                0x26 | 0x2E | 0x36 | 0x3E | 0x64 | 0x65 | 0x66 | 0xF2 | 0xF3 | 0x40..=0x4F
            )
        })
        .count();
    match b[i..] {
        [0x9D, ..] => Some(s.rip + i as u64 + 1),
        [0xCF, ..] => {
            let mut rip = [0u8; 8];
            (target::read_virt(hv, s.cr3, s.rsp, &mut rip) == 8).then(|| u64::from_le_bytes(rip))
        }
        [0x0F, 0x07, ..] => Some(c.state.regs.rcx),
        _ => None,
    }
}

/// Lends a free DR slot to a step over an RFLAGS-reloading instruction (see `step_target`).
fn lend_step_slot(hv: &Hv, c: &mut Cpu) {
    let Some(target) = step_target(hv, c) else {
        return;
    };
    let free = session::free_slots();
    let Some(n) = (0..4u8).find(|&n| free & (1 << n) != 0) else {
        return;
    };
    let dr7 = (c.vmcb.save.dr7 & !target::dr7_fields(n as usize)) | (1 << (2 * n + 1));
    // SAFETY: slot n is used by neither the kernel nor gdb (free_slots); it is given back at
    // the end of the step (end_step) and its old value at detach.
    unsafe {
        instr::write_dr(n, target);
        instr::write_dr(7, dr7);
    }
    c.state.dbg.dr[n as usize] = target;
    c.vmcb.save.dr7 = dr7;
    c.state.dbg.step_slot = n;
}

/// Parks this CPU with `reason` and applies its resume action.
///
/// # Safety
/// As [`handle_exit`].
pub unsafe fn park(hv: &Hv, cpu: *mut Cpu, reason: Reason) -> After {
    // SAFETY: our own area; the borrow ends before `enter`, which takes the raw pointer.
    unsafe { (*cpu).state.dbg.reason = reason };
    // SAFETY: forwarded; no reference into our area is held across the call.
    let action = unsafe { stop::enter(hv, cpu, session::lead) };
    // SAFETY: released: our own area again.
    resume(hv, unsafe { &mut *cpu }, action)
}

/// Sets this CPU up for `action` and tells the run loop what comes next.
fn resume(hv: &Hv, c: &mut Cpu, action: Resume) -> After {
    prepare_run(hv, c, action);
    match action {
        Resume::Leave => After::Leave,
        _ => After::Run,
    }
}

/// Sets up this CPU's VMCB and debug registers for how it runs next (on the CPU itself).
fn prepare_run(hv: &Hv, c: &mut Cpu, action: Resume) {
    let attached = session::attached();
    let ctl = &mut c.vmcb.control;
    if attached && action != Resume::Leave {
        // TCG reports INT3 through the INTn intercept, hardware through #BP (FACTS.md).
        ctl.intercept_misc1 |= vmcb::misc1::INTN;
        ctl.intercept_exceptions |= vmcb::exceptions::DB | vmcb::exceptions::BP;
    } else {
        ctl.intercept_misc1 &= !vmcb::misc1::INTN;
        ctl.intercept_exceptions &= !(vmcb::exceptions::DB | vmcb::exceptions::BP);
    }
    let d = &mut c.state.dbg;
    let s = &mut c.vmcb.save;
    if d.resume_rf {
        s.rflags |= 1 << 16;
        d.resume_rf = false;
    }
    if d.reason == Reason::HwBreak && action != Resume::Leave {
        s.rflags |= 1 << 16;
    }
    if action == Resume::Step {
        d.stepping = true;
        d.tf_was_set = s.rflags & (1 << 8) != 0;
        s.rflags |= 1 << 8;
        ctl.vintr |= vmcb::V_INTR_MASKING;
    }
    apply_debug_registers(&mut c.vmcb, d, action == Resume::Leave || !attached);
    if action == Resume::Step {
        lend_step_slot(hv, c);
    }
}

/// Loads gdb's hardware slots (or, on leaving, the kernel's own values back) into this CPU's
/// DR0-3 and DR7. TCG arms breakpoints only on a host-mode `mov dr7`, hardware from the
/// VMCB's DR7 at VMRUN: do both, with the same value (FACTS.md).
fn apply_debug_registers(vmcb: &mut Vmcb, d: &mut PerCpu, kernel_only: bool) {
    let (dr7, slots) = session::debug_registers(vmcb.save.dr7, kernel_only);
    for (n, slot) in slots.iter().enumerate() {
        // gdb's address in its slot, or the kernel's value back in a slot gdb used.
        let want = match slot {
            session::Slot::Gdb(addr) => *addr,
            session::Slot::Restore => d.kernel_dr[n],
            session::Slot::Untouched => continue,
        };
        if d.dr[n] != want {
            // SAFETY: slot n is one the kernel does not use (session::debug_registers leaves
            // the kernel's slots Untouched), or the kernel's own value going back.
            unsafe { instr::write_dr(n as u8, want) };
            d.dr[n] = want;
        }
    }
    vmcb.save.dr7 = dr7;
    // SAFETY: as above: the kernel's own enable bits are kept as they were.
    unsafe { instr::write_dr(7, dr7) };
}

/// Called by the run loop after it completed an instruction for the guest (CPUID,
/// VMMCALL, ...): a step over such an instruction ends here, since no #DB follows an
/// instruction the hv emulated. Also where a Ctrl-C or attach that arrived in this CPU's
/// hypercall turns into a stop.
///
/// # Safety
/// As [`handle_exit`].
pub unsafe fn after_completed(hv: &Hv, cpu: *mut Cpu, hypercall: bool) -> After {
    // SAFETY: our own area (caller).
    let c = unsafe { &mut *cpu };
    if c.state.dbg.stepping {
        end_step(c);
        // SAFETY: forwarded.
        return unsafe { park(hv, cpu, Reason::Step) };
    }
    // Only at a hypercall: the agent's CPUID check before it must not be where a CPU stops
    // (a detach there would send it on to a VMMCALL on a native CPU).
    if !hypercall {
        return After::Run;
    }
    match session::take_pending_stop(hv) {
        // SAFETY: forwarded.
        Some(reason) => unsafe { park(hv, cpu, reason) },
        None => After::Run,
    }
}
