//! Real GNU gdb against a live Linux in QEMU, through `qs-bridge` and the serial link, as a
//! user would debug it: attach while a workload runs, look around, break, watch, step,
//! interrupt, detach — and afterwards the kernel runs natively, unharmed, and the workload
//! verified itself.
//!
//! Each test boots its own guest (see [`Machine`]); gdb's transcripts are kept in
//! `target/qs/logs/<test>.gdb<N>.log`. `QS_GDB_STUB=qemu` runs the same sessions against
//! QEMU's own gdbstub, to tell a test's mistake from the stub's. The sessions are in
//! `gdb/sessions.rs`; `gdb_fast_link.rs` runs them again over the fast link.

use quicksilver_tests::session::{
    assert_clean_end, check_syscall_argument, detach, detach_and_finish, GETPID,
    WORKLOAD_AND_GETPID,
};
use quicksilver_tests::*;
use std::time::Duration;

/// Boots a test's machine: gdb reaches it over the serial link.
fn boot(name: &str, smp: u32, script: &str, ready: &str) -> Machine {
    Machine::boot(name, smp, script, ready)
}

/// The agent's timer takes the stop in its hypercall; the UART's interrupt (whose hypercall
/// brought the attention) is over by then: one CPU at most is stopped in the agent.
const AGENT_CPUS_AT_MOST: usize = 1;

include!("gdb/sessions.rs");
