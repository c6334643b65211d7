//! The gdb fixture: a guest booted with the link and a script, its kernel's KASLR offset, and
//! the way in for gdb, through `qs-bridge` (Quicksilver's stub) or QEMU's own gdbstub. The gdb
//! tests use [`Machine::boot`], which panics with the reason (a test fixture); the gdb
//! benchmark uses [`Machine::start`], which returns it.

use std::path::PathBuf;
use std::time::Duration;

use crate::artifacts::{Artifacts, LocateError};
use crate::bridge::{free_port, Bridge};
use crate::gdb::{kaslr_offset, thread_lines, Gdb, GdbError, Symbols, TEXT_MARKER};
use crate::qemu::{FastLinkNic, QemuError, RunOutput, Running};

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

/// Which gdbstub a [`Machine`] offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stub {
    /// Quicksilver's, through `qs-bridge` on the link.
    Quicksilver,
    /// QEMU's own (`-gdb tcp:...`), which does not know the KASLR offset.
    Qemu,
}

/// How to boot a [`Machine`].
#[derive(Clone, Debug)]
pub struct MachineConfig {
    /// The run's name: logs are `logs/<name>.log`, `<name>.gdb<N>.log`, `<name>.bridge.log`.
    pub name: String,
    /// Guest CPUs.
    pub smp: u32,
    /// The whole guest script; it must print the [`TEXT_MARKER`] line (as [`GDB_PRELUDE`]
    /// does) and then `ready`.
    pub script: String,
    /// The console marker after which gdb may attach.
    pub ready: String,
    /// Which stub.
    pub stub: Stub,
    /// The link key.
    pub key: String,
    /// Extra kernel command-line words.
    pub cmdline: Vec<String>,
    /// Extra QEMU arguments (a disk for the guest to write into).
    pub qemu_args: Vec<String>,
    /// Guest RAM, if not the default.
    pub memory: Option<String>,
    /// The fast link's NIC, and the agent loaded with `net=` naming it
    /// ([`Qemu::fast_link`](crate::Qemu::fast_link)); [`Machine::fast_link_socket`] is where
    /// a bridge connects (`qs-bridge --net stream:PATH`).
    pub fast_link: Option<FastLinkNic>,
    /// Deadline of the whole run.
    pub timeout: Duration,
    /// How long the guest may take to print the [`TEXT_MARKER`] line.
    pub boot_timeout: Duration,
}

impl MachineConfig {
    /// `name` on `smp` CPUs running `script` until `ready`, with Quicksilver's stub, key
    /// [`GDB_KEY`], a 300 s run and a 180 s boot.
    pub fn new(name: &str, smp: u32, script: &str, ready: &str) -> MachineConfig {
        MachineConfig {
            name: name.into(),
            smp,
            script: script.into(),
            ready: ready.into(),
            stub: Stub::Quicksilver,
            key: GDB_KEY.into(),
            cmdline: Vec::new(),
            qemu_args: Vec::new(),
            memory: None,
            fast_link: None,
            timeout: Duration::from_secs(300),
            boot_timeout: Duration::from_secs(180),
        }
    }
}

/// Why a [`Machine`] could not be had.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error(transparent)]
    Locate(#[from] LocateError),
    #[error(transparent)]
    Qemu(Box<QemuError>),
    #[error(transparent)]
    Gdb(#[from] GdbError),
    #[error("{name}: the guest printed no _text address (the {TEXT_MARKER:?} line)")]
    NoKaslrOffset { name: String },
    #[error("{source}\n(qs-bridge said:\n{bridge_log})")]
    Finish {
        source: Box<QemuError>,
        bridge_log: String,
    },
}

/// Boxed: a [`QemuError`] carries the console's end and would make every `Result` large.
impl From<QemuError> for MachineError {
    fn from(e: QemuError) -> MachineError {
        MachineError::Qemu(Box::new(e))
    }
}

/// A guest with the link, booted with a script, and the way in for gdb.
pub struct Machine {
    pub name: String,
    pub smp: u32,
    /// The running kernel's KASLR offset, from its `/proc/kallsyms`.
    pub kaslr_offset: u64,
    artifacts: Artifacts,
    /// The link's socket (QEMU leaves it behind).
    sock: PathBuf,
    /// The fast link's socket, if the machine has the NIC (QEMU leaves it behind too).
    fast_sock: Option<PathBuf>,
    /// QEMU's human monitor: where each CPU is, when the guest stops answering.
    monitor: PathBuf,
    /// The link's key.
    key: String,
    running: Running,
    bridge: Option<Bridge>,
    addr: String,
    symbols: Symbols,
    gdbs: u32,
}

impl Machine {
    /// Boots `script` (after [`GDB_PRELUDE`]) on `smp` CPUs with the agent watching the link
    /// (key [`GDB_KEY`]), waits until it prints `ready`, and starts `qs-bridge` on the link
    /// (or, with [`qemu_stub`], QEMU's gdbstub); panics with the reason if it cannot.
    pub fn boot(name: &str, smp: u32, script: &str, ready: &str) -> Machine {
        let artifacts = Artifacts::locate()
            .unwrap_or_else(|e| panic!("{e}: run `cargo xtask test` (it builds everything first)"));
        Machine::boot_on(&artifacts, name, smp, script, ready)
    }

    /// [`Machine::boot`], with the fast link's NIC `fast` (the agent loaded with `net=`, the
    /// bridge serving it with `--net`) when it is given: every gdb that connects then finds
    /// the session carried by the fast link ([`Machine::connect`] checks it).
    pub fn boot_over(
        name: &str,
        smp: u32,
        script: &str,
        ready: &str,
        fast: Option<FastLinkNic>,
    ) -> Machine {
        let artifacts = Artifacts::locate()
            .unwrap_or_else(|e| panic!("{e}: run `cargo xtask test` (it builds everything first)"));
        let mut config = Machine::config(name, smp, script, ready);
        config.fast_link = fast;
        Machine::start(&artifacts, &config).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Machine::boot`] with the kernel and parts of `artifacts`.
    pub fn boot_on(
        artifacts: &Artifacts,
        name: &str,
        smp: u32,
        script: &str,
        ready: &str,
    ) -> Machine {
        let config = Machine::config(name, smp, script, ready);
        Machine::start(artifacts, &config).unwrap_or_else(|e| panic!("{e}"))
    }

    /// What [`Machine::boot`] boots, for a test to add to (a disk, more RAM) before
    /// [`Machine::start`].
    pub fn config(name: &str, smp: u32, script: &str, ready: &str) -> MachineConfig {
        let mut config = MachineConfig::new(name, smp, &format!("{GDB_PRELUDE}\n{script}"), ready);
        if qemu_stub() {
            config.stub = Stub::Qemu;
        }
        // The hv does not hide a stop from the kernel's clocks (README, limits): a session on
        // 4 emulated CPUs sharing 2 host cores can hold the kernel longer than the default RCU
        // stall (21 s) and soft-lockup (20 s) thresholds. Raised here, as kgdb users do, so
        // that a slow CI machine does not fail a session that is correct.
        config.cmdline = vec![
            "rcupdate.rcu_cpu_stall_timeout=120".into(),
            "watchdog_thresh=60".into(),
        ];
        config
    }

    /// Boots the guest of `artifacts` as `config` says, waits for its ready marker and starts
    /// the stub's way in.
    pub fn start(artifacts: &Artifacts, config: &MachineConfig) -> Result<Machine, MachineError> {
        let a = artifacts.clone();
        if config.stub == Stub::Quicksilver {
            a.require_agent()?;
        }
        let name = &config.name;
        let sock = a
            .dir
            .join("run")
            .join(format!("{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let mut qemu = a
            .qemu(name)
            .smp(config.smp)
            .timeout(config.timeout)
            .link(&sock, &config.key);
        for word in &config.cmdline {
            qemu = qemu.cmdline(word);
        }
        qemu = qemu.args(config.qemu_args.iter().cloned());
        if let Some(m) = &config.memory {
            qemu = qemu.memory(m);
        }
        let mut fast_sock = None;
        if let Some(nic) = config.fast_link {
            let path = a
                .dir
                .join("run")
                .join(format!("{name}-{}.net.sock", std::process::id()));
            let _ = std::fs::remove_file(&path);
            qemu = qemu.fast_link(&path, nic);
            fast_sock = Some(path);
        }
        let monitor = a
            .dir
            .join("run")
            .join(format!("{name}-{}.mon", std::process::id()));
        let _ = std::fs::remove_file(&monitor);
        qemu = qemu.monitor_socket(&monitor);
        let qemu_port = free_port();
        if config.stub == Stub::Qemu {
            qemu = qemu.args(["-gdb".to_string(), format!("tcp:127.0.0.1:{qemu_port}")]);
        }
        let mut running = qemu.spawn_script(&config.script)?;
        // The marker's whole line has arrived once the next marker has.
        running.wait_for(TEXT_MARKER, config.boot_timeout)?;
        running.wait_for(&config.ready, Duration::from_secs(120))?;
        let kaslr_offset = kaslr_offset(&running.console())
            .ok_or_else(|| MachineError::NoKaslrOffset { name: name.clone() })?;
        let (bridge, addr, symbols) = match config.stub {
            Stub::Qemu => (
                None,
                format!("127.0.0.1:{qemu_port}"),
                Symbols::Offset(a.vmlinux.clone(), kaslr_offset),
            ),
            Stub::Quicksilver => {
                let bridge = Bridge::start(
                    &a.bridge,
                    &sock,
                    fast_sock.as_deref(),
                    config.key.as_bytes(),
                    &a.logs_dir(),
                    name,
                    None,
                    &a.vmlinux,
                    Duration::from_secs(60),
                )?;
                let addr = bridge.addr();
                (Some(bridge), addr, Symbols::File(a.vmlinux.clone()))
            }
        };
        Ok(Machine {
            name: name.clone(),
            smp: config.smp,
            kaslr_offset,
            artifacts: a,
            sock,
            fast_sock,
            monitor,
            key: config.key.clone(),
            running,
            bridge,
            addr,
            symbols,
            gdbs: 0,
        })
    }

    /// The fast link's stream socket, which QEMU listens on from its start (with
    /// [`MachineConfig::fast_link`]): a bridge's `--net stream:PATH`.
    pub fn fast_link_socket(&self) -> Option<&std::path::Path> {
        self.fast_sock.as_deref()
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

    /// Kills `qs-bridge` (as a crash would) and starts a new one on the same link and control
    /// socket (its stale file is replaced), which authenticates anew; its messages go to
    /// `logs/<name>-again.bridge.log`.
    pub fn restart_bridge(&mut self) {
        let Some(old) = self.bridge.take() else {
            return;
        };
        let log = old.log();
        let control = old.control_path().to_path_buf();
        drop(old);
        let name = format!("{}-again", self.name);
        let bridge = Bridge::start(
            &self.artifacts.bridge,
            &self.sock,
            self.fast_sock.as_deref(),
            self.key.as_bytes(),
            &self.artifacts.logs_dir(),
            &name,
            Some(&control),
            &self.artifacts.vmlinux,
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| {
            panic!(
                "a second qs-bridge: {e}
(the first said:\n{log})"
            )
        });
        self.addr = bridge.addr();
        self.bridge = Some(bridge);
    }

    /// The bridge's control socket (none with QEMU's stub).
    pub fn control_path(&self) -> Option<&std::path::Path> {
        self.bridge.as_ref().map(Bridge::control_path)
    }

    /// A gdb with the kernel's symbols, not connected yet; its transcript goes to
    /// `logs/<name>.gdb<N>.log`.
    pub fn try_gdb(&mut self) -> Result<Gdb, GdbError> {
        self.gdbs += 1;
        let log = self
            .artifacts
            .logs_dir()
            .join(format!("{}.gdb{}.log", self.name, self.gdbs));
        Gdb::start(&self.name, &self.symbols, Some(&log))
    }

    /// [`Machine::try_gdb`], or a panic with the reason.
    pub fn gdb(&mut self) -> Gdb {
        self.try_gdb().unwrap_or_else(|e| panic!("{e}"))
    }

    /// `target remote` in `gdb`; panics (with gdb's and the bridge's words) unless gdb then
    /// has threads, and, on a machine with the fast link, unless `monitor link` says the
    /// fast link carries the session. Returns gdb's output.
    pub fn connect(&self, gdb: &mut Gdb) -> String {
        let out = self.run(gdb, &format!("target remote {}", self.addr));
        let threads = self.run(gdb, "info threads");
        if !out.contains("Remote debugging using") || thread_lines(&threads).is_empty() {
            self.fail(gdb, "gdb did not attach", &format!("{out}{threads}"));
        }
        if self.fast_sock.is_some() && self.bridge.is_some() {
            let link = self.run(gdb, "monitor link");
            if !link.contains("the session is carried by the fast link") {
                self.fail(gdb, "the fast link does not carry the session", &link);
            }
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

    /// Each CPU's RIP and CS as QEMU sees them (`info registers -a`), for a failure's
    /// message: a guest that stopped answering shows where it is.
    pub fn cpu_states(&self) -> String {
        match crate::qemu::hmp(&self.monitor, "info registers -a", Duration::from_secs(5)) {
            Ok(out) => out
                .lines()
                .filter(|l| l.starts_with("CPU#") || l.starts_with("RIP=") || l.starts_with("CS ="))
                .map(|l| format!("{l}\n"))
                .collect(),
            Err(e) => format!("(QEMU's monitor did not answer: {e})\n"),
        }
    }

    /// Panics with `what`, gdb's output `out`, the transcript's path, the bridge's log, the
    /// hv's console lines and where the CPUs are.
    pub fn fail(&self, gdb: &Gdb, what: &str, out: &str) -> ! {
        // The hv's own words (a session it ended, a refusal) are on the machine's console.
        let hv: String = self
            .running
            .console()
            .lines()
            .filter(|l| l.contains("quicksilver hv:"))
            .map(|l| format!("{l}\n"))
            .collect();
        panic!(
            "{}: {what}:\n{out}\n(gdb transcript: {:?}; qs-bridge said:\n{}the hv said:\n{hv}the CPUs are at:\n{})",
            self.name,
            gdb.log_path(),
            self.bridge_log(),
            self.cpu_states()
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
    pub fn try_send(&mut self, line: &str) -> Result<(), QemuError> {
        self.running.send(&format!("{line}\n"))
    }

    /// [`Machine::try_send`], or a panic with the reason.
    pub fn send(&mut self, line: &str) {
        self.try_send(line).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Waits for `marker` on the guest's console; returns its whole line.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> String {
        // Then for the end of its line: the console may have delivered only part of it.
        for needle in [marker, "\n"] {
            if let Err(e) = self.running.wait_for(needle, timeout) {
                panic!(
                    "{e}\n(qs-bridge said:\n{}the CPUs are at:\n{})",
                    self.bridge_log(),
                    self.cpu_states()
                );
            }
        }
        let console = self.running.console();
        let line = console.lines().rev().find(|l| l.contains(marker));
        line.unwrap_or_default().to_string()
    }

    /// Waits for the script to end and the guest to power off.
    pub fn try_finish(self) -> Result<RunOutput, MachineError> {
        let bridge_log = self.bridge_log();
        let out = self.running.wait();
        let _ = std::fs::remove_file(&self.sock);
        if let Some(path) = &self.fast_sock {
            let _ = std::fs::remove_file(path);
        }
        out.map_err(|e| MachineError::Finish {
            source: Box::new(e),
            bridge_log,
        })
    }

    /// [`Machine::try_finish`], or a panic with the reason.
    pub fn finish(self) -> RunOutput {
        self.try_finish().unwrap_or_else(|e| panic!("{e}"))
    }
}
