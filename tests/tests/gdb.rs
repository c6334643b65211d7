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

include!("gdb/sessions.rs");

// Over the serial link only, for now: over the fast link, gdb 13.1 hit an internal error
// (`inferior_thread: Assertion current_thread_ != nullptr`) at the 11th `target remote` of
// this test in one of five runs (once it died of a bus error instead). Open, in issue 13's
// notes; the fast link's single reconnect right after a detach passes.
#[test]
fn twenty_attach_detach_cycles_leave_the_kernel_unharmed() {
    let mut m = boot("gdb-cycles", 2, WORKLOAD_UNTIL_HOST, "GUEST-READY");
    let mut gdb = m.gdb();
    for cycle in 1..=20 {
        m.connect(&mut gdb);
        let out = m.run(&mut gdb, "info threads");
        if thread_lines(&out).len() != 2 {
            m.fail(&gdb, &format!("cycle {cycle}: info threads"), &out);
        }
        detach(&m, &mut gdb);
        // Let the kernel and the workload run a little between sessions (and the bridge see
        // this one end: reconnecting at once has a test of its own).
        m.await_sessions_ended(cycle);
        std::thread::sleep(Duration::from_millis(300));
    }
    gdb.quit();
    m.send("detached");
    let out = m.finish();
    assert_clean_end(&out);
}
