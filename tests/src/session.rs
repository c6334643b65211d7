//! The pieces of a gdb session that the gdb tests (`gdb.rs`) and the kernel matrix
//! (`matrix.rs`) share: the guest's workload, how a session must end, and the getpid
//! handler gdb breaks on.

use crate::{assert_console_has, assert_kernel_clean, assert_success, Artifacts};
use qs_testkit::gdb::{register, value_of};
use qs_testkit::{Gdb, Machine, RunOutput};

/// The guest part of most sessions: the workload, and a getpid loop on every CPU but 0 (like
/// the workload), until the test says so (after gdb detached); then the getpid loop runs again
/// for 2 s (a breakpoint left in the handler would hit a kernel without gdb: an oops), the
/// workload stops and checks itself, and every CPU must be native again.
pub const WORKLOAD_AND_GETPID: &str = r#"
start_workload
taskset -c "$cpus" qs-workload --getpid-loop 0 > /tmp/gp.out &
GP=$!
sleep 2
echo GUEST-READY
wait_host
kill -TERM $GP; wait $GP; cat /tmp/gp.out
qs-workload --getpid-loop 2
stop_workload
check_native
"#;

/// The kernel function behind getpid(2) in 6.1 and 6.12 (`SYSCALL_DEFINE0(getpid)`).
pub const GETPID: &str = "__x64_sys_getpid";

/// Checks what every run must end with: the script passed, the workload verified itself,
/// every CPU is native, and the kernel log is clean.
pub fn assert_clean_end(out: &RunOutput) {
    assert_success(out);
    assert_console_has(out, "WORKLOAD OK");
    assert_console_has(out, "PROBE-NATIVE-OK");
    assert!(
        !out.console.contains("GETPID-LOOP FAIL"),
        "{}: a getpid call returned a wrong value:\n{}",
        out.name,
        out.script_output()
    );
    assert_kernel_clean(out);
}

/// How a session ends: gdb detaches and quits, the guest's script finishes, and the run must
/// end clean ([`assert_clean_end`]). The run, for the test's own checks.
pub fn detach_and_finish(mut m: Machine, mut gdb: Gdb) -> RunOutput {
    detach(&m, &mut gdb);
    gdb.quit();
    m.send("detached");
    let out = m.finish();
    assert_clean_end(&out);
    out
}

/// `detach`, which must say so.
pub fn detach(m: &Machine, gdb: &mut Gdb) {
    let out = m.run(gdb, "detach");
    if !out.contains("detached") {
        m.fail(gdb, "detach did not detach", &out);
    }
}

/// gdb's `monitor checkpoint` until checkpoint `id` is taken: a stop that found a CPU inside an
/// interrupt handler cannot be checkpointed ("machine not quiescent"), so the kernel runs a
/// moment and gdb stops it again, up to 10 times. Anything else fails the test.
pub fn monitor_checkpoint(m: &Machine, gdb: &mut Gdb, id: u32) {
    for tries in 0..10 {
        let mut out = m.run(gdb, "monitor checkpoint");
        // `interrupt` returns before the stop is in: wait for it.
        for _ in 0..50 {
            if !out.contains("while the target is running") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
            out = m.run(gdb, "monitor checkpoint");
        }
        if out.contains(&format!("checkpoint {id}:")) {
            if tries > 0 {
                eprintln!("monitor checkpoint: taken after {tries} refusal(s)");
            }
            return;
        }
        if !out.contains("machine not quiescent") {
            m.fail(gdb, "monitor checkpoint", &out);
        }
        eprintln!("monitor checkpoint refused: {}", out.trim());
        m.run(gdb, "continue &");
        std::thread::sleep(std::time::Duration::from_millis(300));
        m.run(gdb, "interrupt");
    }
    m.fail(gdb, "no quiescent stop in 10 tries", "");
}

/// At the entry of the getpid handler: its argument is the user's registers (the wrappers
/// take `const struct pt_regs *`, on the kernel stack) in rdi, and their orig_ax is the system
/// call's number. (The argument by name, `__unused`: a cast to `struct pt_regs *` would be as
/// good, but gdb spends some 20 s of CPU looking the type up in this vmlinux.)
pub fn check_syscall_argument(m: &Machine, gdb: &mut Gdb) {
    let out = m.run(gdb, "info registers rdi");
    let rdi = register(&out, "rdi");
    if rdi.is_none_or(|rdi| rdi < 0xffff_8000_0000_0000) {
        m.fail(gdb, "rdi holds the pt_regs pointer", &out);
    }
    let out = m.run(gdb, "info args");
    if !out.contains(&format!("__unused = {:#x}", rdi.unwrap_or(0))) {
        m.fail(
            gdb,
            &format!("the handler's argument is rdi ({rdi:#x?})"),
            &out,
        );
    }
    let out = m.run(gdb, "p __unused->orig_ax");
    if value_of(&out) != Some(39) {
        m.fail(gdb, "the system call number (getpid = 39)", &out);
    }
}

/// One session as a user runs it on any kernel: attach on 4 CPUs while the workload runs, a
/// breakpoint on the getpid handler (hit, with the right argument), a hardware watchpoint on
/// jiffies (fires with a larger value), detach; then every CPU is native and the kernel clean.
pub fn gdb_session(a: &Artifacts, name: &str) {
    let mut m = Machine::boot_on(a, name, 4, WORKLOAD_AND_GETPID, "GUEST-READY");
    let mut gdb = m.attach();
    let out = m.run(&mut gdb, &format!("break {GETPID}"));
    if !out.contains("Breakpoint 1 at") {
        m.fail(&gdb, "break", &out);
    }
    let out = m.run(&mut gdb, "continue");
    if !out.contains("Breakpoint 1, ") || !out.contains("sys_getpid") {
        m.fail(&gdb, "the getpid breakpoint", &out);
    }
    check_syscall_argument(&m, &mut gdb);
    m.run(&mut gdb, "delete");
    let out = m.run(&mut gdb, "watch jiffies");
    if !out.contains("Hardware watchpoint 2: jiffies") {
        m.fail(&gdb, "watch jiffies (a hardware watchpoint)", &out);
    }
    let out = m.run(&mut gdb, "continue");
    let value = |label: &str| {
        out.split(label)
            .nth(1)
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
    };
    if !matches!((value("Old value = "), value("New value = ")), (Some(o), Some(n)) if n > o) {
        m.fail(&gdb, "the jiffies watchpoint fired with a new value", &out);
    }
    m.run(&mut gdb, "delete");
    let out = detach_and_finish(m, gdb);
    assert_console_has(&out, "GETPID-LOOP OK");
}
