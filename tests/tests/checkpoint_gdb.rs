//! Checkpoints from gdb: `monitor checkpoint` while gdb holds every CPU, `monitor rollback ID`
//! with a breakpoint set (it stays set, the kernel runs on and hits it again), and a rollback
//! refused where a CPU cannot be restored exactly.

use quicksilver_tests::session::GETPID;
use quicksilver_tests::*;

/// The workload and a getpid loop on every CPU but 0 until the test says so; then the
/// checkpoints go and the hv with them, and the workload checks itself.
const GUEST: &str = r#"
start_workload
taskset -c "$cpus" qs-workload --getpid-loop 0 > /tmp/gp.out &
GP=$!
sleep 2
echo GUEST-READY
wait_host
qsctl checkpoints
qsctl checkpoint --delete all
qsctl deactivate
kill -TERM $GP; wait $GP; cat /tmp/gp.out
stop_workload
"#;

#[test]
fn monitor_checkpoint_and_rollback_with_a_breakpoint_set() {
    let mut m = Machine::boot("gdb-checkpoint", 2, GUEST, "GUEST-READY");
    let mut gdb = m.attach();
    // Attach stops every CPU wherever it is: perhaps one in an interrupt handler, which a
    // checkpoint refuses; then run a moment and stop again.
    let mut taken = false;
    for _ in 0..10 {
        let out = m.run(&mut gdb, "monitor checkpoint");
        if out.contains("checkpoint 1:") {
            taken = true;
            break;
        }
        if !out.contains("machine not quiescent") {
            m.fail(&gdb, "monitor checkpoint", &out);
        }
        m.run(&mut gdb, "continue &");
        std::thread::sleep(std::time::Duration::from_millis(300));
        m.run(&mut gdb, "interrupt");
    }
    if !taken {
        m.fail(&gdb, "no quiescent stop in 10 tries", "");
    }
    let at_checkpoint = m.run(&mut gdb, "info threads");
    let out = m.run(&mut gdb, &format!("break {GETPID}"));
    if !out.contains("Breakpoint 1 at") {
        m.fail(&gdb, "break", &out);
    }
    let out = m.run(&mut gdb, "continue");
    if !out.contains("Breakpoint 1, ") {
        m.fail(&gdb, "the breakpoint hits", &out);
    }
    let out = m.run(&mut gdb, "monitor rollback 1");
    if !out.contains("rolled back to checkpoint 1") {
        m.fail(&gdb, "monitor rollback", &out);
    }
    m.run(&mut gdb, "flushregs");
    let after = m.run(&mut gdb, "info threads");
    if after.contains("sys_getpid") && !at_checkpoint.contains("sys_getpid") {
        m.fail(
            &gdb,
            "gdb sees the CPUs where the checkpoint had them",
            &after,
        );
    }
    // The breakpoint is still set, and the kernel runs from the checkpoint into it again.
    let out = m.run(&mut gdb, "continue");
    if !out.contains("Breakpoint 1, ") {
        m.fail(&gdb, "the breakpoint hits again after the rollback", &out);
    }
    // Stopped at a breakpoint in a system call: a checkpoint can be taken here.
    let out = m.run(&mut gdb, "monitor checkpoint");
    if !out.contains("checkpoint 2:") {
        m.fail(&gdb, "a checkpoint while stopped at a breakpoint", &out);
    }
    let out = m.run(&mut gdb, "monitor checkpoints");
    if !out.contains("checkpoint 1:") || !out.contains("checkpoint 2:") {
        m.fail(&gdb, "monitor checkpoints", &out);
    }
    let out = m.run(&mut gdb, "monitor rollback 7");
    if !out.contains("rollback refused: no checkpoint has that id") {
        m.fail(&gdb, "a rollback to a missing id", &out);
    }
    m.run(&mut gdb, "delete");
    let out = m.run(&mut gdb, "detach");
    if !out.contains("detached") {
        m.fail(&gdb, "detach", &out);
    }
    gdb.quit();
    m.send("detached");
    let out = m.finish();
    assert_success(&out);
    assert_console_has(&out, "quicksilver: rolled back to checkpoint 1");
    assert_console_has(&out, "WORKLOAD OK");
    assert!(
        out.script_output().contains("deleted 2 checkpoint(s)"),
        "both checkpoints were kept after the detach:\n{}",
        out.script_output()
    );
    assert!(!out.console.contains("GETPID-LOOP FAIL"));
    assert_kernel_clean(&out);
}
