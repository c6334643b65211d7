//! Checkpoints from the bridge's control socket, as a terminal UI would drive them: with the
//! bridge connected to a running guest under the workload and the ledger, a client takes and
//! lists checkpoints, a subscribed client hears of every one (also of one `qsctl` took inside
//! the guest), a rollback over the socket puts the machine back (the kernel says so, the
//! ledger's count goes back and checks out), the same bridge session works on afterwards, and
//! bad requests get errors that say what to type; the periodic ring is set and stopped.

use quicksilver_proto::abi::Status;
use quicksilver_tests::control::Client;
use quicksilver_tests::*;
use std::time::Duration;

/// The ledger and the workload; then the host's commands, one per line: `qsctl` takes a
/// checkpoint with qsctl and leaves a marker file in tmpfs (a rollback to before it removes
/// it), `done` ends. A loop, so that a rollback (which puts the shell back
/// into an earlier `wait_host`) changes nothing in what the next line does.
const GUEST: &str = r#"
start_workload
qs-workload --ledger /tmp/ledger &
LP=$!
sleep 2
echo GUEST-READY
while true; do
    wait_host
    case "$host_line" in
    qsctl) echo "QSCTL-SAID $(qsctl checkpoint 2>&1)"; echo "after checkpoint 2" > /tmp/marker ;;
    done) break ;;
    esac
done
echo "MARKER: $(cat /tmp/marker 2>/dev/null || echo none)"
qsctl stats | grep "^link:"
kill -TERM $LP; wait $LP; echo "ledger-rc=$?"
qsctl checkpoints
stop_workload
"#;

#[test]
fn control_clients_checkpoint_list_and_roll_back_a_running_machine_and_hear_of_it() {
    let mut m = Machine::boot("control-checkpoints", 2, GUEST, "GUEST-READY");
    let path = m
        .control_path()
        .expect("the bridge's control socket")
        .to_path_buf();
    let mut c = Client::connect(&path);
    let mut sub = Client::connect(&path);
    assert_eq!(sub.ask("subscribe")["subscribed"], true);

    let t = take_checkpoint(&mut c);
    assert_eq!(t["ok"], true, "{t}");
    assert_eq!(t["id"], 1, "{t}");
    assert!(t["pause_us"].as_u64().is_some_and(|p| p > 0), "{t}");
    assert_eq!(t["cpus"], 2, "{t}");
    let e = sub.event();
    assert_eq!(
        (e["event"].as_str(), e["id"].as_u64()),
        (Some("checkpoint"), Some(1)),
        "{e}"
    );

    let l = c.ask("checkpoints");
    assert_eq!(l["ok"], true, "{l}");
    assert_eq!(l["count"], 1, "{l}");
    assert_eq!(l["checkpoints"][0]["id"], 1, "{l}");
    assert_eq!(l["checkpoints"][0]["current"], true, "{l}");

    // qsctl inside the guest: the subscriber hears of it too.
    m.send("qsctl");
    let said = m.wait_for("QSCTL-SAID", Duration::from_secs(120));
    assert!(said.contains("checkpoint 2:"), "{said}");
    let e = sub.event();
    assert_eq!(
        (e["event"].as_str(), e["id"].as_u64()),
        (Some("checkpoint"), Some(2)),
        "{e}"
    );

    // Back to 1 over the socket: the machine (the shell, the ledger, the agent) is where it
    // was then, and says so.
    let r = c.ask("rollback 1");
    assert_eq!(r["ok"], true, "{r} (qs-bridge said:\n{})", m.bridge_log());
    assert_eq!(r["id"], 1, "{r}");
    assert!(r["age_ms"].as_u64().is_some_and(|a| a > 0), "{r}");
    assert_eq!(r["dropped"], 1, "checkpoint 2 was newer: {r}");
    let e = sub.event();
    assert_eq!(
        (e["event"].as_str(), e["id"].as_u64()),
        (Some("rollback"), Some(1)),
        "{e}"
    );
    m.wait_for(
        "rolled back to checkpoint 1, taken",
        Duration::from_secs(60),
    );

    // The same bridge session works on: the machine's link state was not rolled back.
    let l = c.ask("checkpoints");
    assert_eq!(l["ok"], true, "{l}");
    let ids: Vec<u64> = l["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["id"].as_u64())
        .collect();
    assert!(ids.contains(&1), "{l}");
    assert_eq!(c.ask("status")["link"], "authenticated");

    // Bad requests, and refusals from the engine, say what to do.
    for (bad, says) in [
        ("rollback", "rollback needs the checkpoint's id"),
        ("rollback abc", "'abc' is not a checkpoint id"),
        ("delete", "delete all"),
        ("rollback 99", Status::NoSuchCheckpoint.message()),
        ("delete 99", Status::NoSuchCheckpoint.message()),
        ("frobnicate", "unknown command 'frobnicate': try help"),
        ("periodic 1", "at least"),
    ] {
        let e = c.ask(bad);
        assert_eq!(e["ok"], false, "{bad}: {e}");
        assert!(e["error"].as_str().unwrap().contains(says), "{bad}: {e}");
    }

    // The periodic ring from the socket: on (the list says so, and periodic checkpoints come;
    // they are counted, not announced), then off.
    let p = c.ask("periodic 200 3");
    assert_eq!(p["ok"], true, "{p}");
    std::thread::sleep(Duration::from_secs(3));
    let l = c.ask("checkpoints");
    assert_eq!(
        (
            l["periodic"]["every_ms"].as_u64(),
            l["periodic"]["keep"].as_u64()
        ),
        (Some(200), Some(3)),
        "{l}"
    );
    let periodic = l["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["periodic"] == true)
        .count();
    assert!((1..=3).contains(&periodic), "the ring keeps 3 at most: {l}");
    assert_eq!(c.ask("periodic off")["ok"], true);
    assert_eq!(c.ask("checkpoints")["periodic"]["every_ms"], 0);

    let d = c.ask("delete all");
    assert_eq!(d["ok"], true, "{d}");
    assert!(
        d["deleted"].as_u64().unwrap_or(0) >= ids.len() as u64,
        "{d}"
    );
    let e = sub.event();
    assert_eq!(
        (e["event"].as_str(), e["id"].as_str()),
        (Some("delete"), Some("all")),
        "{e}"
    );
    assert_eq!(c.ask("checkpoints")["count"], 0);

    m.send("done");
    m.wait_for("ledger-rc=", Duration::from_secs(120));
    let m_bridge_log = m.bridge_log();
    let out = m.finish();
    let o = out.script_output();
    assert_success(&out);
    assert!(o.contains("LEDGER OK") && o.contains("ledger-rc=0"), "{o}");
    assert_console_has(&out, "WORKLOAD OK");
    assert_console_has(&out, "checkpoint 1 taken at the link's request (qs-bridge)");
    assert_console_has(&out, "quicksilver: rolled back to checkpoint 1, taken");
    // The marker written after checkpoint 1 is gone with the rollback; the ledger (counts in
    // memory, in tmpfs and through a pipe) checked out at every step across it.
    assert!(o.contains("MARKER: none"), "{o}");
    // The agent's thread was rolled back into the call that took checkpoint 1 for the bridge,
    // and answered it again when that call returned a second time: the hv dropped that reply
    // (the bridge got its answer long before), and the link's session went on.
    assert!(
        o.contains(" 1 checkpoint replies from before a rollback dropped"),
        "{o}"
    );
    // Nor did the machine's replay guard refuse any of the bridge's frames across it: its
    // session's state is the hv's, which was not rolled back.
    assert!(
        o.contains("link: bridge authenticated; 0 frames dropped"),
        "{o}"
    );
    assert!(
        !m_bridge_log.contains("dropped a checkpoint reply"),
        "no stale reply reached the bridge:\n{m_bridge_log}"
    );
    assert_kernel_clean(&out);
}

/// The workload until the host says so; then the checkpoints go and the workload checks itself.
const GUEST_FOR_GDB: &str = r#"
start_workload
sleep 2
echo GUEST-READY
wait_host
qsctl checkpoints
stop_workload
"#;

#[test]
fn while_gdb_holds_the_cpus_the_socket_lists_checkpoints_and_refuses_the_rest_with_what_to_do() {
    let mut m = Machine::boot("control-gdb", 2, GUEST_FOR_GDB, "GUEST-READY");
    let path = m
        .control_path()
        .expect("the bridge's control socket")
        .to_path_buf();
    let mut c = Client::connect(&path);
    let mut sub = Client::connect(&path);
    assert_eq!(sub.ask("subscribe")["subscribed"], true);
    let mut gdb = m.attach();
    let r = c.ask("checkpoint");
    assert_eq!(r["ok"], false, "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(
        e.contains("monitor checkpoint") && e.contains("detach gdb"),
        "{r}"
    );
    // gdb's checkpoint is announced like any other (a stop in an interrupt handler cannot be
    // checkpointed: run a moment and stop again).
    quicksilver_tests::session::monitor_checkpoint(&m, &mut gdb, 1);
    let ev = sub.event();
    assert_eq!(
        (ev["event"].as_str(), ev["id"].as_u64()),
        (Some("checkpoint"), Some(1)),
        "{ev}"
    );
    // The list is answered while the CPUs are stopped (the hv reads it from its own state).
    let l = c.ask("checkpoints");
    assert_eq!(l["count"], 1, "{l}");
    assert_eq!(c.ask("rollback 1")["ok"], false);
    let out = m.run(&mut gdb, "detach");
    if !out.contains("detached") {
        m.fail(&gdb, "detach", &out);
    }
    gdb.quit();
    // Once gdb is gone, the socket serves everything again.
    let d = c.ask("delete all");
    assert_eq!(d["ok"], true, "{d} (qs-bridge said:\n{})", m.bridge_log());
    assert_eq!(d["deleted"], 1, "{d}");
    m.send("done");
    let out = m.finish();
    assert_success(&out);
    assert_console_has(&out, "WORKLOAD OK");
    assert_kernel_clean(&out);
}

/// The periodic ring for a second, then off, when the host says `ring`; `done` ends.
const GUEST_RING: &str = r#"
start_workload
sleep 2
echo GUEST-READY
while true; do
    wait_host
    case "$host_line" in
    ring) qsctl checkpoint --every 100ms --keep 3; sleep 1; qsctl checkpoint --every off; echo RING-OFF ;;
    done) break ;;
    esac
done
qsctl status | head -1
stop_workload
"#;

#[test]
fn the_periodic_ring_is_counted_in_events_not_announced_one_by_one() {
    let mut m = Machine::boot("control-ring", 2, GUEST_RING, "GUEST-READY");
    let path = m
        .control_path()
        .expect("the bridge's control socket")
        .to_path_buf();
    let mut c = Client::connect(&path);
    let mut sub = Client::connect(&path);
    assert_eq!(sub.ask("subscribe")["subscribed"], true);
    m.send("ring");
    m.wait_for("RING-OFF", Duration::from_secs(120));
    let t = take_checkpoint(&mut c);
    assert_eq!(t["ok"], true, "{t}");
    // The first event the subscriber gets is this checkpoint: none came for the ring's.
    let e = sub.event();
    assert_eq!(e["event"], "checkpoint", "{e}");
    assert_eq!(e["id"], t["id"], "{e}");
    assert!(
        e["periodic_taken"].as_u64().is_some_and(|n| n >= 5),
        "about 10 periodic checkpoints were counted: {e}"
    );
    let l = c.ask("checkpoints");
    let periodic = l["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["periodic"] == true)
        .count();
    assert_eq!(periodic, 3, "the ring kept its last 3: {l}");
    let d = c.ask("delete all");
    assert_eq!(d["deleted"], 4, "{d}");
    assert_eq!(sub.event()["event"], "delete");
    m.send("done");
    let out = m.finish();
    assert_success(&out);
    // The ring woke the hv; with its checkpoints deleted over the socket it sleeps again, as
    // after `qsctl checkpoint --delete all`.
    assert_console_has(&out, "state: dormant");
    assert_console_has(&out, "WORKLOAD OK");
    assert_kernel_clean(&out);
}
