//! What the bridge's integration tests share: a log that grows while a test watches, the
//! `qs-bridge` binary run as a user runs it, gdb's and the control socket's ends.
#![allow(dead_code)] // each test crate uses its own part

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Lines that grow while a test watches, and waiting for one.
#[derive(Clone, Default)]
pub struct Log(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Log {
    pub fn push(&self, line: String) {
        self.0 .0.lock().unwrap().push(line);
        self.0 .1.notify_all();
    }

    pub fn lines(&self) -> Vec<String> {
        self.0 .0.lock().unwrap().clone()
    }

    /// Waits until a line contains `needle`; panics with the whole log after `timeout`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut lines = self.0 .0.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {needle:?} after {timeout:?}; got:\n{}",
                lines.join("\n")
            );
            lines = self.0 .1.wait_timeout(lines, left).unwrap().0;
        }
    }
}

/// The `qs-bridge` binary; its stderr is collected line by line. Killed when dropped.
pub struct Bridge {
    pub child: Child,
    pub stderr: Log,
    reader: Option<std::thread::JoinHandle<()>>,
    pub port: u16,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Bridge {
    /// Waits for the bridge to exit; returns its status and everything it said.
    pub fn finish(mut self) -> (ExitStatus, String) {
        let status = self.child.wait().unwrap();
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        (status, self.stderr.lines().join("\n"))
    }

    pub fn gdb(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }
}

pub fn bridge(dir: &Path, key: &[u8], extra: &[&str]) -> Bridge {
    let key_file = dir.join("key");
    std::fs::write(&key_file, key).unwrap();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_qs-bridge"))
        .args(["--link", &format!("unix:{}", dir.join("link").display())])
        .args(["--key", key_file.to_str().unwrap()])
        .args(["--gdb", &format!("127.0.0.1:{port}")])
        .args(["--console", dir.join("console.log").to_str().unwrap()])
        .args(if extra.contains(&"--timeout") {
            &[][..]
        } else {
            &["--timeout", "5"][..]
        })
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = Log::default();
    let lines = stderr.clone();
    let pipe = BufReader::new(child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        for line in pipe.lines() {
            let Ok(line) = line else { return };
            lines.push(line);
        }
    });
    Bridge {
        child,
        stderr,
        reader: Some(reader),
        port,
    }
}

pub fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qs-bridge-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub const LONG: Duration = Duration::from_secs(15);

/// Reads what comes until `want` bytes have, or the peer closes or times out.
pub fn read_some(s: &mut TcpStream, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.len() < want {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

/// One request on the control socket, its JSON reply.
pub fn ask(c: &mut BufReader<UnixStream>, command: &str) -> serde_json::Value {
    writeln!(c.get_mut(), "{command}").unwrap();
    let mut line = String::new();
    c.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
}

pub fn control(path: &Path) -> BufReader<UnixStream> {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    BufReader::new(s)
}

/// Asks `status` until `done` holds; returns that status.
pub fn status_until(
    c: &mut BufReader<UnixStream>,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + LONG;
    loop {
        let s = ask(c, "status");
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "status stayed {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
