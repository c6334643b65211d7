//! The serial link between the hv (or the agent, while dormant) and `qs-bridge`.
//!
//! A frame on the wire is COBS-encoded and ends with a 0x00 byte, so that any 0x00 is a clean
//! place to resynchronize after noise. Before COBS it is:
//!
//! ```text
//! channel u8 | seq u32 LE | len u16 LE | payload (len bytes) | crc32 LE of everything before
//! ```
//!
//! A fixed little-endian header rather than a serde encoding: the hv decodes it with GIF = 0
//! on every received byte, and a fixed layout makes the size limits obvious. Messages carried
//! inside the `control` channel can use any encoding.
//!
//! Every frame that is corrupt (CRC), truncated, oversized, badly COBS-encoded or replayed
//! (sequence number not above the last accepted on its direction) is dropped and counted by
//! [`Decoder`] and [`Session`], never acted on.

/// Logical channels multiplexed on the link.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// Text from the machine's console.
    Console = 0,
    /// Raw GDB remote-protocol bytes.
    Gdb = 1,
    /// Hello, authentication, requests, status, events.
    Control = 2,
    /// Bulk transfers (checkpoint export).
    Bulk = 3,
}

impl Channel {
    /// The channel for a wire value.
    pub fn from_u8(v: u8) -> Option<Channel> {
        Some(match v {
            0 => Channel::Console,
            1 => Channel::Gdb,
            2 => Channel::Control,
            3 => Channel::Bulk,
            _ => return None,
        })
    }
}

/// Largest payload a frame carries.
pub const MAX_PAYLOAD: usize = 1024;
/// Header bytes before the payload.
pub const HEADER_LEN: usize = 7;
/// Largest frame before COBS: header, payload, CRC.
pub const MAX_RAW: usize = HEADER_LEN + MAX_PAYLOAD + 4;
/// Largest frame on the wire: COBS adds one byte per 254 and one at the start; then the 0x00.
pub const MAX_WIRE: usize = MAX_RAW + MAX_RAW / 254 + 2;

/// Why a frame could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The payload is over [`MAX_PAYLOAD`].
    PayloadTooLarge { len: usize },
    /// The output buffer is smaller than [`MAX_WIRE`] needs for this frame.
    BufferTooSmall,
}

/// A received frame whose payload is borrowed from the decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub channel: Channel,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// COBS-encodes `src` into `dst` (no trailing zero); returns the length.
fn cobs_encode(src: &[u8], dst: &mut [u8]) -> Option<usize> {
    let mut code_at = 0;
    let mut out = 1;
    let mut code = 1u8;
    for &b in src {
        if b == 0 {
            *dst.get_mut(code_at)? = code;
            code_at = out;
            out += 1;
            code = 1;
        } else {
            *dst.get_mut(out)? = b;
            out += 1;
            code += 1;
            if code == 0xFF {
                *dst.get_mut(code_at)? = code;
                code_at = out;
                out += 1;
                code = 1;
            }
        }
    }
    *dst.get_mut(code_at)? = code;
    Some(out)
}

/// COBS-decodes `buf` in place (no trailing zero); returns the decoded length. The write
/// position never passes the read position, so decoding in place is safe.
fn cobs_decode_in_place(buf: &mut [u8]) -> Option<usize> {
    let mut read = 0;
    let mut write = 0;
    while read < buf.len() {
        let code = buf[read] as usize;
        let next = read + code; // where the next code byte is
        if code == 0 || next > buf.len() {
            return None;
        }
        read += 1;
        while read < next {
            buf[write] = buf[read];
            write += 1;
            read += 1;
        }
        if code != 0xFF && read < buf.len() {
            buf[write] = 0;
            write += 1;
        }
    }
    Some(write)
}

/// Builds the wire form of a frame into `out`, trailing 0x00 included; returns its length.
pub fn encode(
    channel: Channel,
    seq: u32,
    payload: &[u8],
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(EncodeError::PayloadTooLarge { len: payload.len() });
    }
    let mut raw = [0u8; MAX_RAW];
    let n = HEADER_LEN + payload.len();
    raw[0] = channel as u8;
    raw[1..5].copy_from_slice(&seq.to_le_bytes());
    raw[5..7].copy_from_slice(&(payload.len() as u16).to_le_bytes());
    raw[HEADER_LEN..n].copy_from_slice(payload);
    let crc = crate::crc32(&raw[..n]);
    raw[n..n + 4].copy_from_slice(&crc.to_le_bytes());
    let len = cobs_encode(&raw[..n + 4], out).ok_or(EncodeError::BufferTooSmall)?;
    *out.get_mut(len).ok_or(EncodeError::BufferTooSmall)? = 0;
    Ok(len + 1)
}

/// Why a received frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// More bytes than [`MAX_WIRE`] before a 0x00.
    Oversized,
    /// Not valid COBS.
    BadEncoding,
    /// Shorter than a header and a CRC, or shorter than its length field says.
    Truncated,
    /// The CRC does not match.
    BadCrc,
    /// Unknown channel number.
    BadChannel,
    /// Sequence number not above the last accepted one (see [`Session`]).
    Replayed,
}

/// Counts of dropped frames, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounts {
    pub oversized: u64,
    pub bad_encoding: u64,
    pub truncated: u64,
    pub bad_crc: u64,
    pub bad_channel: u64,
    pub replayed: u64,
}

impl DropCounts {
    fn count(&mut self, d: Drop) {
        let c = match d {
            Drop::Oversized => &mut self.oversized,
            Drop::BadEncoding => &mut self.bad_encoding,
            Drop::Truncated => &mut self.truncated,
            Drop::BadCrc => &mut self.bad_crc,
            Drop::BadChannel => &mut self.bad_channel,
            Drop::Replayed => &mut self.replayed,
        };
        *c += 1;
    }

    /// All drops.
    pub fn total(&self) -> u64 {
        self.oversized
            + self.bad_encoding
            + self.truncated
            + self.bad_crc
            + self.bad_channel
            + self.replayed
    }
}

/// A streaming frame decoder with a fixed buffer: push bytes, get frames.
pub struct Decoder {
    buf: [u8; MAX_WIRE],
    len: usize,
    overflowed: bool,
    /// Range of the payload of the last sound frame in `buf`.
    last: Option<(usize, usize)>,
    /// Frames dropped so far.
    pub drops: DropCounts,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            buf: [0; MAX_WIRE],
            len: 0,
            overflowed: false,
            last: None,
            drops: DropCounts::default(),
        }
    }
}

impl Decoder {
    /// Feeds one byte. At a frame's end (0x00) returns the frame if it is sound; a dropped frame
    /// is counted and gives `Some(Err(reason))`. Bytes inside a frame give `None`.
    pub fn push(&mut self, byte: u8) -> Option<Result<Frame<'_>, Drop>> {
        if byte != 0 {
            self.last = None;
            if self.len < self.buf.len() {
                self.buf[self.len] = byte;
                self.len += 1;
            } else {
                self.overflowed = true;
            }
            return None;
        }
        let len = core::mem::replace(&mut self.len, 0);
        if core::mem::replace(&mut self.overflowed, false) {
            self.drops.count(Drop::Oversized);
            return Some(Err(Drop::Oversized));
        }
        if len == 0 {
            return None; // back-to-back delimiters: idle line or resync, not a frame
        }
        let r = Self::parse(&mut self.buf[..len]);
        match &r {
            Ok(f) => self.last = Some((HEADER_LEN, HEADER_LEN + f.payload.len())),
            Err(d) => self.drops.count(*d),
        }
        Some(r)
    }

    /// The payload of the frame the last `push` returned, until the next byte arrives.
    pub fn last_payload(&self) -> Option<&[u8]> {
        self.last.map(|(a, b)| &self.buf[a..b])
    }

    fn parse(wire: &mut [u8]) -> Result<Frame<'_>, Drop> {
        let n = cobs_decode_in_place(wire).ok_or(Drop::BadEncoding)?;
        let raw = &wire[..n];
        if n < HEADER_LEN + 4 {
            return Err(Drop::Truncated);
        }
        let len = u16::from_le_bytes([raw[5], raw[6]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(Drop::Oversized);
        }
        if n != HEADER_LEN + len + 4 {
            return Err(Drop::Truncated);
        }
        let body = HEADER_LEN + len;
        let crc = u32::from_le_bytes([raw[body], raw[body + 1], raw[body + 2], raw[body + 3]]);
        if crc != crate::crc32(&raw[..body]) {
            return Err(Drop::BadCrc);
        }
        let channel = Channel::from_u8(raw[0]).ok_or(Drop::BadChannel)?;
        let seq = u32::from_le_bytes([raw[1], raw[2], raw[3], raw[4]]);
        Ok(Frame {
            channel,
            seq,
            payload: &wire[HEADER_LEN..body],
        })
    }
}

/// One direction's replay guard: accepts only sequence numbers above the last accepted one.
/// Losses (gaps) are allowed, since a corrupted frame is dropped; going back is not.
#[derive(Clone, Copy, Debug, Default)]
pub struct Session {
    last: Option<u32>,
    /// Frames refused as replays.
    pub replayed: u64,
}

impl Session {
    /// Accepts `seq` if it is new.
    pub fn accept(&mut self, seq: u32) -> Result<(), Drop> {
        match self.last {
            Some(last) if seq <= last => {
                self.replayed += 1;
                Err(Drop::Replayed)
            }
            _ => {
                self.last = Some(seq);
                Ok(())
            }
        }
    }
}

/// The link protocol version spoken in the hello. 2: the target description
/// (`gdb::TARGET_XML`) gives `cr0`, `cr4` and `efer` flag types.
pub const LINK_VERSION: u16 = 2;

pub mod bulk;
pub mod checkpoint;
pub mod net;

/// Authentication: the bridge proves it holds the key the agent was loaded with. The hv sends
/// a 32-byte challenge; the bridge answers HMAC-SHA256(key, "qs-link-v1" | challenge).
pub mod auth {
    use hmac::{KeyInit, Mac};

    type HmacSha256 = hmac::Hmac<sha2::Sha256>;

    /// Bytes in a challenge and in a response.
    pub const LEN: usize = 32;
    const CONTEXT: &[u8] = b"qs-link-v1";

    /// The response to `challenge` with `key`.
    pub fn respond(key: &[u8], challenge: &[u8; LEN]) -> [u8; LEN] {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
        mac.update(CONTEXT);
        mac.update(challenge);
        mac.finalize().into_bytes().into()
    }

    /// Checks a response in constant time.
    pub fn verify(key: &[u8], challenge: &[u8; LEN], response: &[u8]) -> bool {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
        mac.update(CONTEXT);
        mac.update(challenge);
        mac.verify_slice(response).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn wire(channel: Channel, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; MAX_WIRE];
        let n = encode(channel, seq, payload, &mut out).unwrap();
        out.truncate(n);
        out
    }

    fn decode_all(bytes: &[u8]) -> (Vec<(Channel, u32, Vec<u8>)>, DropCounts) {
        let mut d = Decoder::default();
        let mut frames = Vec::new();
        for &b in bytes {
            if let Some(Ok(f)) = d.push(b) {
                frames.push((f.channel, f.seq, f.payload.to_vec()));
            }
        }
        (frames, d.drops)
    }

    #[test]
    fn a_frame_round_trips_and_has_one_zero() {
        let w = wire(Channel::Gdb, 7, b"$g#67\0x");
        assert_eq!(w.iter().filter(|&&b| b == 0).count(), 1);
        assert_eq!(*w.last().unwrap(), 0);
        let (frames, drops) = decode_all(&w);
        assert_eq!(frames, vec![(Channel::Gdb, 7, b"$g#67\0x".to_vec())]);
        assert_eq!(drops.total(), 0);
    }

    #[test]
    fn each_bad_input_is_dropped_for_its_reason() {
        let good = wire(Channel::Control, 1, b"hello");
        let mut flipped = good.clone();
        flipped[4] ^= 0x10;
        let (f, d) = decode_all(&flipped);
        assert!(f.is_empty());
        assert_eq!(d.total(), 1);

        let truncated = [&good[..good.len() - 4], &[0u8][..]].concat();
        let (f, d) = decode_all(&truncated);
        assert!(f.is_empty() && d.total() == 1);

        let garbage = vec![0x55u8; MAX_WIRE + 10];
        let (f, d) = decode_all(&[&garbage[..], &[0], &good[..]].concat());
        assert_eq!(d.oversized, 1);
        assert_eq!(f.len(), 1, "the link resynchronizes at the next delimiter");

        assert_eq!(
            encode(Channel::Bulk, 0, &[1; MAX_PAYLOAD + 1], &mut [0; MAX_WIRE]),
            Err(EncodeError::PayloadTooLarge {
                len: MAX_PAYLOAD + 1
            })
        );
    }

    #[test]
    fn replays_are_refused_gaps_are_not() {
        let mut s = Session::default();
        assert_eq!(s.accept(1), Ok(()));
        assert_eq!(s.accept(5), Ok(()));
        assert_eq!(s.accept(5), Err(Drop::Replayed));
        assert_eq!(s.accept(2), Err(Drop::Replayed));
        assert_eq!(s.replayed, 2);
    }

    #[test]
    fn auth_accepts_the_key_and_refuses_any_other() {
        let challenge = [7u8; auth::LEN];
        let r = auth::respond(b"demo key", &challenge);
        assert!(auth::verify(b"demo key", &challenge, &r));
        assert!(!auth::verify(b"wrong key", &challenge, &r));
        assert!(!auth::verify(b"demo key", &[8u8; auth::LEN], &r));
        assert!(!auth::verify(b"demo key", &challenge, &r[..31]));
    }

    proptest! {
        /// Any payload on any channel round-trips, with noise before it.
        #[test]
        fn frames_round_trip(ch in 0u8..4, seq: u32, payload in proptest::collection::vec(any::<u8>(), 0..MAX_PAYLOAD),
                             noise in proptest::collection::vec(1u8..=255, 0..40)) {
            let ch = Channel::from_u8(ch).unwrap();
            let bytes = [&noise[..], &[0], &wire(ch, seq, &payload)[..]].concat();
            let (frames, _) = decode_all(&bytes);
            prop_assert_eq!(frames.last().cloned(), Some((ch, seq, payload)));
        }

        /// The decoder never panics and never accepts a frame whose bytes were flipped
        /// (CRC-32 catches every error of up to 3 bits in frames this short).
        #[test]
        fn flipped_bits_never_pass(payload in proptest::collection::vec(any::<u8>(), 0..64),
                                   flips in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..4)) {
            let mut w = wire(Channel::Gdb, 3, &payload);
            let body = w.len() - 1;
            for (at, bit) in flips {
                let i = at.index(body);
                w[i] ^= 1 << bit;
            }
            let (frames, _) = decode_all(&w);
            for f in frames {
                // A flip pair can cancel out on the same bit: then the frame is the original.
                prop_assert_eq!(f, (Channel::Gdb, 3, payload.clone()));
            }
        }

        /// Arbitrary bytes: no panic, and every delimiter ends at most one frame.
        #[test]
        fn garbage_is_harmless(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let (frames, drops) = decode_all(&bytes);
            let zeros = bytes.iter().filter(|&&b| b == 0).count() as u64;
            prop_assert!(frames.len() as u64 + drops.total() <= zeros);
        }
    }
}

/// Messages on the `control` channel: one type byte, then fixed fields (little-endian).
pub mod control {
    use super::auth;

    /// Who speaks a hello.
    #[repr(u8)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Role {
        /// The production machine: the agent while dormant, the hv while active.
        Machine = 0,
        /// `qs-bridge` on the operator's side.
        Bridge = 1,
    }

    /// Why the machine refused the bridge.
    #[repr(u8)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Refusal {
        /// The response does not match: the bridge holds another key.
        WrongKey = 1,
        /// The machine has no key configured: it serves nobody.
        NoKey = 2,
        /// Another link version.
        Version = 3,
        /// A message other than the one expected at this point.
        Protocol = 4,
    }

    impl Refusal {
        fn from_u8(v: u8) -> Option<Refusal> {
            Some(match v {
                1 => Refusal::WrongKey,
                2 => Refusal::NoKey,
                3 => Refusal::Version,
                4 => Refusal::Protocol,
                _ => return None,
            })
        }

        /// What it means and what to do.
        pub fn message(self) -> &'static str {
            match self {
                Refusal::WrongKey => "the machine refused our key: give qs-bridge the key the agent was loaded with (--key FILE)",
                Refusal::NoKey => "the machine has no link key configured: load the agent with key=... to serve the link",
                Refusal::Version => "the machine speaks another link version: use a qs-bridge from the same release",
                Refusal::Protocol => "the machine saw an unexpected message: restart qs-bridge",
            }
        }
    }

    /// A control message.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Message {
        /// First message of each side.
        Hello { version: u16, role: Role },
        /// Machine to bridge: prove you hold the key.
        Challenge { nonce: [u8; auth::LEN] },
        /// Bridge to machine: HMAC of the challenge.
        Response { mac: [u8; auth::LEN] },
        /// Machine to bridge: authenticated; everything is served from now on.
        AuthOk,
        /// Machine to bridge: refused, and why; nothing is served.
        Refused(Refusal),
        /// Bridge to machine: activate the hv and stop every CPU for the debugger.
        Attention,
        /// Machine to bridge: every CPU is stopped and the debugger serves the gdb channel
        /// (sent once per attention; gdb's bytes sent before it would be lost).
        Stopped { cpus: u32 },
        /// Machine to bridge: the debugger session is over and every CPU runs again.
        Ended(End),
        /// Bridge to machine: are you there? (The fast link's liveness; on the serial link it
        /// also tells the machine that the bridge speaks there again.)
        Ping { n: u32 },
        /// Machine to bridge: the answer to the `Ping` numbered `n`.
        Pong { n: u32 },
    }

    /// How a debugger session ended.
    #[repr(u8)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum End {
        /// gdb detached: the kernel runs natively again (or stays under an active hv if the
        /// `monitor devirt stay` policy was chosen).
        Detached = 1,
        /// gdb asked to kill: the machine is never killed; this is a detach.
        Killed = 2,
    }

    /// A payload that is not a control message.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct BadMessage;

    impl Message {
        /// Encodes into `out`; returns the length (at most 1 + 32 bytes).
        pub fn encode(&self, out: &mut [u8; 33]) -> usize {
            match *self {
                Message::Hello { version, role } => {
                    out[0] = 1;
                    out[1..3].copy_from_slice(&version.to_le_bytes());
                    out[3] = role as u8;
                    4
                }
                Message::Challenge { nonce } => {
                    out[0] = 2;
                    out[1..33].copy_from_slice(&nonce);
                    33
                }
                Message::Response { mac } => {
                    out[0] = 3;
                    out[1..33].copy_from_slice(&mac);
                    33
                }
                Message::AuthOk => {
                    out[0] = 4;
                    1
                }
                Message::Refused(r) => {
                    out[0] = 5;
                    out[1] = r as u8;
                    2
                }
                Message::Attention => {
                    out[0] = 6;
                    1
                }
                Message::Stopped { cpus } => {
                    out[0] = 7;
                    out[1..5].copy_from_slice(&cpus.to_le_bytes());
                    5
                }
                Message::Ended(e) => {
                    out[0] = 8;
                    out[1] = e as u8;
                    2
                }
                Message::Ping { n } => {
                    out[0] = 9;
                    out[1..5].copy_from_slice(&n.to_le_bytes());
                    5
                }
                Message::Pong { n } => {
                    out[0] = 10;
                    out[1..5].copy_from_slice(&n.to_le_bytes());
                    5
                }
            }
        }

        /// Decodes a payload; any length or value out of place is an error.
        pub fn decode(p: &[u8]) -> Result<Message, BadMessage> {
            let arr = |p: &[u8]| -> Result<[u8; auth::LEN], BadMessage> {
                p.get(1..).and_then(|s| s.try_into().ok()).ok_or(BadMessage)
            };
            match (p.first(), p.len()) {
                (Some(1), 4) => Ok(Message::Hello {
                    version: u16::from_le_bytes([p[1], p[2]]),
                    role: match p[3] {
                        0 => Role::Machine,
                        1 => Role::Bridge,
                        _ => return Err(BadMessage),
                    },
                }),
                (Some(2), 33) => Ok(Message::Challenge { nonce: arr(p)? }),
                (Some(3), 33) => Ok(Message::Response { mac: arr(p)? }),
                (Some(4), 1) => Ok(Message::AuthOk),
                (Some(5), 2) => Refusal::from_u8(p[1])
                    .map(Message::Refused)
                    .ok_or(BadMessage),
                (Some(6), 1) => Ok(Message::Attention),
                (Some(7), 5) => Ok(Message::Stopped {
                    cpus: u32::from_le_bytes([p[1], p[2], p[3], p[4]]),
                }),
                (Some(8), 2) => match p[1] {
                    1 => Ok(Message::Ended(End::Detached)),
                    2 => Ok(Message::Ended(End::Killed)),
                    _ => Err(BadMessage),
                },
                (Some(9), 5) => Ok(Message::Ping {
                    n: u32::from_le_bytes([p[1], p[2], p[3], p[4]]),
                }),
                (Some(10), 5) => Ok(Message::Pong {
                    n: u32::from_le_bytes([p[1], p[2], p[3], p[4]]),
                }),
                _ => Err(BadMessage),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn every_message_round_trips_and_wrong_lengths_do_not() {
            let all = [
                Message::Hello {
                    version: 1,
                    role: Role::Bridge,
                },
                Message::Challenge { nonce: [9; 32] },
                Message::Response { mac: [3; 32] },
                Message::AuthOk,
                Message::Refused(Refusal::WrongKey),
                Message::Attention,
                Message::Stopped { cpus: 4 },
                Message::Ended(End::Killed),
                Message::Ping { n: 0xdead_beef },
                Message::Pong { n: 7 },
            ];
            for m in all {
                let mut buf = [0u8; 33];
                let n = m.encode(&mut buf);
                assert_eq!(Message::decode(&buf[..n]), Ok(m));
                assert_eq!(
                    Message::decode(&buf[..n - 1]),
                    Err(BadMessage),
                    "{m:?} truncated"
                );
                let mut longer = buf[..n].to_vec();
                longer.push(0);
                assert_eq!(Message::decode(&longer), Err(BadMessage), "{m:?} padded");
            }
            assert_eq!(Message::decode(&[]), Err(BadMessage));
            assert_eq!(Message::decode(&[5, 99]), Err(BadMessage));
        }
    }
}

/// The machine's end of the link, without I/O: the agent feeds it received bytes while the hv
/// is dormant, the hv while it is active. It answers the handshake and reports what an
/// authenticated bridge asks for; before authentication it serves nothing but the handshake.
///
/// The handshake and the decision what a payload means ([`Handshake`]) are shared with the
/// fast link's endpoint (`net::NetEndpoint`): each endpoint only adds its own framing and
/// replay guard around it, so that both links serve exactly the same requests.
pub mod endpoint {
    use super::control::{Message, Refusal, Role};
    use super::{auth, encode, Channel, Decoder, Session, LINK_VERSION, MAX_WIRE};

    /// Longest key accepted.
    pub const MAX_KEY: usize = 64;

    /// Where the handshake stands.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum State {
        /// Waiting for a bridge's hello.
        Idle,
        /// Challenge sent; waiting for the response.
        Challenged,
        /// The bridge proved the key.
        Authenticated,
    }

    /// What an authenticated bridge asked for.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Event<'a> {
        /// Activate and stop every CPU for the debugger.
        Attention,
        /// Bytes of GDB's remote protocol.
        Gdb(&'a [u8]),
        /// A control message other than the handshake and attention. A `Ping` has been
        /// answered (`Pong`) already; it comes out so that the machine knows the bridge speaks
        /// on this link.
        Control(Message),
        /// A checkpoint request (take, list, roll back, delete).
        Checkpoint(super::checkpoint::Request),
        /// Bulk data (checkpoint export, later).
        Bulk(&'a [u8]),
    }

    /// Counters for `qsctl stats` and the tests.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Counters {
        /// Responses that did not match the key.
        pub wrong_key: u64,
        /// Requests from a bridge that had not authenticated, ignored.
        pub unauthenticated: u64,
    }

    /// The control messages an endpoint sends back for one payload, in order (at most two:
    /// the machine's hello and its challenge).
    #[derive(Clone, Copy, Debug, Default)]
    pub(crate) struct Replies([Option<Message>; 2]);

    impl Replies {
        fn one(m: Message) -> Replies {
            Replies([Some(m), None])
        }

        pub(crate) fn iter(&self) -> impl Iterator<Item = Message> + '_ {
            self.0.iter().flatten().copied()
        }
    }

    /// The handshake's state and the key, and what a payload that got through an endpoint's
    /// framing means: the part both links share.
    pub(crate) struct Handshake {
        key: [u8; MAX_KEY],
        key_len: usize,
        pub(crate) state: State,
        /// The challenge of the handshake under way (or of the session it opened).
        pub(crate) nonce: [u8; auth::LEN],
    }

    impl Handshake {
        /// Keys longer than [`MAX_KEY`] are cut.
        pub(crate) fn new(key: &[u8]) -> Handshake {
            let key_len = key.len().min(MAX_KEY);
            let mut k = [0u8; MAX_KEY];
            k[..key_len].copy_from_slice(&key[..key_len]);
            Handshake {
                key: k,
                key_len,
                state: State::Idle,
                nonce: [0; auth::LEN],
            }
        }

        pub(crate) fn key(&self) -> &[u8] {
            &self.key[..self.key_len]
        }

        /// The version in `payload` if it is a bridge's hello.
        pub(crate) fn bridge_hello(channel: Channel, payload: &[u8]) -> Option<u16> {
            match (channel, Message::decode(payload)) {
                (
                    Channel::Control,
                    Ok(Message::Hello {
                        version,
                        role: Role::Bridge,
                    }),
                ) => Some(version),
                _ => None,
            }
        }

        /// A bridge's hello: whatever session ran is over; a fresh challenge (or a refusal of
        /// the version) goes back.
        pub(crate) fn hello(
            &mut self,
            version: u16,
            nonce: &mut dyn FnMut() -> [u8; auth::LEN],
        ) -> Replies {
            self.state = State::Idle;
            if version != LINK_VERSION {
                return Replies::one(Message::Refused(Refusal::Version));
            }
            self.nonce = nonce();
            self.state = State::Challenged;
            Replies([
                Some(Message::Hello {
                    version: LINK_VERSION,
                    role: Role::Machine,
                }),
                Some(Message::Challenge { nonce: self.nonce }),
            ])
        }

        /// A payload other than a hello, sound and new on its link: the response to the
        /// challenge, or (once authenticated) a request. `Ping` is answered here.
        pub(crate) fn handle<'a>(
            &mut self,
            channel: Channel,
            payload: &'a [u8],
            counters: &mut Counters,
        ) -> (Option<Event<'a>>, Replies) {
            let control = match channel {
                Channel::Control => Message::decode(payload).ok(),
                _ => None,
            };
            match (self.state, control) {
                (State::Challenged, Some(Message::Response { mac })) => {
                    let reply = if self.key_len == 0 {
                        self.state = State::Idle;
                        Message::Refused(Refusal::NoKey)
                    } else if auth::verify(self.key(), &self.nonce, &mac) {
                        self.state = State::Authenticated;
                        Message::AuthOk
                    } else {
                        counters.wrong_key += 1;
                        self.state = State::Idle;
                        Message::Refused(Refusal::WrongKey)
                    };
                    (None, Replies::one(reply))
                }
                (State::Authenticated, Some(Message::Attention)) => {
                    (Some(Event::Attention), Replies::default())
                }
                (State::Authenticated, Some(Message::Ping { n })) => (
                    Some(Event::Control(Message::Ping { n })),
                    Replies::one(Message::Pong { n }),
                ),
                (State::Authenticated, Some(m)) => (Some(Event::Control(m)), Replies::default()),
                (State::Authenticated, None) => {
                    let ev = match channel {
                        Channel::Control => match super::checkpoint::Message::decode(payload) {
                            Ok(super::checkpoint::Message::Request(r)) => {
                                Some(Event::Checkpoint(r))
                            }
                            // Replies and events go the other way: a bridge does not send them.
                            _ => None,
                        },
                        Channel::Gdb => Some(Event::Gdb(payload)),
                        Channel::Bulk => Some(Event::Bulk(payload)),
                        Channel::Console => None,
                    };
                    (ev, Replies::default())
                }
                _ => {
                    counters.unauthenticated += 1;
                    (None, Replies::default())
                }
            }
        }
    }

    /// The machine's end.
    pub struct Endpoint {
        handshake: Handshake,
        decoder: Decoder,
        session: Session,
        tx_seq: u32,
        /// Counters.
        pub counters: Counters,
    }

    /// Frames `payload` on `channel` with the next sequence numbers, into `tx`.
    fn send_frames(tx_seq: &mut u32, channel: Channel, payload: &[u8], tx: &mut dyn FnMut(&[u8])) {
        let mut out = [0u8; MAX_WIRE];
        for chunk in payload.chunks(super::MAX_PAYLOAD) {
            if let Ok(n) = encode(channel, *tx_seq, chunk, &mut out) {
                *tx_seq = tx_seq.wrapping_add(1);
                tx(&out[..n]);
            }
        }
    }

    fn send_message(tx_seq: &mut u32, m: Message, tx: &mut dyn FnMut(&[u8])) {
        let mut b = [0u8; 33];
        let n = m.encode(&mut b);
        send_frames(tx_seq, Channel::Control, &b[..n], tx);
    }

    impl Endpoint {
        /// An endpoint that serves a bridge holding `key` (an empty key serves nobody). Keys
        /// longer than [`MAX_KEY`] are cut.
        pub fn new(key: &[u8]) -> Endpoint {
            Endpoint {
                handshake: Handshake::new(key),
                decoder: Decoder::default(),
                session: Session::default(),
                tx_seq: 1,
                counters: Counters::default(),
            }
        }

        /// Where the handshake stands.
        pub fn state(&self) -> State {
            self.handshake.state
        }

        /// Frames dropped by the decoder and the replay guard.
        pub fn drops(&self) -> super::DropCounts {
            let mut d = self.decoder.drops;
            d.replayed = self.session.replayed;
            d
        }

        /// Sends `payload` on `channel` through `tx`.
        pub fn send(&mut self, channel: Channel, payload: &[u8], tx: &mut dyn FnMut(&[u8])) {
            send_frames(&mut self.tx_seq, channel, payload, tx);
        }

        /// Sends a control message through `tx`.
        pub fn send_control(&mut self, m: Message, tx: &mut dyn FnMut(&[u8])) {
            send_message(&mut self.tx_seq, m, tx);
        }

        /// Sends a checkpoint message (a reply, a list entry, an event) through `tx`.
        pub fn send_checkpoint(
            &mut self,
            m: super::checkpoint::Message,
            tx: &mut dyn FnMut(&[u8]),
        ) {
            let mut b = [0u8; super::checkpoint::MAX_LEN];
            let n = m.encode(&mut b);
            self.send(Channel::Control, &b[..n], tx);
        }

        /// Feeds one received byte. Replies go out through `tx`; `nonce` gives a fresh random
        /// challenge when one is needed. Returns what an authenticated bridge asked for.
        pub fn push(
            &mut self,
            byte: u8,
            nonce: &mut dyn FnMut() -> [u8; auth::LEN],
            tx: &mut dyn FnMut(&[u8]),
        ) -> Option<Event<'_>> {
            let frame = match self.decoder.push(byte) {
                Some(Ok(f)) => f,
                _ => return None,
            };
            // A hello starts a new session: a restarted bridge counts its frames from 1 again.
            // Replaying a captured hello only forces a new handshake with a fresh challenge.
            if let Some(version) = Handshake::bridge_hello(frame.channel, frame.payload) {
                self.session = Session {
                    last: Some(frame.seq),
                    replayed: self.session.replayed,
                };
                for m in self.handshake.hello(version, nonce).iter() {
                    send_message(&mut self.tx_seq, m, tx);
                }
                return None;
            }
            if self.session.accept(frame.seq).is_err() {
                return None;
            }
            let (event, replies) =
                self.handshake
                    .handle(frame.channel, frame.payload, &mut self.counters);
            for m in replies.iter() {
                send_message(&mut self.tx_seq, m, tx);
            }
            event
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::link::control::Message;

        /// Bytes a bridge would send.
        struct Bridge {
            seq: u32,
        }
        impl Bridge {
            fn frame(&mut self, channel: Channel, payload: &[u8]) -> Vec<u8> {
                let mut out = vec![0u8; MAX_WIRE];
                let n = encode(channel, self.seq, payload, &mut out).unwrap();
                self.seq += 1;
                out.truncate(n);
                out
            }
            fn control(&mut self, m: Message) -> Vec<u8> {
                let mut b = [0u8; 33];
                let n = m.encode(&mut b);
                self.frame(Channel::Control, &b[..n])
            }
        }

        /// Feeds bytes; returns the events (as owned) and the control messages sent back.
        fn feed(e: &mut Endpoint, bytes: &[u8]) -> (Vec<String>, Vec<Message>) {
            let mut sent = Vec::new();
            let mut events = Vec::new();
            for &b in bytes {
                let mut tx = |w: &[u8]| sent.extend_from_slice(w);
                let mut nonce = || [0x42; auth::LEN];
                if let Some(ev) = e.push(b, &mut nonce, &mut tx) {
                    events.push(format!("{ev:?}"));
                }
            }
            let mut d = Decoder::default();
            let replies = sent
                .iter()
                .filter_map(|&b| match d.push(b) {
                    Some(Ok(f)) => Message::decode(f.payload).ok(),
                    _ => None,
                })
                .collect();
            (events, replies)
        }

        #[test]
        fn the_key_opens_the_link_and_nothing_else_does() {
            let mut e = Endpoint::new(b"k3y");
            let mut b = Bridge { seq: 1 };
            // Before the handshake, requests are ignored.
            let (ev, _) = feed(&mut e, &b.control(Message::Attention));
            assert!(ev.is_empty());
            let mut cb = [0u8; super::super::checkpoint::MAX_LEN];
            let n = super::super::checkpoint::Message::Request(super::super::checkpoint::Request {
                tag: 1,
                op: super::super::checkpoint::Op::Take,
            })
            .encode(&mut cb);
            let (ev, _) = feed(&mut e, &b.frame(Channel::Control, &cb[..n]));
            assert!(
                ev.is_empty(),
                "no checkpoint for a bridge that did not prove the key"
            );
            let (_, replies) = feed(
                &mut e,
                &b.control(Message::Hello {
                    version: LINK_VERSION,
                    role: Role::Bridge,
                }),
            );
            let nonce = match replies.as_slice() {
                [Message::Hello {
                    role: Role::Machine,
                    ..
                }, Message::Challenge { nonce }] => *nonce,
                other => panic!("{other:?}"),
            };
            let (_, r) = feed(
                &mut e,
                &b.control(Message::Response {
                    mac: auth::respond(b"wrong", &nonce),
                }),
            );
            assert_eq!(r, vec![Message::Refused(Refusal::WrongKey)]);
            assert_eq!(e.state(), State::Idle);
            let (ev, _) = feed(&mut e, &b.frame(Channel::Gdb, b"$g#67"));
            assert!(ev.is_empty(), "nothing is served after a wrong key");

            feed(
                &mut e,
                &b.control(Message::Hello {
                    version: LINK_VERSION,
                    role: Role::Bridge,
                }),
            );
            let (_, r) = feed(
                &mut e,
                &b.control(Message::Response {
                    mac: auth::respond(b"k3y", &nonce),
                }),
            );
            assert_eq!(r, vec![Message::AuthOk]);
            let (ev, _) = feed(&mut e, &b.control(Message::Attention));
            assert_eq!(ev, vec!["Attention"]);
            let (ev, _) = feed(&mut e, &b.frame(Channel::Gdb, b"$g#67"));
            assert_eq!(ev, vec![format!("{:?}", Event::Gdb(b"$g#67"))]);
            let req = super::super::checkpoint::Request {
                tag: 5,
                op: super::super::checkpoint::Op::Rollback { id: 2 },
            };
            let mut cb = [0u8; super::super::checkpoint::MAX_LEN];
            let n = super::super::checkpoint::Message::Request(req).encode(&mut cb);
            let (ev, _) = feed(&mut e, &b.frame(Channel::Control, &cb[..n]));
            assert_eq!(ev, vec![format!("{:?}", Event::Checkpoint(req))]);
            // A reply coming from the bridge's side is nothing the machine acts on.
            let n = super::super::checkpoint::Message::Done(Default::default()).encode(&mut cb);
            let (ev, _) = feed(&mut e, &b.frame(Channel::Control, &cb[..n]));
            assert!(ev.is_empty());
            assert_eq!(e.counters.wrong_key, 1);
            assert!(e.counters.unauthenticated >= 2);
        }

        #[test]
        fn replays_and_an_empty_key_are_refused() {
            let mut e = Endpoint::new(b"");
            let mut b = Bridge { seq: 1 };
            let (_, r) = feed(
                &mut e,
                &b.control(Message::Hello {
                    version: LINK_VERSION,
                    role: Role::Bridge,
                }),
            );
            let Message::Challenge { nonce } = r[1] else {
                panic!("{r:?}")
            };
            let (_, r) = feed(
                &mut e,
                &b.control(Message::Response {
                    mac: auth::respond(b"", &nonce),
                }),
            );
            assert_eq!(r, vec![Message::Refused(Refusal::NoKey)]);

            let mut e = Endpoint::new(b"k");
            let mut b = Bridge { seq: 10 };
            feed(
                &mut e,
                &b.control(Message::Hello {
                    version: LINK_VERSION,
                    role: Role::Bridge,
                }),
            );
            feed(
                &mut e,
                &b.control(Message::Response {
                    mac: auth::respond(b"k", &[0x42; 32]),
                }),
            );
            assert_eq!(e.state(), State::Authenticated);
            let old = Bridge { seq: 5 }.frame(Channel::Gdb, b"replayed");
            let (ev, _) = feed(&mut e, &old);
            assert!(ev.is_empty());
            assert_eq!(e.drops().replayed, 1);
        }
    }
}
