//! The runner against the real guest: boots the cached kernel with the built initramfs
//! (`cargo xtask build` first; `cargo xtask test` does both). The agent is not loaded
//! (`qs.noload`): these tests check the infrastructure the Quicksilver tests stand on.

use std::time::Duration;

use qs_testkit::{Artifacts, QemuError};

fn artifacts() -> Artifacts {
    Artifacts::locate().unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_script_runs_and_its_status_and_output_come_back() {
    let a = artifacts();
    let out = a
        .qemu("runner-script")
        .smp(2)
        .noload()
        .file("/root/data.txt", 0o644, "payload from the host\n")
        .run_script("uname -r\ncat /root/data.txt\necho answer=$((6 * 7))\nexit 3\n")
        .unwrap();
    assert_eq!(out.script_status, Some(3), "{}", out.console);
    let script = out.script_output();
    assert!(script.contains(&a.kernel.release), "{script}");
    assert!(
        script.contains("payload from the host") && script.contains("answer=42"),
        "{script}"
    );
    assert!(out.console.contains("QS-NOLOAD"));
    assert!(out.booted_after.is_some_and(|t| t < out.elapsed));
    let err = out.ensure_success().unwrap_err().to_string();
    assert!(
        err.contains("status 3") && err.contains("answer=42"),
        "{err}"
    );
    let log = std::fs::read_to_string(out.log.as_ref().unwrap()).unwrap();
    assert!(log.contains("answer=42"));
}

#[test]
fn the_workload_passes_after_the_kvm_modules_load() {
    let out = artifacts()
        .qemu("runner-workload")
        .smp(2)
        .noload()
        .run_script(
            "set -e\n\
             for m in $(cat /lib/quicksilver/kvm-modules); do insmod $m; done\n\
             lsmod | grep kvm_amd\n\
             qs-workload --seconds 4 --threads 2\n",
        )
        .unwrap();
    out.ensure_success().unwrap();
    assert!(out.console.contains("WORKLOAD OK"), "{}", out.console);
    assert!(
        out.console.contains("workload: alive t=2"),
        "{}",
        out.console
    );
}

#[test]
fn the_console_can_be_driven_interactively() {
    let mut guest = artifacts()
        .qemu("runner-interactive")
        .smp(1)
        .noload()
        .spawn()
        .unwrap();
    guest
        .wait_for("qs-guest:", Duration::from_secs(60))
        .unwrap();
    guest.send("echo sum=$((40 + 2))\n").unwrap();
    let line = guest.wait_for("sum=42", Duration::from_secs(30)).unwrap();
    assert_eq!(line.trim(), "sum=42");
    guest.send("poweroff\n").unwrap();
    let out = guest.wait().unwrap();
    assert_eq!(out.script_status, None);
    assert!(out.qemu_status.success());
}

#[test]
fn a_hung_guest_is_killed_at_the_deadline() {
    let started = std::time::Instant::now();
    let err = artifacts()
        .qemu("runner-timeout")
        .smp(1)
        .noload()
        .timeout(Duration::from_secs(3))
        .run_script("sleep 600\n")
        .unwrap_err();
    assert!(matches!(err, QemuError::Timeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(err.to_string().contains("runner-timeout.log"), "{err}");
}

/// A kernel that never reaches userspace (here: `/bin/sh` as the initramfs' init, waiting on
/// the console, so `/init` never prints `QS-INIT`) is booted once more, and the hung boot's log
/// is kept; the second hang then ends at the deadline.
#[test]
fn a_boot_that_does_not_reach_userspace_is_tried_once_more_and_its_log_kept() {
    let a = artifacts();
    let hung_log = a.logs_dir().join("runner-boot-hang.hung-boot.log");
    let _ = std::fs::remove_file(&hung_log);
    let started = std::time::Instant::now();
    let err = a
        .qemu("runner-boot-hang")
        .smp(1)
        .noload()
        .cmdline("rdinit=/bin/sh")
        .boot_limit(Duration::from_secs(4))
        .timeout(Duration::from_secs(10))
        .run_script("echo never\n")
        .unwrap_err();
    assert!(matches!(err, QemuError::Timeout { .. }), "{err}");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(14),
        "two boots: 4 s, then 10 s ({elapsed:?})"
    );
    let hung = std::fs::read_to_string(&hung_log).expect("the hung boot's log is kept");
    assert!(
        hung.contains("Linux version") && !hung.contains("QS-INIT"),
        "{hung}"
    );
}

/// A kernel that panics before userspace (here: no init it can run, and `init=` pointing
/// nowhere) is booted once more and the panicked boot's log is kept; the second panic is then
/// reported as the run's failure.
#[test]
fn a_boot_that_panics_before_userspace_is_tried_once_more_and_its_log_kept() {
    let a = artifacts();
    let kept_log = a.logs_dir().join("runner-boot-panic.panicked-boot.log");
    let _ = std::fs::remove_file(&kept_log);
    let err = a
        .qemu("runner-boot-panic")
        .smp(1)
        .noload()
        .cmdline("rdinit=/nonexistent init=/nonexistent")
        .boot_limit(Duration::from_secs(60))
        .timeout(Duration::from_secs(120))
        .run_script("echo never\n")
        .unwrap()
        .ensure_success()
        .unwrap_err();
    assert!(
        err.to_string().contains("Kernel panic - not syncing"),
        "the second boot's panic is the run's failure: {err}"
    );
    let kept = std::fs::read_to_string(&kept_log).expect("the panicked boot's log is kept");
    assert!(
        kept.contains("Kernel panic - not syncing") && !kept.contains("QS-INIT"),
        "{kept}"
    );
}

#[test]
fn the_monitor_and_the_link_port_are_reachable() {
    let dir = std::env::temp_dir().join(format!("qs-runner-sockets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (monitor, link) = (dir.join("monitor.sock"), dir.join("link.sock"));
    let mut guest = artifacts()
        .qemu("runner-sockets")
        .smp(2)
        .noload()
        .monitor_socket(&monitor)
        .link_socket(&link)
        .spawn_script("echo from-ttyS1 > /dev/ttyS1\necho LINK-WRITTEN\nsleep 600\n")
        .unwrap();
    // Connect to the link port before the guest writes to it (unconnected output is dropped).
    let mut port = loop {
        match std::os::unix::net::UnixStream::connect(&link) {
            Ok(s) => break s,
            Err(_) if guest.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("link socket: {e}"),
        }
    };
    guest
        .wait_for("LINK-WRITTEN", Duration::from_secs(60))
        .unwrap();
    port.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("from-ttyS1") {
        let mut buf = [0u8; 256];
        let n = std::io::Read::read(&mut port, &mut buf).unwrap();
        assert!(n > 0, "link closed");
        got.extend_from_slice(&buf[..n]);
    }
    let cpus = qs_testkit::qemu::hmp(&monitor, "info cpus", Duration::from_secs(10)).unwrap();
    assert!(
        cpus.contains("CPU #0") && cpus.contains("CPU #1"),
        "{cpus:?}"
    );
    drop(guest);
    std::fs::remove_dir_all(&dir).unwrap();
}
