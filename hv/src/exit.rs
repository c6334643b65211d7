//! What the hv does about each #VMEXIT, independent of the vendor.
//!
//! The vendor layer decodes an exit into a [`VmExit`]; [`handle`] decides an [`Action`]; the
//! run loop in [`crate::vcpu`] applies it. One function per exit kind, one dispatcher.
//!
//! Policies (documented in the README):
//! - CPUID: the signature leaves answer "Quicksilver"; every other leaf is the CPU's own.
//! - Writes to EFER keep SVME set (clearing it would pull SVM from under the hv); writes to
//!   VM_CR and VM_HSAVE_PA get #GP. Both are counted as refusals. A guest that tries to start
//!   its own hypervisor (kvm_amd) sees EFER.SVME already set and refuses by itself.
//! - VMRUN, VMLOAD, VMSAVE, CLGI, SKINIT, INVLPGA: #UD, counted (no nested SVM).
//! - STGI, and a write of 0 to VM_HSAVE_PA, complete as no-ops: that is how the kernel turns
//!   virtualization off on its way to reboot or power off (`cpu_svm_disable`), and as far as
//!   the guest can tell, its GIF is always set.
//! - VMMCALL from CPL > 0, or without the Quicksilver tag: #UD, as on bare metal.
//! - A nested page fault inside the hv's memory: the guest's access is refused by remapping
//!   that guest page to a scratch page (reads see zeros, writes land in scratch), counted.
//!   An instruction fetch there is unexpected (below): running scratch would run zeros.
//! - SHUTDOWN (guest triple fault): the machine is reset, as bare metal would.
//! - Anything else is unexpected: recorded with a VMCB dump, and the CPU steps out of guest
//!   mode at the instruction that exited, which then runs natively. The kernel never stops.

use crate::arch::instr;
use crate::decode::Insn;
use quicksilver_proto::abi::{self, Op, Status};
use quicksilver_proto::stats::ExitKind;

/// A #VMEXIT, in vendor-neutral terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    Cpuid {
        leaf: u32,
        subleaf: u32,
    },
    MsrWrite {
        msr: u32,
        value: u64,
    },
    MsrRead {
        msr: u32,
    },
    Hypercall {
        rax: u64,
        rbx: u64,
        rcx: u64,
        cpl: u8,
    },
    /// STGI.
    Stgi,
    /// VMRUN, VMLOAD, VMSAVE, CLGI, SKINIT, INVLPGA.
    VirtualizationInstruction {
        vmrun: bool,
    },
    NestedPageFault {
        gpa: u64,
        write: bool,
        fetch: bool,
    },
    Shutdown,
    /// A physical NMI (intercepted: the hv's own stop request, or a foreign one to reflect).
    Nmi,
    /// INT n / INT3 / INTO (the INTn intercept; RIP at the instruction).
    SoftwareInterrupt,
    /// #BP intercepted (real hardware; TCG reports INT3 as a software interrupt).
    Breakpoint,
    /// #DB intercepted: single step, hardware breakpoint or watchpoint; `dr6` says which.
    DebugException {
        dr6: u64,
    },
    /// VMRUN refused the guest state (VMEXIT_INVALID).
    VmrunFailed,
    Unexpected {
        code: u64,
    },
}

impl VmExit {
    /// The statistics bucket.
    pub fn kind(&self) -> ExitKind {
        match self {
            VmExit::Cpuid { .. } => ExitKind::Cpuid,
            VmExit::MsrWrite { .. } | VmExit::MsrRead { .. } => ExitKind::Msr,
            VmExit::Hypercall { .. } => ExitKind::Vmmcall,
            VmExit::VirtualizationInstruction { vmrun: true } => ExitKind::Vmrun,
            VmExit::VirtualizationInstruction { vmrun: false } | VmExit::Stgi => {
                ExitKind::SvmInstruction
            }
            VmExit::NestedPageFault { .. } => ExitKind::Npf,
            VmExit::Shutdown => ExitKind::Shutdown,
            VmExit::Nmi
            | VmExit::SoftwareInterrupt
            | VmExit::Breakpoint
            | VmExit::DebugException { .. } => ExitKind::Debug,
            VmExit::VmrunFailed | VmExit::Unexpected { .. } => ExitKind::Other,
        }
    }
}

/// An exception to inject into the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    InvalidOpcode,
    GeneralProtection,
}

/// What the run loop does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Run the guest again at the same instruction.
    Resume,
    /// The hv did the instruction's work: step over it and run on.
    Complete(Insn),
    /// Deliver an exception at the instruction.
    Inject(Event),
    /// Complete the VMMCALL, then step out: this CPU runs natively from there.
    CompleteAndLeave,
    /// Step out at the instruction, recording the exit as unexpected.
    Unexpected,
    /// Reset the machine.
    Reset,
    /// The debugger's business (NMI, breakpoints, stepping): see `crate::debug`.
    Debug(VmExit),
}

/// What a handler may see and change of the guest CPU.
pub trait GuestCpu {
    /// This CPU's index.
    fn index(&self) -> u32;
    /// Sets RAX, RBX, RCX, RDX to a CPUID answer.
    fn set_cpuid_result(&mut self, r: [u32; 4]);
    fn set_rax(&mut self, v: u64);
    fn set_efer(&mut self, v: u64);
    /// Maps the guest-physical page of `gpa`, inside the hv's memory, to scratch.
    fn refuse_hv_access(&mut self, gpa: u64) -> bool;
    /// Performs a control operation on a guest-physical buffer: a [`Status`] or, for
    /// `LinkRx`, a count.
    fn control(&mut self, op: Op, buf_gpa: u64, len: u64) -> i64;
}

/// Counters the handlers bump; the run loop owns them.
pub trait Refusals {
    fn msr_refused(&self);
    fn svm_instruction_refused(&self);
    fn hv_access_refused(&self, gpa: u64);
}

/// Decides what to do about `exit`.
pub fn handle(exit: VmExit, cpu: &mut impl GuestCpu, count: &impl Refusals) -> Action {
    match exit {
        VmExit::Cpuid { leaf, subleaf } => cpuid(leaf, subleaf, cpu),
        VmExit::MsrWrite { msr, value } => msr_write(msr, value, cpu, count),
        VmExit::MsrRead { .. } => Action::Unexpected,
        VmExit::Hypercall { rax, rbx, rcx, cpl } => hypercall(rax, rbx, rcx, cpl, cpu),
        VmExit::Stgi => Action::Complete(Insn::Stgi),
        VmExit::VirtualizationInstruction { .. } => {
            count.svm_instruction_refused();
            Action::Inject(Event::InvalidOpcode)
        }
        // An instruction fetch from hv memory is not refused with scratch (that would run
        // zeros): it is unexpected, and the CPU steps out to run that code natively.
        VmExit::NestedPageFault {
            gpa, fetch: false, ..
        } => {
            if cpu.refuse_hv_access(gpa) {
                count.hv_access_refused(gpa);
                Action::Resume
            } else {
                Action::Unexpected
            }
        }
        VmExit::NestedPageFault { fetch: true, .. } => Action::Unexpected,
        VmExit::Shutdown => Action::Reset,
        e @ (VmExit::Nmi
        | VmExit::SoftwareInterrupt
        | VmExit::Breakpoint
        | VmExit::DebugException { .. }) => Action::Debug(e),
        VmExit::VmrunFailed | VmExit::Unexpected { .. } => Action::Unexpected,
    }
}

fn cpuid(leaf: u32, subleaf: u32, cpu: &mut impl GuestCpu) -> Action {
    let sig = abi::CPUID_SIGNATURE;
    let word = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
    let r = match leaf {
        abi::CPUID_SIGNATURE_LEAF => [abi::CPUID_INFO_LEAF, word(0), word(4), word(8)],
        abi::CPUID_INFO_LEAF => [quicksilver_proto::image::ABI_VERSION, cpu.index(), 0, 0],
        _ => instr::cpuid(leaf, subleaf),
    };
    cpu.set_cpuid_result(r);
    Action::Complete(Insn::Cpuid)
}

fn msr_write(msr: u32, value: u64, cpu: &mut impl GuestCpu, count: &impl Refusals) -> Action {
    match msr {
        instr::msr::EFER => {
            if value & instr::EFER_SVME == 0 {
                count.msr_refused();
            }
            cpu.set_efer(value | instr::EFER_SVME);
            Action::Complete(Insn::Wrmsr)
        }
        instr::msr::VM_HSAVE_PA if value == 0 => Action::Complete(Insn::Wrmsr),
        instr::msr::VM_CR | instr::msr::VM_HSAVE_PA => {
            count.msr_refused();
            Action::Inject(Event::GeneralProtection)
        }
        _ => Action::Unexpected,
    }
}

fn hypercall(rax: u64, rbx: u64, rcx: u64, cpl: u8, cpu: &mut impl GuestCpu) -> Action {
    if cpl != 0 || rax & 0xFFFF_0000_0000_0000 != abi::HYPERCALL_MAGIC {
        return Action::Inject(Event::InvalidOpcode);
    }
    match Op::from_u64(rax & 0xFFFF) {
        Some(Op::Deactivate) => {
            cpu.set_rax(Status::Ok as u64);
            Action::CompleteAndLeave
        }
        Some(op) => {
            let result = cpu.control(op, rbx, rcx);
            cpu.set_rax(result as u64);
            Action::Complete(Insn::Vmmcall)
        }
        None => {
            cpu.set_rax(Status::BadOp as i64 as u64);
            Action::Complete(Insn::Vmmcall)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[derive(Default)]
    struct FakeCpu {
        rax: u64,
        efer: u64,
        cpuid: [u32; 4],
        refused: Vec<u64>,
    }

    impl GuestCpu for FakeCpu {
        fn index(&self) -> u32 {
            3
        }
        fn set_cpuid_result(&mut self, r: [u32; 4]) {
            self.cpuid = r;
        }
        fn set_rax(&mut self, v: u64) {
            self.rax = v;
        }
        fn set_efer(&mut self, v: u64) {
            self.efer = v;
        }
        fn refuse_hv_access(&mut self, gpa: u64) -> bool {
            let inside = (0x100_0000..0x120_0000).contains(&gpa);
            if inside {
                self.refused.push(gpa);
            }
            inside
        }
        fn control(&mut self, _op: Op, _gpa: u64, _len: u64) -> i64 {
            Status::Ok as i64
        }
    }

    #[derive(Default)]
    struct Count(Cell<u32>);
    impl Refusals for Count {
        fn msr_refused(&self) {
            self.0.set(self.0.get() + 1);
        }
        fn svm_instruction_refused(&self) {
            self.0.set(self.0.get() + 100);
        }
        fn hv_access_refused(&self, _gpa: u64) {
            self.0.set(self.0.get() + 10_000);
        }
    }

    #[test]
    fn signature_leaf_spells_quicksilver() {
        let mut cpu = FakeCpu::default();
        let a = handle(
            VmExit::Cpuid {
                leaf: 0x4000_0000,
                subleaf: 0,
            },
            &mut cpu,
            &Count::default(),
        );
        assert_eq!(a, Action::Complete(Insn::Cpuid));
        let mut sig = Vec::new();
        for w in &cpu.cpuid[1..] {
            sig.extend_from_slice(&w.to_le_bytes());
        }
        assert_eq!(&sig, b"Quicksilver\0");
        handle(
            VmExit::Cpuid {
                leaf: 0x4000_0001,
                subleaf: 0,
            },
            &mut cpu,
            &Count::default(),
        );
        assert_eq!(cpu.cpuid[1], 3, "EBX of the info leaf is the CPU index");
    }

    #[test]
    fn efer_keeps_svme_and_counts_an_attempt_to_clear_it() {
        let mut cpu = FakeCpu::default();
        let count = Count::default();
        let a = handle(
            VmExit::MsrWrite {
                msr: 0xC000_0080,
                value: 0xD01,
            },
            &mut cpu,
            &count,
        );
        assert_eq!(a, Action::Complete(Insn::Wrmsr));
        assert_eq!(cpu.efer, 0xD01 | instr::EFER_SVME);
        assert_eq!(count.0.get(), 1);
        let a = handle(
            VmExit::MsrWrite {
                msr: 0xC001_0117,
                value: 0x1000,
            },
            &mut cpu,
            &count,
        );
        assert_eq!(a, Action::Inject(Event::GeneralProtection));
        assert_eq!(count.0.get(), 2);
    }

    #[test]
    fn the_kernels_reboot_path_turning_svm_off_completes_quietly() {
        // cpu_svm_disable: VM_HSAVE_PA = 0, STGI, EFER without SVME.
        let mut cpu = FakeCpu::default();
        let count = Count::default();
        let hsave_zero = VmExit::MsrWrite {
            msr: 0xC001_0117,
            value: 0,
        };
        assert_eq!(
            handle(hsave_zero, &mut cpu, &count),
            Action::Complete(Insn::Wrmsr)
        );
        assert_eq!(
            handle(VmExit::Stgi, &mut cpu, &count),
            Action::Complete(Insn::Stgi)
        );
        assert_eq!(count.0.get(), 0, "nothing refused");
    }

    #[test]
    fn hypercalls_need_cpl0_and_the_tag() {
        let mut cpu = FakeCpu::default();
        let c = Count::default();
        let deactivate = abi::HYPERCALL_MAGIC | Op::Deactivate as u64;
        let user = VmExit::Hypercall {
            rax: deactivate,
            rbx: 0,
            rcx: 0,
            cpl: 3,
        };
        assert_eq!(
            handle(user, &mut cpu, &c),
            Action::Inject(Event::InvalidOpcode)
        );
        let untagged = VmExit::Hypercall {
            rax: 1,
            rbx: 0,
            rcx: 0,
            cpl: 0,
        };
        assert_eq!(
            handle(untagged, &mut cpu, &c),
            Action::Inject(Event::InvalidOpcode)
        );
        let ok = VmExit::Hypercall {
            rax: deactivate,
            rbx: 0,
            rcx: 0,
            cpl: 0,
        };
        assert_eq!(handle(ok, &mut cpu, &c), Action::CompleteAndLeave);
        let unknown = VmExit::Hypercall {
            rax: abi::HYPERCALL_MAGIC | 99,
            rbx: 0,
            rcx: 0,
            cpl: 0,
        };
        assert_eq!(
            handle(unknown, &mut cpu, &c),
            Action::Complete(Insn::Vmmcall)
        );
        assert_eq!(cpu.rax, Status::BadOp as u64);
    }

    #[test]
    fn hv_memory_faults_are_refused_others_are_unexpected() {
        let mut cpu = FakeCpu::default();
        let c = Count::default();
        let inside = VmExit::NestedPageFault {
            gpa: 0x110_0000,
            write: true,
            fetch: false,
        };
        assert_eq!(handle(inside, &mut cpu, &c), Action::Resume);
        assert_eq!(c.0.get(), 10_000);
        let outside = VmExit::NestedPageFault {
            gpa: 0x9_0000_0000,
            write: false,
            fetch: false,
        };
        assert_eq!(handle(outside, &mut cpu, &c), Action::Unexpected);
        let fetch = VmExit::NestedPageFault {
            gpa: 0x110_0000,
            write: false,
            fetch: true,
        };
        assert_eq!(handle(fetch, &mut cpu, &c), Action::Unexpected);
        assert_eq!(handle(outside, &mut cpu, &c), Action::Unexpected);
        assert_eq!(
            handle(VmExit::Unexpected { code: 0x60 }, &mut cpu, &c),
            Action::Unexpected
        );
        assert_eq!(handle(VmExit::Shutdown, &mut cpu, &c), Action::Reset);
    }
}
