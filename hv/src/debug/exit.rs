//! The exits the debugger owns, intercepted only while a session is attached:
//! - INT3 / INTn (TCG's way) and #BP (hardware's): a gdb breakpoint stops; the kernel's own
//!   INT3s (kprobes, static calls, text poking) and INT n are delivered as the instruction
//!   would have;
//! - #DB: our single step or one of our hardware slots stops; the kernel's own (its
//!   hw_breakpoint users, a user-space single step) is reflected with DR6 as it is.
//!
//! Also where a step over an instruction the hv emulated ends ([`after_instruction`]: no #DB
//! follows such an instruction), and where a Ctrl-C or attach that arrived in this CPU's
//! hypercall becomes a stop.

use super::{run, session, target, Reason};
use crate::arch::virt_cpu::{dr6, rflags, vector};
use crate::arch::{Event, VirtCpu, VmExit};
use crate::decode::Insn;
use crate::exit::{Action, Stop};
use crate::vcpu::Stopped;
use crate::vmm::{self, Hv};
use core::sync::atomic::Ordering::*;

/// Decides about an INTn, #BP or #DB exit on this CPU.
pub fn handle(hv: &Hv, cpu: &mut impl VirtCpu, st: &mut Stopped, exit: VmExit) -> Action {
    match exit {
        VmExit::SoftwareInterrupt => software_interrupt(hv, cpu, false),
        VmExit::Breakpoint => software_interrupt(hv, cpu, true),
        VmExit::DebugException { dr6 } => debug_exception(hv, cpu, st, dr6),
        _ => Action::Unexpected,
    }
}

/// INT3 / INT n. Ours (a gdb breakpoint at RIP): stop. Anyone else's: deliver it to the
/// guest as the instruction would have (RIP past it, the event injected).
fn software_interrupt(hv: &Hv, cpu: &mut impl VirtCpu, hw_bp: bool) -> Action {
    let cr3 = cpu.cr3();
    if hw_bp && !target::is_int3(hv, cr3, cpu.rip()) && target::is_int3(hv, cr3, cpu.rip() - 1) {
        // Hardware reports #BP as a trap: RIP after the INT3. Point at it, as TCG does.
        cpu.set_rip(cpu.rip() - 1);
    }
    let mut bytes = [0u8; 15];
    if !vmm::read_guest_insn(hv, cr3, cpu.rip(), &mut bytes) {
        return Action::Unexpected;
    }
    if bytes[0] == 0xCC && session::owns_breakpoint(cpu.rip()) {
        return Action::Park(Stop::Debug(Reason::SwBreak));
    }
    let (len, event) = match bytes {
        // The INT3 was removed while this CPU was on its way here (text poking): run what
        // is there now, as the kernel's own INT3 handler would.
        [b, ..] if b != 0xCC && b != 0xCD && b != 0xCE && b != 0xF1 => return Action::Run,
        [0xCC, ..] => (1, Event::BP),
        [0xCD, n, ..] => (2, Event::SoftwareInterrupt { vector: n }),
        [0xCE, ..] => (1, Event::SoftwareInterrupt { vector: vector::OF }),
        // INT1 (ICEBP).
        _ => (1, Event::DB),
    };
    cpu.skip(len);
    cpu.inject(event);
    Action::Run
}

/// #DB: ours (a step, a slot gdb armed) stops; the kernel's is reflected.
fn debug_exception(hv: &Hv, cpu: &mut impl VirtCpu, st: &mut Stopped, dr6: u64) -> Action {
    let dbg = &mut st.dbg;
    let step_bit = if dbg.step_slot < 4 {
        1u64 << dbg.step_slot
    } else {
        0
    };
    let ours = session::our_slots() as u64 & dr6 & dr6::B_MASK & !step_bit;
    let stepped = dbg.stepping && dr6 & (dr6::BS | step_bit) != 0;
    if stepped {
        run::end_step(cpu, dbg);
    }
    if ours == 0 && !stepped {
        let kernel = session::KERNEL_SLOTS.load(Acquire) as u64;
        let stale = dr6 & dr6::B_MASK & !kernel;
        if stale != 0 {
            // A slot gdb armed on this CPU in a session that is over (this CPU missed the
            // stop that ended it): not the kernel's to see. Disarm it and run on.
            cpu.set_dr6(cpu.dr6() & !stale);
            cpu.set_rflags(cpu.rflags() | rflags::RF);
            return straggler(hv, cpu, st);
        }
        cpu.inject(Event::DB);
        return Action::Run;
    }
    cpu.set_dr6(cpu.dr6() & !(ours | if stepped { dr6::BS | step_bit } else { 0 }));
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
    Action::Park(Stop::Debug(reason))
}

/// A CPU that missed the stop that ended a session: it gets what the others got (its debug
/// registers back, no debug intercepts) and, if they left guest mode, leaves too.
pub fn straggler(hv: &Hv, cpu: &mut impl VirtCpu, st: &mut Stopped) -> Action {
    if session::attached() {
        return Action::Run;
    }
    let leave = session::LEAVE_AFTER_DETACH.load(Acquire);
    st.dbg.step = false;
    run::prepare(hv, cpu, st, leave);
    if leave {
        Action::Leave
    } else {
        Action::Run
    }
}

/// After the run loop completed an instruction for the guest (CPUID, VMMCALL, ...): a step
/// over such an instruction ends here, since no #DB follows an instruction the hv emulated.
/// At a hypercall, a Ctrl-C or attach that arrived meanwhile becomes a stop (only there: the
/// agent's CPUID check before it must not be where a CPU stops, or a detach there would send
/// it on to a VMMCALL on a native CPU).
pub fn after_instruction(
    hv: &Hv,
    cpu: &mut impl VirtCpu,
    st: &mut Stopped,
    insn: Insn,
) -> Option<Stop> {
    if st.dbg.stepping {
        run::end_step(cpu, &mut st.dbg);
        return Some(Stop::Debug(Reason::Step));
    }
    if insn != Insn::Vmmcall {
        return None;
    }
    session::take_pending_stop(hv).map(Stop::Debug)
}
