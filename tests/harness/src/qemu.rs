//! Booting the test kernel under QEMU/TCG: the demo, the integration tests and the
//! benchmarks all go through [`Qemu`].
//!
//! The guest's console is its first UART, wired to QEMU's stdio. In a scripted run the
//! initramfs gets `/qs/script.sh`, `/init` runs it, prints `QS-SCRIPT-EXIT <status>` and powers
//! off (see `xtask/src/init.sh`); [`Running`] collects the console as it comes, saves it to a
//! log, lets a test wait for a line or type into the console, enforces a deadline and kills
//! QEMU when dropped, so that no failed test leaves a guest running (QEMU is a
//! [`crate::child::Process`]).
//!
//! TCG rather than KVM: the host's `/dev/kvm` exposes no SVM to a guest, and QEMU's TCG
//! emulates AMD SVM with nested paging (`-cpu EPYC`), which the hv needs (FACTS.md). The QEMU
//! binary is Debian's source with one race fixed (`xtask/src/emulator.rs`).

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::artifacts::Artifacts;
use crate::child::{tail, Ended, Process, Stream, Watch, TAIL_LINES};
use crate::initramfs::{self, ExtraFile};

/// Kernel command line every boot gets: console on the first UART; any panic or oops ends
/// the run at once (QEMU's `-no-reboot` turns the reboot into an exit) instead of hanging
/// until the timeout.
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 oops=panic";
/// Printed by `/init` when userspace is up and the agent step is done.
pub const BOOTED_MARKER: &str = "QS-BOOTED";
/// AMD EPYC as TCG can give it: the model without the nine features TCG lacks, which it
/// would drop anyway after a warning per feature and per CPU (36 lines before a 4-CPU boot).
/// The guest sees the same CPUID either way.
pub const EPYC_UNDER_TCG: &str =
    "EPYC,-rdseed,-sha-ni,-xsavec,-3dnowprefetch,-misalignsse,-osvw,-topoext,-fxsr-opt,-nrip-save";
/// Where [`Qemu::link`] puts the link key in the guest.
pub const LINK_KEY_FILE: &str = "/etc/quicksilver/link.key";
/// The fast link's NIC's PCI address in the guest: [`Qemu::fast_link_nic`] puts it in slot 4 of
/// the root bus, so that the agent's `net=` is the same on every run.
pub const FAST_LINK_BDF: &str = "0000:00:04.0";
/// The first line of the initramfs' `/init`: the kernel has booted to userspace.
pub const INIT_MARKER: &str = "QS-INIT";
/// How long a stock kernel may take to reach userspace before [`Qemu::spawn_script`] takes it
/// for an emulator hang (a boot takes 1-3 s here, 20 s on a loaded CI machine).
pub const KERNEL_BOOT_LIMIT: Duration = Duration::from_secs(100);
/// Printed by `/init` after the script, followed by its exit status.
pub const SCRIPT_EXIT_MARKER: &str = "QS-SCRIPT-EXIT ";

/// Why a run did not go as asked. Each message carries the end of the console and the path of
/// the full log.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error(
        "cannot start {}: {source}; run `cargo xtask setup` (it installs qemu-system-x86 and builds the patched QEMU)", .binary.display()
    )]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("{name}: preparing the run's initramfs failed: {message}")]
    Initrd { name: String, message: String },
    #[error("{name}: no {waiting_for:?} on the console after {after:.1?}{}", context(.console_tail, .log))]
    Timeout {
        name: String,
        waiting_for: String,
        after: Duration,
        console_tail: String,
        log: Option<PathBuf>,
    },
    #[error("{name}: QEMU exited ({status}) before {waiting_for:?} appeared{}{}", stderr_note(.stderr), context(.console_tail, .log))]
    Exited {
        name: String,
        waiting_for: String,
        status: ExitStatus,
        stderr: String,
        console_tail: String,
        log: Option<PathBuf>,
    },
    #[error("{name}: the script exited with status {status}{}", context(.console_tail, .log))]
    ScriptFailed {
        name: String,
        status: i32,
        console_tail: String,
        log: Option<PathBuf>,
    },
    #[error("{name}: the guest stopped without finishing the script (kernel panic or oops? QEMU: {status}){}{}", stderr_note(.stderr), context(.console_tail, .log))]
    NoScriptExit {
        name: String,
        status: ExitStatus,
        stderr: String,
        console_tail: String,
        log: Option<PathBuf>,
    },
    #[error("{name}: talking to QEMU failed: {source}")]
    Io {
        name: String,
        source: std::io::Error,
    },
}

fn context(tail: &str, log: &Option<PathBuf>) -> String {
    let log = match log {
        Some(path) => format!("\nfull console log: {}", path.display()),
        None => String::new(),
    };
    format!("\n--- console (last lines) ---\n{tail}---{log}")
}

fn stderr_note(stderr: &str) -> String {
    if stderr.trim().is_empty() {
        String::new()
    } else {
        format!("\nQEMU said: {}", stderr.trim())
    }
}

/// The last lines of the console, for error messages.
fn tail_of(text: &str) -> String {
    tail(text, TAIL_LINES)
}

/// Whether a console that ended before userspace ends in the kernel's panic: with `panic=-1`
/// and `-no-reboot` QEMU then exits, and the boot is tried once more ([`Qemu::spawn_script`]).
fn boot_panicked(console_tail: &str) -> bool {
    console_tail.contains("Kernel panic - not syncing")
}

/// Which NIC the fast link gets (issue 13): the hv drives either.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FastLinkNic {
    /// `virtio-net-pci` (modern and transitional), which Linux drives with `virtio_net`.
    #[default]
    VirtioNet,
    /// `e1000e`, QEMU's Intel 82574L, which Linux drives with `e1000e`.
    E1000e,
}

impl FastLinkNic {
    /// QEMU's `-device` name.
    pub fn device(self) -> &'static str {
        match self {
            FastLinkNic::VirtioNet => "virtio-net-pci",
            FastLinkNic::E1000e => "e1000e",
        }
    }
}

/// A callback that sees each console line as it arrives.
pub type LineCallback = Arc<dyn Fn(&str) + Send + Sync>;

/// How to boot the guest. Built from [`Artifacts::qemu`]; every setter consumes and returns
/// the builder.
#[derive(Clone)]
pub struct Qemu {
    name: String,
    vmlinuz: PathBuf,
    initrd: PathBuf,
    run_dir: PathBuf,
    log: Option<PathBuf>,
    smp: u32,
    memory: String,
    cpu: String,
    icount: Option<u32>,
    cmdline: Vec<String>,
    args: Vec<OsString>,
    files: Vec<ExtraFile>,
    timeout: Duration,
    boot_limit: Duration,
    on_line: Option<LineCallback>,
}

impl std::fmt::Debug for Qemu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qemu")
            .field("name", &self.name)
            .field("args", &self.qemu_args(&self.initrd, false))
            .finish()
    }
}

impl Qemu {
    /// A run named `name` (the log is `logs/<name>.log`) with the defaults: 4 CPUs, 1 GiB,
    /// `-cpu EPYC` ([`EPYC_UNDER_TCG`]), 120 s timeout.
    pub fn new(artifacts: &Artifacts, name: &str) -> Qemu {
        let safe_name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Qemu {
            log: Some(artifacts.logs_dir().join(format!("{safe_name}.log"))),
            name: safe_name,
            vmlinuz: artifacts.kernel.vmlinuz.clone(),
            initrd: artifacts.initrd.clone(),
            run_dir: artifacts.dir.join("run"),
            smp: 4,
            memory: "1G".into(),
            cpu: EPYC_UNDER_TCG.into(),
            icount: None,
            cmdline: Vec::new(),
            args: Vec::new(),
            files: Vec::new(),
            timeout: Duration::from_secs(120),
            boot_limit: KERNEL_BOOT_LIMIT,
            on_line: None,
        }
    }

    /// Number of CPUs (`-smp`).
    pub fn smp(mut self, cpus: u32) -> Self {
        self.smp = cpus;
        self
    }

    /// Guest memory in QEMU's syntax (`512M`, `2G`).
    pub fn memory(mut self, size: &str) -> Self {
        self.memory = size.into();
        self
    }

    /// CPU model (`-cpu`); it must offer SVM with NPT under TCG (`EPYC`, `max`).
    pub fn cpu(mut self, model: &str) -> Self {
        self.cpu = model.into();
        self
    }

    /// Deterministic instruction counting (`-icount shift=N`): time advances 2^N ns per
    /// instruction, independent of host load. It also makes TCG single-threaded (slower).
    pub fn icount(mut self, shift: u32) -> Self {
        self.icount = Some(shift);
        self
    }

    /// Adds a word to the kernel command line (after [`BASE_CMDLINE`]).
    pub fn cmdline(mut self, word: &str) -> Self {
        self.cmdline.push(word.into());
        self
    }

    /// Boots without loading the agent (`qs.noload`).
    pub fn noload(self) -> Self {
        self.cmdline("qs.noload")
    }

    /// Adds raw QEMU arguments (a second UART, a monitor socket, ...). They come after the
    /// console's `-serial stdio`, so a `-serial` (or `-chardev` + `-serial chardev:`) added
    /// here is the guest's second UART (ttyS1, 0x2F8, IRQ 3).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The link: [`link_socket`](Self::link_socket), and the agent told to use that port
    /// (COM2) with `key`, which goes into the guest as a root-only file
    /// ([`LINK_KEY_FILE`], mode 0600): never on the kernel command line.
    pub fn link(self, path: &Path, key: &str) -> Self {
        self.link_socket(path)
            .file(LINK_KEY_FILE, 0o600, format!("{key}\n"))
            .cmdline("quicksilver.link_port=0x2f8")
            .cmdline(&format!("quicksilver.key_file={LINK_KEY_FILE}"))
    }

    /// Makes the guest's second UART (ttyS1, COM2) a Unix socket that QEMU listens on at
    /// `path` (a bridge or test connects to it; until then output is dropped).
    pub fn link_socket(self, path: &Path) -> Self {
        self.args([
            "-chardev".into(),
            format!(
                "socket,id=qslink,path={},server=on,wait=off",
                path.display()
            ),
            "-serial".into(),
            "chardev:qslink".into(),
        ])
    }

    /// The fast link: [`fast_link_nic`](Self::fast_link_nic), and the agent told to take that
    /// NIC (`net=`[`FAST_LINK_BDF`], the default `net_ip` and `net_port`). The agent needs the
    /// link too ([`link`](Self::link)): the fast link proves the same key.
    pub fn fast_link(self, path: &Path, nic: FastLinkNic) -> Self {
        self.fast_link_nic(path, nic)
            .cmdline(&format!("quicksilver.net={FAST_LINK_BDF}"))
    }

    /// Adds a second NIC for the fast link at [`FAST_LINK_BDF`], its other end a stream socket
    /// QEMU listens on at `path` (Ethernet frames, each after its 4-byte big-endian length:
    /// `qs-bridge --net stream:PATH` connects to it; until something does, what the guest sends
    /// is dropped). QEMU creates the socket when it starts, before the guest runs. The guest
    /// has no other NIC (`-nodefaults`), so Linux names this one `eth0` when it drives it.
    pub fn fast_link_nic(self, path: &Path, nic: FastLinkNic) -> Self {
        // QS_FAST_LINK_PCAP=DIR: every frame on the fast link, both ways, as QEMU saw it
        // (`DIR/<socket>.pcap`): which side lost a datagram.
        let me = match std::env::var_os("QS_FAST_LINK_PCAP") {
            Some(dir) => self.args([
                "-object".into(),
                format!(
                    "filter-dump,id=qsdump,netdev=qsfast,file={}",
                    Path::new(&dir)
                        .join(path.file_name().unwrap_or_default())
                        .with_extension("pcap")
                        .display()
                ),
            ]),
            None => self,
        };
        me.args([
            "-netdev".into(),
            format!(
                "stream,id=qsfast,server=on,addr.type=unix,addr.path={}",
                path.display()
            ),
            "-device".into(),
            // No option ROM: the guest boots with -kernel, never from the network.
            format!("{},netdev=qsfast,addr=0x4,romfile=", nic.device()),
        ])
    }

    /// Puts QEMU's human monitor on a Unix socket at `path`; talk to it with [`hmp`] (e.g.
    /// `mce ...` to inject a machine check, `info registers`).
    pub fn monitor_socket(self, path: &Path) -> Self {
        self.args([
            "-monitor".into(),
            format!("unix:{},server=on,wait=off", path.display()),
        ])
    }

    /// Adds a file to this run's initramfs (with the script, in an appended archive).
    pub fn file(mut self, guest_path: &str, mode: u32, data: impl Into<Vec<u8>>) -> Self {
        self.files.push(ExtraFile {
            path: guest_path.into(),
            mode,
            data: data.into(),
        });
        self
    }

    /// Deadline for the whole run, from QEMU's start.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long the kernel may take to reach userspace in [`Qemu::run_script`] before the run
    /// is taken for an emulator hang and booted once more (default [`KERNEL_BOOT_LIMIT`]); a
    /// run whose timeout is not longer than this is never booted again.
    pub fn boot_limit(mut self, limit: Duration) -> Self {
        self.boot_limit = limit;
        self
    }

    /// Where to save the console (default `logs/<name>.log`); `None` keeps no log.
    pub fn log(mut self, path: Option<PathBuf>) -> Self {
        self.log = path;
        self
    }

    /// Calls `f` with each console line as it arrives (e.g. to echo it live).
    pub fn on_line(mut self, f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.on_line = Some(Arc::new(f));
        self
    }

    /// The QEMU arguments for booting with `initrd`; `interactive` puts the serial console and
    /// QEMU's monitor on the terminal (Ctrl-A X quits, Ctrl-A C toggles the monitor).
    pub fn qemu_args(&self, initrd: &Path, interactive: bool) -> Vec<OsString> {
        let mut append = BASE_CMDLINE.to_string();
        for word in &self.cmdline {
            append.push(' ');
            append.push_str(word);
        }
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |a: &str| args.push(a.into());
        // No default devices (NIC, VGA, floppy, CD): less to emulate, faster boot.
        for a in [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-accel",
            "tcg",
        ] {
            push(a);
        }
        push("-cpu");
        push(&self.cpu);
        push("-smp");
        push(&self.smp.to_string());
        push("-m");
        push(&self.memory);
        if let Some(shift) = self.icount {
            push("-icount");
            push(&format!("shift={shift}"));
        }
        push("-serial");
        push(if interactive { "mon:stdio" } else { "stdio" });
        push("-append");
        push(&append);
        args.push("-kernel".into());
        args.push(self.vmlinuz.clone().into());
        args.push("-initrd".into());
        args.push(initrd.into());
        args.extend(self.args.iter().cloned());
        args
    }

    /// Boots with the serial console on this terminal and waits for QEMU to exit (the user
    /// powers off or presses Ctrl-A X). Files added with [`Qemu::file`] are included.
    pub fn run_interactive(&self) -> Result<ExitStatus, QemuError> {
        let initrd = self.prepare_initrd(None)?;
        let binary = crate::paths::qemu_binary();
        let status = Command::new(&binary)
            .args(self.qemu_args(initrd.path(), true))
            .status()
            .map_err(|source| QemuError::Spawn { binary, source });
        drop(initrd);
        status
    }

    /// The console log file, created afresh (with its folder), if one is kept.
    fn create_log(&self) -> std::io::Result<Option<std::fs::File>> {
        let Some(path) = &self.log else {
            return Ok(None);
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::File::create(path).map(Some)
    }

    /// Like [`Qemu::run_interactive`], but the boot goes only to the log: the terminal shows
    /// nothing until `/init` says `QS-BOOTED`, then the line `summary` makes of the boot's
    /// console text, then the console as it comes (the guest's prompt first). If QEMU ends
    /// before that, the boot's last lines are shown instead.
    pub fn run_interactive_quiet(
        &self,
        summary: impl FnOnce(&str) -> String,
    ) -> Result<ExitStatus, QemuError> {
        use std::process::Stdio;
        let io_err = |source| QemuError::Io {
            name: self.name.clone(),
            source,
        };
        let initrd = self.prepare_initrd(None)?;
        let binary = crate::paths::qemu_binary();
        let mut child = Command::new(&binary)
            .args(self.qemu_args(initrd.path(), true))
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|source| QemuError::Spawn {
                binary: binary.clone(),
                source,
            })?;
        let mut log = self.create_log().map_err(io_err)?;
        let mut from_qemu = child.stdout.take().expect("piped");
        let mut terminal = std::io::stdout();
        let mut boot = Vec::new();
        let mut booted = false;
        let mut summary = Some(summary);
        let mut chunk = [0u8; 4096];
        loop {
            let n = match from_qemu.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(e)),
            };
            if let Some(file) = log.as_mut() {
                let _ = file.write_all(&chunk[..n]);
            }
            if booted {
                let _ = terminal.write_all(&chunk[..n]);
                let _ = terminal.flush();
                continue;
            }
            boot.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&boot);
            if let Some(at) = text.find(BOOTED_MARKER) {
                let after = text[at..].find('\n').map_or(text.len(), |i| at + i + 1);
                // The terminal is raw (QEMU's stdio console): lines end in CR LF.
                let line = summary.take().map_or_else(String::new, |f| f(&text[..at]));
                let _ = write!(terminal, "{line}\r\n{}", &text[after..]);
                let _ = terminal.flush();
                booted = true;
            }
        }
        if !booted {
            let text = String::from_utf8_lossy(&boot);
            let _ = write!(terminal, "{}\r\n", tail_of(&text).replace('\n', "\r\n"));
        }
        let status = child.wait().map_err(io_err)?;
        drop(initrd);
        Ok(status)
    }

    /// Boots, runs `script` (busybox sh) as `/qs/script.sh`, and waits until the guest powers
    /// off or the timeout passes. A script that fails is not an error here: see
    /// [`RunOutput::ensure_success`].
    pub fn run_script(&self, script: &str) -> Result<RunOutput, QemuError> {
        self.spawn_script(script)?.wait()
    }

    /// Boots with `script` and returns once the kernel has reached userspace; drive the run
    /// with [`Running`].
    pub fn spawn_script(&self, script: &str) -> Result<Running, QemuError> {
        self.boot(Some(script))
    }

    /// Boots to the interactive shell with the console on a pipe: type with
    /// [`Running::send`], read with [`Running::wait_for`].
    pub fn spawn(&self) -> Result<Running, QemuError> {
        self.boot(None)
    }

    /// Starts QEMU and waits until the kernel has reached userspace ([`INIT_MARKER`]). One that
    /// has not after [`Qemu::boot_limit`], or that panicked on the way, is booted once more,
    /// saying so on stderr and keeping the failed boot's log beside the run's (`.hung-boot` or
    /// `.panicked-boot` added): nothing of Quicksilver has run by then, and QEMU's TCG now and
    /// then breaks a stock kernel's boot at code the kernel has just patched (seen three times
    /// in about 450 boots as a CPU taking INT3 for ever at a jump label, and once in CI as an
    /// oops with RIP inside a just-patched NOP of `sched_clock_cpu`; see the README's Limits).
    /// If QEMU exits first for another reason, the run is returned as it is, for its caller to
    /// report.
    fn boot(&self, script: Option<&str>) -> Result<Running, QemuError> {
        let mut run = self.spawn_with(self.prepare_initrd(script)?)?;
        if self.timeout <= self.boot_limit {
            return Ok(run);
        }
        let (what, suffix) = match run.wait_for(INIT_MARKER, self.boot_limit) {
            Err(QemuError::Timeout { after, .. }) => (
                format!("did not reach userspace in {} s", after.as_secs()),
                "hung-boot.log",
            ),
            Err(QemuError::Exited { console_tail, .. }) if boot_panicked(&console_tail) => {
                ("panicked before userspace".to_string(), "panicked-boot.log")
            }
            _ => return Ok(run),
        };
        drop(run);
        let kept = self.log.as_ref().map(|log| {
            let failed = log.with_extension(suffix);
            let _ = std::fs::rename(log, &failed);
            failed.display().to_string()
        });
        eprintln!(
            "{}: the kernel {what}, before any Quicksilver code ran (an emulator fault; its log: \
             {}): booting once more",
            self.name,
            kept.as_deref().unwrap_or("not kept")
        );
        self.spawn_with(self.prepare_initrd(script)?)
    }

    /// The base initramfs, or a per-run copy with the script and files appended.
    fn prepare_initrd(&self, script: Option<&str>) -> Result<RunInitrd, QemuError> {
        let mut files = self.files.clone();
        if let Some(script) = script {
            files.push(ExtraFile {
                path: "/qs/script.sh".into(),
                mode: 0o755,
                data: script.as_bytes().to_vec(),
            });
        }
        if files.is_empty() {
            return Ok(RunInitrd::Shared(self.initrd.clone()));
        }
        // Unique per process and per run: tests run in parallel threads and processes.
        static RUNS: AtomicU32 = AtomicU32::new(0);
        let n = RUNS.fetch_add(1, Ordering::Relaxed);
        let path = self
            .run_dir
            .join(format!("{}-{}-{n}.cpio", self.name, std::process::id()));
        let err = |e: anyhow::Error| QemuError::Initrd {
            name: self.name.clone(),
            message: format!("{e:#}"),
        };
        std::fs::create_dir_all(&self.run_dir).map_err(|e| err(e.into()))?;
        initramfs::with_files(&self.initrd, &files, &path).map_err(err)?;
        Ok(RunInitrd::Own(path))
    }

    fn spawn_with(&self, initrd: RunInitrd) -> Result<Running, QemuError> {
        let args = self.qemu_args(initrd.path(), false);
        let io_err = |source| QemuError::Io {
            name: self.name.clone(),
            source,
        };
        let binary = crate::paths::qemu_binary();
        let mut log = self.create_log().map_err(io_err)?;
        if let Some(file) = log.as_mut() {
            let line = std::iter::once(binary.clone().into_os_string())
                .chain(args.iter().cloned())
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ");
            writeln!(file, "# {line}\n# [host seconds since start] console line")
                .map_err(io_err)?;
        }
        let mut command = Command::new(&binary);
        command.args(&args);
        let booted_after = Arc::new(OnceLock::new());
        let on_line = {
            let booted_after = Arc::clone(&booted_after);
            let callback = self.on_line.clone();
            move |at: Duration, line: &str| {
                if line.trim_end() == BOOTED_MARKER {
                    let _ = booted_after.set(at);
                }
                if let Some(file) = log.as_mut() {
                    let _ = writeln!(file, "[{:8.3}] {line}", at.as_secs_f64());
                }
                if let Some(f) = &callback {
                    f(line);
                }
            }
        };
        let process = Watch::new(Stream::Stdout)
            .stdin()
            .on_line(on_line)
            .spawn(&self.name, command)
            .map_err(|source| QemuError::Spawn { binary, source })?;
        Ok(Running {
            name: self.name.clone(),
            deadline: process.started() + self.timeout,
            process,
            booted_after,
            _initrd: initrd,
            log: self.log.clone(),
        })
    }
}

/// The initramfs a run boots: the shared base, or a per-run copy deleted after the run.
#[derive(Debug)]
enum RunInitrd {
    Shared(PathBuf),
    Own(PathBuf),
}

impl RunInitrd {
    fn path(&self) -> &Path {
        match self {
            RunInitrd::Shared(p) | RunInitrd::Own(p) => p,
        }
    }
}

impl Drop for RunInitrd {
    fn drop(&mut self) {
        if let RunInitrd::Own(path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A QEMU process booting the guest. Dropping it kills QEMU, and QEMU is also killed when the
/// thread that started it ends (`PR_SET_PDEATHSIG`, so that a test killed by its runner leaves
/// no guest behind): start runs from the thread that owns them.
#[derive(Debug)]
pub struct Running {
    name: String,
    /// Declared before `_initrd`: QEMU is killed before its per-run initramfs goes.
    process: Process,
    deadline: Instant,
    /// When the `QS-BOOTED` line arrived.
    booted_after: Arc<OnceLock<Duration>>,
    /// Held for its `Drop`: the per-run initramfs goes when the run does.
    _initrd: RunInitrd,
    log: Option<PathBuf>,
}

impl Running {
    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Time since QEMU started.
    pub fn elapsed(&self) -> Duration {
        self.process.elapsed()
    }

    /// The console log file, if kept.
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// Everything the console printed so far.
    pub fn console(&self) -> String {
        self.process.text()
    }

    /// Types `text` on the guest's console (include the `\n`).
    pub fn send(&mut self, text: &str) -> Result<(), QemuError> {
        self.process
            .send(text.as_bytes())
            .map_err(|source| QemuError::Io {
                name: self.name.clone(),
                source,
            })
    }

    /// Waits until `needle` appears on the console after what earlier calls matched, and
    /// returns the (possibly unfinished) line holding it. Fails if QEMU exits first or after
    /// `timeout` (or the run's deadline, whichever is sooner). Kernel messages share the
    /// console: wait for a marker the kernel will not print (`sent` matches "present").
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String, QemuError> {
        let give_up = (Instant::now() + timeout).min(self.deadline);
        match self.process.wait_for(&[needle], give_up) {
            Ok(found) => Ok(found.line),
            Err(Ended::Exited { tail }) => {
                let status = self.exit_status()?;
                Err(QemuError::Exited {
                    name: self.name.clone(),
                    waiting_for: needle.into(),
                    status,
                    stderr: self.process.stderr_text(),
                    console_tail: tail,
                    log: self.log.clone(),
                })
            }
            Err(Ended::TimedOut { tail }) => Err(QemuError::Timeout {
                name: self.name.clone(),
                waiting_for: needle.into(),
                after: self.process.elapsed(),
                console_tail: tail,
                log: self.log.clone(),
            }),
        }
    }

    /// QEMU's exit status once its output has ended.
    fn exit_status(&mut self) -> Result<ExitStatus, QemuError> {
        let status = self
            .process
            .wait_exit(self.deadline.max(Instant::now()))
            .map_err(|source| QemuError::Io {
                name: self.name.clone(),
                source,
            })?;
        Ok(status.expect("QEMU closed its output, so it exits"))
    }

    /// Waits for QEMU to exit (the guest powered off, or crashed with `panic=-1`), killing it
    /// at the run's deadline, and returns what happened.
    pub fn wait(mut self) -> Result<RunOutput, QemuError> {
        let status = match self.process.wait_exit(self.deadline) {
            Ok(Some(status)) => status,
            Ok(None) => {
                let tail = tail_of(&self.process.text());
                self.kill();
                return Err(QemuError::Timeout {
                    name: self.name.clone(),
                    waiting_for: "the guest to power off".into(),
                    after: self.process.elapsed(),
                    console_tail: tail,
                    log: self.log.clone(),
                });
            }
            Err(source) => {
                return Err(QemuError::Io {
                    name: self.name.clone(),
                    source,
                })
            }
        };
        let console = self.process.text();
        let script_status = console.lines().rev().find_map(|l| {
            l.trim_end()
                .strip_prefix(SCRIPT_EXIT_MARKER)
                .and_then(|s| s.trim().parse().ok())
        });
        Ok(RunOutput {
            name: self.name.clone(),
            console,
            script_status,
            qemu_status: status,
            qemu_stderr: self.process.stderr_text(),
            elapsed: self.process.elapsed(),
            booted_after: self.booted_after.get().copied(),
            log: self.log.clone(),
        })
    }

    /// Kills QEMU now (also done on drop).
    pub fn kill(&mut self) {
        self.process.kill();
    }
}

/// Runs one command on QEMU's human monitor at `socket` (see [`Qemu::monitor_socket`]) and
/// returns what it printed. Connects anew each time (QEMU serves one client at a time).
pub fn hmp(socket: &Path, command: &str, timeout: Duration) -> std::io::Result<String> {
    use std::os::unix::net::UnixStream;
    const PROMPT: &str = "(qemu) ";
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    // The monitor echoes input and redraws the line with terminal escapes; everything up to
    // the first prompt is its banner.
    let read_to_prompt = |stream: &mut UnixStream| -> std::io::Result<String> {
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&text).ends_with(PROMPT) {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "QEMU closed the monitor",
                ));
            }
            text.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&text).into_owned())
    };
    read_to_prompt(&mut stream)?;
    stream.write_all(format!("{command}\n").as_bytes())?;
    let reply = read_to_prompt(&mut stream)?;
    // Drop the echoed command line and the closing prompt; keep what the command printed.
    let body = reply.strip_suffix(PROMPT).unwrap_or(&reply);
    let body = body.split_once('\n').map_or("", |(_echo, rest)| rest);
    Ok(body.replace('\r', ""))
}

/// What a finished run left.
#[derive(Clone, Debug)]
pub struct RunOutput {
    /// The run's name.
    pub name: String,
    /// The whole console, lines ending in `\n`, carriage returns removed.
    pub console: String,
    /// The script's exit status, from the `QS-SCRIPT-EXIT` line; `None` if the guest stopped
    /// before printing it.
    pub script_status: Option<i32>,
    /// How QEMU exited.
    pub qemu_status: ExitStatus,
    /// What QEMU printed on stderr (warnings about CPU features, errors).
    pub qemu_stderr: String,
    /// From QEMU's start to its exit.
    pub elapsed: Duration,
    /// From QEMU's start to the `QS-BOOTED` line.
    pub booted_after: Option<Duration>,
    /// The console log file, if kept.
    pub log: Option<PathBuf>,
}

impl RunOutput {
    /// The script ran to the end and exited 0.
    pub fn succeeded(&self) -> bool {
        self.script_status == Some(0)
    }

    /// `Ok` if the script exited 0; otherwise an error with the end of the console.
    pub fn ensure_success(&self) -> Result<&RunOutput, QemuError> {
        let console_tail = tail_of(&self.console);
        match self.script_status {
            Some(0) => Ok(self),
            Some(status) => Err(QemuError::ScriptFailed {
                name: self.name.clone(),
                status,
                console_tail,
                log: self.log.clone(),
            }),
            None => Err(QemuError::NoScriptExit {
                name: self.name.clone(),
                status: self.qemu_status,
                stderr: self.qemu_stderr.clone(),
                console_tail,
                log: self.log.clone(),
            }),
        }
    }

    /// The console lines between the `QS-BOOTED` marker and the `QS-SCRIPT-EXIT` line: what
    /// the script printed (with kernel messages that came meanwhile).
    pub fn script_output(&self) -> String {
        let mut out = String::new();
        let mut inside = false;
        for line in self.console.lines() {
            if line.trim_end() == BOOTED_MARKER {
                inside = true;
            } else if line.starts_with(SCRIPT_EXIT_MARKER) {
                inside = false;
            } else if inside {
                let _ = writeln!(out, "{line}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_output_is_what_lies_between_the_markers() {
        let out = RunOutput {
            name: "t".into(),
            console: "[    1.0] kernel\nQS-NOLOAD\nQS-BOOTED\nhello\nworld\nQS-SCRIPT-EXIT 3\n[ 2.0] reboot\n".into(),
            script_status: Some(3),
            qemu_status: std::os::unix::process::ExitStatusExt::from_raw(0),
            qemu_stderr: String::new(),
            elapsed: Duration::ZERO,
            booted_after: None,
            log: None,
        };
        assert_eq!(out.script_output(), "hello\nworld\n");
        assert!(!out.succeeded());
        let err = out.ensure_success().unwrap_err().to_string();
        assert!(err.contains("status 3") && err.contains("world"), "{err}");
    }
}
