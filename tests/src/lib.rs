//! Shared pieces of the integration tests: finding the built artifacts, booting a guest with a
//! script, and the checks every test makes on the kernel log.
//!
//! The tests boot the stock Debian cloud kernel under QEMU/TCG with the agent loaded and drive
//! Quicksilver through `qsctl` as a user would. `cargo xtask test` builds everything first.

use std::time::Duration;
pub use xtask::build::Artifacts;
pub use xtask::qemu::{Qemu, RunOutput, Running};

/// The built artifacts, or a panic that says how to get them.
pub fn artifacts() -> Artifacts {
    match Artifacts::locate() {
        Ok(a) => a,
        Err(e) => panic!("{e}: run `cargo xtask test` (it builds everything first)"),
    }
}

/// A guest with `smp` CPUs on `-cpu EPYC`, named after the test.
pub fn guest(name: &str, smp: u32) -> Qemu {
    artifacts()
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

// ---------------------------------------------------------------------------------------------
// gdb sessions (tests/tests/gdb.rs)

pub use xtask::gdb::{register, Bridge, Gdb, Symbols};

/// The link key of the gdb tests' guests.
pub const GDB_KEY: &str = "the-gdb-test-key";

/// Shell functions every gdb test script starts with, and the kernel's `_text` (which only
/// QEMU's stub needs: it does not answer `qOffsets`).
///
/// - `start_workload`: `qs-workload` on every CPU but CPU 0 (so that CPU 0 is in the kernel,
///   idle, when gdb stops it, and its backtrace has kernel symbols), output in /tmp/wl.out.
/// - `stop_workload`: SIGTERM, wait, print its verdict (`WORKLOAD OK ...`).
/// - `wait_host`: wait for a line typed on the console by the test ([`Machine::send`]).
/// - `check_native`: `qsctl probe --expect native`, printing `PROBE-NATIVE-OK` if it passes.
pub const GDB_PRELUDE: &str = r#"
n=$(nproc)
start_workload() {
    if [ "$n" -gt 1 ]; then cpus="1-$((n - 1))"; else cpus=0; fi
    taskset -c "$cpus" qs-workload > /tmp/wl.out 2> /tmp/wl.err &
    WL=$!
}
stop_workload() {
    kill -TERM $WL
    wait $WL
    echo "workload exited with $?"
    tail -n 3 /tmp/wl.err
    cat /tmp/wl.out
}
wait_host() { read -r host_line; echo "host: $host_line"; }
check_native() { qsctl probe --expect native && echo PROBE-NATIVE-OK; }
echo "KALLSYMS-TEXT $(grep -w _text /proc/kallsyms | cut -d' ' -f1)"
"#;

/// The stub the gdb tests talk to: Quicksilver's through `qs-bridge` (the default), or with
/// `QS_GDB_STUB=qemu` QEMU's own, on the same guest — to tell a mistake in a test from one in
/// the stub (tests of what only Quicksilver does are skipped then).
pub fn qemu_stub() -> bool {
    std::env::var("QS_GDB_STUB").is_ok_and(|v| v == "qemu")
}

/// A guest with the link, booted with a script, and the way in for gdb.
pub struct Machine {
    pub name: String,
    pub smp: u32,
    /// The running kernel's KASLR offset, from its `/proc/kallsyms`.
    pub kaslr_offset: u64,
    /// The link's socket (QEMU leaves it behind).
    sock: std::path::PathBuf,
    running: Running,
    bridge: Option<Bridge>,
    addr: String,
    symbols: Symbols,
    gdbs: u32,
}

impl Machine {
    /// Boots `script` (after [`GDB_PRELUDE`]) on `smp` CPUs with the agent watching the link
    /// (key [`GDB_KEY`]), waits until it prints `ready`, and starts `qs-bridge` on the link
    /// (or, with [`qemu_stub`], QEMU's gdbstub).
    pub fn boot(name: &str, smp: u32, script: &str, ready: &str) -> Machine {
        let a = artifacts();
        let sock = a
            .dir
            .join("run")
            .join(format!("{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let mut qemu = guest(name, smp)
            .timeout(Duration::from_secs(300))
            .link(&sock, GDB_KEY)
            // The hv does not hide a stop from the kernel's clocks (README, limits): a session
            // on 4 emulated CPUs sharing 2 host cores can hold the kernel longer than the
            // default RCU stall (21 s) and soft-lockup (20 s) thresholds. Raised here, as kgdb
            // users do, so that a slow CI machine does not fail a session that is correct.
            .cmdline("rcupdate.rcu_cpu_stall_timeout=120")
            .cmdline("watchdog_thresh=60");
        let qemu_port = xtask::gdb::free_port();
        if qemu_stub() {
            qemu = qemu.args(["-gdb".to_string(), format!("tcp:127.0.0.1:{qemu_port}")]);
        }
        let mut running = qemu
            .spawn_script(&format!("{GDB_PRELUDE}\n{script}"))
            .unwrap_or_else(|e| panic!("{e}"));
        // The marker's whole line has arrived once the next marker has.
        for (marker, secs) in [(xtask::gdb::TEXT_MARKER, 180), (ready, 120)] {
            if let Err(e) = running.wait_for(marker, Duration::from_secs(secs)) {
                panic!("{e}");
            }
        }
        let kaslr_offset = xtask::gdb::kaslr_offset(&running.console())
            .unwrap_or_else(|| panic!("{name}: no _text address from the guest"));
        let (bridge, addr, symbols) = if qemu_stub() {
            (
                None,
                format!("127.0.0.1:{qemu_port}"),
                Symbols::Offset(a.vmlinux.clone(), kaslr_offset),
            )
        } else {
            let bridge = Bridge::start(
                &a.bridge,
                &sock,
                GDB_KEY.as_bytes(),
                &a.logs_dir(),
                name,
                Duration::from_secs(60),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            let addr = bridge.addr();
            (Some(bridge), addr, Symbols::File(a.vmlinux.clone()))
        };
        Machine {
            name: name.into(),
            smp,
            kaslr_offset,
            sock,
            running,
            bridge,
            addr,
            symbols,
            gdbs: 0,
        }
    }

    /// Where gdb connects.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// What `qs-bridge` said so far (empty with QEMU's stub; also in
    /// `logs/<name>.bridge.log`).
    pub fn bridge_log(&self) -> String {
        self.bridge.as_ref().map(Bridge::log).unwrap_or_default()
    }

    /// A gdb with the kernel's symbols, not connected yet; its transcript goes to
    /// `logs/<name>.gdb<N>.log`.
    pub fn gdb(&mut self) -> Gdb {
        self.gdbs += 1;
        let log = artifacts()
            .logs_dir()
            .join(format!("{}.gdb{}.log", self.name, self.gdbs));
        Gdb::start(&self.name, &self.symbols, Some(&log)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `target remote` in `gdb`; panics (with gdb's and the bridge's words) unless gdb then
    /// has threads. Returns gdb's output.
    pub fn connect(&self, gdb: &mut Gdb) -> String {
        let out = self.run(gdb, &format!("target remote {}", self.addr));
        let threads = self.run(gdb, "info threads");
        if !out.contains("Remote debugging using") || thread_lines(&threads).is_empty() {
            self.fail(gdb, "gdb did not attach", &format!("{out}{threads}"));
        }
        out
    }

    /// A new gdb, attached.
    pub fn attach(&mut self) -> Gdb {
        let mut gdb = self.gdb();
        self.connect(&mut gdb);
        gdb
    }

    /// Runs a gdb command; panics (with the bridge's log) if gdb does not finish it.
    pub fn run(&self, gdb: &mut Gdb, command: &str) -> String {
        gdb.run(command).unwrap_or_else(|e| {
            self.fail(gdb, &format!("`{command}` did not finish"), &e.to_string())
        })
    }

    /// Panics with `what`, gdb's output `out`, the transcript's path and the bridge's log.
    pub fn fail(&self, gdb: &Gdb, what: &str, out: &str) -> ! {
        panic!(
            "{}: {what}:\n{out}\n(gdb transcript: {:?}; qs-bridge said:\n{})",
            self.name,
            gdb.log_path(),
            self.bridge_log()
        )
    }

    /// Waits until the bridge says that `sessions` gdb sessions have ended (detach or kill);
    /// at once with QEMU's stub.
    pub fn await_sessions_ended(&self, sessions: usize) {
        if let Some(bridge) = &self.bridge {
            // "gdb detached; ..." or "... detached instead, the kernel keeps running".
            if let Err(e) = bridge.wait_for_count("detached", sessions, Duration::from_secs(60)) {
                panic!("{}: {e}", self.name);
            }
        }
    }

    /// Types `line` on the guest's console (for the script's `wait_host`).
    pub fn send(&mut self, line: &str) {
        self.running
            .send(&format!("{line}\n"))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Waits for `marker` on the guest's console; returns its whole line.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> String {
        // Then for the end of its line: the console may have delivered only part of it.
        for needle in [marker, "\n"] {
            if let Err(e) = self.running.wait_for(needle, timeout) {
                panic!("{e}\n(qs-bridge said:\n{})", self.bridge_log());
            }
        }
        let console = self.running.console();
        let line = console.lines().rev().find(|l| l.contains(marker));
        line.unwrap_or_default().to_string()
    }

    /// Waits for the script to end and the guest to power off.
    pub fn finish(self) -> RunOutput {
        let log = self.bridge_log();
        let sock = self.sock.clone();
        let out = self.running.wait();
        let _ = std::fs::remove_file(sock);
        out.unwrap_or_else(|e| panic!("{e}\n(qs-bridge said:\n{log})"))
    }
}

/// The `(thread, text)` blocks of a `thread apply all ...` output.
pub fn thread_blocks(out: &str) -> Vec<(String, String)> {
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in out.lines() {
        if line.starts_with("Thread ") && line.trim_end().ends_with("):") {
            blocks.push((line.trim_end().to_string(), String::new()));
        } else if let Some((_, text)) = blocks.last_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    blocks
}

/// The thread lines of `info threads` (`* 1    Thread 1.1 ...`).
pub fn thread_lines(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| {
            let mut words = l.trim_start_matches('*').split_whitespace();
            words.next().is_some_and(|id| id.parse::<u32>().is_ok())
                && words.next() == Some("Thread")
        })
        .collect()
}

/// The bytes of an `x/Nxb` output.
pub fn bytes_of(out: &str) -> Vec<u8> {
    out.lines()
        .filter_map(|l| l.split_once(":\t").or_else(|| l.split_once(':')))
        .flat_map(|(_, rest)| {
            rest.split_whitespace()
                .filter_map(|w| u8::from_str_radix(w.strip_prefix("0x")?, 16).ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The number after the last `$N = ` in gdb's output.
pub fn value_of(out: &str) -> Option<u64> {
    let rest = out.rsplit(" = ").next()?;
    let word = rest.split_whitespace().next()?;
    match word.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => word.parse().ok(),
    }
}
