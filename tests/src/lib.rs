//! What the integration tests add to the harness (`qs-testkit`, re-exported here): finding the
//! built artifacts or saying how to get them, booting a guest with a script, and the checks
//! every test makes on the kernel log.
//!
//! The tests boot a stock Debian kernel under QEMU/TCG (the default one, or `$QS_KERNEL`; the
//! matrix boots each of the others) with the agent loaded and drive Quicksilver through
//! `qsctl` as a user would. `cargo xtask test` builds everything first.

pub use qs_testkit::control;
pub mod fast_link;
pub mod scenarios;
pub mod session;

use std::time::Duration;

pub use qs_testkit::gdb::{bytes_of, register, thread_blocks, thread_lines, value_of};
pub use qs_testkit::machine::{qemu_stub, GDB_KEY, GDB_PRELUDE};
pub use qs_testkit::{Artifacts, Bridge, Gdb, Machine, Qemu, RunOutput, Running, Symbols};

/// The built artifacts, or a panic that says how to get them.
pub fn artifacts() -> Artifacts {
    match Artifacts::locate() {
        Ok(a) => a,
        Err(e) => panic!("{e}: run `cargo xtask test` (it builds everything first)"),
    }
}

/// A guest with `smp` CPUs on `-cpu EPYC`, named after the test.
pub fn guest(name: &str, smp: u32) -> Qemu {
    guest_on(&artifacts(), name, smp)
}

/// [`guest`], booting the kernel of `artifacts`.
pub fn guest_on(artifacts: &Artifacts, name: &str, smp: u32) -> Qemu {
    artifacts
        .qemu(name)
        .smp(smp)
        .timeout(Duration::from_secs(600))
}

/// Runs `script` and returns what happened; panics with the console's end if QEMU could not
/// run it at all.
pub fn run(qemu: Qemu, script: &str) -> RunOutput {
    match qemu.run_script(script) {
        Ok(out) => out,
        Err(e) => panic!("{e}"),
    }
}

/// Kernel-log lines that mean the kernel under us was hurt.
const BAD: &[&str] = &[
    "BUG:",
    "WARNING: CPU:",
    "cut here",
    "Oops",
    "Call Trace",
    "soft lockup",
    "hard LOCKUP",
    "rcu_preempt detected stalls",
    "rcu: INFO",
    "Kernel panic",
    "general protection fault",
    "unchecked MSR access",
    "quicksilver hv:",
    "NMI received for unknown reason",
    "invalid opcode:",
    // IBT (6.12): an indirect branch to a target without ENDBR64.
    "Missing ENDBR",
    "control protection",
    // CONFIG_DEBUG_WX, and the page-attribute code refusing a W^X violation.
    "insecure W+X",
    "CPA refuse W^X",
    "objtool",
];

/// Panics if the console shows an oops, warning, lockup, RCU stall or an hv fault report.
pub fn assert_kernel_clean(out: &RunOutput) {
    for line in out.console.lines() {
        if let Some(bad) = BAD.iter().find(|b| line.contains(*b)) {
            panic!(
                "{}: the kernel log has {bad:?}:\n  {line}\n(full log: {:?})",
                out.name, out.log
            );
        }
    }
}

/// Panics unless the script exited 0, showing the end of the console.
pub fn assert_success(out: &RunOutput) {
    if let Err(e) = out.ensure_success() {
        panic!("{e}");
    }
}

/// Panics unless the console contains `needle`.
pub fn assert_console_has(out: &RunOutput, needle: &str) {
    assert!(
        out.console.contains(needle),
        "{}: expected {needle:?} on the console; script output:\n{}\n(full log: {:?})",
        out.name,
        out.script_output(),
        out.log
    );
}

/// `checkpoint` over the control socket, asked again (for up to a minute) while a CPU happens
/// to be handling an interrupt at every try; the reply.
pub fn take_checkpoint(c: &mut crate::control::Client) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let v = c.ask("checkpoint");
        let busy = v["error"]
            .as_str()
            .is_some_and(|e| e.contains(quicksilver_proto::abi::Status::NotQuiescent.message()));
        if !busy || std::time::Instant::now() > deadline {
            return v;
        }
    }
}

/// `qsctl stats`' refusals line in `o` ("refused: N accesses to hv memory (last at ...)"), and
/// its count; panics if either is missing (a missing line is a failure, not a pass).
pub fn hv_memory_refusals(o: &str) -> (&str, u64) {
    let line = o
        .lines()
        .find(|l| l.contains("accesses to hv memory"))
        .unwrap_or_else(|| {
            panic!("`qsctl stats` printed no \"refused: N accesses to hv memory\" line:\n{o}")
        });
    let count = line
        .split("refused: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no count in the refusals line: {line}"));
    (line, count)
}
