//! The machine's end of the fast link (`quicksilver_proto::link::net::NetEndpoint`, which the
//! hv runs with GIF = 0 on every frame its NIC receives) against any Ethernet frame: noise,
//! ARP, IPv4/UDP with any header field, datagrams of the wire format with any header, a peer
//! that holds the key and one that does not, from the right source and from others, and
//! replays of earlier frames.
//!
//! What must hold besides "no panic": the endpoint acts (returns an event, or reaches
//! `Authenticated`) only after a correct response to its challenge came in; every frame it
//! sends is a sound Ethernet frame of at most `MAX_FRAME` bytes; each frame in is dropped
//! (and counted) at most once.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use quicksilver_proto::link::endpoint::State;
use quicksilver_proto::link::net::{
    self, BridgeEvent, BridgeSession, Host, NetEndpoint, Packet, MAX_DATAGRAM, MAX_FRAME,
};
use quicksilver_proto::link::Channel;

const KEY: &[u8] = b"the machine's key, which the fuzzer does not have";
const MACHINE: Host = Host {
    mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
    ip: [10, 13, 0, 2],
    port: 50000,
};

/// What arrives next.
#[derive(Arbitrary, Debug)]
enum Step {
    /// Any bytes as a frame.
    Raw(Vec<u8>),
    /// A sound UDP frame to the machine carrying any bytes, from a source picked by `from`.
    Udp { from: u8, payload: Vec<u8> },
    /// A datagram of the wire format with any header fields, untagged or tagged with a key
    /// that is not the machine's.
    Datagram {
        from: u8,
        channel: u8,
        tagged: bool,
        session: u64,
        seq: u64,
        payload: Vec<u8>,
    },
    /// The bridge's hello, from a source picked by `from`.
    Hello { from: u8 },
    /// A key holder's answer to the newest challenge (through `BridgeSession`).
    Respond,
    /// A key holder's session datagram on any channel.
    Session { channel: u8, payload: Vec<u8> },
    /// An earlier frame again.
    Replay { index: u16 },
}

fn source(from: u8) -> Host {
    Host {
        mac: [2, 0x51, 0x53, 0, 0, from % 3],
        ip: [10, 13, 0, 1 + from % 2],
        port: 40000 + u16::from(from % 5),
    }
}

fn udp(src: Host, payload: &[u8]) -> Vec<u8> {
    let mut out = [0u8; MAX_FRAME];
    let n = net::build_udp(&mut out, src, MACHINE, 1, payload);
    out[..n].to_vec()
}

fuzz_target!(|steps: Vec<Step>| {
    let mut e = NetEndpoint::new(KEY, MACHINE.mac, MACHINE.ip, MACHINE.port);
    let mut bridge = BridgeSession::new(KEY);
    let mut response: Option<Vec<u8>> = None;
    let mut nonces = 0u64;
    let mut proved = false;
    let mut sent: Vec<Vec<u8>> = Vec::new();
    for step in steps {
        let frame = match step {
            Step::Raw(b) => b,
            Step::Udp { from, payload } => udp(source(from), &payload),
            Step::Datagram {
                from,
                channel,
                tagged,
                session,
                seq,
                payload,
            } => {
                let key = net::SessionKey::derive(b"not the key", &[0; 32]);
                let mut d = [0u8; MAX_DATAGRAM];
                let n = net::write_datagram(
                    &mut d,
                    Channel::from_u8(channel % 4).expect("four channels"),
                    tagged.then_some((&key, net::Sender::Bridge)),
                    session,
                    seq,
                    &payload,
                );
                udp(source(from), &d[..n])
            }
            Step::Hello { from } => {
                let mut d = [0u8; MAX_DATAGRAM];
                let n = bridge.hello(&mut d);
                udp(source(from), &d[..n])
            }
            Step::Respond => match response.take() {
                Some(r) => {
                    proved = true;
                    udp(source(0), &r)
                }
                None => continue,
            },
            Step::Session { channel, payload } => {
                let mut d = [0u8; MAX_DATAGRAM];
                let ch = Channel::from_u8(channel % 4).expect("four channels");
                let len = payload.len().min(net::MAX_PAYLOAD);
                match bridge.wrap(ch, &payload[..len], &mut d) {
                    Some(n) => udp(source(0), &d[..n]),
                    None => continue,
                }
            }
            Step::Replay { index } => match sent.len() {
                0 => continue,
                n => sent[usize::from(index) % n].clone(),
            },
        };
        sent.push(frame.clone());
        let before = e.counters().dropped();
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut nonce = || {
            nonces += 1;
            let mut n = [0u8; 32];
            n[..8].copy_from_slice(&nonces.to_le_bytes());
            n
        };
        let acted = e
            .receive(&frame, &mut nonce, &mut |f: &[u8]| out.push(f.to_vec()))
            .is_some();
        assert!(!acted || proved, "the endpoint acted for a peer without the key");
        assert!(
            e.state() != State::Authenticated || proved,
            "authenticated a peer without the key"
        );
        assert!(e.counters().dropped() - before <= 1, "a frame counted twice");
        for f in out {
            assert!(f.len() <= MAX_FRAME, "a frame over the MTU");
            match net::parse_frame(&f, None) {
                Ok(Packet::Udp(u)) => {
                    let mut d = [0u8; MAX_DATAGRAM];
                    // The machine answers the source it heard; the key holder is source 0.
                    if u.dst == source(0) {
                        if let Ok(BridgeEvent::Respond(n)) = bridge.receive(u.payload, &mut d) {
                            response = Some(d[..n].to_vec());
                        }
                    }
                }
                Ok(Packet::Arp(_)) => {}
                Err(d) => panic!("the endpoint sent a frame it cannot read: {d:?}"),
            }
        }
    }
});
