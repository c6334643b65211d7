//! Checkpoints from gdb: `monitor checkpoint` while gdb holds every CPU, `monitor rollback ID`
//! with a breakpoint set (it stays set, the kernel runs on and hits it again), a checkpoint
//! refused where a CPU cannot be restored exactly (stopped inside an interrupt handler or an
//! NMI handler); and
//! checkpoints and rollbacks from `qsctl` and the control socket while gdb lets the kernel run.

use quicksilver_tests::session::{monitor_checkpoint, GETPID};
use quicksilver_tests::*;
use std::time::Duration;

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
    // checkpoint refuses (the helper runs a moment and stops again).
    monitor_checkpoint(&m, &mut gdb, 1);
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
    // Stopped at the entry of the timer's interrupt handler, before its EOI (Linux ends the
    // interrupt first thing, so deeper in, e.g. in hrtimer_interrupt, nothing is in service
    // any more): that CPU's state cannot be restored exactly, so the checkpoint is refused,
    // naming the CPU and what it is doing, and nothing new is kept.
    m.run(&mut gdb, "delete");
    let out = m.run(&mut gdb, "break sysvec_apic_timer_interrupt");
    if !out.contains("Breakpoint 2 at") {
        m.fail(&gdb, "break sysvec_apic_timer_interrupt", &out);
    }
    let out = m.run(&mut gdb, "continue");
    if !out.contains("Breakpoint 2, ") {
        m.fail(&gdb, "the timer interrupt's breakpoint hits", &out);
    }
    let out = m.run(&mut gdb, "monitor checkpoint");
    if !(out.contains("checkpoint refused: CPU ")
        && out.contains("is handling interrupt vector 0x")
        && out.contains("machine not quiescent"))
    {
        m.fail(
            &gdb,
            "a checkpoint inside an interrupt handler is refused",
            &out,
        );
    }
    let out = m.run(&mut gdb, "monitor checkpoints");
    if out.contains("checkpoint 3:") || !out.contains("checkpoint 2:") {
        m.fail(&gdb, "the refusal kept nothing and lost nothing", &out);
    }
    // Stopped inside an NMI handler (the rollback's notice NMI runs every NMI handler of the
    // kernel's, its backtrace one included): refused too, by name.
    m.run(&mut gdb, "delete");
    let out = m.run(&mut gdb, "break nmi_cpu_backtrace_handler");
    if !out.contains("Breakpoint 3 at") {
        m.fail(&gdb, "break nmi_cpu_backtrace_handler", &out);
    }
    let out = m.run(&mut gdb, "monitor rollback 2");
    if !out.contains("rolled back to checkpoint 2") {
        m.fail(&gdb, "monitor rollback 2", &out);
    }
    let out = m.run(&mut gdb, "continue");
    if !out.contains("Breakpoint 3, ") {
        m.fail(&gdb, "the NMI handler's breakpoint hits", &out);
    }
    let out = m.run(&mut gdb, "monitor checkpoint");
    if !(out.contains("checkpoint refused: CPU ")
        && out.contains("is inside an NMI handler")
        && out.contains("machine not quiescent"))
    {
        m.fail(&gdb, "a checkpoint inside an NMI handler is refused", &out);
    }
    let out = m.run(&mut gdb, "monitor checkpoints");
    if out.contains("checkpoint 3:") || !out.contains("checkpoint 2:") {
        m.fail(&gdb, "that refusal kept nothing and lost nothing", &out);
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
    assert_console_has(&out, "quicksilver: rolled back to checkpoint 2");
    assert_console_has(&out, "WORKLOAD OK");
    assert!(
        out.script_output().contains("deleted 2 checkpoint(s)"),
        "both checkpoints were kept after the detach:\n{}",
        out.script_output()
    );
    assert!(!out.console.contains("GETPID-LOOP FAIL"));
    assert_kernel_clean(&out);
}

/// The guest's own checkpoint and rollback (`qsctl`) while gdb is attached and lets the
/// kernel run with a breakpoint inserted: the checkpoint keeps the kernel's bytes, not gdb's
/// INT3; the rollback puts gdb's INT3 back into the restored text, so the breakpoint still
/// hits afterwards; and after gdb removed it and detached, a second rollback to the same
/// checkpoint brings back no stray INT3 (the getpid loop would oops on one). The hv's
/// rollback count (not rolled back) tells the script which pass it is in.
const QSCTL_WHILE_ATTACHED: &str = r#"
rollbacks() { qsctl checkpoints | sed -n 's/.*; \([0-9]*\) rollbacks$/\1/p'; }
start_workload
echo GUEST-READY
wait_host
echo "state-at-checkpoint" > /tmp/file
out=$(qsctl checkpoint 2>&1)
echo "$out"
case "$out" in
*"rolled back to checkpoint 1"*) ;;
*) echo "changed" > /tmp/file; qsctl rollback 1; echo "rollback returned rc=$?" ;;
esac
n=$(rollbacks)
echo "BACK-AT-CHECKPOINT $n file=$(cat /tmp/file)"
if [ "$n" = 1 ]; then
    wait_host
    qs-workload --getpid-loop 1
    echo GETPID-CALLED
    wait_host
    qsctl rollback 1; echo "second rollback returned rc=$?"
fi
qs-workload --getpid-loop 2
qsctl checkpoint --delete all
stop_workload
"#;

#[test]
fn qsctl_checkpoint_and_rollback_while_gdb_is_attached_and_the_kernel_runs() {
    let mut m = Machine::boot("gdb-qsctl-rollback", 2, QSCTL_WHILE_ATTACHED, "GUEST-READY");
    let mut gdb = m.attach();
    let out = m.run(&mut gdb, &format!("break {GETPID}"));
    if !out.contains("Breakpoint 1 at") {
        m.fail(&gdb, "break", &out);
    }
    // Nothing in the guest calls getpid until told: the checkpoint and the rollback run with
    // the INT3 in the kernel's text.
    m.run(&mut gdb, "continue &");
    m.send("go");
    let line = m.wait_for("BACK-AT-CHECKPOINT 1", Duration::from_secs(120));
    if !line.contains("file=state-at-checkpoint") {
        m.fail(&gdb, "the rollback from qsctl while gdb is attached", &line);
    }
    // The bridge's control socket, too, takes a checkpoint while gdb lets the kernel run (the
    // second rollback, after the detach, drops it again).
    let reply = control_checkpoint(&m);
    if !reply.contains("\"ok\":true") {
        m.fail(
            &gdb,
            "a checkpoint from the control socket while gdb is attached",
            &reply,
        );
    }
    m.send("call getpid");
    if let Err(e) = gdb.wait_for_any(&["Breakpoint 1, "], Duration::from_secs(120)) {
        m.fail(
            &gdb,
            "the breakpoint hits after the rollback",
            &e.to_string(),
        );
    }
    m.run(&mut gdb, "delete");
    let out = m.run(&mut gdb, "detach");
    if !out.contains("detached") {
        m.fail(&gdb, "detach", &out);
    }
    gdb.quit();
    m.wait_for("GETPID-CALLED", Duration::from_secs(60));
    m.send("detached");
    let out = m.finish();
    assert_success(&out);
    assert_console_has(&out, "BACK-AT-CHECKPOINT 2 file=state-at-checkpoint");
    assert_console_has(&out, "WORKLOAD OK");
    assert!(!out.console.contains("GETPID-LOOP FAIL"));
    assert_kernel_clean(&out);
}

/// `checkpoint` on the bridge's control socket, asked again while the answer is "not
/// quiescent" (a CPU in an interrupt handler at every try); the JSON reply line.
fn control_checkpoint(m: &Machine) -> String {
    use std::io::{BufRead, BufReader, Write};
    let path = m
        .control_path()
        .expect("the bridge serves a control socket");
    let stream = std::os::unix::net::UnixStream::connect(path).expect("the control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut c = BufReader::new(stream);
    let not_quiescent = quicksilver_proto::abi::Status::NotQuiescent.message();
    for _ in 0..20 {
        writeln!(c.get_mut(), "checkpoint").unwrap();
        let mut line = String::new();
        c.read_line(&mut line).expect("a reply line");
        if !line.contains(not_quiescent) {
            return line;
        }
    }
    "not quiescent at 20 tries".into()
}
