//! The fast link's wire format and both ends, as a bridge and a machine (or an attacker on
//! the same Ethernet) would see them.

use super::*;
use crate::link::control::{Refusal, Role};
use proptest::prelude::*;

const KEY: &[u8] = b"the link key";
const MACHINE: Host = Host {
    mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
    ip: [10, 13, 0, 2],
    port: 50000,
};
const BRIDGE: Host = Host {
    mac: [0x02, 0x51, 0x53, 0, 0, 1],
    ip: [10, 13, 0, 1],
    port: 40000,
};

fn machine() -> NetEndpoint {
    NetEndpoint::new(KEY, MACHINE.mac, MACHINE.ip, MACHINE.port)
}

/// A frame from `src` to the machine carrying `datagram`.
fn frame_from(src: Host, datagram: &[u8]) -> Vec<u8> {
    let mut out = [0u8; MAX_FRAME];
    let n = build_udp(&mut out, src, MACHINE, 7, datagram);
    out[..n].to_vec()
}

/// Feeds one frame; returns the event (formatted) and the frames sent back.
fn feed(e: &mut NetEndpoint, frame: &[u8]) -> (Option<String>, Vec<Vec<u8>>) {
    let mut sent = Vec::new();
    let mut nonce = || [0x42; auth::LEN];
    let ev = e
        .receive(frame, &mut nonce, &mut |f: &[u8]| sent.push(f.to_vec()))
        .map(|ev| format!("{ev:?}"));
    (ev, sent)
}

/// The UDP payloads of frames the machine sent, checked to be sound frames to `to`.
fn datagrams(frames: &[Vec<u8>], to: Host) -> Vec<Vec<u8>> {
    frames
        .iter()
        .map(|f| match parse_frame(f, Some(to.mac)) {
            Ok(Packet::Udp(u)) => {
                assert_eq!((u.src, u.dst), (MACHINE, to));
                u.payload.to_vec()
            }
            other => panic!("{other:?}"),
        })
        .collect()
}

/// A bridge at `at` that went through the handshake with `e`.
fn authenticated(e: &mut NetEndpoint, at: Host) -> BridgeSession {
    let mut b = BridgeSession::new(KEY);
    let mut out = [0u8; MAX_DATAGRAM];
    let n = b.hello(&mut out);
    let (_, sent) = feed(e, &frame_from(at, &out[..n]));
    let mut response = None;
    for d in datagrams(&sent, at) {
        if let Ok(BridgeEvent::Respond(n)) = b.receive(&d, &mut out) {
            response = Some(out[..n].to_vec());
        }
    }
    let (_, sent) = feed(e, &frame_from(at, &response.expect("a challenge")));
    let d = datagrams(&sent, at);
    assert_eq!(b.receive(&d[0], &mut out), Ok(BridgeEvent::Authenticated));
    assert_eq!(e.state(), State::Authenticated);
    b
}

fn wrap(b: &mut BridgeSession, channel: Channel, payload: &[u8]) -> Vec<u8> {
    let mut out = [0u8; MAX_DATAGRAM];
    let n = b.wrap(channel, payload, &mut out).expect("a session");
    out[..n].to_vec()
}

fn control(b: &mut BridgeSession, m: Message) -> Vec<u8> {
    let mut buf = [0u8; 33];
    let n = m.encode(&mut buf);
    wrap(b, Channel::Control, &buf[..n])
}

#[test]
fn the_ip_checksum_is_rfc_1071s() {
    // A header whose checksum (0xb861) is the usual worked example.
    let h = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];
    assert_eq!(ip_checksum(&h), 0xb861);
    let mut sound = h;
    sound[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
    assert_eq!(ip_checksum(&sound), 0);
}

#[test]
fn the_sizes_add_up_to_a_1500_byte_mtu() {
    assert_eq!(MAX_DATAGRAM, 1472);
    assert_eq!(MAX_PAYLOAD, 1432);
    let mut out = [0u8; MAX_FRAME];
    let n = build_udp(&mut out, BRIDGE, MACHINE, 1, &[0xaa; MAX_DATAGRAM]);
    assert_eq!(n, MAX_FRAME);
}

#[test]
fn arp_requests_for_the_machines_address_are_answered_and_no_others() {
    let mut e = machine();
    let ask = |target_ip| {
        let mut out = [0u8; MAX_FRAME];
        let n = build_arp(
            &mut out,
            &Arp {
                op: 1,
                sender_mac: BRIDGE.mac,
                sender_ip: BRIDGE.ip,
                target_mac: [0; 6],
                target_ip,
            },
        );
        out[..n].to_vec()
    };
    let (ev, sent) = feed(&mut e, &ask(MACHINE.ip));
    assert_eq!(ev, None);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].len(), MIN_FRAME);
    assert_eq!(&sent[0][..6], &BRIDGE.mac, "the reply goes to the asker");
    assert_eq!(
        parse_frame(&sent[0], Some(BRIDGE.mac)),
        Ok(Packet::Arp(Arp {
            op: 2,
            sender_mac: MACHINE.mac,
            sender_ip: MACHINE.ip,
            target_mac: BRIDGE.mac,
            target_ip: BRIDGE.ip,
        }))
    );
    let (_, sent) = feed(&mut e, &ask([10, 13, 0, 9]));
    assert!(sent.is_empty());
    assert_eq!(e.counters().arp_answered, 1);
    assert_eq!(e.counters().not_for_us, 1);
}

#[test]
fn the_key_opens_a_session_whose_datagrams_carry_gdb_bytes_both_ways() {
    let mut e = machine();
    let mut b = authenticated(&mut e, BRIDGE);
    assert_eq!(e.peer(), Some((BRIDGE.mac, BRIDGE.ip, BRIDGE.port)));
    let (ev, _) = feed(
        &mut e,
        &frame_from(BRIDGE, &wrap(&mut b, Channel::Gdb, b"$g#67")),
    );
    assert_eq!(ev, Some(format!("{:?}", Event::Gdb(b"$g#67"))));
    let (ev, _) = feed(
        &mut e,
        &frame_from(BRIDGE, &control(&mut b, Message::Attention)),
    );
    assert_eq!(ev.as_deref(), Some("Attention"));

    // A 128 KiB gdb reply is a stream of full datagrams, in order.
    let reply: Vec<u8> = (0..128 * 1024u32)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    let mut sent = Vec::new();
    e.send(Channel::Gdb, &reply, &mut |f: &[u8]| sent.push(f.to_vec()));
    assert_eq!(sent.len(), reply.len().div_ceil(MAX_PAYLOAD));
    assert!(sent.iter().all(|f| f.len() <= MAX_FRAME));
    let mut got = Vec::new();
    let mut out = [0u8; MAX_DATAGRAM];
    for d in datagrams(&sent, BRIDGE) {
        match b.receive(&d, &mut out) {
            Ok(BridgeEvent::Data {
                channel: Channel::Gdb,
                payload,
            }) => got.extend_from_slice(payload),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, reply);
    assert_eq!(b.counters.dropped(), 0);
    assert_eq!(e.counters().dropped(), 0);
}

/// Each direction has its own key: a datagram of the machine's sent back to it (its sequence
/// number above any the bridge used) does not pass for the bridge's, nor the bridge's own for
/// the machine's.
#[test]
fn a_datagram_sent_back_to_its_sender_is_refused() {
    let mut e = machine();
    let mut b = authenticated(&mut e, BRIDGE);
    let mut sent = Vec::new();
    for _ in 0..5 {
        e.send(Channel::Gdb, b"$OK#9a", &mut |f: &[u8]| {
            sent.push(f.to_vec())
        });
    }
    let reflected = datagrams(&sent, BRIDGE).pop().expect("datagrams");
    let (ev, replies) = feed(&mut e, &frame_from(BRIDGE, &reflected));
    assert_eq!((ev, replies.len()), (None, 0));
    assert_eq!(e.counters().bad_tag, 1);
    let own = wrap(&mut b, Channel::Gdb, b"$g#67");
    let mut out = [0u8; MAX_DATAGRAM];
    assert_eq!(b.receive(&own, &mut out), Err(Drop::BadTag));
    // The session goes on.
    let (ev, _) = feed(
        &mut e,
        &frame_from(BRIDGE, &wrap(&mut b, Channel::Gdb, b"$g#67")),
    );
    assert_eq!(ev, Some(format!("{:?}", Event::Gdb(b"$g#67"))));
}

#[test]
fn a_ping_is_answered_with_its_pong_and_reported() {
    let mut e = machine();
    let mut b = authenticated(&mut e, BRIDGE);
    let (ev, sent) = feed(
        &mut e,
        &frame_from(BRIDGE, &control(&mut b, Message::Ping { n: 77 })),
    );
    assert_eq!(
        ev,
        Some(format!("{:?}", Event::Control(Message::Ping { n: 77 })))
    );
    let mut out = [0u8; MAX_DATAGRAM];
    let d = datagrams(&sent, BRIDGE);
    let Ok(BridgeEvent::Data {
        channel: Channel::Control,
        payload,
    }) = b.receive(&d[0], &mut out)
    else {
        panic!("no pong")
    };
    assert_eq!(Message::decode(payload), Ok(Message::Pong { n: 77 }));
}

#[test]
fn a_wrong_key_is_refused_and_serves_nothing() {
    let mut e = machine();
    let mut b = BridgeSession::new(b"another key");
    let mut out = [0u8; MAX_DATAGRAM];
    let n = b.hello(&mut out);
    let (_, sent) = feed(&mut e, &frame_from(BRIDGE, &out[..n]));
    let mut response = None;
    for d in datagrams(&sent, BRIDGE) {
        if let Ok(BridgeEvent::Respond(n)) = b.receive(&d, &mut out) {
            response = Some(out[..n].to_vec());
        }
    }
    let (_, sent) = feed(&mut e, &frame_from(BRIDGE, &response.unwrap()));
    let d = datagrams(&sent, BRIDGE);
    assert_eq!(
        b.receive(&d[0], &mut out),
        Ok(BridgeEvent::Refused(Refusal::WrongKey))
    );
    assert_eq!(e.state(), State::Idle);
    assert_eq!(e.peer(), None);
    assert_eq!(e.counters().wrong_key, 1);
    // The bridge cannot send anything the machine takes.
    assert_eq!(b.wrap(Channel::Gdb, b"$g#67", &mut out), None);
    let forged = {
        let key = SessionKey::derive(b"another key", &[0x42; 32]);
        let mut f = [0u8; MAX_DATAGRAM];
        let n = write_datagram(
            &mut f,
            Channel::Gdb,
            Some((&key, Sender::Bridge)),
            key.id,
            1,
            b"$g#67",
        );
        f[..n].to_vec()
    };
    let (ev, sent) = feed(&mut e, &frame_from(BRIDGE, &forged));
    assert_eq!((ev, sent.len()), (None, 0));
    assert_eq!(e.counters().unauthenticated, 1);
}

#[test]
fn a_machine_without_a_key_serves_nobody() {
    let mut e = NetEndpoint::new(b"", MACHINE.mac, MACHINE.ip, MACHINE.port);
    let mut b = BridgeSession::new(b"");
    let mut out = [0u8; MAX_DATAGRAM];
    let n = b.hello(&mut out);
    let (_, sent) = feed(&mut e, &frame_from(BRIDGE, &out[..n]));
    let d = datagrams(&sent, BRIDGE);
    let Ok(BridgeEvent::Respond(n)) = b.receive(&d[1], &mut out) else {
        panic!()
    };
    let (_, sent) = feed(&mut e, &frame_from(BRIDGE, &out[..n]));
    let d = datagrams(&sent, BRIDGE);
    assert_eq!(
        b.receive(&d[0], &mut out),
        Ok(BridgeEvent::Refused(Refusal::NoKey))
    );
}

/// Rewrites a frame's IPv4 header with `f` and sets its checksum again.
fn with_ip(frame: &[u8], f: impl Fn(&mut [u8])) -> Vec<u8> {
    let mut v = frame.to_vec();
    let ip = &mut v[ETH_HEADER..ETH_HEADER + IPV4_HEADER];
    f(ip);
    ip[10..12].copy_from_slice(&[0, 0]);
    let sum = ip_checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    v
}

#[test]
fn every_bad_datagram_is_dropped_for_its_reason_and_changes_nothing() {
    let mut e = machine();
    let mut b = authenticated(&mut e, BRIDGE);
    let good = wrap(&mut b, Channel::Gdb, b"$m0,4#fd");
    let sound = frame_from(BRIDGE, &good);
    let mut bad_checksum = sound.clone();
    bad_checksum[ETH_HEADER + 10] ^= 1;
    let mut other_mac = sound.clone();
    other_mac[0] ^= 2;
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    let mut bad_tag = good.clone();
    *bad_tag.last_mut().unwrap() ^= 1;
    let mut untagged = good.clone();
    untagged[5] = 0;
    untagged.truncate(untagged.len() - TAG_LEN);
    let other_key = SessionKey::derive(b"not the key", &[0x42; 32]);
    let mut forged = [0u8; MAX_DATAGRAM];
    let n = write_datagram(
        &mut forged,
        Channel::Gdb,
        Some((&other_key, Sender::Bridge)),
        other_key.id,
        99,
        b"$g#67",
    );
    let real = SessionKey::derive(KEY, &[0x42; 32]);
    let mut old_session = [0u8; MAX_DATAGRAM];
    let m = write_datagram(
        &mut old_session,
        Channel::Gdb,
        Some((&real, Sender::Bridge)),
        real.id ^ 1,
        99,
        b"$g#67",
    );
    let spoofer = Host {
        port: BRIDGE.port + 1,
        ..BRIDGE
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("malformed", sound[..ETH_HEADER + 10].to_vec()),
        ("malformed", bad_checksum),
        ("malformed", with_ip(&sound, |ip| ip[0] = 0x46)),
        ("malformed", with_ip(&sound, |ip| ip[9] = 6)),
        ("fragmented", with_ip(&sound, |ip| ip[6] |= 0x20)),
        ("fragmented", with_ip(&sound, |ip| ip[7] = 1)),
        ("oversized", [sound.clone(), vec![0; MAX_FRAME]].concat()),
        ("not_for_us", other_mac),
        ("not_for_us", with_ip(&sound, |ip| ip[19] = 3)),
        ("not_for_us", {
            let mut f = [0u8; MAX_FRAME];
            let to = Host { port: 1, ..MACHINE };
            let n = build_udp(&mut f, BRIDGE, to, 1, &good);
            f[..n].to_vec()
        }),
        ("bad_magic", frame_from(BRIDGE, &bad_magic)),
        ("unauthenticated", frame_from(BRIDGE, &untagged)),
        ("bad_tag", frame_from(BRIDGE, &bad_tag)),
        ("bad_tag", frame_from(BRIDGE, &forged[..n])),
        ("wrong_session", frame_from(BRIDGE, &old_session[..m])),
        ("spoofed", frame_from(spoofer, &good)),
    ];
    for (reason, frame) in cases {
        let before = e.counters();
        let (ev, sent) = feed(&mut e, &frame);
        assert_eq!((ev, sent.len()), (None, 0), "{reason}");
        let after = e.counters();
        let delta = |f: fn(&NetCounters) -> u64| f(&after) - f(&before);
        let counted = match reason {
            "malformed" => delta(|c| c.malformed),
            "fragmented" => delta(|c| c.fragmented),
            "oversized" => delta(|c| c.oversized),
            "not_for_us" => delta(|c| c.not_for_us),
            "bad_magic" => delta(|c| c.bad_magic),
            "unauthenticated" => delta(|c| c.unauthenticated),
            "bad_tag" => delta(|c| c.bad_tag),
            "wrong_session" => delta(|c| c.wrong_session),
            "spoofed" => delta(|c| c.spoofed),
            _ => unreachable!(),
        };
        assert_eq!(
            (counted, after.dropped() - before.dropped()),
            (1, 1),
            "{reason}"
        );
    }
    // The sound datagram still gets through once, and its replay does not.
    let (ev, _) = feed(&mut e, &sound);
    assert_eq!(ev, Some(format!("{:?}", Event::Gdb(b"$m0,4#fd"))));
    let (ev, _) = feed(&mut e, &sound);
    assert_eq!(ev, None);
    assert_eq!(e.counters().replayed, 1);
    assert_eq!(e.state(), State::Authenticated);
}

#[test]
fn a_hello_from_anyone_restarts_the_handshake_and_ends_the_session() {
    let mut e = machine();
    let mut old = authenticated(&mut e, BRIDGE);
    let elsewhere = Host {
        port: 40001,
        ..BRIDGE
    };
    let _new = authenticated(&mut e, elsewhere);
    assert_eq!(
        e.peer(),
        Some((elsewhere.mac, elsewhere.ip, elsewhere.port))
    );
    let (ev, sent) = feed(
        &mut e,
        &frame_from(BRIDGE, &wrap(&mut old, Channel::Gdb, b"x")),
    );
    assert_eq!((ev, sent.len()), (None, 0));
    assert_eq!(e.counters().spoofed, 1);
    // Nothing goes to the old bridge any more.
    let mut sent = Vec::new();
    e.send(Channel::Gdb, b"$OK#9a", &mut |f: &[u8]| {
        sent.push(f.to_vec())
    });
    datagrams(&sent, elsewhere);
}

#[test]
fn a_machine_without_a_bridge_sends_nothing() {
    let mut e = machine();
    let mut sent = 0;
    e.send(Channel::Gdb, b"$OK#9a", &mut |_| sent += 1);
    e.send_control(Message::Stopped { cpus: 1 }, &mut |_| sent += 1);
    assert_eq!(sent, 0);
}

#[test]
fn the_bridge_drops_what_the_session_did_not_send() {
    let mut e = machine();
    let mut b = authenticated(&mut e, BRIDGE);
    let mut sent = Vec::new();
    e.send(Channel::Console, b"hello", &mut |f: &[u8]| {
        sent.push(f.to_vec())
    });
    let d = datagrams(&sent, BRIDGE).remove(0);
    let mut out = [0u8; MAX_DATAGRAM];
    assert!(b.receive(&d, &mut out).is_ok());
    assert_eq!(b.receive(&d, &mut out), Err(Drop::Replayed));
    let mut flipped = d.clone();
    flipped[HEADER_LEN] ^= 0x80;
    assert_eq!(b.receive(&flipped, &mut out), Err(Drop::BadTag));
    let hello = {
        let mut h = [0u8; 33];
        let n = Message::Hello {
            version: 2,
            role: Role::Machine,
        }
        .encode(&mut h);
        let mut f = [0u8; MAX_DATAGRAM];
        let k = write_datagram(&mut f, Channel::Control, None, 0, 0, &h[..n]);
        f[..k].to_vec()
    };
    assert!(matches!(
        b.receive(&hello, &mut out),
        Ok(BridgeEvent::Hello { .. })
    ));
    assert_eq!(b.counters.replayed + b.counters.bad_tag, 2);
}

proptest! {
    /// Any UDP payload round-trips through a frame.
    #[test]
    fn udp_frames_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..MAX_DATAGRAM), id: u16) {
        let mut out = [0u8; MAX_FRAME];
        let n = build_udp(&mut out, BRIDGE, MACHINE, id, &payload);
        prop_assert_eq!(
            parse_frame(&out[..n], Some(MACHINE.mac)),
            Ok(Packet::Udp(Udp { src: BRIDGE, dst: MACHINE, payload: &payload }))
        );
    }

    /// Arbitrary frames never panic, never give an event, and each is counted once at most.
    #[test]
    fn garbage_frames_are_harmless(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..1600), 0..20)) {
        let mut e = machine();
        let _b = authenticated(&mut e, BRIDGE);
        for f in frames {
            let before = e.counters();
            let (ev, _) = feed(&mut e, &f);
            prop_assert!(ev.is_none());
            prop_assert!(e.counters().dropped() - before.dropped() <= 1);
        }
    }

    /// A session's datagram with any bits flipped after the UDP header never gets through
    /// (unless the flips cancel out).
    #[test]
    fn flipped_datagrams_never_pass(payload in proptest::collection::vec(any::<u8>(), 0..64),
                                    flips in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..4)) {
        let mut e = machine();
        let mut b = authenticated(&mut e, BRIDGE);
        let good = wrap(&mut b, Channel::Gdb, &payload);
        let mut bad = good.clone();
        for (at, bit) in flips {
            let i = at.index(bad.len());
            bad[i] ^= 1 << bit;
        }
        let (ev, _) = feed(&mut e, &frame_from(BRIDGE, &bad));
        if bad != good {
            prop_assert!(ev.is_none());
        }
    }
}
