//! Driving real GNU gdb and `qs-bridge` from the tests and the benchmarks.
//!
//! [`Gdb`] runs gdb with its commands on a pipe, as a user's terminal would give them, and
//! waits for each command's output: after every command it sends `echo <marker>` and reads up
//! to the marker. Unlike `gdb -batch -x FILE`, this lets gdb's event loop run between commands,
//! so that `continue &` followed later by `interrupt` works (in a batch script gdb never sees
//! the stop that `interrupt` causes). Everything gdb printed, with the commands sent, goes to a
//! transcript file next to the console logs.
//!
//! [`Bridge`] runs the built `qs-bridge` on a guest's link socket with a key file, and waits
//! until it has authenticated.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The gdb program.
pub const GDB: &str = "gdb";

/// Settings every session starts with: no pager or line wrapping (the output is parsed), no
/// questions, and patience with a machine that is slow to answer (TCG, a serial link).
pub const GDB_SETTINGS: &[&str] = &[
    "set pagination off",
    "set height 0",
    "set width 0",
    "set confirm off",
    "set style enabled off",
    "set non-stop off",
    "set tcp connect-timeout 60",
    "set remotetimeout 30",
];

/// What went wrong driving gdb or the bridge.
#[derive(Debug, thiserror::Error)]
pub enum GdbError {
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{name}: writing to gdb: {source}")]
    Io {
        name: String,
        source: std::io::Error,
    },
    #[error("{name}: gdb exited while we waited for {waiting_for:?}; its last output:\n{tail}")]
    Exited {
        name: String,
        waiting_for: String,
        tail: String,
    },
    #[error("{name}: no {waiting_for:?} from gdb after {after:?}; its last output:\n{tail}")]
    Timeout {
        name: String,
        waiting_for: String,
        after: Duration,
        tail: String,
    },
    #[error("qs-bridge did not authenticate: {why}; its output:\n{stderr}")]
    Bridge { why: String, stderr: String },
}

/// Text a child process printed, shared with the thread that reads it.
#[derive(Default)]
struct Shared {
    state: Mutex<Output>,
    changed: Condvar,
}

#[derive(Default)]
struct Output {
    text: String,
    eof: bool,
}

/// Reads `from` into `shared` (and `log`) until it ends.
fn pump(
    mut from: impl Read + Send + 'static,
    shared: Arc<Shared>,
    log: Option<Arc<Mutex<std::fs::File>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let text = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
            if let Some(log) = &log {
                let _ = log.lock().expect("log").write_all(text.as_bytes());
            }
            shared.state.lock().expect("output").text.push_str(&text);
            shared.changed.notify_all();
        }
        shared.state.lock().expect("output").eof = true;
        shared.changed.notify_all();
    })
}

/// The last lines of `text`, for error messages.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Kills `child` with the thread that spawned it, so that a test killed by its runner leaves
/// no gdb or bridge behind.
fn die_with_parent(command: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec and calls only prctl, which
    // is async-signal-safe; it touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Which symbols gdb starts with.
#[derive(Clone, Debug)]
pub enum Symbols {
    /// None (raw addresses only).
    None,
    /// `gdb FILE`: the stub's `qOffsets` answer relocates them (KASLR).
    File(PathBuf),
    /// `symbol-file -o OFFSET FILE`: for a stub that does not know the KASLR offset (QEMU's).
    Offset(PathBuf, u64),
}

/// A gdb process driven through its standard input. Dropping it kills gdb.
pub struct Gdb {
    name: String,
    child: Child,
    stdin: ChildStdin,
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    log: Option<Arc<Mutex<std::fs::File>>>,
    log_path: Option<PathBuf>,
    /// Byte offset in the output up to which commands and waits have consumed.
    cursor: usize,
    seq: u64,
    started: Instant,
    /// Default time one command may take.
    pub timeout: Duration,
}

impl std::fmt::Debug for Gdb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gdb")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .finish()
    }
}

impl Gdb {
    /// Starts gdb with `symbols` and [`GDB_SETTINGS`], keeping a transcript at `log` (if
    /// given), and waits until it has read the symbols and is ready for commands.
    pub fn start(name: &str, symbols: &Symbols, log: Option<&Path>) -> Result<Gdb, GdbError> {
        let mut command = Command::new(GDB);
        command.args(["-nx", "-nh", "-q"]);
        for s in GDB_SETTINGS {
            command.arg("-iex").arg(s);
        }
        // gdb indexes the vmlinux's DWARF on every start (~25 s of CPU); its index cache, kept
        // with the build, makes every start after the first take about two seconds.
        let cache = crate::target_dir().join("gdb-index-cache");
        let _ = std::fs::create_dir_all(&cache);
        command
            .arg("-iex")
            .arg(format!("set index-cache directory {}", cache.display()))
            .arg("-iex")
            .arg("set index-cache enabled on");
        match symbols {
            Symbols::None => {}
            Symbols::File(path) => {
                command.arg(path);
            }
            Symbols::Offset(path, offset) => {
                command
                    .arg("-ex")
                    .arg(format!("symbol-file -o {offset:#x} {}", path.display()));
            }
        }
        // One pipe for stdout and stderr keeps gdb's errors in order with its output.
        let spawn_err = |source| GdbError::Spawn {
            what: GDB.into(),
            source,
        };
        let (reader, writer) = std::io::pipe().map_err(spawn_err)?;
        command
            .stdin(Stdio::piped())
            .stdout(writer.try_clone().map_err(spawn_err)?)
            .stderr(writer);
        die_with_parent(&mut command);
        let mut child = command.spawn().map_err(spawn_err)?;
        // Our copies of the pipe's write end went with `command`'s Stdio when it was spawned;
        // drop the command so that the reader sees EOF when gdb exits.
        drop(command);
        let stdin = child.stdin.take().expect("stdin is piped");
        let log_file = match log {
            Some(path) => {
                if let Some(dir) = path.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                std::fs::File::create(path)
                    .ok()
                    .map(|f| Arc::new(Mutex::new(f)))
            }
            None => None,
        };
        let shared = Arc::new(Shared::default());
        let reader = pump(reader, shared.clone(), log_file.clone());
        let mut gdb = Gdb {
            name: name.into(),
            child,
            stdin,
            shared,
            reader: Some(reader),
            log: log_file,
            log_path: log.map(Path::to_path_buf),
            cursor: 0,
            seq: 0,
            started: Instant::now(),
            timeout: Duration::from_secs(120),
        };
        // Reading a vmlinux with debug info takes seconds.
        gdb.run_timeout("echo", Duration::from_secs(300))?;
        Ok(gdb)
    }

    /// The transcript file, if kept.
    pub fn log_path(&self) -> Option<&Path> {
        self.log_path.as_deref()
    }

    /// Everything gdb printed so far.
    pub fn output(&self) -> String {
        self.shared.state.lock().expect("output").text.clone()
    }

    /// Types `line` into gdb without waiting for anything.
    pub fn send(&mut self, line: &str) -> Result<(), GdbError> {
        if let Some(log) = &self.log {
            let at = self.started.elapsed().as_secs_f64();
            let _ = writeln!(log.lock().expect("log"), "\n>>> [{at:8.3}] {line}");
        }
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| self.stdin.flush())
            .map_err(|source| GdbError::Io {
                name: self.name.clone(),
                source,
            })
    }

    /// Runs `command` and returns what gdb printed for it, within [`Gdb::timeout`].
    pub fn run(&mut self, command: &str) -> Result<String, GdbError> {
        self.run_timeout(command, self.timeout)
    }

    /// Runs `command` and returns what gdb printed until it finished (prompts removed).
    /// Asynchronous output that arrives meanwhile (a stop after `interrupt`) is included.
    pub fn run_timeout(&mut self, command: &str, timeout: Duration) -> Result<String, GdbError> {
        self.seq += 1;
        let marker = format!("QS-GDB-DONE-{}", self.seq);
        self.send(command)?;
        self.send(&format!("echo {marker}\\n"))?;
        let text = self.wait_for_any(&[&marker], timeout)?;
        let text = text
            .strip_suffix(&marker)
            .unwrap_or(&text)
            .replace("(gdb) ", "");
        Ok(text)
    }

    /// Waits until one of `needles` appears in gdb's output after what earlier calls consumed;
    /// returns the output up to and including it.
    pub fn wait_for_any(
        &mut self,
        needles: &[&str],
        timeout: Duration,
    ) -> Result<String, GdbError> {
        let started = Instant::now();
        let give_up = started + timeout;
        let mut out = self.shared.state.lock().expect("output");
        loop {
            let view = &out.text[self.cursor..];
            if let Some((at, needle)) = needles
                .iter()
                .filter_map(|n| view.find(n).map(|at| (at, n)))
                .min()
            {
                let end = at + needle.len();
                let found = view[..end].to_string();
                self.cursor += end;
                return Ok(found);
            }
            let now = Instant::now();
            if out.eof || now >= give_up {
                let t = tail(&out.text);
                return Err(if out.eof {
                    GdbError::Exited {
                        name: self.name.clone(),
                        waiting_for: needles.join(" | "),
                        tail: t,
                    }
                } else {
                    GdbError::Timeout {
                        name: self.name.clone(),
                        waiting_for: needles.join(" | "),
                        after: started.elapsed(),
                        tail: t,
                    }
                });
            }
            out = self
                .shared
                .changed
                .wait_timeout(out, give_up - now)
                .expect("output")
                .0;
        }
    }

    /// Says `quit` and waits (up to 30 s) for gdb to exit; returns everything it printed.
    pub fn quit(mut self) -> String {
        let _ = self.send("quit");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        self.output()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for Gdb {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where the vmlinux of Debian's `-dbg` package has `_text` (before KASLR).
pub const LINK_TEXT: u64 = 0xffff_ffff_8100_0000;

/// The marker before the running kernel's `_text` on a guest console: a guest script prints
/// it with `echo "KALLSYMS-TEXT $(grep -w _text /proc/kallsyms | cut -d' ' -f1)"`.
pub const TEXT_MARKER: &str = "KALLSYMS-TEXT ";

/// The KASLR offset from a console with a [`TEXT_MARKER`] line (QEMU's stub does not know
/// it; gdb is given it with `symbol-file -o`).
pub fn kaslr_offset(console: &str) -> Option<u64> {
    let line = console.lines().find(|l| l.contains(TEXT_MARKER))?;
    let text = line.split(TEXT_MARKER).nth(1)?;
    let text = u64::from_str_radix(text.trim(), 16).ok()?;
    Some(text.wrapping_sub(LINK_TEXT))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free TCP port on 127.0.0.1")
}

/// A running `qs-bridge`. Dropping it kills the bridge.
pub struct Bridge {
    child: Child,
    shared: Arc<Shared>,
    port: u16,
    key_file: PathBuf,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("pid", &self.child.id())
            .field("port", &self.port)
            .finish()
    }
}

impl Bridge {
    /// Runs `binary --link unix:SOCK --key FILE --gdb 127.0.0.1:PORT --console FILE` with `key`
    /// written to `<dir>/<name>-<pid>.key` (removed with the bridge), the machine's console to
    /// `<dir>/<name>.bridge-console` and the bridge's own messages also to
    /// `<dir>/<name>.bridge.log`, and waits (up to `timeout`) until it says it authenticated.
    pub fn start(
        binary: &Path,
        link: &Path,
        key: &[u8],
        dir: &Path,
        name: &str,
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
        let mut command = Command::new(binary);
        command
            .arg("--link")
            .arg(format!("unix:{}", link.display()))
            .arg("--key")
            .arg(&key_file)
            .arg("--gdb")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--console")
            .arg(dir.join(format!("{name}.bridge-console")))
            .arg("--timeout")
            .arg(timeout.as_secs().max(1).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        die_with_parent(&mut command);
        let mut child = command.spawn().map_err(spawn_err)?;
        let shared = Arc::new(Shared::default());
        let log = std::fs::File::create(dir.join(format!("{name}.bridge.log")))
            .ok()
            .map(|f| Arc::new(Mutex::new(f)));
        pump(
            child.stderr.take().expect("stderr is piped"),
            shared.clone(),
            log,
        );
        let bridge = Bridge {
            child,
            shared,
            port,
            key_file,
        };
        bridge.wait_for("authenticated", timeout + Duration::from_secs(10))?;
        Ok(bridge)
    }

    /// Where gdb connects: `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What the bridge printed on stderr so far.
    pub fn log(&self) -> String {
        self.shared.state.lock().expect("output").text.clone()
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
        let give_up = Instant::now() + timeout;
        let mut out = self.shared.state.lock().expect("output");
        loop {
            if out.text.matches(needle).count() >= count {
                return Ok(());
            }
            let now = Instant::now();
            if out.eof || now >= give_up {
                return Err(GdbError::Bridge {
                    why: if out.eof {
                        format!("it exited before saying {needle:?}")
                    } else {
                        format!("no {needle:?} after {timeout:?}")
                    },
                    stderr: out.text.clone(),
                });
            }
            out = self
                .shared
                .changed
                .wait_timeout(out, give_up - now)
                .expect("output")
                .0;
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.key_file);
    }
}

/// The value of register `name` in `info registers` output (`cs  0x10  16`).
pub fn register(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next()? != name {
            return None;
        }
        let value = words.next()?;
        u64::from_str_radix(value.strip_prefix("0x")?, 16).ok()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kaslr_offset_comes_from_the_text_marker_line() {
        let console = "boot\r\nKALLSYMS-TEXT ffffffff9bc00000\nGUEST-READY\n";
        assert_eq!(super::kaslr_offset(console), Some(0x1ac0_0000));
        assert_eq!(super::kaslr_offset("KALLSYMS-TEXT \n"), None);
        assert_eq!(super::kaslr_offset("no marker"), None);
    }

    use super::*;

    #[test]
    fn registers_are_read_from_info_registers() {
        let text = "cs             0x10                16\ncr3            0x20210000          [ PDBR=131600 PCID=0 ]\nefer           0xd01               [ NXE LMA LME SCE ]\nrip            0xffffffff9aa17a0b  0xffffffff9aa17a0b <native_safe_halt+11>\n";
        assert_eq!(register(text, "cs"), Some(0x10));
        assert_eq!(register(text, "efer"), Some(0xd01));
        assert_eq!(register(text, "rip"), Some(0xffff_ffff_9aa1_7a0b));
        assert_eq!(register(text, "cr4"), None);
    }
}
