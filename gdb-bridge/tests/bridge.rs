//! `qs-bridge` as a user runs it, against the machine's end of the link (`Endpoint` from
//! `quicksilver-proto`, the code the agent and the hv run) behind a Unix socket, as QEMU's
//! chardev would be. The machine side also injects corrupt, replayed and garbage frames,
//! which must change nothing. (The real machine, with the gdbstub, comes next.)

use quicksilver_proto::link::endpoint::{Endpoint, Event};
use quicksilver_proto::link::{self, auth, Channel};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const KEY: &[u8] = b"correct horse battery staple";

fn frame(channel: Channel, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; link::MAX_WIRE];
    let n = link::encode(channel, seq, payload, &mut out).unwrap();
    out.truncate(n);
    out
}

/// The machine's end: the real `Endpoint` (the code the agent and hv run) with `machine_key`.
/// On attention it writes garbage, a corrupt frame and a replayed frame, then a console line;
/// gdb bytes come back as "echo:<bytes>".
fn machine(listener: UnixListener, machine_key: &'static [u8]) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut r = s.try_clone().unwrap();
        let mut e = Endpoint::new(machine_key);
        let mut buf = [0u8; 2048];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            for &b in &buf[..n] {
                let mut out = Vec::new();
                let mut nonce = || [0x5A; auth::LEN];
                let ev = e.push(b, &mut nonce, &mut |w: &[u8]| out.extend_from_slice(w));
                let reply: Option<(Channel, Vec<u8>)> = match ev {
                    Some(Event::Attention) => {
                        out.extend_from_slice(&[0x13, 0x37, 0x00]);
                        let mut bad = frame(Channel::Gdb, 1000, b"BAD-CRC");
                        bad[3] ^= 0x20;
                        out.extend(bad);
                        out.extend(frame(Channel::Gdb, 1, b"BAD-REPLAY"));
                        Some((Channel::Console, b"machine: attention received\n".to_vec()))
                    }
                    Some(Event::Gdb(p)) => Some((Channel::Gdb, [b"echo:", p].concat())),
                    None => None,
                };
                if let Some((channel, payload)) = reply {
                    e.send(channel, &payload, &mut |w: &[u8]| out.extend_from_slice(w));
                }
                let _ = s.write_all(&out);
            }
        }
    })
}

struct Bridge {
    child: Child,
    stderr: BufReader<std::process::ChildStderr>,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bridge(dir: &std::path::Path, key: &[u8], gdb_port: u16) -> Bridge {
    let key_file = dir.join("key");
    std::fs::write(&key_file, key).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_qs-bridge"))
        .args(["--link", &format!("unix:{}", dir.join("link").display())])
        .args(["--key", key_file.to_str().unwrap()])
        .args(["--gdb", &format!("127.0.0.1:{gdb_port}")])
        .args([
            "--console",
            dir.join("console.log").to_str().unwrap(),
            "--timeout",
            "5",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    Bridge { child, stderr }
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("qs-bridge-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn authenticates_then_carries_gdb_bytes_and_ignores_bad_frames() {
    let dir = tempdir("ok");
    let m = machine(UnixListener::bind(dir.join("link")).unwrap(), KEY);
    let port = free_port();
    let mut b = bridge(&dir, KEY, port);
    let mut line = String::new();
    b.stderr.read_line(&mut line).unwrap();
    assert!(line.contains("authenticated"), "{line}");
    assert!(
        line.contains(&format!("target remote 127.0.0.1:{port}")),
        "{line}"
    );

    let mut gdb = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    gdb.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    gdb.write_all(b"$qSupported#37").unwrap();
    let mut got = vec![0u8; 64];
    let n = gdb.read(&mut got).unwrap();
    assert_eq!(
        &got[..n],
        b"echo:$qSupported#37",
        "only the sound frame reaches gdb"
    );

    // A second client is turned away while the first is attached.
    let mut second = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut msg = String::new();
    let _ = second.read_to_string(&mut msg);
    assert!(msg.contains("another gdb is attached"), "{msg:?}");

    let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    assert!(
        console.contains("machine: attention received"),
        "{console:?}"
    );
    drop(gdb);
    drop(b);
    let _ = m.join();
}

#[test]
fn a_wrong_key_is_refused_with_the_fix() {
    let dir = tempdir("wrong");
    let _m = machine(UnixListener::bind(dir.join("link")).unwrap(), KEY);
    let mut b = bridge(&dir, b"not the key", free_port());
    let mut all = String::new();
    b.stderr.read_to_string(&mut all).unwrap();
    assert!(!b.child.wait().unwrap().success());
    assert!(all.contains("the machine refused our key"), "{all}");
    assert!(all.contains("--key FILE"), "{all}");
}

#[test]
fn a_machine_without_a_key_serves_nobody() {
    let dir = tempdir("nokey");
    let _m = machine(UnixListener::bind(dir.join("link")).unwrap(), b"");
    let mut b = bridge(&dir, KEY, free_port());
    let mut all = String::new();
    b.stderr.read_to_string(&mut all).unwrap();
    assert!(!b.child.wait().unwrap().success());
    assert!(all.contains("no link key configured"), "{all}");
}

#[test]
fn an_unreachable_link_says_so() {
    let dir = tempdir("unreachable");
    let mut b = bridge(&dir, KEY, free_port());
    let mut all = String::new();
    b.stderr.read_to_string(&mut all).unwrap();
    assert!(!b.child.wait().unwrap().success());
    assert!(all.contains("link not reachable"), "{all}");
}
