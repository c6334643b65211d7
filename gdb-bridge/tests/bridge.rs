//! `qs-bridge` as a user runs it, against a stand-in for the machine's end of the link that
//! speaks the protocol from `quicksilver-proto` (the hv's end comes with the gdbstub). The
//! stand-in also injects corrupt, replayed and garbage frames, which must change nothing.

use quicksilver_proto::link::{
    self, auth, control::Message, control::Refusal, control::Role, Channel, Decoder,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const KEY: &[u8] = b"correct horse battery staple";

fn frame(channel: Channel, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; link::MAX_WIRE];
    let n = link::encode(channel, seq, payload, &mut out).unwrap();
    out.truncate(n);
    out
}

fn control(seq: u32, m: Message) -> Vec<u8> {
    let mut b = [0u8; 33];
    let n = m.encode(&mut b);
    frame(Channel::Control, seq, &b[..n])
}

/// The machine's end: answers the handshake with `machine_key`, then echoes gdb bytes back
/// as "echo:<bytes>", announces attention on the console, and sprinkles bad frames.
fn machine(
    listener: UnixListener,
    machine_key: Option<&'static [u8]>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut r = s.try_clone().unwrap();
        let mut dec = Decoder::default();
        let mut seq = 1;
        let send = |s: &mut UnixStream, bytes: Vec<u8>| {
            let _ = s.write_all(&bytes);
        };
        let nonce = [0x5Au8; auth::LEN];
        let mut buf = [0u8; 2048];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            for &b in &buf[..n] {
                let Some(Ok(f)) = dec.push(b) else { continue };
                let (channel, payload) = (f.channel, f.payload.to_vec());
                let mut out = Vec::new();
                match (channel, Message::decode(&payload)) {
                    (
                        Channel::Control,
                        Ok(Message::Hello {
                            role: Role::Bridge, ..
                        }),
                    ) => {
                        out.extend(control(
                            seq,
                            Message::Hello {
                                version: link::LINK_VERSION,
                                role: Role::Machine,
                            },
                        ));
                        out.extend(control(seq + 1, Message::Challenge { nonce }));
                        seq += 2;
                    }
                    (Channel::Control, Ok(Message::Response { mac })) => {
                        let m = match machine_key {
                            None => Message::Refused(Refusal::NoKey),
                            Some(k) if auth::verify(k, &nonce, &mac) => Message::AuthOk,
                            Some(_) => Message::Refused(Refusal::WrongKey),
                        };
                        out.extend(control(seq, m));
                        seq += 1;
                    }
                    (Channel::Control, Ok(Message::Attention)) => {
                        // Noise first: garbage, a corrupt frame, a frame replaying an old seq.
                        out.extend_from_slice(&[0x13, 0x37, 0x00]);
                        let mut bad = frame(Channel::Gdb, seq, b"BAD-CRC");
                        bad[3] ^= 0x20;
                        out.extend(bad);
                        out.extend(frame(Channel::Gdb, 1, b"BAD-REPLAY"));
                        out.extend(frame(
                            Channel::Console,
                            seq,
                            b"machine: attention received\n",
                        ));
                        seq += 1;
                    }
                    (Channel::Gdb, _) => {
                        out.extend(frame(Channel::Gdb, seq, &[b"echo:", &payload[..]].concat()));
                        seq += 1;
                    }
                    _ => {}
                }
                send(&mut s, out);
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
    let m = machine(UnixListener::bind(dir.join("link")).unwrap(), Some(KEY));
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
    let _m = machine(UnixListener::bind(dir.join("link")).unwrap(), Some(KEY));
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
    let _m = machine(UnixListener::bind(dir.join("link")).unwrap(), None);
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
