//! What the hv does about each #VMEXIT, independent of the vendor: one file per exit kind,
//! one dispatcher ([`handle`]), one vocabulary for what comes next ([`Action`]), which the run
//! loop in [`crate::vcpu`] applies (illusion-rs's `vmexit/` is the model for the layout).
//!
//! Handlers see the guest only through [`VirtCpu`] and the hv only through [`Env`], so host
//! tests run them on fake CPUs.
//!
//! Policies (documented in the README):
//! - CPUID ([`cpuid`]): the signature leaves answer "Quicksilver"; every other leaf is the CPU's.
//! - MSR writes ([`msr`]): EFER keeps SVME; VM_CR and VM_HSAVE_PA get #GP; both counted. A
//!   guest that tries to start its own hypervisor (kvm_amd) sees SVME set and refuses itself.
//! - SVM instructions ([`svm_insn`]): VMRUN, VMLOAD, VMSAVE, CLGI, SKINIT, INVLPGA get #UD,
//!   counted (no nested SVM); STGI, and a write of 0 to VM_HSAVE_PA, complete as no-ops (the
//!   kernel's way to turn virtualization off before reboot).
//! - VMMCALL ([`hypercall`]): from CPL > 0 or without the Quicksilver tag, #UD as on bare metal;
//!   otherwise one table of operations.
//! - Nested page faults ([`npf`]): the owner of the page decides.
//! - IN/OUT ([`io`]) to the two ports whose writes the hv shadows (COM1's FIFO control, the
//!   CMOS index): the hv performs the access, records a write, and steps over it.
//! - NMI ([`nmi`]): a stop NMI joins the rendezvous; a foreign one is reflected. Inside the
//!   guest's NMI handler both wait for its IRET (intercepted only then), as on silicon.
//! - INTn, #BP, #DB: the debugger's ([`crate::debug::exit`]).
//! - SHUTDOWN (guest triple fault): the machine is reset, as bare metal would.
//! - Anything else is unexpected: recorded with a VMCB dump, and the CPU steps out of guest
//!   mode at the instruction that exited, which then runs natively. The kernel never stops.

pub mod cpuid;
pub mod hypercall;
pub mod io;
pub mod msr;
pub mod nmi;
pub mod npf;
pub mod svm_insn;

use crate::arch::{Event, VirtCpu, VmExit};
use crate::decode::Insn;
use quicksilver_proto::abi::Op;

/// Why this CPU wants every CPU stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The debugger's: a breakpoint, a finished step, gdb's Ctrl-C or attach.
    Debug(crate::debug::Reason),
    /// `qsctl freeze`: every CPU held for a while, its state captured (and, with `check`,
    /// restored and compared) — the consistent cut a checkpoint needs.
    Freeze,
    /// `qsctl checkpoint` or `qsctl rollback`: every CPU stopped to take a checkpoint or to
    /// be put back at one.
    Checkpoint,
}

/// What the run loop does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Run the guest again at the same instruction; an event the exit interrupted is
    /// delivered again.
    Resume,
    /// Run the guest as the handler left it (events it injected, RIP it moved).
    Run,
    /// The hv did the instruction's work: step over it, then [`Then`].
    Complete(Insn, Then),
    /// Deliver an exception at the instruction (it does not complete).
    Inject(Event),
    /// Stop every CPU; this CPU parks (and leads, if it is the first).
    Park(Stop),
    /// This CPU took the leader's stop NMI: join the stop.
    Follow,
    /// Step out at the instruction: this CPU runs natively from there.
    Leave,
    /// Step out at the instruction, recording the exit as unexpected.
    Unexpected,
    /// Reset the machine.
    Reset,
}

/// After an instruction the hv completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// Run on (unless a client that watches instruction boundaries, the debugger's stepping,
    /// stops this CPU there).
    Run,
    /// Step out: this CPU runs natively after the instruction.
    Leave,
    /// Stop every CPU, this one after the instruction.
    Park(Stop),
}

/// What a handler may ask of the hv.
pub trait Env {
    /// This CPU's index.
    fn cpu_index(&self) -> u32;
    /// A control operation on a guest-physical buffer: a [`quicksilver_proto::abi::Status`]
    /// or, for `LinkRx`, a count.
    fn control(&self, op: Op, buf_gpa: u64, len: u64) -> i64;
    /// The owner of the guest-physical page of `gpa` (for a nested page fault).
    fn page_owner(&self, gpa: u64) -> npf::Owner;
    /// Checks and keeps a freeze request in the guest's buffer: a `Status`.
    fn freeze_request(&self, buf_gpa: u64, len: u64) -> i64;
    /// Checks and keeps a checkpoint (or, with `rollback`, a rollback) request: a `Status`.
    fn checkpoint_request(&self, rollback: bool, buf_gpa: u64, len: u64) -> i64;
    /// A write faulted at `gpa`: copy-on-write if checkpoints protect the page.
    fn copy_on_write(&self, gpa: u64) -> crate::checkpoint::Cow;
    /// Is a checkpoint kept (so every CPU must stay in guest mode)?
    fn checkpoints_kept(&self) -> bool;
    /// Was the NMI this CPU just took one the rendezvous sent? (Consumes the expectation.)
    fn take_stop_nmi(&self) -> bool;
    /// NMIs this CPU holds back until the guest's NMI handler ends.
    fn held_nmis(&self) -> nmi::Held;
    fn set_held_nmis(&self, held: nmi::Held);
    /// Maps the guest page of `gpa`, inside the hv's memory, to the scratch page.
    fn refuse_hv_access(&self, gpa: u64) -> bool;
    /// Counters of what was refused.
    fn msr_refused(&self);
    fn svm_instruction_refused(&self);
    fn hv_access_refused(&self, gpa: u64);
    /// Performs the guest's IN of `size` bytes at `port` (an intercepted port).
    fn port_in(&self, port: u16, size: u8) -> u32;
    /// Performs the guest's OUT, and shadows what it wrote to a write-only register.
    fn port_out(&self, port: u16, size: u8, value: u32);
}

/// Decides what to do about `exit`. Debug exits (INTn, #BP, #DB) are not decided here: they
/// need the debugger's session (`crate::debug::exit`); the run loop sends them there.
pub fn handle(exit: VmExit, cpu: &mut impl VirtCpu, env: &impl Env) -> Action {
    match exit {
        VmExit::Cpuid { leaf, subleaf } => cpuid::handle(leaf, subleaf, cpu, env),
        VmExit::MsrWrite { msr, value } => msr::write(msr, value, cpu, env),
        VmExit::MsrRead { .. } => Action::Unexpected,
        VmExit::Hypercall { rax, rbx, rcx, cpl } => hypercall::handle(rax, rbx, rcx, cpl, cpu, env),
        VmExit::Stgi => svm_insn::stgi(),
        VmExit::VirtualizationInstruction { .. } => svm_insn::refuse(env),
        VmExit::NestedPageFault { gpa, write, fetch } => npf::handle(gpa, write, fetch, cpu, env),
        VmExit::Nmi => nmi::handle(cpu, env),
        VmExit::Iret => nmi::iret(cpu, env),
        VmExit::Shutdown => Action::Reset,
        VmExit::PortIo {
            port,
            size,
            input,
            string,
            len,
        } => io::handle(
            io::PortAccess {
                port,
                size,
                input,
                string,
                len,
            },
            cpu,
            env,
        ),
        VmExit::SoftwareInterrupt | VmExit::Breakpoint | VmExit::DebugException { .. } => {
            Action::Unexpected
        }
        VmExit::VmrunFailed | VmExit::LostGuestState | VmExit::Unexpected { .. } => {
            Action::Unexpected
        }
    }
}

/// A fake hv for host tests of the handlers.
#[cfg(test)]
pub mod fake {
    use super::*;
    use quicksilver_proto::abi::Status;
    use std::cell::{Cell, RefCell};

    #[derive(Default)]
    pub struct FakeEnv {
        pub refused: RefCell<Vec<u64>>,
        pub msr_refusals: Cell<u32>,
        pub svm_refusals: Cell<u32>,
        pub hv_refusals: Cell<u32>,
        pub controls: RefCell<Vec<(Op, u64, u64)>>,
        pub stop_nmi: Cell<bool>,
        pub held: Cell<nmi::Held>,
        pub freezes: Cell<u32>,
        pub refuse_freeze: Cell<bool>,
        pub checkpoints: Cell<u32>,
        pub kept: Cell<bool>,
        /// Pages the fake checkpoints protect, and those copied.
        pub protected: RefCell<Vec<u64>>,
        pub copied: RefCell<Vec<u64>>,
        pub port_writes: RefCell<Vec<(u16, u8, u32)>>,
        pub port_value: Cell<u32>,
    }

    /// The fake hv's memory.
    pub const HV_MEMORY: core::ops::Range<u64> = 0x100_0000..0x120_0000;

    impl Env for FakeEnv {
        fn cpu_index(&self) -> u32 {
            3
        }
        fn control(&self, op: Op, gpa: u64, len: u64) -> i64 {
            self.controls.borrow_mut().push((op, gpa, len));
            Status::Ok as i64
        }
        fn freeze_request(&self, _gpa: u64, _len: u64) -> i64 {
            if self.refuse_freeze.get() {
                return Status::Busy as i64;
            }
            self.freezes.set(self.freezes.get() + 1);
            Status::Ok as i64
        }
        fn take_stop_nmi(&self) -> bool {
            self.stop_nmi.replace(false)
        }
        fn held_nmis(&self) -> nmi::Held {
            self.held.get()
        }
        fn set_held_nmis(&self, held: nmi::Held) {
            self.held.set(held);
        }
        fn checkpoint_request(&self, _rollback: bool, _gpa: u64, _len: u64) -> i64 {
            self.checkpoints.set(self.checkpoints.get() + 1);
            Status::Ok as i64
        }
        fn copy_on_write(&self, gpa: u64) -> crate::checkpoint::Cow {
            let page = gpa & !0xFFF;
            if self.copied.borrow().contains(&page) {
                crate::checkpoint::Cow::Spurious
            } else if self.protected.borrow().contains(&page) {
                self.copied.borrow_mut().push(page);
                crate::checkpoint::Cow::Copied
            } else {
                crate::checkpoint::Cow::NotLogged
            }
        }
        fn checkpoints_kept(&self) -> bool {
            self.kept.get()
        }
        fn page_owner(&self, gpa: u64) -> npf::Owner {
            if HV_MEMORY.contains(&gpa) {
                npf::Owner::Hv
            } else {
                npf::Owner::Nobody
            }
        }
        fn refuse_hv_access(&self, gpa: u64) -> bool {
            let inside = HV_MEMORY.contains(&gpa);
            if inside {
                self.refused.borrow_mut().push(gpa);
            }
            inside
        }
        fn msr_refused(&self) {
            self.msr_refusals.set(self.msr_refusals.get() + 1);
        }
        fn svm_instruction_refused(&self) {
            self.svm_refusals.set(self.svm_refusals.get() + 1);
        }
        fn hv_access_refused(&self, _gpa: u64) {
            self.hv_refusals.set(self.hv_refusals.get() + 1);
        }
        fn port_in(&self, _port: u16, _size: u8) -> u32 {
            self.port_value.get()
        }
        fn port_out(&self, port: u16, size: u8, value: u32) {
            self.port_writes.borrow_mut().push((port, size, value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeEnv;
    use super::*;
    use crate::arch::virt_cpu::fake::FakeCpu;

    #[test]
    fn debug_exits_are_not_decided_without_the_debugger_and_unknown_ones_are_unexpected() {
        let (mut cpu, env) = (FakeCpu::default(), FakeEnv::default());
        assert_eq!(
            handle(VmExit::Unexpected { code: 0x60 }, &mut cpu, &env),
            Action::Unexpected
        );
        assert_eq!(handle(VmExit::Shutdown, &mut cpu, &env), Action::Reset);
        assert_eq!(
            handle(VmExit::MsrRead { msr: 0xC000_0080 }, &mut cpu, &env),
            Action::Unexpected
        );
        assert_eq!(
            handle(VmExit::LostGuestState, &mut cpu, &env),
            Action::Unexpected
        );
    }
}
