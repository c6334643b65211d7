//! Running the built `qs-bridge` on a guest's link: [`command`] is the command line every
//! caller shares (the tests' [`Bridge`], `cargo xtask demo`), [`Bridge`] the tests' and
//! benchmarks' bridge, which waits until it has authenticated.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::child::{Ended, Process, Stream, Watch};
use crate::gdb::GdbError;

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free TCP port on 127.0.0.1")
}

/// `binary --link unix:LINK --key KEY_FILE --gdb GDB_ADDR --console CONSOLE`: the bridge on
/// the guest's link socket, serving gdb at `gdb_addr` and writing the machine's console
/// channel to `console`. Callers add `--timeout`, `--retry`, `--control` as they need.
pub fn command(
    binary: &Path,
    link: &Path,
    key_file: &Path,
    gdb_addr: &str,
    console: &Path,
) -> Command {
    let mut command = Command::new(binary);
    command
        .arg("--link")
        .arg(format!("unix:{}", link.display()))
        .arg("--key")
        .arg(key_file)
        .args(["--gdb", gdb_addr])
        .arg("--console")
        .arg(console);
    command
}

/// A running `qs-bridge`. Dropping it kills the bridge.
#[derive(Debug)]
pub struct Bridge {
    process: Process,
    port: u16,
    key_file: PathBuf,
    control: PathBuf,
}

impl Bridge {
    /// Runs the bridge `binary` on `link` ([`command`]) with `key` written to
    /// `<dir>/<name>-<pid>.key` (removed with the bridge), gdb on a free port, the machine's
    /// console to `<dir>/<name>.bridge-console` and the bridge's own messages also to
    /// `<dir>/<name>.bridge.log`, its control socket at `control` (or a path of its own in the
    /// temporary folder), the kernel's symbols from `vmlinux`, and waits (up to `timeout`)
    /// until it says it authenticated. With `net` (QEMU's stream socket of the fast link's
    /// NIC) it also serves the fast link (`--net stream:PATH`) and waits until it is up.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        binary: &Path,
        link: &Path,
        net: Option<&Path>,
        key: &[u8],
        dir: &Path,
        name: &str,
        control: Option<&Path>,
        vmlinux: &Path,
        timeout: Duration,
    ) -> Result<Bridge, GdbError> {
        let spawn_err = |source| GdbError::Spawn {
            what: binary.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(spawn_err)?;
        let key_file = dir.join(format!("{name}-{}.key", std::process::id()));
        std::fs::write(&key_file, key).map_err(spawn_err)?;
        let port = free_port();
        let mut command = command(
            binary,
            link,
            &key_file,
            &format!("127.0.0.1:{port}"),
            &dir.join(format!("{name}.bridge-console")),
        );
        // In the temporary folder: a Unix socket's path is limited to 107 bytes.
        let control = control.map_or_else(
            || std::env::temp_dir().join(format!("qs-ctl-{name}-{}.sock", std::process::id())),
            Path::to_path_buf,
        );
        command
            .arg("--timeout")
            .arg(timeout.as_secs().max(1).to_string())
            .arg("--control")
            .arg(&control)
            .arg("--vmlinux")
            .arg(vmlinux);
        if let Some(net) = net {
            command
                .arg("--net")
                .arg(format!("stream:{}", net.display()));
        }
        let mut watch = Watch::new(Stream::Stderr);
        if let Ok(log) = std::fs::File::create(dir.join(format!("{name}.bridge.log"))) {
            let log = Arc::new(Mutex::new(log));
            watch = watch.on_line(move |_, line| {
                let _ = writeln!(log.lock().expect("bridge log"), "{line}");
            });
        }
        let process = watch.spawn(name, command).map_err(spawn_err)?;
        let bridge = Bridge {
            process,
            port,
            key_file,
            control,
        };
        bridge.wait_for("authenticated", timeout + Duration::from_secs(10))?;
        if net.is_some() {
            bridge.wait_for("the fast link is up", timeout + Duration::from_secs(10))?;
        }
        Ok(bridge)
    }

    /// Where gdb connects: `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The bridge's control socket (`--control`).
    pub fn control_path(&self) -> &Path {
        &self.control
    }

    /// What the bridge printed on stderr so far.
    pub fn log(&self) -> String {
        self.process.text()
    }

    /// Waits until the bridge's stderr contains `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<(), GdbError> {
        self.wait_for_count(needle, 1, timeout)
    }

    /// Waits until the bridge's stderr contains `needle` at least `count` times.
    pub fn wait_for_count(
        &self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<(), GdbError> {
        let deadline = Instant::now() + timeout;
        self.process
            .wait_until(deadline, |text| {
                (text.matches(needle).count() >= count).then_some(())
            })
            .map_err(|ended| GdbError::Bridge {
                why: match ended {
                    Ended::Exited { .. } => format!("it exited before saying {needle:?}"),
                    Ended::TimedOut { .. } => format!("no {needle:?} after {timeout:?}"),
                },
                stderr: self.log(),
            })
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.process.kill();
        let _ = std::fs::remove_file(&self.key_file);
        let _ = std::fs::remove_file(&self.control);
    }
}
