//! The link's frame decoder (`quicksilver_proto::link::Decoder`, the code the hv and qs-bridge
//! both run on every byte of the line) against anything the line can carry: noise, cut and
//! corrupted frames, and sound frames with any channel, sequence number and payload.
//!
//! What must hold besides "no panic":
//! - every 0x00 after other bytes ends exactly one frame: sound, or dropped and counted
//!   (never silently lost); back-to-back 0x00s are an idle line;
//! - a sound frame that starts right after a 0x00 is decoded as it was sent, whatever noise
//!   came before: noise never desynchronizes the decoder for longer than one frame;
//! - whatever the decoder accepts is well formed: a payload of at most `MAX_PAYLOAD` bytes,
//!   whose re-encoding decodes to the same frame.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use quicksilver_proto::link::{self, Channel, Decoder};

/// What goes onto the line next.
#[derive(Arbitrary, Debug)]
enum Piece {
    /// Arbitrary bytes: noise, or a frame the fuzzer builds by hand.
    Raw(Vec<u8>),
    /// A sound frame (channel taken modulo the four channels).
    Frame {
        channel: u8,
        seq: u32,
        payload: Vec<u8>,
    },
    /// A sound frame with one byte changed before its end.
    Corrupted {
        channel: u8,
        seq: u32,
        payload: Vec<u8>,
        at: u16,
        xor: u8,
    },
}

fn channel(c: u8) -> Channel {
    Channel::from_u8(c % 4).expect("four channels")
}

fn wire(channel: Channel, seq: u32, payload: &[u8]) -> Vec<u8> {
    let payload = &payload[..payload.len().min(link::MAX_PAYLOAD)];
    let mut out = vec![0u8; link::MAX_WIRE];
    let n = link::encode(channel, seq, payload, &mut out).expect("a payload that fits");
    out.truncate(n);
    out
}

/// Feeds `bytes`; returns the frames decoded as (channel, seq, payload), checking on the way
/// that each 0x00 after other bytes ends exactly one frame and that each drop is counted.
/// `prev_zero`: the last byte fed was a 0x00 (or none was fed yet).
fn feed(d: &mut Decoder, prev_zero: &mut bool, bytes: &[u8]) -> Vec<(Channel, u32, Vec<u8>)> {
    let mut frames = Vec::new();
    for &b in bytes {
        let before = d.drops.total();
        let idle = *prev_zero;
        *prev_zero = b == 0;
        match d.push(b) {
            // Back-to-back 0x00s: an idle line, no frame.
            None => assert!(b != 0 || idle, "a 0x00 that ended nothing"),
            Some(_) if idle => panic!("a frame out of back-to-back 0x00s"),
            Some(Ok(f)) => {
                assert_eq!(b, 0, "a frame ended by a byte that is not 0x00");
                assert!(f.payload.len() <= link::MAX_PAYLOAD);
                frames.push((f.channel, f.seq, f.payload.to_vec()));
                assert_eq!(d.drops.total(), before, "a sound frame counted as dropped");
            }
            Some(Err(_)) => {
                assert_eq!(b, 0);
                assert_eq!(d.drops.total(), before + 1, "a drop not counted");
            }
        }
    }
    frames
}

fuzz_target!(|pieces: Vec<Piece>| {
    let mut d = Decoder::default();
    // The decoder starts in sync; after that, it is in sync right after a 0x00.
    let mut in_sync = true;
    let mut prev_zero = true;
    for piece in pieces {
        let (bytes, expect) = match piece {
            Piece::Raw(bytes) => (bytes, None),
            Piece::Frame {
                channel: c,
                seq,
                payload,
            } => {
                let w = wire(channel(c), seq, &payload);
                let want = (
                    channel(c),
                    seq,
                    payload[..payload.len().min(link::MAX_PAYLOAD)].to_vec(),
                );
                (w, Some(want))
            }
            Piece::Corrupted {
                channel: c,
                seq,
                payload,
                at,
                xor,
            } => {
                let mut w = wire(channel(c), seq, &payload);
                let at = usize::from(at) % (w.len() - 1);
                w[at] ^= xor;
                (w, None)
            }
        };
        let frames = feed(&mut d, &mut prev_zero, &bytes);
        if let (Some(want), true) = (expect, in_sync) {
            assert_eq!(
                frames,
                [want],
                "a sound frame after a 0x00 was not decoded as sent"
            );
        }
        for (c, seq, payload) in &frames {
            // What was accepted re-encodes into a frame that decodes the same.
            let mut again = Decoder::default();
            let got = feed(&mut again, &mut true, &wire(*c, *seq, payload));
            assert_eq!(got, [(*c, *seq, payload.clone())]);
        }
        if let Some(&last) = bytes.last() {
            in_sync = last == 0;
        }
    }
});
