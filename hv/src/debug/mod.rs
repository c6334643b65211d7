//! The debugger: a gdbstub (the `gdbstub` crate's state machine) inside the hv, fed by the
//! serial link, serving the live kernel with one GDB thread per CPU. A client of the
//! rendezvous (`crate::rendezvous`): every stop it makes parks every CPU, whose whole state
//! (`crate::cpu_state::CpuState`) gdb then reads and writes.
//!
//! - [`exit`]: the exits the debugger owns (INT3/INTn, #BP, #DB), and where a step ends.
//! - [`run`]: how a CPU runs after a stop: a step (TF, held interrupts, a lent DR slot), the
//!   debug intercepts, gdb's hardware slots in DR0-3.
//! - [`session`]: the gdb session: the stub, driven by the link while CPUs are parked (the
//!   leader polls the UART) and by the agent's link hypercalls while they run (Ctrl-C).
//! - [`target`]: what gdb asks of the target: registers, memory, breakpoints, monitor.
//! - [`regs`]: the register file and its target description.

pub mod exit;
pub mod regs;
pub mod run;
pub mod session;
pub mod target;

pub use exit::{after_instruction, straggler};
pub use run::resumed;

/// Why a CPU stopped.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Reason {
    /// Stopped by the leader's NMI, or by another client's stop: nothing to report.
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

/// No DR slot lent to a step.
pub const NO_SLOT: u8 = 0xFF;

/// One CPU's debugger state, in its stopped area (`vcpu::Stopped`): the CPU's own while it
/// runs, the leader's while it is parked.
#[derive(Clone, Copy, Debug)]
pub struct PerCpu {
    pub reason: Reason,
    /// The leader's word for a CPU it releases to run: a single step rather than a continue.
    pub step: bool,
    /// DR0-3 as the kernel had them when the session began (put back at detach).
    pub kernel_dr: [u64; 4],
    /// Single-stepping: the hv set TF (and held interrupts) for this step.
    pub stepping: bool,
    pub tf_was_set: bool,
    /// A DR slot lent to this step (0-3), or [`NO_SLOT`]: see `run::step_target`.
    pub step_slot: u8,
    /// The last stop was an instruction breakpoint: resume with RF so it does not hit again.
    pub resume_rf: bool,
}

impl PerCpu {
    pub const fn new() -> Self {
        PerCpu {
            reason: Reason::None,
            step: false,
            kernel_dr: [0; 4],
            stepping: false,
            tf_was_set: false,
            step_slot: NO_SLOT,
            resume_rf: false,
        }
    }
}

impl Default for PerCpu {
    fn default() -> Self {
        Self::new()
    }
}

/// Readies this CPU's debug state at activation.
pub fn prepare_cpu(dbg: &mut PerCpu) {
    dbg.step_slot = NO_SLOT;
    dbg.stepping = false;
    dbg.step = false;
}
