//! The machine's end of the link (`quicksilver_proto::link::endpoint::Endpoint`: the hello,
//! the challenge, the response, then attention and gdb bytes) against a peer that does not
//! hold the key, or holds it and interleaves anything else: sound frames with any channel,
//! sequence number and payload (so that control messages are reached past the CRC), replays
//! of its own earlier frames, and raw noise.
//!
//! What must hold besides "no panic": the endpoint acts (returns an event, or reaches
//! `Authenticated`) only after the peer sent a response computed with the key to a challenge
//! the endpoint sent; and everything the endpoint writes is a sound control frame.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use quicksilver_proto::link::control::{Message, Role};
use quicksilver_proto::link::endpoint::{Endpoint, State};
use quicksilver_proto::link::{self, auth, Channel, Decoder};

const KEY: &[u8] = b"the machine's key, which the fuzzer does not have";

/// What the peer sends next.
#[derive(Arbitrary, Debug)]
enum Step {
    /// Raw bytes.
    Raw(Vec<u8>),
    /// A sound frame: channel modulo four, sequence number given outright.
    Frame {
        channel: u8,
        seq: u32,
        payload: Vec<u8>,
    },
    /// A sound control frame with a message built from its parts (any version, role, MAC).
    Message {
        seq: u32,
        kind: u8,
        a: u16,
        b: u8,
        bytes: [u8; 32],
    },
    /// A hello of the right version, as a bridge says it.
    Hello { seq: u32 },
    /// The correct response to the newest challenge seen (only a key holder can send this).
    Respond { seq: u32 },
    /// A frame the peer sent earlier, again.
    Replay { index: u16 },
}

fn frame(channel: Channel, seq: u32, payload: &[u8]) -> Vec<u8> {
    let payload = &payload[..payload.len().min(link::MAX_PAYLOAD)];
    let mut out = vec![0u8; link::MAX_WIRE];
    let n = link::encode(channel, seq, payload, &mut out).expect("a payload that fits");
    out.truncate(n);
    out
}

fn control(seq: u32, m: Message) -> Vec<u8> {
    let mut b = [0u8; 33];
    let n = m.encode(&mut b);
    frame(Channel::Control, seq, &b[..n])
}

fuzz_target!(|steps: Vec<Step>| {
    let mut e = Endpoint::new(KEY);
    let mut nonces = 0u64;
    // The endpoint's output, decoded as a bridge would.
    let mut from_machine = Decoder::default();
    let mut challenge: Option<[u8; auth::LEN]> = None;
    // The peer proved the key at least once (a correct response went out).
    let mut proved = false;
    let mut sent: Vec<Vec<u8>> = Vec::new();
    for step in steps {
        let bytes = match step {
            Step::Raw(b) => b,
            Step::Frame {
                channel,
                seq,
                payload,
            } => frame(
                Channel::from_u8(channel % 4).expect("four channels"),
                seq,
                &payload,
            ),
            Step::Message {
                seq,
                kind,
                a,
                b,
                bytes,
            } => {
                let mut p = vec![kind];
                match kind {
                    1 => p.extend_from_slice(&[a as u8, (a >> 8) as u8, b]),
                    2 | 3 => p.extend_from_slice(&bytes),
                    5 | 8 => p.push(b),
                    7 => p.extend_from_slice(&u32::from(a).to_le_bytes()),
                    _ => {}
                }
                frame(Channel::Control, seq, &p)
            }
            Step::Hello { seq } => control(
                seq,
                Message::Hello {
                    version: link::LINK_VERSION,
                    role: Role::Bridge,
                },
            ),
            Step::Respond { seq } => match challenge {
                Some(nonce) => {
                    proved = true;
                    control(
                        seq,
                        Message::Response {
                            mac: auth::respond(KEY, &nonce),
                        },
                    )
                }
                None => continue,
            },
            Step::Replay { index } => match sent.len() {
                0 => continue,
                n => sent[usize::from(index) % n].clone(),
            },
        };
        sent.push(bytes.clone());
        for &b in &bytes {
            let mut out = Vec::new();
            let mut nonce = || {
                nonces += 1;
                let mut n = [0u8; auth::LEN];
                n[..8].copy_from_slice(&nonces.to_le_bytes());
                n
            };
            let acted = e
                .push(b, &mut nonce, &mut |w: &[u8]| out.extend_from_slice(w))
                .is_some();
            assert!(
                !acted || proved,
                "the endpoint acted for a peer without the key"
            );
            assert!(
                e.state() != State::Authenticated || proved,
                "authenticated a peer without the key"
            );
            for &o in &out {
                match from_machine.push(o) {
                    None => {}
                    Some(Ok(f)) => {
                        assert_eq!(
                            f.channel,
                            Channel::Control,
                            "the handshake wrote off the control channel"
                        );
                        match Message::decode(f.payload) {
                            Ok(Message::Challenge { nonce }) => challenge = Some(nonce),
                            Ok(_) => {}
                            Err(_) => panic!("the endpoint wrote an undecodable control message"),
                        }
                    }
                    Some(Err(d)) => panic!("the endpoint wrote a broken frame: {d:?}"),
                }
            }
        }
    }
});
