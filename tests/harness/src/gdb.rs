//! Driving real GNU gdb from the tests and the benchmarks, and reading what it prints.
//!
//! [`Gdb`] runs gdb with its commands on a pipe, as a user's terminal would give them, and
//! waits for each command's output: after every command it sends `echo <marker>` and reads up
//! to the marker. Unlike `gdb -batch -x FILE`, this lets gdb's event loop run between commands,
//! so that `continue &` followed later by `interrupt` works (in a batch script gdb never sees
//! the stop that `interrupt` causes). Everything gdb printed, with the commands sent, goes to a
//! transcript file next to the console logs.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::child::{Ended, Process, Stream, Watch};

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
#[derive(Debug)]
pub struct Gdb {
    name: String,
    process: Process,
    log: Option<Arc<Mutex<std::fs::File>>>,
    log_path: Option<PathBuf>,
    seq: u64,
    /// Default time one command may take.
    pub timeout: Duration,
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
        let cache = crate::paths::target_dir().join("gdb-index-cache");
        let _ = std::fs::create_dir_all(&cache);
        command
            .arg("-iex")
            .arg(format!("set index-cache directory {}", cache.display()))
            .arg("-iex")
            .arg("set index-cache enabled on");
        // QS_GDB_REMOTE_LOG=1: every byte of the remote protocol, both ways, beside the
        // transcript (what a protocol error is made of). Not by default: gdb formats each
        // byte, which slows a megabyte's read four times over (the benches use this too).
        if let Some(path) = log.filter(|_| std::env::var_os("QS_GDB_REMOTE_LOG").is_some()) {
            command.arg("-iex").arg(format!(
                "set remotelogfile {}",
                path.with_extension("remote").display()
            ));
        }
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
        let log_file = log.and_then(|path| {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            std::fs::File::create(path)
                .ok()
                .map(|f| Arc::new(Mutex::new(f)))
        });
        let mut watch = Watch::new(Stream::Both).stdin();
        if let Some(log) = log_file.clone() {
            watch = watch.on_line(move |_, line| {
                let _ = writeln!(log.lock().expect("transcript"), "{line}");
            });
        }
        // One pipe for stdout and stderr keeps gdb's errors in order with its output.
        let process = watch
            .spawn(name, command)
            .map_err(|source| GdbError::Spawn {
                what: GDB.into(),
                source,
            })?;
        let mut gdb = Gdb {
            name: name.into(),
            process,
            log: log_file,
            log_path: log.map(Path::to_path_buf),
            seq: 0,
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
        self.process.text()
    }

    /// Types `line` into gdb without waiting for anything.
    pub fn send(&mut self, line: &str) -> Result<(), GdbError> {
        if let Some(log) = &self.log {
            let at = self.process.elapsed().as_secs_f64();
            let _ = writeln!(log.lock().expect("transcript"), ">>> [{at:8.3}] {line}");
        }
        self.process
            .send(format!("{line}\n").as_bytes())
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
        match self.process.wait_for(needles, started + timeout) {
            Ok(found) => Ok(found.text),
            Err(Ended::Exited { tail }) => Err(GdbError::Exited {
                name: self.name.clone(),
                waiting_for: needles.join(" | "),
                tail,
            }),
            Err(Ended::TimedOut { tail }) => Err(GdbError::Timeout {
                name: self.name.clone(),
                waiting_for: needles.join(" | "),
                after: started.elapsed(),
                tail,
            }),
        }
    }

    /// Says `quit` and waits (up to 30 s) for gdb to exit; returns everything it printed.
    pub fn quit(mut self) -> String {
        let _ = self.send("quit");
        let _ = self
            .process
            .wait_exit(Instant::now() + Duration::from_secs(30));
        self.process.kill();
        self.output()
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
