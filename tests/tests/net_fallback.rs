//! The network dies mid-session (issue 13): gdb attached through `qs-bridge` over the fast
//! link, then QEMU's monitor takes the NIC's link down (`set_link qsfast off`). gdb goes on
//! over the serial link (memory, registers, a step), `monitor link` says so and the bridge's
//! log says the fast link is down; with the link back the bridge says it is up again and the
//! session moves back. Then the same while the kernel runs: gdb continues towards a
//! breakpoint, the link dies, and the stop reply still reaches gdb (through serial) when the
//! breakpoint hits. gdb detaches, the kernel is clean.

use qs_testkit::qemu::{hmp, FastLinkNic};
use quicksilver_tests::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// The workload, then (after the host's first word, while gdb continues) `sync`, whose
/// handler gdb breaks on; after the second the end.
const SCRIPT: &str = r#"
start_workload
echo GUEST-READY
wait_host
sync && echo SYNC-OK
wait_host
stop_workload
qsctl stats | grep -E "hv stack|^fast link:"
check_native
"#;

/// Waits until the bridge's log says `needle` `count` times.
fn await_bridge(m: &Machine, needle: &str, count: usize, timeout: Duration) {
    let give_up = Instant::now() + timeout;
    while m.bridge_log().matches(needle).count() < count {
        if Instant::now() > give_up {
            panic!(
                "{}: the bridge did not say {needle:?} ({count}) within {timeout:?}:\n{}",
                m.name,
                m.bridge_log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn set_link(monitor: &Path, up: bool) {
    let command = format!("set_link qsfast {}", if up { "on" } else { "off" });
    let out = hmp(monitor, &command, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("QEMU's monitor, {command}: {e}"));
    assert!(out.trim().is_empty(), "{command}: {out}");
}

/// `monitor link` says `carrier` carries the session.
fn carried_by(m: &Machine, gdb: &mut Gdb, carrier: &str) -> String {
    let out = m.run(gdb, "monitor link");
    if !out.contains(&format!("the session is carried by {carrier}")) {
        m.fail(gdb, &format!("monitor link should name {carrier}"), &out);
    }
    out
}

/// What gdb reads of the stopped machine: `jiffies` from memory, the program counter, and
/// the instruction one `stepi` later.
fn inspect_and_step(m: &Machine, gdb: &mut Gdb, what: &str) {
    let out = m.run(gdb, "print jiffies");
    let read = out
        .split(" = ")
        .nth(1)
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
    if read.is_none_or(|j| j == 0) {
        m.fail(gdb, &format!("{what}: reading jiffies"), &out);
    }
    let out = m.run(gdb, "info registers rip rsp");
    let pc = register(&out, "rip").unwrap_or_else(|| m.fail(gdb, &format!("{what}: rip"), &out));
    if register(&out, "rsp").is_none() {
        m.fail(gdb, &format!("{what}: rsp"), &out);
    }
    let out = m.run(gdb, "stepi");
    let after = value_of(&m.run(gdb, "p/x $pc"))
        .unwrap_or_else(|| m.fail(gdb, &format!("{what}: $pc after stepi"), &out));
    if after == pc {
        m.fail(gdb, &format!("{what}: stepi did not move {pc:#x}"), &out);
    }
}

#[test]
fn when_the_fast_link_dies_gdb_goes_on_over_serial_stopped_or_running() {
    let a = artifacts();
    let name = "net-fallback";
    // In the temporary folder: a Unix socket's path is limited to 107 bytes.
    let monitor = std::env::temp_dir().join(format!("qs-mon-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&monitor);
    let mut config = Machine::config(name, 2, SCRIPT, "GUEST-READY");
    config.fast_link = Some(FastLinkNic::VirtioNet);
    config.qemu_args = vec![
        "-monitor".into(),
        format!("unix:{},server=on,wait=off", monitor.display()),
    ];
    let mut m = Machine::start(&a, &config).unwrap_or_else(|e| panic!("{e}"));
    // `connect` checks that `monitor link` names the fast link.
    let mut gdb = m.attach();
    inspect_and_step(&m, &mut gdb, "over the fast link");

    // The network dies with every CPU stopped.
    set_link(&monitor, false);
    await_bridge(&m, "the fast link is down", 1, Duration::from_secs(30));
    inspect_and_step(&m, &mut gdb, "over serial, the fast link down");
    let out = carried_by(&m, &mut gdb, "the serial link");
    if !out.contains(": down (") {
        m.fail(&gdb, "monitor link says why the fast link is down", &out);
    }
    set_link(&monitor, true);
    await_bridge(&m, "the fast link is up again", 1, Duration::from_secs(30));
    carried_by(&m, &mut gdb, "the fast link");
    inspect_and_step(&m, &mut gdb, "over the fast link again");

    // The network dies while the kernel runs towards a breakpoint.
    let out = m.run(&mut gdb, "break __x64_sys_sync");
    if !out.contains("Breakpoint 1 at") {
        m.fail(&gdb, "break __x64_sys_sync", &out);
    }
    if let Err(e) = gdb.send("continue") {
        m.fail(&gdb, &format!("continue: {e}"), "");
    }
    std::thread::sleep(Duration::from_secs(1));
    set_link(&monitor, false);
    await_bridge(&m, "the fast link is down", 2, Duration::from_secs(30));
    m.send("sync now");
    let stop = gdb
        .wait_for_any(&["Breakpoint 1, "], Duration::from_secs(60))
        .unwrap_or_else(|e| {
            m.fail(
                &gdb,
                "the breakpoint's stop reply did not reach gdb with the fast link down",
                &e.to_string(),
            )
        });
    println!("{stop}");
    carried_by(&m, &mut gdb, "the serial link");
    let out = m.run(&mut gdb, "bt 3");
    if !out.contains("sync") {
        m.fail(&gdb, "the backtrace at the breakpoint", &out);
    }
    inspect_and_step(&m, &mut gdb, "at the breakpoint, over serial");
    m.run(&mut gdb, "delete");
    set_link(&monitor, true);
    await_bridge(&m, "the fast link is up again", 2, Duration::from_secs(30));
    carried_by(&m, &mut gdb, "the fast link");
    let log = m.bridge_log();
    println!("qs-bridge said:\n{log}");
    quicksilver_tests::session::detach(&m, &mut gdb);
    gdb.quit();
    m.send("detached");
    let out = m.finish();
    let _ = std::fs::remove_file(&monitor);
    quicksilver_tests::session::assert_clean_end(&out);
    assert_console_has(&out, "SYNC-OK");
    println!("{}", out.script_output());
}
