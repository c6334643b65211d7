//! Hostile datagrams against the real hv's fast link (issue 13). The test itself is the peer
//! on the NIC's stream socket, built on `proto`'s `BridgeSession` and frame helpers (no
//! bridge on either link): a bridge with the wrong key is refused, then a bridge with the
//! right one gets a session, and every datagram below it is dropped, never acted on, and
//! counted by its reason in the hv's statistics (`qsctl stats`' fast link line): replayed,
//! spoofed (another MAC, IP address or port), bad tag, another session's id, garbage,
//! oversized, an IPv4 fragment, UDP that is not the link's, truncated, untagged. Acted on
//! would show: a replayed or spoofed `Ping` answered with a `Pong`, a replayed or spoofed
//! checkpoint request taking a checkpoint, a replayed or spoofed attention stopping the
//! machine (its script would stall). After each hostile datagram a sound `Ping` must be
//! answered, and nothing else: the hv took the datagram in order and the session survived.
//! At the end a sound checkpoint request takes checkpoint 1, the only one.

use qs_testkit::qemu::FastLinkNic;
use quicksilver_proto::link::checkpoint::{self, Op, Request};
use quicksilver_proto::link::control::{Message, Refusal};
use quicksilver_proto::link::net::{
    build_udp, ip_checksum, parse_frame, BridgeEvent, BridgeSession, Host, Packet, ETH_HEADER,
    MAX_DATAGRAM, MAX_FRAME, UDP_PAYLOAD,
};
use quicksilver_proto::link::Channel;
use quicksilver_tests::fast_link::{self, HV_IP, HV_PORT};
use quicksilver_tests::*;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The test, as a bridge would be on that Ethernet.
const US: Host = Host {
    mac: [0x02, 0x51, 0x53, 0x00, 0x00, 0x01],
    ip: [10, 13, 0, 1],
    port: 40001,
};

/// The guest: the agent loaded with the link and the fast link (by /init); after the host's
/// first word what the hv counted and kept, after its second the checkpoints again.
const SCRIPT: &str = r#"
qsctl status | grep "fast link"
echo PEER-MAY-START
read -r host_line; echo "host: $host_line"
echo CHECKPOINTS-AFTER-HOSTILE
qsctl checkpoints
echo STATS-AFTER-HOSTILE
qsctl stats | grep "^fast link:"
echo ROUND-ONE-DONE
read -r host_line; echo "host: $host_line"
echo CHECKPOINTS-AT-THE-END
qsctl checkpoints
qsctl stats | grep "^fast link:"
qsctl checkpoint --delete all
"#;

/// The peer's end of QEMU's stream socket: Ethernet frames, each after its 4-byte big-endian
/// length.
struct Peer {
    s: UnixStream,
    hv: Host,
    ip_id: u16,
    /// Datagrams for us, as they came.
    log: Vec<String>,
}

impl Peer {
    fn connect(path: &std::path::Path) -> Peer {
        let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {path:?}: {e}"));
        Peer {
            s,
            hv: Host {
                mac: [0; 6],
                ip: HV_IP,
                port: HV_PORT,
            },
            ip_id: 0,
            log: Vec::new(),
        }
    }

    fn send_frame(&mut self, f: &[u8]) {
        fast_link::send_frame(&mut self.s, f).expect("writing to QEMU's stream socket");
    }

    fn recv_frame(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        fast_link::recv_frame(&mut self.s, timeout)
            .unwrap_or_else(|e| panic!("reading QEMU's stream socket: {e}"))
    }

    /// The hv's MAC, from its answer to ARP.
    fn resolve(&mut self) {
        self.send_frame(&fast_link::arp_request(US.mac, US.ip));
        let give_up = Instant::now() + Duration::from_secs(10);
        while Instant::now() < give_up {
            let Some(f) = self.recv_frame(Duration::from_secs(1)) else {
                continue;
            };
            if let Ok(Packet::Arp(a)) = parse_frame(&f, Some(US.mac)) {
                if a.op == 2 && a.sender_ip == HV_IP {
                    self.hv.mac = a.sender_mac;
                    return;
                }
            }
        }
        panic!("no ARP reply from the hv's {HV_IP:?}");
    }

    /// A whole frame carrying `payload` from `from` to the hv.
    fn frame(&mut self, from: Host, payload: &[u8]) -> Vec<u8> {
        self.ip_id = self.ip_id.wrapping_add(1);
        let mut f = [0u8; MAX_FRAME];
        let n = build_udp(&mut f, from, self.hv, self.ip_id, payload);
        f[..n].to_vec()
    }

    fn send_datagram(&mut self, from: Host, payload: &[u8]) {
        let f = self.frame(from, payload);
        self.send_frame(&f);
    }

    /// The next datagram for us within `timeout`.
    fn recv_datagram(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let give_up = Instant::now() + timeout;
        loop {
            let left = give_up.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let f = self.recv_frame(left)?;
            if let Ok(Packet::Udp(u)) = parse_frame(&f, Some(US.mac)) {
                if u.dst == US && u.src == self.hv {
                    return Some(u.payload.to_vec());
                }
                self.log.push(format!("a datagram not for us: {u:?}"));
            }
        }
    }

    /// Says hello with `session`'s key and answers the challenge: the refusal, if any.
    fn handshake(&mut self, session: &mut BridgeSession) -> Result<(), Refusal> {
        let mut out = [0u8; MAX_DATAGRAM];
        let n = session.hello(&mut out);
        self.send_datagram(US, &out[..n]);
        let give_up = Instant::now() + Duration::from_secs(20);
        while Instant::now() < give_up {
            let Some(d) = self.recv_datagram(Duration::from_secs(1)) else {
                continue;
            };
            let mut reply = [0u8; MAX_DATAGRAM];
            match session.receive(&d, &mut reply) {
                Ok(BridgeEvent::Respond(n)) => self.send_datagram(US, &reply[..n]),
                Ok(BridgeEvent::Authenticated) => return Ok(()),
                Ok(BridgeEvent::Refused(r)) => return Err(r),
                Ok(BridgeEvent::Hello { .. }) => {}
                other => panic!("in the handshake: {other:?}"),
            }
        }
        panic!("the hv did not finish the handshake within 20 s");
    }
}

/// A datagram of `session` carrying a control message (not sent).
fn wrap_control(session: &mut BridgeSession, m: Message) -> Vec<u8> {
    let mut b = [0u8; 33];
    let n = m.encode(&mut b);
    wrap(session, &b[..n])
}

/// A datagram of `session` carrying a checkpoint request (not sent).
fn wrap_request(session: &mut BridgeSession, tag: u32, op: Op) -> Vec<u8> {
    let mut b = [0u8; checkpoint::MAX_LEN];
    let n = checkpoint::Message::Request(Request { tag, op }).encode(&mut b);
    wrap(session, &b[..n])
}

fn wrap(session: &mut BridgeSession, payload: &[u8]) -> Vec<u8> {
    let mut out = [0u8; MAX_DATAGRAM];
    let n = session
        .wrap(Channel::Control, payload, &mut out)
        .expect("the session runs");
    out[..n].to_vec()
}

/// What the machine said on the session's control channel, as text.
fn describe(session: &mut BridgeSession, d: &[u8]) -> String {
    let mut scratch = [0u8; MAX_DATAGRAM];
    match session.receive(d, &mut scratch) {
        Ok(BridgeEvent::Data {
            channel: Channel::Control,
            payload,
        }) => match Message::decode(payload) {
            Ok(m) => format!("{m:?}"),
            Err(_) => format!("{:?}", checkpoint::Message::decode(payload)),
        },
        other => format!("{other:?}"),
    }
}

/// The sound ping `n`: the hv must answer it with `Pong { n }` and nothing else first (a
/// `Pong` for a hostile datagram's ping, or a checkpoint's `Done`, would come before it).
fn probe(peer: &mut Peer, session: &mut BridgeSession, n: u32, after: &str) {
    let d = wrap_control(session, Message::Ping { n });
    peer.send_datagram(US, &d);
    await_pong(peer, session, n, after);
}

/// Waits for `Pong { n }`; anything else first fails the test.
fn await_pong(peer: &mut Peer, session: &mut BridgeSession, n: u32, after: &str) {
    if let Some(what) = answers_before_pong(peer, session, n, after).first() {
        panic!("after {after}, the hv answered {what} before the Pong to ping {n}");
    }
}

/// What the hv sent before `Pong { n }`.
fn answers_before_pong(
    peer: &mut Peer,
    session: &mut BridgeSession,
    n: u32,
    after: &str,
) -> Vec<String> {
    let mut before = Vec::new();
    let give_up = Instant::now() + Duration::from_secs(10);
    while Instant::now() < give_up {
        let Some(d) = peer.recv_datagram(Duration::from_secs(1)) else {
            continue;
        };
        let what = describe(session, &d);
        if what == format!("{:?}", Message::Pong { n }) {
            return before;
        }
        before.push(what);
    }
    panic!("after {after}, the hv did not answer ping {n} (the session died?)");
}

/// A frame from `from` to the hv's MAC whose bytes after Ethernet are `body`.
fn raw_frame(hv_mac: [u8; 6], from: [u8; 6], ethertype: u16, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HEADER + body.len());
    f.extend_from_slice(&hv_mac);
    f.extend_from_slice(&from);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// The number before `what` on the `fast link:` line (`... 3 replayed, ...`).
fn counter(line: &str, what: &str) -> u64 {
    line.split([';', ',', ':'])
        .map(str::trim)
        .find_map(|part| {
            let (n, rest) = part.split_once(' ')?;
            (rest == what).then(|| n.parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("no {what:?} count on {line:?}"))
}

/// The lines after the one with `marker`.
fn console_after<'a>(o: &'a str, marker: &'a str) -> impl Iterator<Item = &'a str> {
    o.lines().skip_while(move |l| !l.contains(marker)).skip(1)
}

/// The `fast link:` line that follows `marker` in the script's output.
fn fast_link_line<'a>(o: &'a str, marker: &str) -> &'a str {
    o.lines()
        .skip_while(|l| !l.contains(marker))
        .find(|l| l.starts_with("fast link:"))
        .unwrap_or_else(|| panic!("no `fast link:` line after {marker}:\n{o}"))
}

#[test]
fn hostile_datagrams_are_dropped_counted_by_reason_and_never_acted_on() {
    let a = artifacts();
    let name = "net-hostile";
    let (link, net) = fast_link::sockets(&a, name);
    // virtio-net: QEMU's 82574L drops a frame longer than 1522 bytes itself (no long packet
    // enable), so only a virtio-net hands the hv an oversized one to refuse.
    let qemu = guest_on(&a, name, 2)
        .link(&link, GDB_KEY)
        .fast_link(&net, FastLinkNic::VirtioNet);
    let mut running = qemu.spawn_script(SCRIPT).unwrap_or_else(|e| panic!("{e}"));
    running
        .wait_for("PEER-MAY-START", Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}"));

    let mut peer = Peer::connect(&net);
    peer.resolve();

    // Another key: refused, counted as a wrong key; nothing is served.
    let mut wrong = BridgeSession::new(b"not-the-machines-key");
    assert_eq!(peer.handshake(&mut wrong), Err(Refusal::WrongKey));
    // The right one: a session.
    let mut s = BridgeSession::new(GDB_KEY.as_bytes());
    peer.handshake(&mut s).expect("the right key is accepted");
    probe(&mut peer, &mut s, 1, "the handshake");

    // Replayed: the sound ping 2 again, and a checkpoint request and an attention written
    // before ping 3 but sent after it (their sequence numbers are behind the guard).
    let ping2 = wrap_control(&mut s, Message::Ping { n: 2 });
    peer.send_datagram(US, &ping2);
    await_pong(&mut peer, &mut s, 2, "ping 2");
    let stale_take = wrap_request(&mut s, 7, Op::Take);
    let stale_attention = wrap_control(&mut s, Message::Attention);
    probe(&mut peer, &mut s, 3, "writing two datagrams");
    peer.send_datagram(US, &ping2);
    probe(&mut peer, &mut s, 4, "a replayed ping");
    peer.send_datagram(US, &stale_take);
    probe(&mut peer, &mut s, 5, "a replayed checkpoint request");
    peer.send_datagram(US, &stale_attention);
    probe(&mut peer, &mut s, 6, "a replayed attention");

    // Spoofed: sound datagrams of the session, fresh sequence numbers, from another MAC, IP
    // address or port than the bridge's.
    let other_mac = Host {
        mac: [0x02, 0x66, 0x66, 0x66, 0x66, 0x66],
        ..US
    };
    let other_ip = Host {
        ip: [10, 13, 0, 66],
        ..US
    };
    let other_port = Host { port: 6666, ..US };
    let d = wrap_control(&mut s, Message::Ping { n: 66 });
    peer.send_datagram(other_mac, &d);
    probe(&mut peer, &mut s, 7, "a ping from another MAC");
    let d = wrap_request(&mut s, 8, Op::Take);
    peer.send_datagram(other_ip, &d);
    probe(
        &mut peer,
        &mut s,
        8,
        "a checkpoint request from another IP address",
    );
    let d = wrap_control(&mut s, Message::Attention);
    peer.send_datagram(other_port, &d);
    probe(&mut peer, &mut s, 9, "an attention from another port");

    // A bad tag (the tag's last byte flipped), another session's id.
    let mut d = wrap_request(&mut s, 9, Op::Take);
    *d.last_mut().unwrap() ^= 1;
    peer.send_datagram(US, &d);
    probe(&mut peer, &mut s, 10, "a checkpoint request with a bad tag");
    let mut d = wrap_control(&mut s, Message::Ping { n: 67 });
    d[8] ^= 0x80;
    peer.send_datagram(US, &d);
    probe(&mut peer, &mut s, 11, "a ping of another session");

    // Garbage: not IPv4 or ARP; not an IPv4 header.
    let hv_mac = peer.hv.mac;
    let f = raw_frame(hv_mac, US.mac, 0x88b5, &[0xa5; 100]);
    peer.send_frame(&f);
    probe(&mut peer, &mut s, 12, "a frame of another EtherType");
    let f = raw_frame(hv_mac, US.mac, 0x0800, &[0x5a; 100]);
    peer.send_frame(&f);
    probe(&mut peer, &mut s, 13, "garbage behind an IPv4 EtherType");

    // Oversized: a sound ping of the session in a frame padded past Ethernet's 1514 bytes.
    let d = wrap_control(&mut s, Message::Ping { n: 68 });
    let mut f = peer.frame(US, &d);
    f.resize(1600, 0);
    peer.send_frame(&f);
    // Checked at the end, with the counters: the rest is worth knowing when this fails.
    let d = wrap_control(&mut s, Message::Ping { n: 14 });
    peer.send_datagram(US, &d);
    let oversized_answers = answers_before_pong(&mut peer, &mut s, 14, "an oversized frame");

    // An IPv4 fragment (more fragments set) of a sound ping.
    let d = wrap_control(&mut s, Message::Ping { n: 69 });
    let mut f = peer.frame(US, &d);
    let ip = &mut f[ETH_HEADER..ETH_HEADER + 20];
    ip[6] |= 0x20;
    ip[10..12].copy_from_slice(&[0, 0]);
    let sum = ip_checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    peer.send_frame(&f);
    probe(&mut peer, &mut s, 15, "a ping in an IPv4 fragment");

    // UDP that is not the link's: to its port, and to another port.
    peer.send_datagram(US, b"GET / HTTP/1.0\r\n\r\n");
    probe(&mut peer, &mut s, 16, "UDP that is not the link's");
    let mut f = peer.frame(US, b"not for the link either");
    f[UDP_PAYLOAD - 6..UDP_PAYLOAD - 4].copy_from_slice(&50001u16.to_be_bytes());
    peer.send_frame(&f);
    probe(&mut peer, &mut s, 17, "UDP to another port");

    // Truncated: a sound ping's frame cut short of its IPv4 length; a datagram cut inside
    // its header.
    let d = wrap_control(&mut s, Message::Ping { n: 70 });
    let mut f = peer.frame(US, &d);
    f.truncate(f.len() - 20);
    peer.send_frame(&f);
    probe(&mut peer, &mut s, 18, "a truncated frame");
    let d = wrap_control(&mut s, Message::Ping { n: 71 });
    peer.send_datagram(US, &d[..12]);
    probe(&mut peer, &mut s, 19, "a truncated datagram");

    // Untagged: a ping outside the handshake, without the session's tag.
    let mut b = [0u8; 33];
    let n = Message::Ping { n: 72 }.encode(&mut b);
    let mut d = [0u8; MAX_DATAGRAM];
    let len = BridgeSession::new(b"").hello(&mut d);
    // The hello's header (untagged, session 0) with a ping in place of the hello.
    let mut untagged = d[..24].to_vec();
    assert!(len > 24);
    untagged.extend_from_slice(&b[..n]);
    peer.send_datagram(US, &untagged);
    probe(&mut peer, &mut s, 20, "an untagged ping");

    // Nothing was acted on: the machine ran on (its script answers), no checkpoint was taken.
    running.send("hostile datagrams sent\n").unwrap();
    running
        .wait_for("ROUND-ONE-DONE", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n(a replayed or spoofed attention stopped the machine?)"));
    let console = running.console();

    // A sound checkpoint request is served: checkpoint 1, the only one.
    let mut taken = None;
    for tag in 1000..1010 {
        let d = wrap_request(&mut s, tag, Op::Take);
        peer.send_datagram(US, &d);
        let give_up = Instant::now() + Duration::from_secs(60);
        while taken.is_none() && Instant::now() < give_up {
            let Some(d) = peer.recv_datagram(Duration::from_secs(1)) else {
                continue;
            };
            let mut scratch = [0u8; MAX_DATAGRAM];
            if let Ok(BridgeEvent::Data { payload, .. }) = s.receive(&d, &mut scratch) {
                if let Ok(checkpoint::Message::Done(done)) = checkpoint::Message::decode(payload) {
                    assert_eq!(done.tag, tag, "a Done for another request: {done:?}");
                    taken = Some(done);
                }
            }
        }
        // Taken, or refused because a CPU was handling an interrupt: ask again.
        if taken.is_some_and(|d| d.status == 0) {
            break;
        }
        taken = None;
    }
    let done = taken.expect("a sound checkpoint request over the fast link is served");
    assert_eq!(done.id, 1, "{done:?}");
    running.send("sound request sent\n").unwrap();
    let out = running.wait().unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_file(&link);
    let _ = std::fs::remove_file(&net);
    assert_success(&out);
    let o = out.script_output();
    println!("{o}");
    assert!(peer.log.is_empty(), "{:?}", peer.log);

    // Round one, after the hostile datagrams: no checkpoint.
    let kept = |after: &str| -> String {
        console_after(&o, after)
            .find(|l| l.contains(" of at most "))
            .unwrap_or_else(|| panic!("no `qsctl checkpoints` summary after {after}:\n{o}"))
            .to_string()
    };
    let round_one = kept("CHECKPOINTS-AFTER-HOSTILE");
    assert!(
        round_one.starts_with("0 of at most"),
        "a hostile datagram took a checkpoint:\n{round_one}\n{console}"
    );
    let line = fast_link_line(&o, "STATS-AFTER-HOSTILE");
    println!("{line}");
    assert!(
        line.contains("bridge authenticated, answering on the fast link"),
        "{line}"
    );
    let mut counts = Vec::new();
    for (what, expected) in [
        ("wrong keys", 1),
        ("replayed", 3),
        ("spoofed", 3),
        ("bad tag", 1),
        ("wrong session", 1),
        // Two garbage frames, a truncated frame, a truncated datagram.
        ("malformed", 4),
        ("fragmented", 1),
        ("bad magic", 1),
        ("not for us", 1),
        ("unauthenticated", 1),
    ] {
        assert_eq!(counter(line, what), expected, "{what}: {line}");
        counts.push(format!("{what} {expected}"));
    }
    println!("counted as expected: {}", counts.join(", "));
    assert_eq!(counter(line, "ARP requests answered"), 1, "{line}");
    // The handshakes (two, four datagrams) and the 20 sound pings at least.
    assert!(counter(line, "accepted") >= 24, "{line}");
    // The end: the sound request's checkpoint, and only it.
    let end = kept("CHECKPOINTS-AT-THE-END");
    assert!(end.starts_with("1 of at most"), "{end}\n{o}");
    assert!(
        console_after(&o, "CHECKPOINTS-AT-THE-END")
            .any(|l| l.trim_start().starts_with("1 ") && l.contains("manual")),
        "checkpoint 1 is not listed:\n{o}"
    );
    let link_requests = o
        .lines()
        .filter(|l| l.contains("taken at the link's request"))
        .collect::<Vec<_>>();
    assert!(
        link_requests.len() == 1 && link_requests[0].contains("checkpoint 1 taken"),
        "the checkpoints the link asked for: {link_requests:?}"
    );
    assert_kernel_clean(&out);
    // A frame longer than Ethernet allows is dropped as oversized, whatever it carries (here
    // a sound ping of the session, which must get no Pong).
    assert!(
        oversized_answers.is_empty() && counter(line, "oversized") == 1,
        "an oversized frame was acted on ({oversized_answers:?} answered) or not counted: {line}"
    );
}
