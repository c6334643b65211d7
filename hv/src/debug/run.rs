//! How a CPU runs after one of the debugger's stops, set up on the CPU itself: a continue or a
//! single step (TF, physical interrupts held, a DR slot lent where TF cannot work), the debug
//! intercepts while a session is attached, and gdb's hardware slots in DR0-3 (or, on the way
//! out, the kernel's values back).

use super::{session, target, PerCpu, Reason, NO_SLOT};
use crate::arch::instr;
use crate::arch::virt_cpu::rflags;
use crate::arch::{Gpr, VirtCpu};
use crate::exit::Action;
use crate::rendezvous::Release;
use crate::vcpu::Stopped;
use crate::vmm::{self, Hv};

/// On this CPU, released from a debugger's stop: sets it up to run as gdb asked.
pub fn resumed(hv: &Hv, cpu: &mut impl VirtCpu, st: &mut Stopped, release: Release) -> Action {
    let leave = release == Release::Leave;
    prepare(hv, cpu, st, leave);
    if leave {
        Action::Leave
    } else {
        Action::Run
    }
}

/// Sets up this CPU's intercepts, flags and debug registers for how it runs next.
pub fn prepare(hv: &Hv, cpu: &mut impl VirtCpu, st: &mut Stopped, leave: bool) {
    let attached = session::attached();
    cpu.set_debug_intercepts(attached && !leave);
    let d = &mut st.dbg;
    if d.resume_rf || (d.reason == Reason::HwBreak && !leave) {
        cpu.set_rflags(cpu.rflags() | rflags::RF);
    }
    d.resume_rf = false;
    let step = d.step && !leave;
    d.step = false;
    if step {
        d.stepping = true;
        d.tf_was_set = cpu.rflags() & rflags::TF != 0;
        cpu.set_rflags(cpu.rflags() | rflags::TF);
        cpu.hold_interrupts(true);
    }
    apply_debug_registers(cpu, st, leave || !attached);
    if step {
        lend_step_slot(hv, cpu, st);
    }
}

/// Undoes what a step set up: TF (unless the guest had it), held interrupts, a lent slot.
pub fn end_step(cpu: &mut impl VirtCpu, d: &mut PerCpu) {
    if d.stepping {
        d.stepping = false;
        if !d.tf_was_set {
            cpu.set_rflags(cpu.rflags() & !rflags::TF);
        }
        cpu.hold_interrupts(false);
    }
    if d.step_slot < 4 {
        let dr7 = cpu.dr7() & !target::dr7_fields(d.step_slot as usize);
        cpu.set_dr7(dr7);
        // SAFETY: the slot was lent to the step (free of the kernel's and gdb's use).
        unsafe { instr::write_dr(7, dr7) };
        d.step_slot = NO_SLOT;
    }
}

/// Where an instruction that reloads RFLAGS continues: POPF, IRETQ and SYSRET take TF away
/// with the old RFLAGS, so no single-step #DB would follow them. For those, a step also puts
/// an instruction breakpoint where the CPU goes next (the next instruction, the RIP on the
/// interrupt frame, RCX).
fn step_target(hv: &Hv, cpu: &impl VirtCpu) -> Option<u64> {
    let mut b = [0u8; 15];
    if !vmm::read_guest_insn(hv, cpu.cr3(), cpu.rip(), &mut b) {
        return None;
    }
    let read = |va: u64, out: &mut [u8; 8]| target::read_virt(hv, cpu.cr3(), va, out) == 8;
    next_after_flags_reload(&b, cpu.rip(), cpu.gpr(Gpr::Rsp), cpu.gpr(Gpr::Rcx), read)
}

/// The pure part of [`step_target`]: `b` the instruction's bytes at `rip`.
fn next_after_flags_reload(
    b: &[u8; 15],
    rip: u64,
    rsp: u64,
    rcx: u64,
    read: impl Fn(u64, &mut [u8; 8]) -> bool,
) -> Option<u64> {
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
        [0x9D, ..] => Some(rip + i as u64 + 1),
        [0xCF, ..] => {
            let mut frame_rip = [0u8; 8];
            read(rsp, &mut frame_rip).then(|| u64::from_le_bytes(frame_rip))
        }
        [0x0F, 0x07, ..] => Some(rcx),
        _ => None,
    }
}

/// Lends a free DR slot to a step over an RFLAGS-reloading instruction (see `step_target`).
fn lend_step_slot(hv: &Hv, cpu: &mut impl VirtCpu, st: &mut Stopped) {
    let Some(target) = step_target(hv, cpu) else {
        return;
    };
    let free = session::free_slots();
    let Some(n) = (0..4u8).find(|&n| free & (1 << n) != 0) else {
        return;
    };
    let dr7 = (cpu.dr7() & !target::dr7_fields(n as usize)) | (1 << (2 * n + 1));
    // SAFETY: slot n is used by neither the kernel nor gdb (free_slots); it is given back at
    // the end of the step (end_step) and its old value at detach.
    unsafe {
        instr::write_dr(n, target);
        instr::write_dr(7, dr7);
    }
    st.state.dr[n as usize] = target;
    cpu.set_dr7(dr7);
    st.dbg.step_slot = n;
}

/// Loads gdb's hardware slots (or, on leaving, the kernel's own values back) into this CPU's
/// DR0-3 and DR7. TCG arms breakpoints only on a host-mode `mov dr7`, hardware from the
/// VMCB's DR7 at VMRUN: do both, with the same value (FACTS.md).
fn apply_debug_registers(cpu: &mut impl VirtCpu, st: &mut Stopped, kernel_only: bool) {
    let (dr7, slots) = session::debug_registers(cpu.dr7(), kernel_only);
    for (n, slot) in slots.iter().enumerate() {
        // gdb's address in its slot, or the kernel's value back in a slot gdb used.
        let want = match slot {
            session::Slot::Gdb(addr) => *addr,
            session::Slot::Restore => st.dbg.kernel_dr[n],
            session::Slot::Untouched => continue,
        };
        if st.state.dr[n] != want {
            // SAFETY: slot n is one the kernel does not use (session::debug_registers leaves
            // the kernel's slots Untouched), or the kernel's own value going back.
            unsafe { instr::write_dr(n as u8, want) };
            st.state.dr[n] = want;
        }
    }
    cpu.set_dr7(dr7);
    // SAFETY: as above: the kernel's own enable bits are kept as they were.
    unsafe { instr::write_dr(7, dr7) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(b: &[u8]) -> [u8; 15] {
        let mut out = [0x90; 15];
        out[..b.len()].copy_from_slice(b);
        out
    }

    #[test]
    fn a_step_over_popf_iretq_or_sysret_knows_where_the_cpu_goes() {
        let frame = |va: u64, out: &mut [u8; 8]| {
            *out = (va + 0x1000).to_le_bytes();
            true
        };
        assert_eq!(
            next_after_flags_reload(&bytes(&[0x9D]), 0x100, 0, 0, frame),
            Some(0x101)
        );
        assert_eq!(
            next_after_flags_reload(&bytes(&[0x66, 0x9D]), 0x100, 0, 0, frame),
            Some(0x102),
            "a prefix counts"
        );
        assert_eq!(
            next_after_flags_reload(&bytes(&[0x48, 0xCF]), 0x100, 0x8000, 0, frame),
            Some(0x9000),
            "IRETQ goes to the RIP on the frame"
        );
        assert_eq!(
            next_after_flags_reload(&bytes(&[0x48, 0x0F, 0x07]), 0x100, 0, 0x4242, frame),
            Some(0x4242),
            "SYSRET goes to RCX"
        );
        assert_eq!(
            next_after_flags_reload(&bytes(&[0x0F, 0xA2]), 0x100, 0, 0, frame),
            None,
            "CPUID keeps TF: an ordinary step"
        );
    }
}
