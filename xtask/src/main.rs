//! `cargo xtask`: the developer's and CI's entry point. Each subcommand is a thin layer over
//! the `xtask` library, which the tests and benchmarks use too.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser};
use xtask::{note, Artifacts, KernelId};

#[derive(Parser)]
#[command(
    bin_name = "cargo xtask",
    about = "Quicksilver's setup, build, demo, test and bench tasks"
)]
enum Cli {
    /// Install missing host packages and the Rust target, and fetch a kernel into
    /// .cache/kernel/<K> (does nothing when already done).
    Setup(KernelArg),
    /// Build the hv image, the agent module, the guest tools and the initramfs into target/qs.
    Build(KernelArg),
    /// Build the Debian packages into target/qs/package: quicksilver (the agent's source for
    /// DKMS, the hv image, qsctl) for the machine to debug, qs-bridge for the operator's.
    Package,
    /// Boot the test guest under QEMU: an interactive shell on this terminal, or a script;
    /// qs-bridge serves gdb for its kernel on 127.0.0.1:1234.
    Demo(DemoArgs),
    /// rustfmt and clippy (-D warnings) over every crate, host and the hv's own target.
    Lint,
    /// The coverage-guided fuzzers (fuzz/): every target, or TARGET, for 10 million inputs
    /// (or --runs N, or --seconds S). Installs nightly and cargo-fuzz when missing.
    Fuzz {
        target: Option<String>,
        #[arg(long, conflicts_with = "seconds")]
        runs: Option<u64>,
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Set up and build for every supported kernel, lint, then run the workspace's tests
    /// (cargo nextest if installed, else cargo test): the whole suite on --kernel, a matrix
    /// subset on the others. Arguments after `--` go to the test runner.
    Test {
        #[command(flatten)]
        kernel: KernelArg,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Write guest-agent/linux/qs_abi.h, the C side of the ABI, from quicksilver-proto (or with
    /// --check, fail if the committed one differs).
    AbiHeader {
        #[arg(long)]
        check: bool,
    },
    /// Benchmarks: `mode-switch` (the switch, the overheads and the platform's IPI floor),
    /// `gdb` (Quicksilver's gdbstub against QEMU's), `freeze` (stopping every CPU, with and
    /// without the state check), `checkpoint` (periodic checkpoints' cost, rollbacks), `export`
    /// (a checkpoint into a file, against the disk's raw rate; qs-tui's redraw), `link` (the
    /// fast link, the serial link and Linux's own NIC driver: bulk each way, round trips); each
    /// takes `--kernel K` (the default kernel otherwise).
    Bench {
        which: Benchmark,
        #[command(flatten)]
        kernel: KernelArg,
        /// mode-switch only: measure these CPU counts (repeatable), on the wall clock only.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        smp: Vec<u32>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Benchmark {
    ModeSwitch,
    Gdb,
    Freeze,
    Checkpoint,
    Export,
    Link,
}

/// `--kernel K`: which Debian kernel to fetch, build for and boot.
#[derive(Args, Clone, Copy)]
struct KernelArg {
    /// The kernel: 6.12 (Debian 13's series, the default) or 6.1 (Debian 12's), optionally with
    /// a flavour: 6.12-generic (the default flavour, what bare-metal servers run) or 6.12-cloud
    /// (built for VMs, boots faster under emulation). Also $QS_KERNEL.
    #[arg(long = "kernel", value_name = "K", value_parser = parse_kernel)]
    id: Option<KernelId>,
}

impl KernelArg {
    /// `--kernel`, else `$QS_KERNEL`, else the default.
    fn resolve(self) -> anyhow::Result<KernelId> {
        match self.id {
            Some(id) => Ok(id),
            None => Ok(KernelId::from_env()?),
        }
    }
}

fn parse_kernel(s: &str) -> Result<KernelId, String> {
    s.parse().map_err(|e: xtask::LocateError| e.to_string())
}

#[derive(Args)]
struct DemoArgs {
    #[command(flatten)]
    kernel: KernelArg,
    /// Guest CPUs.
    #[arg(long, default_value_t = 4)]
    smp: u32,
    /// Guest memory (QEMU syntax: 512M, 2G).
    #[arg(long, default_value = "1G")]
    memory: String,
    /// Run this busybox sh script in the guest instead of a shell, print the console, and exit
    /// with the script's status.
    #[arg(long)]
    script: Option<PathBuf>,
    /// Boot without loading the Quicksilver agent (kernel parameter qs.noload).
    #[arg(long)]
    noload: bool,
    /// Extra kernel command-line words (repeatable), e.g. quicksilver.<param>=<value>.
    #[arg(long = "cmdline", value_name = "WORD")]
    cmdline: Vec<String>,
    /// With --script: give up after this many seconds. (qs-bridge waits as long for the
    /// guest's agent to answer.)
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Where qs-bridge serves gdb for the guest's kernel.
    #[arg(long, value_name = "ADDR:PORT", default_value = xtask::demo::GDB_ADDR)]
    gdb: String,
    /// Open the demo and qs-tui side by side in tmux (installed if missing).
    #[arg(long)]
    tui: bool,
}

/// `cargo xtask demo --tui`: the demo and qs-tui side by side, qs-tui on the demo's control
/// socket (it connects once the bridge is up, retrying every second). Inside tmux, qs-tui
/// splits the current window and the demo runs here (`None`); outside, a new tmux session
/// runs both (its exit status).
fn demo_in_tmux(kernel: KernelId) -> anyhow::Result<Option<ExitCode>> {
    use std::process::Command;
    // The setup installs tmux with the rest (and the demo inside tmux finds it done).
    xtask::setup(kernel)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    xtask::cmd::run_inherit(Command::new(&cargo).args(["build", "-p", "qs-tui"]))?;
    let demo: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--tui")
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect();
    let here = std::env::current_dir()?;
    let demo_cmd = format!("{cargo} xtask {}", demo.join(" "));
    let tui_cmd = format!(
        "{} --socket {}",
        xtask::target_dir().join("debug").join("qs-tui").display(),
        xtask::target_dir().join("qs").join("bridge.sock").display()
    );
    if std::env::var_os("TMUX").is_some() {
        xtask::cmd::run_inherit(Command::new("tmux").args(["split-window", "-h", "-d", &tui_cmd]))?;
        return Ok(None);
    }
    let status = Command::new("tmux")
        .current_dir(&here)
        .args(["new-session", "-s", "quicksilver-demo", &demo_cmd, ";"])
        .args(["split-window", "-h", &tui_cmd, ";"])
        .args(["select-pane", "-L"])
        .status()?;
    Ok(Some(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }))
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli {
        Cli::Setup(kernel) => {
            let kernel = xtask::setup(kernel.resolve()?)?;
            println!("kernel {}:", kernel.release);
            println!("  vmlinuz  {}", kernel.vmlinuz.display());
            println!("  headers  {}", kernel.headers_dir.display());
            println!("  modules  {}", kernel.modules_dir.display());
            println!("  busybox  {}", kernel.busybox.display());
            println!(
                "  vmlinux  {} (debug info, for gdb)",
                kernel.vmlinux.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cli::Build(kernel) => {
            let kernel = xtask::setup(kernel.resolve()?)?;
            xtask::build(&kernel)?;
            Ok(ExitCode::SUCCESS)
        }
        Cli::Package => {
            // No kernel needed: DKMS builds the agent on the machine that installs it.
            xtask::setup::ensure_rust_target(xtask::setup::HV_TARGET)?;
            let out = xtask::package::out_dir();
            let debs = xtask::package::package(&out)?;
            for (deb, goes) in [
                (&debs.agent, "the machine to debug"),
                (&debs.bridge, "the operator's machine"),
            ] {
                let size = std::fs::metadata(deb).map(|m| m.len()).unwrap_or(0);
                println!(
                    "{} ({} KiB): for {goes}",
                    deb.display(),
                    size.div_ceil(1024)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cli::AbiHeader { check: true } => {
            xtask::abi_header::check()?;
            Ok(ExitCode::SUCCESS)
        }
        Cli::AbiHeader { check: false } => {
            let changed = xtask::abi_header::write()?;
            note(format!(
                "{} {}",
                xtask::abi_header::HEADER,
                if changed { "written" } else { "was up to date" }
            ));
            Ok(ExitCode::SUCCESS)
        }
        Cli::Demo(args) => demo(args),
        Cli::Lint => {
            xtask::lint::lint()?;
            Ok(ExitCode::SUCCESS)
        }
        Cli::Fuzz {
            target,
            runs,
            seconds,
        } => {
            let budget = match (runs, seconds) {
                (_, Some(s)) => xtask::fuzz::Budget::Seconds(s),
                (Some(n), None) => xtask::fuzz::Budget::Runs(n),
                (None, None) => xtask::fuzz::Budget::Runs(10_000_000),
            };
            xtask::fuzz::run(target.as_deref(), budget)?;
            Ok(ExitCode::SUCCESS)
        }
        Cli::Test { kernel, args } => test(kernel.resolve()?, &args),
        Cli::Bench { which, kernel, smp } => bench(which, kernel.resolve()?, &smp),
    }
}

fn bench(which: Benchmark, id: KernelId, smps: &[u32]) -> anyhow::Result<ExitCode> {
    let switches = std::env::var("QS_BENCH_SWITCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    if !smps.is_empty() && !matches!(which, Benchmark::ModeSwitch) {
        anyhow::bail!("--smp is for `cargo xtask bench mode-switch`; the other benchmarks choose their own CPU counts");
    }
    let kernel = xtask::setup(id)?;
    match which {
        Benchmark::ModeSwitch => {
            let artifacts = xtask::build(&kernel)?;
            xtask::bench::mode_switch(&artifacts, switches, smps)?;
        }
        Benchmark::Gdb => {
            // QEMU's half needs no hv: measure it even if the hv does not build.
            if let Err(err) = xtask::build(&kernel) {
                eprintln!("xtask: warning: {err:#}");
            }
            let mut artifacts = Artifacts::locate_id(id)?;
            // The bridge as it ships: its time per packet is part of every figure.
            artifacts.bridge = xtask::build::build_release_bridge(&artifacts.dir)?;
            xtask::bench_gdb::gdb(&artifacts)?;
        }
        Benchmark::Freeze => {
            let artifacts = xtask::build(&kernel)?;
            xtask::bench_freeze::freeze(&artifacts, 50)?;
        }
        Benchmark::Checkpoint => {
            let artifacts = xtask::build(&kernel)?;
            xtask::bench_checkpoint::checkpoint(&artifacts)?;
        }
        Benchmark::Export => {
            let artifacts = xtask::build(&kernel)?;
            xtask::bench_export::export(&artifacts)?;
        }
        Benchmark::Link => {
            let mut artifacts = xtask::build(&kernel)?;
            artifacts.bridge = xtask::build::build_release_bridge(&artifacts.dir)?;
            xtask::bench_link::link(&artifacts)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if args.tui {
        if let Some(code) = demo_in_tmux(args.kernel.resolve()?)? {
            return Ok(code);
        }
    }
    let id = args.kernel.resolve()?;
    let kernel = xtask::setup(id)?;
    // A part that does not build (the hv, the agent) should not keep the rest from booting:
    // /init reports what is missing on the console.
    if let Err(err) = xtask::build(&kernel) {
        eprintln!("xtask: warning: {err:#}\nxtask: booting what was built");
    }
    let artifacts = Artifacts::locate_id(id)?;
    let mut qemu = artifacts.qemu("demo").smp(args.smp).memory(&args.memory);
    if args.noload {
        qemu = qemu.noload();
    }
    for word in &args.cmdline {
        qemu = qemu.cmdline(word);
    }
    // The link: QEMU's ttyS1 on a socket, a fresh key, qs-bridge serving gdb on it.
    let link = (!args.noload)
        .then(|| xtask::demo::DemoLink::new(&artifacts, &args.gdb))
        .transpose()?;
    if let Some(link) = &link {
        qemu = link.configure(qemu);
        note(format!(
            "once qs-bridge is on the link, debug the kernel from another terminal: {}",
            link.gdb_command(&artifacts.vmlinux)
        ));
    }
    let start_bridge = |raw_terminal: bool| {
        let link = link.as_ref()?;
        let patience = Duration::from_secs(args.timeout);
        match link.start_bridge(&artifacts, patience, raw_terminal) {
            Ok(bridge) => {
                note(format!(
                    "qs-bridge (pid {}) serves gdb on {}; its log: {}; control socket: {}",
                    bridge.pid(),
                    link.gdb,
                    link.bridge_log.display(),
                    link.control.display()
                ));
                note(format!(
                    "the operator's terminal, from another terminal: cargo run -p qs-tui -- --socket {}",
                    link.control.display()
                ));
                Some(bridge)
            }
            Err(err) => {
                eprintln!("xtask: warning: no qs-bridge, so no gdb: {err:#}");
                None
            }
        }
    };
    let Some(script_path) = args.script else {
        note("booting; leave with `poweroff` in the guest, or Ctrl-A X (Ctrl-A C: QEMU monitor)");
        // Started first: it connects once QEMU listens and the agent answers.
        let _bridge = start_bridge(true);
        let started = std::time::Instant::now();
        let log = artifacts.logs_dir().join("demo.log");
        let status = qemu.run_interactive_quiet(|console| {
            xtask::boot_summary::boot_summary(console, started.elapsed().as_secs_f64(), &log)
        })?;
        return Ok(if status.success() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    };
    let script = std::fs::read_to_string(&script_path)
        .with_context(|| format!("reading the script {}", script_path.display()))?;
    let mut running = qemu
        .timeout(Duration::from_secs(args.timeout))
        .on_line(|line| println!("{line}"))
        .spawn_script(&script)?;
    // If the guest never boots, `wait` below says why.
    let bridge = running
        .wait_for(
            qs_testkit::qemu::BOOTED_MARKER,
            Duration::from_secs(args.timeout),
        )
        .ok()
        .and_then(|_| start_bridge(false));
    let out = running.wait()?;
    drop(bridge);
    let booted = out
        .booted_after
        .map_or("?".into(), |d| format!("{:.1} s", d.as_secs_f64()));
    note(format!(
        "guest booted in {booted}, ran for {:.1} s; console log: {}",
        out.elapsed.as_secs_f64(),
        out.log
            .as_ref()
            .map_or("none".into(), |p| p.display().to_string())
    ));
    match out.script_status {
        Some(status) => {
            note(format!("script exited with status {status}"));
            Ok(ExitCode::from(u8::try_from(status).unwrap_or(1)))
        }
        None => Err(out
            .ensure_success()
            .expect_err("no status is an error")
            .into()),
    }
}

fn test(suite: KernelId, args: &[String]) -> anyhow::Result<ExitCode> {
    let kernels = xtask::setup_all(suite)?;
    xtask::build_all(&kernels)?;
    xtask::lint::lint()?;
    // A short bounded run of every fuzzer: the full campaign is `cargo xtask fuzz`.
    xtask::fuzz::run(None, xtask::fuzz::Budget::Seconds(20))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let has_nextest = Command::new(&cargo)
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(xtask::repo_root());
    if has_nextest {
        cmd.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        note("cargo-nextest is not installed (cargo install cargo-nextest); using cargo test");
        cmd.args(["test", "--workspace"]);
    }
    cmd.args(args)
        .env(qs_testkit::artifacts::KERNEL_ENV, suite.to_string());
    note(format!(
        "the whole suite runs on kernel {suite}, a matrix subset on the others"
    ));
    note(xtask::cmd::describe(&cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", xtask::cmd::describe(&cmd)))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}
