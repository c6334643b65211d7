//! `qs-bridge --net` as a user runs it, against a fake machine built on `quicksilver-proto`'s
//! real endpoints (the serial `Endpoint` and the fast link's `NetEndpoint`, the code the hv
//! runs) behind two Unix sockets, as QEMU's chardev and its `-netdev stream,server=on` would
//! be. Like the hv, the fake machine answers on the link the bridge last spoke on; it
//! answers attention with `Stopped`, echoes gdb's bytes (`echo:` and the link they came on),
//! sends a 100 KiB answer for [`BIG`], and can stop reading its NIC (as a hung hv would).

mod common;
use common::*;

use quicksilver_proto::link::checkpoint as ck;
use quicksilver_proto::link::control::{End, Message};
use quicksilver_proto::link::endpoint::{Endpoint, Event};
use quicksilver_proto::link::net::{self, Host, NetCounters, NetEndpoint, Packet, MAX_FRAME};
use quicksilver_proto::link::{auth, Channel};
use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY: &[u8] = b"correct horse battery staple";
const MACHINE: Host = Host {
    mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
    ip: [10, 13, 0, 2],
    port: 50000,
};
/// gdb's packet body for which the machine answers [`BIG_LEN`] bytes.
const BIG: &str = "qQsBig";
const BIG_LEN: usize = 100 * 1024;

/// A whole gdb packet.
fn pkt(body: &str) -> Vec<u8> {
    let sum = body.bytes().fold(0u8, |s, b| s.wrapping_add(b));
    format!("${body}#{sum:02x}").into_bytes()
}

/// Where the machine's NIC's frames go.
enum NetOut {
    /// QEMU's stream: each frame after its length (big-endian).
    Stream(UnixStream),
    /// A UDP socket standing for the NIC and the network: the datagram in the frame goes to
    /// the address in it.
    Udp(UdpSocket),
}

/// The hv, as far as the links go.
struct Hv {
    serial: Endpoint,
    net: NetEndpoint,
    serial_w: Option<UnixStream>,
    net_w: Option<NetOut>,
    /// The link the bridge last spoke on: "serial" or "net".
    last: &'static str,
    /// gdb's bytes until a packet is whole (a long one spans datagrams).
    pending: Vec<u8>,
    /// Frames the machine sent on the net, and frames it received there.
    sent_net: Vec<Vec<u8>>,
    got_net: Vec<Vec<u8>>,
}

impl Hv {
    fn send(&mut self, channel: Channel, payload: &[u8]) {
        if self.last == "net" {
            let mut frames = Vec::new();
            self.net
                .send(channel, payload, &mut |f: &[u8]| frames.push(f.to_vec()));
            for f in frames {
                self.write_net(&f);
            }
        } else {
            let mut out = Vec::new();
            self.serial
                .send(channel, payload, &mut |w: &[u8]| out.extend_from_slice(w));
            if let Some(w) = self.serial_w.as_mut() {
                let _ = w.write_all(&out);
            }
        }
    }

    fn send_control(&mut self, m: Message) {
        let mut b = [0u8; 33];
        let n = m.encode(&mut b);
        self.send(Channel::Control, &b[..n]);
    }

    /// One frame out of the NIC.
    fn write_net(&mut self, frame: &[u8]) {
        self.sent_net.push(frame.to_vec());
        match self.net_w.as_mut() {
            Some(NetOut::Stream(w)) => {
                let _ = w.write_all(&[&(frame.len() as u32).to_be_bytes()[..], frame].concat());
            }
            Some(NetOut::Udp(u)) => {
                if let Ok(Packet::Udp(d)) = net::parse_frame(frame, None) {
                    let to = std::net::SocketAddr::from((d.dst.ip, d.dst.port));
                    let _ = u.send_to(d.payload, to);
                }
            }
            None => {}
        }
    }

    /// One frame into the NIC.
    fn nic_frame(&mut self, frame: &[u8], nonce: &mut dyn FnMut() -> [u8; 32], log: &Log) {
        self.got_net.push(frame.to_vec());
        let mut out = Vec::new();
        let ev = self
            .net
            .receive(frame, nonce, &mut |f: &[u8]| out.push(f.to_vec()))
            .map(Owned::from);
        for f in out {
            self.write_net(&f);
        }
        if let Some(ev) = ev {
            act(self, "net", ev, log);
        }
    }
}

/// What an endpoint reported, owned.
enum Owned {
    Attention,
    Gdb(Vec<u8>),
    Ping,
    Checkpoint(ck::Request),
    Other,
}

impl From<Event<'_>> for Owned {
    fn from(e: Event<'_>) -> Owned {
        match e {
            Event::Attention => Owned::Attention,
            Event::Gdb(b) => Owned::Gdb(b.to_vec()),
            Event::Control(Message::Ping { .. }) => Owned::Ping,
            Event::Checkpoint(r) => Owned::Checkpoint(r),
            _ => Owned::Other,
        }
    }
}

struct Machine {
    hv: Arc<Mutex<Hv>>,
    log: Log,
    /// The NIC is not read: what arrives on it is lost.
    deaf: Arc<AtomicBool>,
}

impl Machine {
    fn counters(&self) -> NetCounters {
        self.hv.lock().unwrap().net.counters()
    }
}

/// What the machine does for an event that came over `via`.
fn act(hv: &mut Hv, via: &'static str, ev: Owned, log: &Log) {
    // Like the hv: the answers go where the bridge last spoke.
    hv.last = via;
    match ev {
        Owned::Attention => {
            log.push(format!("attention({via})"));
            hv.send_control(Message::Stopped { cpus: 1 });
        }
        Owned::Gdb(bytes) => {
            hv.pending.extend_from_slice(&bytes);
            let n = hv.pending.len();
            if n < 3 || hv.pending[n - 3] != b'#' {
                return;
            }
            let p = std::mem::take(&mut hv.pending);
            log.push(format!("gdb({via}):{}", String::from_utf8_lossy(&p)));
            if p.windows(5).any(|w| w == b"$D#44") {
                hv.send(Channel::Gdb, b"+$OK#9a");
                hv.send_control(Message::Ended(End::Detached));
            } else if p.windows(BIG.len()).any(|w| w == BIG.as_bytes()) {
                let body = "x".repeat(BIG_LEN - 4);
                hv.send(Channel::Gdb, &pkt(&body));
            } else {
                hv.send(
                    Channel::Gdb,
                    &[format!("echo({via}):").as_bytes(), &p].concat(),
                );
            }
        }
        Owned::Ping => log.push(format!("ping({via})")),
        Owned::Checkpoint(r) => {
            log.push(format!("checkpoint({via}) {:?}", r.op));
            let mut b = [0u8; ck::MAX_LEN];
            let n = ck::Message::Done(ck::Done {
                tag: r.tag,
                id: 7,
                cpus: 1,
                ..ck::Done::default()
            })
            .encode(&mut b);
            hv.send(Channel::Control, &b[..n]);
        }
        Owned::Other => {}
    }
}

/// Starts the machine: its serial link on `dir/link`, its NIC's stream on `dir/net`, the NIC
/// serving `net_key`.
fn machine(dir: &Path, net_key: &'static [u8]) -> Machine {
    let nic = UnixListener::bind(dir.join("net")).unwrap();
    let m = machine_with(
        dir,
        NetEndpoint::new(net_key, MACHINE.mac, MACHINE.ip, MACHINE.port),
    );
    nic_thread(nic, m.hv.clone(), m.log.clone(), m.deaf.clone());
    m
}

/// Starts the machine with its NIC on a UDP socket of 127.0.0.1; returns it and the port.
fn machine_udp(dir: &Path) -> (Machine, u16) {
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = u.local_addr().unwrap().port();
    let m = machine_with(
        dir,
        NetEndpoint::new(KEY, MACHINE.mac, [127, 0, 0, 1], port),
    );
    m.hv.lock().unwrap().net_w = Some(NetOut::Udp(u.try_clone().unwrap()));
    let (hv, log) = (m.hv.clone(), m.log.clone());
    std::thread::spawn(move || {
        let mut nonce = nonce_source();
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = u.recv_from(&mut buf) {
            let std::net::SocketAddr::V4(from) = from else {
                continue;
            };
            // The frame the network would have brought.
            let src = Host {
                mac: [2, 0, 0, 0, 0, 9],
                ip: from.ip().octets(),
                port: from.port(),
            };
            let dst = Host {
                ip: [127, 0, 0, 1],
                port,
                ..MACHINE
            };
            let mut f = [0u8; MAX_FRAME];
            let len = net::build_udp(&mut f, src, dst, 1, &buf[..n]);
            hv.lock().unwrap().nic_frame(&f[..len], &mut nonce, &log);
        }
    });
    (m, port)
}

/// The machine's serial side on `dir/link`, and `net` for its NIC (not connected yet).
fn machine_with(dir: &Path, net: NetEndpoint) -> Machine {
    let serial = UnixListener::bind(dir.join("link")).unwrap();
    let log = Log::default();
    let deaf = Arc::new(AtomicBool::new(false));
    let hv = Arc::new(Mutex::new(Hv {
        serial: Endpoint::new(KEY),
        net,
        serial_w: None,
        net_w: None,
        last: "serial",
        pending: Vec::new(),
        sent_net: Vec::new(),
        got_net: Vec::new(),
    }));
    let (serial_hv, serial_log) = (hv.clone(), log.clone());
    std::thread::spawn(move || {
        let Ok((s, _)) = serial.accept() else { return };
        serial_hv.lock().unwrap().serial_w = Some(s.try_clone().unwrap());
        serial_loop(s, serial_hv, serial_log);
    });
    Machine { hv, log, deaf }
}

fn nonce_source() -> impl FnMut() -> [u8; auth::LEN] {
    let mut n = 0u8;
    move || {
        n = n.wrapping_add(1);
        [n; auth::LEN]
    }
}

fn serial_loop(mut r: UnixStream, hv: Arc<Mutex<Hv>>, log: Log) {
    let mut nonce = nonce_source();
    let mut buf = [0u8; 4096];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            let mut guard = hv.lock().unwrap();
            let hv = &mut *guard;
            let mut out = Vec::new();
            let ev = hv
                .serial
                .push(b, &mut nonce, &mut |w: &[u8]| out.extend_from_slice(w))
                .map(Owned::from);
            if let Some(w) = hv.serial_w.as_mut() {
                let _ = w.write_all(&out);
            }
            if let Some(ev) = ev {
                act(hv, "serial", ev, &log);
            }
        }
    }
}

/// QEMU's `-netdev stream` server: accepts the bridge, then hands each frame to the NIC's
/// endpoint (unless deaf).
fn nic_thread(nic: UnixListener, hv: Arc<Mutex<Hv>>, log: Log, deaf: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut nonce = nonce_source();
        for conn in nic.incoming() {
            let Ok(mut r) = conn else { return };
            hv.lock().unwrap().net_w = Some(NetOut::Stream(r.try_clone().unwrap()));
            log.push("nic connected".into());
            loop {
                let mut len = [0u8; 4];
                if r.read_exact(&mut len).is_err() {
                    break;
                }
                let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
                if r.read_exact(&mut frame).is_err() {
                    break;
                }
                if deaf.load(Ordering::SeqCst) {
                    continue;
                }
                hv.lock().unwrap().nic_frame(&frame, &mut nonce, &log);
            }
        }
    });
}

/// The bridge with `--net stream:dir/net` and a control socket.
fn net_bridge(dir: &Path, extra: &[&str]) -> Bridge {
    let net = format!("stream:{}", dir.join("net").display());
    let ctl = dir.join("ctl.sock");
    let mut args = vec!["--net", &net, "--control", ctl.to_str().unwrap()];
    args.extend_from_slice(extra);
    bridge(dir, KEY, &args)
}

/// gdb connected and served.
fn served_gdb(b: &Bridge) -> TcpStream {
    // The bridge listens for gdb once both handshakes are over.
    b.stderr.wait_for("authenticated; for gdb", LONG);
    let gdb = b.gdb();
    b.stderr.wait_for("gdb is served", LONG);
    gdb
}

/// Sends a packet and reads the machine's echo of it; returns the link it came back over.
fn echo(gdb: &mut TcpStream, body: &str) -> String {
    let p = pkt(body);
    gdb.write_all(&p).unwrap();
    let mut got = Vec::new();
    while !got.ends_with(&p) {
        let more = read_some(gdb, 1);
        assert!(
            !more.is_empty(),
            "no echo of {body}: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend(more);
    }
    let got = String::from_utf8_lossy(&got).into_owned();
    let (via, rest) = got.split_once(':').unwrap_or_else(|| panic!("{got:?}"));
    assert_eq!(rest.as_bytes(), &p[..], "{got:?}");
    via.trim_start_matches("echo(")
        .trim_end_matches(')')
        .to_string()
}

/// A machine, and a bridge whose gdb client is served over the fast link; `dir` holds
/// their sockets.
fn on_the_fast_link(name: &str) -> (PathBuf, Machine, Bridge, TcpStream) {
    let dir = tempdir(name);
    let m = machine(&dir, KEY);
    let b = net_bridge(&dir, &[]);
    b.stderr.wait_for("the fast link is up", LONG);
    let mut gdb = served_gdb(&b);
    assert_eq!(echo(&mut gdb, "g"), "net");
    (dir, m, b, gdb)
}

#[test]
fn over_a_stream_ethernet_the_bridge_arps_authenticates_and_carries_gdb_bytes_both_ways() {
    let dir = tempdir("net-ok");
    let m = machine(&dir, KEY);
    let b = net_bridge(&dir, &[]);
    b.stderr.wait_for("the fast link is up (stream:", LONG);
    b.stderr.wait_for("authenticated", LONG);
    assert!(m.counters().arp_answered >= 1, "{:?}", m.counters());

    let mut gdb = served_gdb(&b);
    assert_eq!(echo(&mut gdb, "qSupported"), "net");
    // A packet longer than a datagram, out; one of 100 KiB (70 datagrams), back.
    let long = format!("M1000,800:{}", "ab".repeat(2048));
    assert_eq!(echo(&mut gdb, &long), "net");
    gdb.write_all(&pkt(BIG)).unwrap();
    let got = read_some(&mut gdb, BIG_LEN);
    assert_eq!(got.len(), BIG_LEN);
    assert_eq!(got, pkt(&"x".repeat(BIG_LEN - 4)));
    let net_lines = m.log.lines();
    assert!(
        net_lines
            .iter()
            .any(|l| l.starts_with("gdb(net):") && l.contains(&long)),
        "{net_lines:?}"
    );

    // `monitor link` is the bridge's answer (once a ping came back).
    let mut c = control(&dir.join("ctl.sock"));
    let s = status_until(&mut c, |s| !s["fast_link"]["rtt_median_us"].is_null());
    gdb.write_all(&pkt("qRcmd,6c696e6b")).unwrap();
    let mut answer = Vec::new();
    while answer.len() < 3 || answer[answer.len() - 3] != b'#' {
        let b = read_some(&mut gdb, 1);
        assert!(!b.is_empty(), "gdb's connection ended in {answer:?}");
        answer.extend(b);
    }
    let start = answer.iter().position(|&b| b == b'$').unwrap() + 1;
    let hex = String::from_utf8(answer[start..answer.len() - 3].to_vec()).unwrap();
    let text: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains("the session is carried by the fast link"),
        "{text}"
    );
    assert!(text.contains("fast link stream:"), "{text}");
    assert!(
        text.contains("round trip") && text.contains(" us "),
        "{text}"
    );
    assert!(text.contains("serial link unix:"), "{text}");
    assert!(
        !m.log.lines().iter().any(|l| l.contains("qRcmd")),
        "monitor link went to the machine"
    );

    assert_eq!(s["fast_link"]["state"], "up", "{s}");
    assert!(
        s["fast_link"]["datagrams_in"].as_u64().unwrap() >= 70,
        "{s}"
    );
    assert_eq!(s["fast_link"]["dropped"]["bad_tag"], 0, "{s}");
    assert!(m.log.lines().iter().any(|l| l == "ping(net)"));
    drop(b);
}

#[test]
fn a_fast_link_that_refuses_the_key_leaves_the_session_on_the_serial_link() {
    let dir = tempdir("net-wrong-key");
    let m = machine(&dir, b"the NIC was given another key");
    let b = net_bridge(&dir, &["--timeout", "2"]);
    let line = b.stderr.wait_for("did not come up within", LONG);
    assert!(line.contains("fast_link.why"), "{line}");
    let mut c = control(&dir.join("ctl.sock"));
    let s = ask(&mut c, "status");
    assert_ne!(s["fast_link"]["state"], "up", "{s}");
    assert!(
        s["fast_link"]["why"]
            .as_str()
            .is_some_and(|w| w.contains("refused our key")),
        "{s}"
    );
    assert!(m.counters().wrong_key >= 1, "{:?}", m.counters());
    let mut gdb = served_gdb(&b);
    assert_eq!(echo(&mut gdb, "g"), "serial");
    assert!(m.log.lines().iter().all(|l| !l.contains("(net)")));
}

#[test]
fn garbage_replayed_and_spoofed_datagrams_are_counted_and_not_acted_on() {
    let (dir, m, _b, mut gdb) = on_the_fast_link("net-bad");

    let bridge_mac = qs_bridge::net::transport::BRIDGE_MAC;
    {
        let mut hv = m.hv.lock().unwrap();
        // The echo's frame again: a replay.
        let echo_frame = hv.sent_net.last().unwrap().clone();
        hv.write_net(&echo_frame);
        let Ok(Packet::Udp(u)) = net::parse_frame(&echo_frame, None) else {
            panic!()
        };
        // The same datagram from another port: spoofed.
        let mut f = [0u8; MAX_FRAME];
        let other = Host {
            port: MACHINE.port + 1,
            ..MACHINE
        };
        let n = net::build_udp(&mut f, other, u.dst, 9, u.payload);
        hv.write_net(&f[..n]);
        // The datagram with its last byte changed: a bad tag.
        let mut tampered = u.payload.to_vec();
        *tampered.last_mut().unwrap() ^= 1;
        let n = net::build_udp(&mut f, MACHINE, u.dst, 10, &tampered);
        hv.write_net(&f[..n]);
        // Garbage for the bridge's MAC: not even IPv4.
        let mut garbage = bridge_mac.to_vec();
        garbage.extend_from_slice(&MACHINE.mac);
        garbage.extend_from_slice(&[0x08, 0x00, 0x99, 0x99, 0x99]);
        hv.write_net(&garbage);
        // And toward the machine: the bridge's last datagram again.
        let from_bridge = hv.got_net.last().unwrap().clone();
        let mut nonce = nonce_source();
        let ev = hv
            .net
            .receive(&from_bridge, &mut nonce, &mut |_: &[u8]| {})
            .is_some();
        assert!(!ev, "the machine acted on a replay");
        assert!(hv.net.counters().replayed >= 1);
    }
    // Only the next echo reaches gdb: nothing of the bad frames did.
    assert_eq!(echo(&mut gdb, "m2000,4"), "net");
    let mut c = control(&dir.join("ctl.sock"));
    let s = status_until(&mut c, |s| {
        s["fast_link"]["dropped"]["malformed"].as_u64() >= Some(1)
    });
    let d = &s["fast_link"]["dropped"];
    assert_eq!(d["replayed"], 1, "{s}");
    assert_eq!(d["spoofed"], 1, "{s}");
    assert_eq!(d["bad_tag"], 1, "{s}");
    assert_eq!(d["malformed"], 1, "{s}");
    assert_eq!(s["fast_link"]["state"], "up", "{s}");
    let gdb_lines: Vec<_> = m
        .log
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("gdb("))
        .collect();
    assert_eq!(gdb_lines.len(), 2, "{gdb_lines:?}");
}

#[test]
fn when_the_fast_link_stops_answering_the_session_falls_back_to_serial_and_comes_back() {
    let (dir, m, b, mut gdb) = on_the_fast_link("net-fallback");

    // The machine stops reading its NIC; gdb's read goes out on the fast link and is lost.
    m.deaf.store(true, Ordering::SeqCst);
    let asked = Instant::now();
    let p = pkt("m1000,4");
    gdb.write_all(&p).unwrap();
    // The bridge notices, pings on the serial link, and asks the read again there.
    let got = read_some(&mut gdb, "echo(serial):".len() + p.len());
    let fell_after = asked.elapsed();
    assert_eq!(got, [b"echo(serial):".as_slice(), &p].concat());
    let line = b.stderr.wait_for("the fast link is down", LONG);
    assert!(line.contains("3 pings unanswered"), "{line}");
    assert!(m.log.lines().iter().any(|l| l == "ping(serial)"));
    assert!(
        fell_after < Duration::from_secs(3),
        "the fall back took {fell_after:?}"
    );
    let mut c = control(&dir.join("ctl.sock"));
    assert_eq!(ask(&mut c, "status")["fast_link"]["state"], "down");
    assert_eq!(echo(&mut gdb, "p10"), "serial");
    // The machine heard the read once: on the serial link (its NIC lost the first).
    assert_eq!(
        m.log
            .lines()
            .iter()
            .filter(|l| l.contains("m1000,4"))
            .count(),
        1,
        "{:?}",
        m.log.lines()
    );
    let asked_again = format!("gdb(serial):{}", String::from_utf8_lossy(&p));
    assert!(m.log.lines().contains(&asked_again), "{:?}", m.log.lines());

    // The NIC answers again: the bridge moves back.
    m.deaf.store(false, Ordering::SeqCst);
    b.stderr.wait_for("the fast link is up again", LONG);
    let deadline = Instant::now() + LONG;
    while echo(&mut gdb, "qC") != "net" {
        assert!(Instant::now() < deadline, "the session stayed on serial");
    }
    assert_eq!(ask(&mut c, "status")["fast_link"]["times_down"], 1);
}

#[test]
fn a_write_outstanding_when_the_fast_link_falls_is_not_sent_again() {
    let (_dir, m, b, mut gdb) = on_the_fast_link("net-fallback-write");
    m.deaf.store(true, Ordering::SeqCst);
    gdb.write_all(&pkt("M1000,1:00")).unwrap();
    b.stderr.wait_for("the fast link is down", LONG);
    assert_eq!(echo(&mut gdb, "g"), "serial");
    assert!(
        !m.log.lines().iter().any(|l| l.contains("M1000,1:00")),
        "the write was sent again: {:?}",
        m.log.lines()
    );
}

#[test]
fn net_addresses_that_are_neither_are_refused_with_what_to_give() {
    let dir = tempdir("net-bad-addr");
    let b = bridge(&dir, KEY, &["--net", "eth0"]);
    let (status, all) = b.finish();
    assert!(!status.success());
    assert!(
        all.contains("give stream:PATH") && all.contains("udp:HOST:PORT"),
        "{all}"
    );
}

#[test]
fn checkpoint_requests_and_their_answers_travel_on_the_fast_link() {
    let (dir, m, _b, _gdb) = on_the_fast_link("net-checkpoint");
    let mut c = control(&dir.join("ctl.sock"));
    let v = ask(&mut c, "checkpoint");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["id"], 7, "{v}");
    assert!(
        m.log.lines().iter().any(|l| l == "checkpoint(net) Take"),
        "{:?}",
        m.log.lines()
    );
}

#[test]
fn over_udp_the_os_carries_the_datagrams() {
    let dir = tempdir("net-udp");
    let (m, port) = machine_udp(&dir);
    let net = format!("udp:127.0.0.1:{port}");
    let ctl = dir.join("ctl.sock");
    let b = bridge(
        &dir,
        KEY,
        &["--net", &net, "--control", ctl.to_str().unwrap()],
    );
    b.stderr
        .wait_for("the fast link is up (udp:127.0.0.1:", LONG);
    let mut gdb = served_gdb(&b);
    assert_eq!(echo(&mut gdb, "qSupported"), "net");
    gdb.write_all(&pkt(BIG)).unwrap();
    assert_eq!(read_some(&mut gdb, BIG_LEN), pkt(&"x".repeat(BIG_LEN - 4)));
    let mut c = control(&ctl);
    let s = status_until(&mut c, |s| !s["fast_link"]["rtt_median_us"].is_null());
    assert_eq!(s["fast_link"]["dropped"]["bad_tag"], 0, "{s}");
    assert_eq!(m.counters().arp_answered, 0, "the OS does ARP over UDP");
}
