// The gdb sessions, included by `gdb.rs` (over the serial link) and `gdb_fast_link.rs` (over
// the fast link's NIC), which each define `boot` and bring the imports: the same assertions
// over either link.

/// The guest part of most tests: the workload runs until the test says so (after gdb
/// detached), then stops and checks itself, and every CPU must be native again.
const WORKLOAD_UNTIL_HOST: &str = r#"
start_workload
sleep 2
echo GUEST-READY
wait_host
stop_workload
check_native
echo "HOSTNAME $(hostname)"
"#;

fn attach_and_look_around(smp: u32) {
    let name = format!("gdb-attach-smp{smp}");
    let mut m = boot(&name, smp, WORKLOAD_UNTIL_HOST, "GUEST-READY");
    let mut gdb = m.attach();

    // One thread per CPU.
    let out = m.run(&mut gdb, "info threads");
    let threads = thread_lines(&out);
    if threads.len() != smp as usize {
        m.fail(&gdb, &format!("info threads: expected {smp} threads"), &out);
    }

    // Every CPU's registers are those of a 64-bit kernel (or of a process it runs).
    let out = m.run(
        &mut gdb,
        "thread apply all info registers cs cr0 cr3 cr4 efer rip fs_base gs_base",
    );
    let blocks = thread_blocks(&out);
    if blocks.len() != smp as usize {
        m.fail(&gdb, "registers of every thread", &out);
    }
    let mut in_kernel = Vec::new();
    let mut at_entry_stub = Vec::new();
    for (thread, regs) in &blocks {
        let reg = |name: &str| {
            register(regs, name)
                .unwrap_or_else(|| m.fail(&gdb, &format!("{thread}: no {name}"), regs))
        };
        let (cs, cr0, cr3, efer, rip) =
            (reg("cs"), reg("cr0"), reg("cr3"), reg("efer"), reg("rip"));
        reg("cr4");
        reg("fs_base");
        let gs_base = reg("gs_base");
        let sane = (cs == 0x10 || cs == 0x33)
            && efer & 0x400 != 0
            && cr0 & 0x8000_0001 == 0x8000_0001
            && cr3 != 0
            && cr3 & 0xfff == 0
            && (cs == 0x33 || rip >= 0xffff_8000_0000_0000);
        if !sane {
            m.fail(
                &gdb,
                &format!("{thread}: registers are not a 64-bit kernel's"),
                regs,
            );
        }
        if cs == 0x10 {
            in_kernel.push(thread.clone());
            // The kernel's per-CPU base, except at an entry from user mode before its
            // `swapgs` (`<asm_exc_page_fault>`, `<entry_SYSCALL_64>`): user's base still.
            let at_entry = regs.lines().any(|l| {
                l.starts_with("rip") && (l.contains("<asm_") || l.contains("<entry_"))
            });
            if gs_base < 0xffff_8000_0000_0000 && !at_entry {
                m.fail(&gdb, &format!("{thread}: gs_base in the kernel"), regs);
            }
            if at_entry {
                at_entry_stub.push(thread.clone());
            }
        }
    }
    if in_kernel.is_empty() {
        m.fail(
            &gdb,
            "no CPU was in the kernel (CPU 0 runs no workload)",
            &out,
        );
    }

    // Memory by virtual address, with the symbols where the running kernel has them (KASLR).
    let out = m.run(&mut gdb, "x/s linux_banner");
    if !out.contains("\"Linux version 6.1") {
        m.fail(&gdb, "x/s linux_banner", &out);
    }
    let out = m.run(&mut gdb, "p init_task.comm");
    if !out.contains("= \"swapper") {
        m.fail(&gdb, "p init_task.comm", &out);
    }
    let out = m.run(&mut gdb, "p jiffies");
    if value_of(&out).is_none_or(|j| j == 0) {
        m.fail(&gdb, "p jiffies", &out);
    }
    // A write the guest can see: its host name (`hostname` prints it after the session).
    m.run(&mut gdb, "set var init_uts_ns.name.nodename[0] = 'Q'");
    let out = m.run(&mut gdb, "p init_uts_ns.name.nodename");
    if !out.contains("= \"Qs-guest") {
        m.fail(&gdb, "set var on the kernel's host name", &out);
    }

    // Backtraces through real kernel functions on the CPUs in the kernel. One CPU made the
    // agent's hypercall that stopped the others: its stack goes through the agent module,
    // whose symbols gdb does not have (module space, 0xffffffffc0000000 and up).
    let out = m.run(&mut gdb, "thread apply all bt 12");
    let mut deepest = 0;
    let mut in_agent = 0;
    for (thread, bt) in thread_blocks(&out) {
        if !in_kernel.contains(&thread) {
            continue;
        }
        if bt.lines().take(3).any(|l| l.contains(" 0xffffffffc0")) {
            in_agent += 1;
            if in_agent > AGENT_CPUS_AT_MOST {
                m.fail(&gdb, "more CPUs stopped in the agent than make hypercalls", &out);
            }
            continue;
        }
        // `#0  0xffffffff9f618710 in cpu_relax () at ...`, `#1  virt_spin_lock (lock=...) at ...`
        let named = |l: &&str| l.starts_with('#') && !l.contains(" ?? (") && l.contains(" (");
        let frames = bt.lines().filter(named).count();
        // Frame #0 must be a kernel function; how deep gdb can walk depends on where the CPU
        // was (from an entry's assembly, `asm_exc_page_fault` or `entry_SYSCALL_64`, it
        // cannot go further: what is above is the user's frame): the depth is required of
        // one CPU at least, below.
        if !bt.lines().next().is_some_and(|l| named(&l)) {
            m.fail(
                &gdb,
                &format!("{thread}: a backtrace without kernel symbols"),
                &bt,
            );
        }
        if !at_entry_stub.contains(&thread) {
            deepest = deepest.max(frames);
        }
    }
    // Every CPU but the agent's may be in user mode, or just entering the kernel from it, at
    // the moment of the stop: then there is no kernel stack to walk.
    let walkable = in_kernel.len().saturating_sub(in_agent + at_entry_stub.len());
    if walkable > 0 && (deepest < 3 || !out.contains(".c:")) {
        m.fail(
            &gdb,
            "no backtrace goes three kernel functions deep with source lines",
            &out,
        );
    }

    // Quicksilver's own commands (QEMU's stub has its monitor's instead).
    if !qemu_stub() {
        let out = m.run(&mut gdb, "monitor help");
        for command in ["status", "stats", "kaslr", "cpus", "devirt"] {
            if !out.contains(command) {
                m.fail(&gdb, &format!("monitor help lists {command}"), &out);
            }
        }
        let out = m.run(&mut gdb, "monitor kaslr");
        if !out.contains(&format!("{:x}", m.kaslr_offset)) {
            m.fail(
                &gdb,
                &format!("monitor kaslr gives the offset {:#x}", m.kaslr_offset),
                &out,
            );
        }
    }

    let out = detach_and_finish(m, gdb);
    assert_console_has(&out, "HOSTNAME Qs-guest");
}

#[test]
fn attach_on_2_cpus_while_the_workload_runs() {
    attach_and_look_around(2);
}

#[test]
fn attach_on_4_cpus_while_the_workload_runs() {
    attach_and_look_around(4);
}

#[test]
fn a_breakpoint_on_the_getpid_handler_hits_and_leaves_no_trace() {
    let mut m = boot("gdb-break", 2, WORKLOAD_AND_GETPID, "GUEST-READY");
    let mut gdb = m.attach();
    let before = m.run(&mut gdb, &format!("x/16xb {GETPID}"));
    let original = bytes_of(&before);
    if original.len() != 16 || original[0] == 0xcc {
        m.fail(&gdb, "the handler's first bytes", &before);
    }

    let out = m.run(&mut gdb, &format!("break {GETPID}"));
    if !out.contains("Breakpoint 1 at") {
        m.fail(&gdb, "break", &out);
    }
    for hit in 1..=2 {
        let out = m.run(&mut gdb, "continue");
        if !out.contains("Breakpoint 1, ") || !out.contains("sys_getpid") {
            m.fail(&gdb, &format!("hit {hit} of the getpid breakpoint"), &out);
        }
        check_syscall_argument(&m, &mut gdb);
        let out = m.run(&mut gdb, "bt");
        if !out.contains("do_syscall_64") {
            m.fail(
                &gdb,
                "the backtrace from the handler reaches do_syscall_64",
                &out,
            );
        }
        let pc = value_of(&m.run(&mut gdb, "p/x $pc"));
        let out = m.run(&mut gdb, "stepi");
        let after = value_of(&m.run(&mut gdb, "p/x $pc"));
        if pc.is_none() || after.is_none() || pc == after {
            m.fail(
                &gdb,
                &format!("stepi from {pc:x?} went to {after:x?}"),
                &out,
            );
        }
        if hit == 2 {
            // A source line further (the handler's code is mostly inlined helpers).
            let out = m.run(&mut gdb, "next");
            let next = value_of(&m.run(&mut gdb, "p/x $pc"));
            if next.is_none_or(|n| Some(n) == after || n < 0xffff_8000_0000_0000)
                || !(out.contains(".c:") || out.contains(".h:") || out.contains("\t"))
            {
                m.fail(
                    &gdb,
                    &format!("next from {after:x?} went to {next:x?}"),
                    &out,
                );
            }
        }
    }
    m.run(&mut gdb, "delete");
    detach(&m, &mut gdb);

    // A second session sees the handler as it was. (Once the bridge has seen the first one
    // end: reconnecting at once is the cycles test's business.)
    m.await_sessions_ended(1);
    m.connect(&mut gdb);
    let after = m.run(&mut gdb, &format!("x/16xb {GETPID}"));
    if bytes_of(&after) != original {
        m.fail(
            &gdb,
            &format!("the handler's bytes after detach differ from before:\n{before}"),
            &after,
        );
    }
    let out = detach_and_finish(m, gdb);
    assert_console_has(&out, "GETPID-LOOP OK");
}

#[test]
fn a_hardware_watchpoint_and_a_hardware_breakpoint_fire() {
    let mut m = boot("gdb-watch", 2, WORKLOAD_AND_GETPID, "GUEST-READY");
    let mut gdb = m.attach();
    let out = m.run(&mut gdb, "watch jiffies");
    if !out.contains("Hardware watchpoint 1: jiffies") {
        m.fail(&gdb, "watch jiffies (a hardware watchpoint)", &out);
    }
    let out = m.run(&mut gdb, "continue");
    let old = out
        .split("Old value = ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
    let new = out
        .split("New value = ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
    if !out.contains("Hardware watchpoint 1: jiffies")
        || !matches!((old, new), (Some(o), Some(n)) if n > o)
    {
        m.fail(&gdb, "the jiffies watchpoint fired with a new value", &out);
    }
    m.run(&mut gdb, "delete");

    let out = m.run(&mut gdb, &format!("hbreak {GETPID}"));
    if !out.contains("Hardware assisted breakpoint 2 at") {
        m.fail(&gdb, "hbreak", &out);
    }
    let out = m.run(&mut gdb, "continue");
    if !out.contains("Breakpoint 2, ") || !out.contains("sys_getpid") {
        m.fail(&gdb, "the hardware breakpoint on the getpid handler", &out);
    }
    let out = m.run(&mut gdb, "info breakpoints");
    if !out.contains("hw breakpoint") || !out.contains("breakpoint already hit 1 time") {
        m.fail(
            &gdb,
            "info breakpoints: a hardware breakpoint, hit once",
            &out,
        );
    }
    check_syscall_argument(&m, &mut gdb);
    m.run(&mut gdb, "delete");
    let out = detach_and_finish(m, gdb);
    assert_console_has(&out, "GETPID-LOOP OK");
}

#[test]
fn interrupt_stops_a_running_kernel_and_kprobes_work_while_attached() {
    // The kprobe sits after the function's ftrace call site, so that it is an INT3 of the
    // kernel's own (at the entry it would go through ftrace).
    let script = r#"
start_workload
sleep 2
echo GUEST-READY
wait_host
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
cd /sys/kernel/tracing
# After the ftrace call: +5 on 6.1, +9 on 6.12 (after its ENDBR64); a kprobe elsewhere than
# an instruction boundary is refused, so the one that takes is the right one.
echo 'p:qsprobe __x64_sys_getpid+9' > kprobe_events || echo 'p:qsprobe __x64_sys_getpid+5' > kprobe_events
echo 1 > events/kprobes/qsprobe/enable
qs-workload --getpid-loop 1
echo 0 > events/kprobes/qsprobe/enable
echo "KPROBE-HITS $(grep -c 'qsprobe:' trace)"
echo '-:qsprobe' >> kprobe_events
cd /
echo KPROBE-DONE
wait_host
stop_workload
check_native
"#;
    let mut m = boot("gdb-interrupt", 2, script, "GUEST-READY");
    let mut gdb = m.attach();
    let out = m.run(&mut gdb, "continue &");
    if !out.contains("Continuing.") {
        m.fail(&gdb, "continue &", &out);
    }
    // The kernel runs under gdb: the guest sets up a kprobe and calls getpid.
    m.send("kprobe");
    let hits = m.wait_for("KPROBE-HITS ", Duration::from_secs(120));
    m.wait_for("KPROBE-DONE", Duration::from_secs(60));
    let fired = hits
        .split_whitespace()
        .last()
        .and_then(|n| n.parse::<u64>().ok());
    if !matches!(fired, Some(n) if n > 0) {
        m.fail(
            &gdb,
            "the kprobe did not fire while gdb was attached",
            &hits,
        );
    }
    // Ctrl-C.
    gdb.send("interrupt").unwrap();
    let out = gdb
        .wait_for_any(&["received signal", " stopped."], Duration::from_secs(60))
        .unwrap_or_else(|e| m.fail(&gdb, "interrupt did not stop the kernel", &e.to_string()));
    let threads = m.run(&mut gdb, "info threads");
    if thread_lines(&threads).len() != 2 || threads.contains("(running)") {
        m.fail(
            &gdb,
            &format!("after the interrupt ({out}) every CPU is stopped"),
            &threads,
        );
    }
    let out = m.run(&mut gdb, "p jiffies");
    if value_of(&out).is_none() {
        m.fail(&gdb, "p jiffies after the interrupt", &out);
    }
    let out = detach_and_finish(m, gdb);
    assert_console_has(&out, "GETPID-LOOP OK");
}

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

#[test]
fn gdb_can_reconnect_at_once_after_a_detach() {
    // As a gdb script would: `detach`, then `target remote` again straight away.
    let mut m = boot("gdb-reconnect", 2, WORKLOAD_UNTIL_HOST, "GUEST-READY");
    let mut gdb = m.attach();
    for session in 1..=3 {
        detach(&m, &mut gdb);
        let out = m.run(&mut gdb, &format!("target remote {}", m.addr()));
        let threads = m.run(&mut gdb, "info threads");
        if thread_lines(&threads).len() != 2 {
            m.fail(
                &gdb,
                &format!("reconnecting at once after detach {session}"),
                &format!("{out}{threads}"),
            );
        }
    }
    detach_and_finish(m, gdb);
}

#[test]
fn kill_from_gdb_detaches_and_the_machine_runs_on() {
    if qemu_stub() {
        eprintln!("skipped with QS_GDB_STUB=qemu: QEMU's stub does kill the machine");
        return;
    }
    let mut m = boot("gdb-kill", 2, WORKLOAD_UNTIL_HOST, "GUEST-READY");
    let mut gdb = m.attach();
    let out = m.run(&mut gdb, "kill");
    if !out.contains("killed") {
        m.fail(&gdb, "kill", &out);
    }
    gdb.quit();
    m.send("killed");
    let log = m.bridge_log();
    let out = m.finish();
    assert_clean_end(&out);
    assert!(
        log.contains("detached instead, the kernel keeps running"),
        "the bridge says a kill is a detach:\n{log}"
    );
}

#[test]
fn a_second_gdb_is_refused_while_one_is_attached() {
    if qemu_stub() {
        eprintln!("skipped with QS_GDB_STUB=qemu: QEMU's stub leaves a second client hanging");
        return;
    }
    let mut m = boot("gdb-second-client", 2, WORKLOAD_UNTIL_HOST, "GUEST-READY");
    let mut first = m.attach();
    let mut second = m.gdb();
    let out = m.run(&mut second, &format!("target remote {}", m.addr()));
    let threads = m.run(&mut second, "info threads");
    if !threads.contains("No threads") {
        m.fail(
            &second,
            &format!("the second gdb got a session: {out}"),
            &threads,
        );
    }
    second.quit();
    // The first session is unaffected.
    let out = m.run(&mut first, "info threads");
    if thread_lines(&out).len() != 2 {
        m.fail(&first, "the first gdb after the second was refused", &out);
    }
    let out = m.run(&mut first, "p jiffies");
    if value_of(&out).is_none() {
        m.fail(&first, "p jiffies in the first session", &out);
    }
    detach(&m, &mut first);
    first.quit();
    m.send("detached");
    let log = m.bridge_log();
    let out = m.finish();
    assert_clean_end(&out);
    assert!(
        log.contains("refused a second GDB client"),
        "the bridge says it refused the second gdb:\n{log}"
    );
}

#[test]
fn attach_works_again_after_a_session_longer_than_ten_seconds() {
    // Linux charges a stop to the task that ran on each CPU as run time, and CFS then holds
    // that task back for as long. The agent's own thread must never be that task: once, a
    // 15 s session left the next attach waiting 15 s for it, past the hv's 10 s limit on an
    // attention request's age, and gdb was never served. CPU 0 (the link's interrupt) runs a
    // getpid loop too, so that the charged task competes with something there.
    let script = r#"
taskset -c 0 qs-workload --getpid-loop 0 > /tmp/gp.out &
GP=$!
start_workload
sleep 2
echo GUEST-READY
wait_host
kill -TERM $GP; wait $GP; cat /tmp/gp.out
stop_workload
check_native
"#;
    let mut m = boot("gdb-long-session", 2, script, "GUEST-READY");
    let mut gdb = m.attach();
    // A user reading, thinking: the machine stays stopped meanwhile.
    std::thread::sleep(Duration::from_secs(12));
    let threads = m.run(&mut gdb, "info threads");
    if thread_lines(&threads).len() != 2 {
        m.fail(&gdb, "info threads after 12 s", &threads);
    }
    detach(&m, &mut gdb);
    m.await_sessions_ended(1);
    let out = m.run(&mut gdb, &format!("target remote {}", m.addr()));
    let threads = m.run(&mut gdb, "info threads");
    if thread_lines(&threads).len() != 2 {
        m.fail(&gdb, "attaching again", &format!("{out}{threads}"));
    }
    let out = detach_and_finish(m, gdb);
    assert_console_has(&out, "GETPID-LOOP OK");
}

/// A guest that, once the host lets it go on, runs `sync` (its handler is where the test puts a
/// breakpoint): an INT3 left there by a gdb that died would oops the kernel.
const WORKLOAD_THEN_SYNC: &str = r#"
start_workload
sleep 2
echo GUEST-READY
wait_host
sync && echo SYNC-OK
stop_workload
check_native
"#;

#[test]
fn a_gdb_killed_mid_continue_with_a_breakpoint_set_ends_like_a_detach() {
    if qemu_stub() {
        eprintln!(
            "skipped with QS_GDB_STUB=qemu: the bridge's detach on gdb's behalf is Quicksilver's"
        );
        return;
    }
    let mut m = boot("gdb-killed-running", 2, WORKLOAD_THEN_SYNC, "GUEST-READY");
    let mut gdb = m.attach();
    let out = m.run(&mut gdb, "break __x64_sys_sync");
    if !out.contains("Breakpoint 1 at") {
        m.fail(&gdb, "break __x64_sys_sync", &out);
    }
    // The kernel runs (nothing calls sync yet) with the breakpoint in its text; then gdb dies.
    if let Err(e) = gdb.send("continue") {
        m.fail(&gdb, &format!("continue: {e}"), "");
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    drop(gdb);
    m.await_sessions_ended(1);
    // Every CPU must be native again (check_native), and the breakpoint gone (sync runs).
    m.send("gdb was killed");
    let log = m.bridge_log();
    let out = m.finish();
    assert_clean_end(&out);
    assert_console_has(&out, "SYNC-OK");
    assert!(
        log.contains("sent a detach on its behalf"),
        "the bridge says it detached for the gdb that died:\n{log}"
    );
}

