//! The demo's links to the operator: the guest's second UART (ttyS1, port 0x2f8) on a Unix
//! socket, and the fast link, a second NIC (virtio-net at 0000:00:04.0) the hv drives, on
//! QEMU's stream socket; a fresh random key (in the guest as a root-only file, never on its
//! command line), and the built `qs-bridge` on the other ends, serving gdb on TCP and its
//! control socket for as long as the demo runs.
//!
//! Files, all in `<target>/qs`: `demo.key` (the key, mode 0600), `demo-link.sock` (QEMU's end
//! of the link), `demo-net.sock` (QEMU's end of the fast link's Ethernet), `bridge.sock` (the
//! bridge's control socket), `logs/demo-bridge.log` (what the bridge says) and
//! `logs/demo-bridge-console.log` (the machine's console channel).

use std::io::{Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use qs_testkit::child::{Process, Stream, Watch};
use qs_testkit::qemu::FastLinkNic;
use qs_testkit::{Artifacts, Qemu};

/// Where gdb connects by default.
pub const GDB_ADDR: &str = "127.0.0.1:1234";

/// The demo's link: key, sockets and logs.
#[derive(Clone, Debug)]
pub struct DemoLink {
    /// The key file given to the bridge.
    pub key_file: PathBuf,
    /// QEMU's Unix socket for ttyS1.
    pub socket: PathBuf,
    /// QEMU's stream socket for the fast link's NIC.
    pub net_socket: PathBuf,
    /// The bridge's control socket.
    pub control: PathBuf,
    /// What the bridge says.
    pub bridge_log: PathBuf,
    /// The machine's console channel, as the bridge receives it.
    pub console_log: PathBuf,
    /// Where gdb connects (`HOST:PORT`).
    pub gdb: String,
    key: String,
}

impl DemoLink {
    /// Writes a new random key to `<target>/qs/demo.key` (mode 0600) and picks the paths.
    pub fn new(artifacts: &Artifacts, gdb: &str) -> anyhow::Result<DemoLink> {
        let mut random = [0u8; 16];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut random))
            .context("cannot read /dev/urandom for the demo's link key")?;
        let key: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let key_file = artifacts.dir.join("demo.key");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key_file)
            .with_context(|| format!("cannot write {}", key_file.display()))?;
        // An older file keeps its mode through open(): set it.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        writeln!(f, "{key}")?;
        // sun_path holds 108 bytes.
        let socket_path = |name: &str| {
            let path = artifacts.dir.join(format!("demo-{name}.sock"));
            let path = if path.as_os_str().len() > 100 {
                std::env::temp_dir().join(format!("qs-demo-{name}-{}.sock", std::process::id()))
            } else {
                path
            };
            let _ = std::fs::remove_file(&path);
            path
        };
        let (socket, net_socket) = (socket_path("link"), socket_path("net"));
        Ok(DemoLink {
            key_file,
            socket,
            net_socket,
            control: artifacts.dir.join("bridge.sock"),
            bridge_log: artifacts.logs_dir().join("demo-bridge.log"),
            console_log: artifacts.logs_dir().join("demo-bridge-console.log"),
            gdb: gdb.to_string(),
            key,
        })
    }

    /// `qemu` with ttyS1 on the link socket and the agent told to watch it with the key, and
    /// the fast link's NIC on its stream socket, which the agent hands to the hv (`net=`).
    pub fn configure(&self, qemu: Qemu) -> Qemu {
        qemu.link(&self.socket, &self.key)
            .fast_link(&self.net_socket, FastLinkNic::VirtioNet)
    }

    /// What to type in another terminal to debug the guest's kernel. (The hv answers gdb's
    /// `qOffsets` with the KASLR offset: no manual relocation.)
    pub fn gdb_command(&self, vmlinux: &Path) -> String {
        let target = match self.gdb.rsplit_once(':') {
            Some(("127.0.0.1" | "localhost", port)) => format!(":{port}"),
            _ => self.gdb.clone(),
        };
        format!("gdb {} -ex 'target remote {target}'", vmlinux.display())
    }

    /// Starts the built `qs-bridge` on the link. It keeps connecting and saying hello for up
    /// to `patience` (QEMU may not listen yet, the agent may not have taken the port yet).
    /// Its stderr goes to [`DemoLink::bridge_log`] and, line by line, to this terminal
    /// (`raw_terminal`: QEMU owns it in raw mode, so lines start on a fresh line).
    pub fn start_bridge(
        &self,
        artifacts: &Artifacts,
        patience: Duration,
        raw_terminal: bool,
    ) -> anyhow::Result<DemoBridge> {
        if !artifacts.bridge.exists() {
            anyhow::bail!(
                "{} is missing: run `cargo xtask build`",
                artifacts.bridge.display()
            );
        }
        std::fs::create_dir_all(artifacts.logs_dir())?;
        let mut log = std::fs::File::create(&self.bridge_log)
            .with_context(|| format!("cannot write {}", self.bridge_log.display()))?;
        let mut command = qs_testkit::bridge::command(
            &artifacts.bridge,
            &self.socket,
            &self.key_file,
            &self.gdb,
            &self.console_log,
        );
        command
            .arg("--control")
            .arg(&self.control)
            .args(["--timeout", "5"])
            .arg("--vmlinux")
            .arg(&artifacts.vmlinux)
            .args(["--retry", &patience.as_secs().to_string()])
            .arg("--net")
            .arg(format!("stream:{}", self.net_socket.display()));
        let quiet = Arc::new(AtomicBool::new(false));
        let say = move |text: &str| {
            if raw_terminal {
                eprint!("\r\n{text}\r\n");
            } else {
                eprintln!("{text}");
            }
        };
        let (echo_quiet, gdb_line) = (quiet.clone(), self.gdb_command(&artifacts.vmlinux));
        let on_line = move |_, line: &str| {
            let _ = writeln!(log, "{line}");
            if line.contains("authenticated") {
                say(&format!(
                    "xtask: qs-bridge is on the link; in another terminal: {gdb_line}"
                ));
                return;
            }
            // Expected while the guest boots: the log has it.
            if line.contains("no answer yet") {
                return;
            }
            // The link closes when QEMU exits: at the end of the demo that is no news.
            if line.contains("the link closed") || line.contains("the link failed") {
                std::thread::sleep(Duration::from_secs(1));
            }
            if !echo_quiet.load(Ordering::Acquire) {
                say(line);
            }
        };
        let (end_quiet, bridge_log) = (quiet.clone(), self.bridge_log.clone());
        let on_end = move || {
            std::thread::sleep(Duration::from_secs(1));
            if !end_quiet.load(Ordering::Acquire) {
                say(&format!(
                    "xtask: qs-bridge stopped; gdb is not served any more (log: {})",
                    bridge_log.display()
                ));
            }
        };
        // The bridge must not outlive the demo, even if xtask itself is killed: the process
        // dies with this thread, and with the `DemoBridge`.
        let process = Watch::new(Stream::Stderr)
            .on_line(on_line)
            .on_end(on_end)
            .spawn("qs-bridge", command)
            .with_context(|| format!("cannot start {}", artifacts.bridge.display()))?;
        Ok(DemoBridge { process, quiet })
    }
}

/// The demo's running bridge: killed when dropped.
#[derive(Debug)]
pub struct DemoBridge {
    process: Process,
    quiet: Arc<AtomicBool>,
}

impl DemoBridge {
    /// The bridge's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

impl Drop for DemoBridge {
    fn drop(&mut self) {
        self.quiet.store(true, Ordering::Release);
        self.process.kill();
    }
}
