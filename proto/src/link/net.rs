//! The fast link: Quicksilver datagrams in UDP/IPv4 in Ethernet II, between the hv's own NIC
//! and `qs-bridge`, beside the serial link (which stays for attention, the console and as the
//! fallback). Wire format v2.
//!
//! ```text
//! Ethernet II  dst[6] src[6] ethertype u16 BE            (no VLAN, no FCS; at most 1514 bytes)
//! IPv4         IHL 5, DF, TTL 64, protocol 17, header checksum (RFC 791)
//! UDP          ports, length, checksum 0 (legal on IPv4, RFC 768: the datagram has its own MAC)
//! datagram     "QSN" | version u8 = 2 | channel u8 | flags u8 (bit 0: tagged) | reserved u16 = 0
//!              | session u64 LE | seq u64 LE | payload | tag[16] if tagged
//! ```
//!
//! The tag is ChaCha20-Poly1305's (RFC 8439) over every datagram byte before it as associated
//! data, with no plaintext, under its sender's session key and the nonce 0u32 | seq LE: a
//! one-time Poly1305 key per datagram. (v1 used HMAC-SHA256, whose software SHA-256 cost the
//! hv 20 of the 51-72 µs it spent on each full datagram under TCG; Poly1305 costs a fraction
//! per byte.) Each direction has its own key, so that the two sides' sequence numbers, both
//! from 1, never meet under one key; a datagram sent again must be sent byte for byte, or
//! the one-time key would serve two messages. Why UDP/IPv4 rather than a raw
//! EtherType: an ordinary unprivileged socket on the operator's side, routable, one format for
//! QEMU and real machines (research note fast-link.md section 3.2, KDNET's choice).
//!
//! The handshake is the serial link's ([`super::control`], [`super::auth`]), untagged:
//! the bridge's hello (session 0), the machine's hello and challenge, the bridge's response.
//! The machine answers `AuthOk` tagged: from then on, in both directions, every datagram is
//! tagged with its sender's session key, HMAC-SHA256(key, "qs-net-v2 machine" | challenge) or
//! HMAC-SHA256(key, "qs-net-v2 bridge" | challenge), carries the session
//! id (the challenge's first 8 bytes, LE) and a sequence number above the last one accepted
//! in its direction (each side starts at 1). The machine sends only to the MAC, IP and port
//! whose response verified. Everything else is dropped and counted by reason
//! ([`NetCounters`]), never acted on.
//!
//! The gdb and bulk channels are byte streams, as on the serial link: one `send` is cut into
//! as many datagrams as it takes (gdb's packets reach 128 KiB); control messages fit one.
//! Nothing is sent again: a lost datagram is a gap, as a corrupted frame is on the serial
//! link. The bulk end's CRC notices; a gap in gdb's stream breaks the hv's stub (gdb runs
//! without acks once it asked `QStartNoAckMode`), which ends the session and says so on
//! the console, and the bridge tells the user to connect again.

use super::control::Message;
use super::endpoint::{Counters as HandshakeCounters, Event, Handshake, State};
use super::{auth, checkpoint, Channel};
use chacha20poly1305::{AeadInOut, ChaCha20Poly1305};
use hmac::{KeyInit, Mac};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Writes one frame into the buffer it is given and returns the frame's length
/// ([`NetEndpoint::send_in_place`]).
pub type Build<'a> = dyn FnMut(&mut [u8; MAX_FRAME]) -> usize + 'a;

/// Bytes of an Ethernet II header.
pub const ETH_HEADER: usize = 14;
/// Largest Ethernet frame (1500-byte MTU, no FCS).
pub const MAX_FRAME: usize = 1514;
/// Smallest Ethernet frame without FCS: shorter ones are padded.
pub const MIN_FRAME: usize = 60;
/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Bytes of an IPv4 header without options.
pub const IPV4_HEADER: usize = 20;
/// Bytes of a UDP header.
pub const UDP_HEADER: usize = 8;
/// Largest UDP payload in a [`MAX_FRAME`] frame.
pub const MAX_DATAGRAM: usize = MAX_FRAME - ETH_HEADER - IPV4_HEADER - UDP_HEADER;
/// Bytes of a datagram's header.
pub const HEADER_LEN: usize = 24;
/// Bytes of a datagram's tag.
pub const TAG_LEN: usize = 16;
/// Largest payload one datagram carries.
pub const MAX_PAYLOAD: usize = MAX_DATAGRAM - HEADER_LEN - TAG_LEN;
/// A datagram's first bytes.
pub const MAGIC: [u8; 3] = *b"QSN";
/// The wire format's version.
pub const VERSION: u8 = 2;
/// The broadcast MAC address.
pub const BROADCAST: [u8; 6] = [0xff; 6];

const TAGGED: u8 = 1;
const SESSION_CONTEXT: &[u8] = b"qs-net-v2 ";
const ARP_LEN: usize = 28;
const IP_DF: u16 = 0x4000;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
const TTL: u8 = 64;
const PROTO_UDP: u8 = 17;

/// Why a received frame or datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// Not an Ethernet II frame with IPv4 (IHL 5, sound checksum) and UDP, or a sound ARP
    /// packet; or a datagram with an unknown channel, flag or reserved bits set.
    Malformed,
    /// An IPv4 fragment (more-fragments set or an offset): never reassembled.
    Fragmented,
    /// Longer than [`MAX_FRAME`] (or a datagram longer than [`MAX_DATAGRAM`]).
    Oversized,
    /// For another MAC, IP address or UDP port.
    NotForUs,
    /// Not "QSN" or another version.
    BadMagic,
    /// Untagged outside the handshake, or tagged while no session runs.
    Unauthenticated,
    /// The tag does not match the session key: forged, corrupted, or another key.
    BadTag,
    /// Another session's id (an old session's datagram, or a bridge that did not say hello).
    WrongSession,
    /// A sequence number not above the last one accepted.
    Replayed,
    /// From another MAC, IP address or port than the authenticated bridge's.
    Spoofed,
}

/// Counts by reason, and what got through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub malformed: u64,
    pub fragmented: u64,
    pub oversized: u64,
    pub not_for_us: u64,
    pub bad_magic: u64,
    pub unauthenticated: u64,
    pub bad_tag: u64,
    pub wrong_session: u64,
    pub replayed: u64,
    pub spoofed: u64,
    /// Responses that did not match the key.
    pub wrong_key: u64,
    /// Datagrams accepted (handshake included).
    pub accepted: u64,
    /// Datagrams sent.
    pub sent: u64,
    /// ARP requests answered.
    pub arp_answered: u64,
}

impl NetCounters {
    /// Counts a drop.
    pub fn count(&mut self, d: Drop) {
        let c = match d {
            Drop::Malformed => &mut self.malformed,
            Drop::Fragmented => &mut self.fragmented,
            Drop::Oversized => &mut self.oversized,
            Drop::NotForUs => &mut self.not_for_us,
            Drop::BadMagic => &mut self.bad_magic,
            Drop::Unauthenticated => &mut self.unauthenticated,
            Drop::BadTag => &mut self.bad_tag,
            Drop::WrongSession => &mut self.wrong_session,
            Drop::Replayed => &mut self.replayed,
            Drop::Spoofed => &mut self.spoofed,
        };
        *c += 1;
    }

    /// All drops.
    pub fn dropped(&self) -> u64 {
        self.malformed
            + self.fragmented
            + self.oversized
            + self.not_for_us
            + self.bad_magic
            + self.unauthenticated
            + self.bad_tag
            + self.wrong_session
            + self.replayed
            + self.spoofed
    }
}

/// One end of a UDP conversation: MAC, IPv4 address, port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Host {
    pub mac: [u8; 6],
    pub ip: [u8; 4],
    pub port: u16,
}

/// A UDP datagram found in an Ethernet frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Udp<'a> {
    pub src: Host,
    pub dst: Host,
    pub payload: &'a [u8],
}

/// An ARP packet (IPv4 over Ethernet, RFC 826).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    /// 1: request, 2: reply.
    pub op: u16,
    pub sender_mac: [u8; 6],
    pub sender_ip: [u8; 4],
    pub target_mac: [u8; 6],
    pub target_ip: [u8; 4],
}

/// What an Ethernet frame carries, as far as the link cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    Arp(Arp),
    Udp(Udp<'a>),
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn mac_at(b: &[u8], at: usize) -> [u8; 6] {
    let mut m = [0; 6];
    m.copy_from_slice(&b[at..at + 6]);
    m
}

fn ip_at(b: &[u8], at: usize) -> [u8; 4] {
    [b[at], b[at + 1], b[at + 2], b[at + 3]]
}

/// The Internet checksum (RFC 1071) of `b`: 0 over a header that carries a sound one.
pub fn ip_checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in b.chunks(2) {
        let hi = u32::from(pair[0]) << 8;
        sum += hi | pair.get(1).copied().map_or(0, u32::from);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Reads an Ethernet frame down to ARP or UDP. A frame for another MAC (not broadcast) is
/// [`Drop::NotForUs`] when `mac` is given; addresses above Ethernet are the caller's to check.
pub fn parse_frame(frame: &[u8], mac: Option<[u8; 6]>) -> Result<Packet<'_>, Drop> {
    if frame.len() > MAX_FRAME {
        return Err(Drop::Oversized);
    }
    if frame.len() < ETH_HEADER {
        return Err(Drop::Malformed);
    }
    let dst_mac = mac_at(frame, 0);
    let src_mac = mac_at(frame, 6);
    if mac.is_some_and(|m| m != dst_mac && dst_mac != BROADCAST) {
        return Err(Drop::NotForUs);
    }
    let body = &frame[ETH_HEADER..];
    match be16(frame, 12) {
        ETHERTYPE_ARP => parse_arp(body).map(Packet::Arp),
        ETHERTYPE_IPV4 => parse_ipv4_udp(body, src_mac, dst_mac).map(Packet::Udp),
        _ => Err(Drop::Malformed),
    }
}

fn parse_arp(b: &[u8]) -> Result<Arp, Drop> {
    // Hardware Ethernet (1), protocol IPv4, address lengths 6 and 4; padding may follow.
    if b.len() < ARP_LEN
        || be16(b, 0) != 1
        || be16(b, 2) != ETHERTYPE_IPV4
        || b[4] != 6
        || b[5] != 4
    {
        return Err(Drop::Malformed);
    }
    let op = be16(b, 6);
    if op != 1 && op != 2 {
        return Err(Drop::Malformed);
    }
    Ok(Arp {
        op,
        sender_mac: mac_at(b, 8),
        sender_ip: ip_at(b, 14),
        target_mac: mac_at(b, 18),
        target_ip: ip_at(b, 24),
    })
}

fn parse_ipv4_udp(b: &[u8], src_mac: [u8; 6], dst_mac: [u8; 6]) -> Result<Udp<'_>, Drop> {
    // Options (IHL above 5) are dropped: nothing on this link sends them.
    if b.len() < IPV4_HEADER || b[0] != 0x45 {
        return Err(Drop::Malformed);
    }
    let total = usize::from(be16(b, 2));
    if total < IPV4_HEADER || total > b.len() || ip_checksum(&b[..IPV4_HEADER]) != 0 {
        return Err(Drop::Malformed);
    }
    let frag = be16(b, 6);
    if frag & (IP_MF | IP_OFFSET) != 0 {
        return Err(Drop::Fragmented);
    }
    if b[9] != PROTO_UDP {
        return Err(Drop::Malformed);
    }
    let udp = &b[IPV4_HEADER..total];
    if udp.len() < UDP_HEADER {
        return Err(Drop::Malformed);
    }
    let len = usize::from(be16(udp, 4));
    if len < UDP_HEADER || len > udp.len() {
        return Err(Drop::Malformed);
    }
    Ok(Udp {
        src: Host {
            mac: src_mac,
            ip: ip_at(b, 12),
            port: be16(udp, 0),
        },
        dst: Host {
            mac: dst_mac,
            ip: ip_at(b, 16),
            port: be16(udp, 2),
        },
        payload: &udp[UDP_HEADER..len],
    })
}

fn eth_header(out: &mut [u8], dst: [u8; 6], src: [u8; 6], ethertype: u16) {
    out[0..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&src);
    out[12..14].copy_from_slice(&ethertype.to_be_bytes());
}

/// Writes the Ethernet, IPv4 and UDP headers for a `len`-byte UDP payload that the caller
/// has put (or will put) at `out[UDP_PAYLOAD..]`; returns the frame's length. `len` is at
/// most [`MAX_DATAGRAM`].
fn udp_headers(out: &mut [u8; MAX_FRAME], src: Host, dst: Host, ip_id: u16, len: usize) -> usize {
    let len = len.min(MAX_DATAGRAM);
    eth_header(out, dst.mac, src.mac, ETHERTYPE_IPV4);
    let ip = &mut out[ETH_HEADER..ETH_HEADER + IPV4_HEADER];
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2..4].copy_from_slice(&((IPV4_HEADER + UDP_HEADER + len) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&ip_id.to_be_bytes());
    ip[6..8].copy_from_slice(&IP_DF.to_be_bytes());
    ip[8] = TTL;
    ip[9] = PROTO_UDP;
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[12..16].copy_from_slice(&src.ip);
    ip[16..20].copy_from_slice(&dst.ip);
    let sum = ip_checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let udp = &mut out[ETH_HEADER + IPV4_HEADER..UDP_PAYLOAD];
    udp[0..2].copy_from_slice(&src.port.to_be_bytes());
    udp[2..4].copy_from_slice(&dst.port.to_be_bytes());
    udp[4..6].copy_from_slice(&((UDP_HEADER + len) as u16).to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);
    UDP_PAYLOAD + len
}

/// Where a frame's UDP payload starts.
pub const UDP_PAYLOAD: usize = ETH_HEADER + IPV4_HEADER + UDP_HEADER;

/// Builds a whole frame carrying `payload` (at most [`MAX_DATAGRAM`] bytes, cut otherwise)
/// from `src` to `dst`; returns its length.
pub fn build_udp(
    out: &mut [u8; MAX_FRAME],
    src: Host,
    dst: Host,
    ip_id: u16,
    payload: &[u8],
) -> usize {
    let n = payload.len().min(MAX_DATAGRAM);
    out[UDP_PAYLOAD..UDP_PAYLOAD + n].copy_from_slice(&payload[..n]);
    udp_headers(out, src, dst, ip_id, n)
}

/// Builds an ARP frame (padded to [`MIN_FRAME`]); returns its length. A request goes to
/// the broadcast address, a reply to its target.
pub fn build_arp(out: &mut [u8; MAX_FRAME], a: &Arp) -> usize {
    let dst = if a.op == 1 { BROADCAST } else { a.target_mac };
    eth_header(out, dst, a.sender_mac, ETHERTYPE_ARP);
    let b = &mut out[ETH_HEADER..ETH_HEADER + ARP_LEN];
    b[0..2].copy_from_slice(&1u16.to_be_bytes());
    b[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    b[4] = 6;
    b[5] = 4;
    b[6..8].copy_from_slice(&a.op.to_be_bytes());
    b[8..14].copy_from_slice(&a.sender_mac);
    b[14..18].copy_from_slice(&a.sender_ip);
    b[18..24].copy_from_slice(&a.target_mac);
    b[24..28].copy_from_slice(&a.target_ip);
    out[ETH_HEADER + ARP_LEN..MIN_FRAME].fill(0);
    MIN_FRAME
}

/// A datagram's header and payload, as read (its tag not yet checked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Datagram<'a> {
    pub channel: Channel,
    pub tagged: bool,
    pub session: u64,
    pub seq: u64,
    pub payload: &'a [u8],
    /// Every byte before the tag (what the tag covers).
    signed: &'a [u8],
    tag: &'a [u8],
}

impl<'a> Datagram<'a> {
    /// Reads a datagram (the UDP payload).
    pub fn parse(d: &'a [u8]) -> Result<Datagram<'a>, Drop> {
        if d.len() > MAX_DATAGRAM {
            return Err(Drop::Oversized);
        }
        if d.len() < 4 || d[..3] != MAGIC || d[3] != VERSION {
            return Err(Drop::BadMagic);
        }
        if d.len() < HEADER_LEN {
            return Err(Drop::Malformed);
        }
        let channel = Channel::from_u8(d[4]).ok_or(Drop::Malformed)?;
        let flags = d[5];
        if flags & !TAGGED != 0 || d[6] != 0 || d[7] != 0 {
            return Err(Drop::Malformed);
        }
        let tagged = flags & TAGGED != 0;
        let end = if tagged {
            d.len().checked_sub(TAG_LEN).filter(|&e| e >= HEADER_LEN)
        } else {
            Some(d.len())
        }
        .ok_or(Drop::Malformed)?;
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&d[at..at + 8]);
            u64::from_le_bytes(b)
        };
        Ok(Datagram {
            channel,
            tagged,
            session: u64_at(8),
            seq: u64_at(16),
            payload: &d[HEADER_LEN..end],
            signed: &d[..end],
            tag: &d[end..],
        })
    }

    /// Whether the tag is the one `from`'s key gives (constant time).
    pub fn verify(&self, key: &SessionKey, from: Sender) -> bool {
        self.tagged && key.verify(from, self.seq, self.signed, self.tag)
    }
}

/// Writes a datagram into `out`; returns its length. `key`: tag it with the session key of
/// the side sending it. `payload` is at most [`MAX_PAYLOAD`] (cut otherwise).
pub fn write_datagram(
    out: &mut [u8],
    channel: Channel,
    key: Option<(&SessionKey, Sender)>,
    session: u64,
    seq: u64,
    payload: &[u8],
) -> usize {
    let n = payload.len().min(MAX_PAYLOAD);
    out[..3].copy_from_slice(&MAGIC);
    out[3] = VERSION;
    out[4] = channel as u8;
    out[5] = if key.is_some() { TAGGED } else { 0 };
    out[6..8].copy_from_slice(&[0, 0]);
    out[8..16].copy_from_slice(&session.to_le_bytes());
    out[16..24].copy_from_slice(&seq.to_le_bytes());
    out[HEADER_LEN..HEADER_LEN + n].copy_from_slice(&payload[..n]);
    let end = HEADER_LEN + n;
    match key {
        Some((k, from)) => {
            let tag = k.tag(from, seq, &out[..end]);
            out[end..end + TAG_LEN].copy_from_slice(&tag);
            end + TAG_LEN
        }
        None => end,
    }
}

/// Which side sent a datagram: each has its own session key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    /// The hv.
    Machine,
    /// `qs-bridge`.
    Bridge,
}

impl Sender {
    fn context(self) -> &'static [u8] {
        match self {
            Sender::Machine => b"machine",
            Sender::Bridge => b"bridge",
        }
    }
}

/// A session's keys (one per direction) and id, from the link key and the challenge that
/// opened it.
#[derive(Clone, Copy)]
pub struct SessionKey {
    machine: [u8; 32],
    bridge: [u8; 32],
    /// The session id datagrams carry.
    pub id: u64,
}

impl SessionKey {
    /// HMAC-SHA256(key, "qs-net-v2 " | sender | challenge) for each sender; the id is the
    /// challenge's first 8 bytes.
    pub fn derive(key: &[u8], challenge: &[u8; auth::LEN]) -> SessionKey {
        let one = |from: Sender| -> [u8; 32] {
            let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
            mac.update(SESSION_CONTEXT);
            mac.update(from.context());
            mac.update(challenge);
            mac.finalize().into_bytes().into()
        };
        let mut id = [0u8; 8];
        id.copy_from_slice(&challenge[..8]);
        SessionKey {
            machine: one(Sender::Machine),
            bridge: one(Sender::Bridge),
            id: u64::from_le_bytes(id),
        }
    }

    /// The AEAD of `from`'s key, and the nonce of its datagram `seq`.
    fn aead(&self, from: Sender, seq: u64) -> (ChaCha20Poly1305, chacha20poly1305::Nonce) {
        let key = match from {
            Sender::Machine => &self.machine,
            Sender::Bridge => &self.bridge,
        };
        let mut nonce = chacha20poly1305::Nonce::default();
        nonce[4..].copy_from_slice(&seq.to_le_bytes());
        (ChaCha20Poly1305::new(key.into()), nonce)
    }

    /// The tag of datagram `seq` from `from` whose bytes before the tag are `signed`.
    fn tag(&self, from: Sender, seq: u64, signed: &[u8]) -> [u8; TAG_LEN] {
        let (aead, nonce) = self.aead(from, seq);
        aead.encrypt_inout_detached(&nonce, signed, (&mut [][..]).into())
            .expect("no plaintext, and a datagram is far below the AAD limit")
            .into()
    }

    fn verify(&self, from: Sender, seq: u64, signed: &[u8], tag: &[u8]) -> bool {
        let Ok(tag) = <&[u8; TAG_LEN]>::try_from(tag) else {
            return false;
        };
        let (aead, nonce) = self.aead(from, seq);
        aead.decrypt_inout_detached(&nonce, signed, (&mut [][..]).into(), tag.into())
            .is_ok()
    }
}

/// One direction's replay guard: a sequence number must be above the last one accepted.
#[derive(Clone, Copy, Debug, Default)]
struct Guard {
    last: u64,
}

impl Guard {
    fn accept(&mut self, seq: u64) -> Result<(), Drop> {
        if seq <= self.last {
            return Err(Drop::Replayed);
        }
        self.last = seq;
        Ok(())
    }
}

/// A running session, on either side: the key, the next sequence number to send, the replay
/// guard of what comes in.
#[derive(Clone, Copy)]
struct Tagged {
    key: SessionKey,
    /// This side.
    us: Sender,
    tx_seq: u64,
    rx: Guard,
}

impl Tagged {
    fn new(key: SessionKey, us: Sender) -> Tagged {
        Tagged {
            key,
            us,
            tx_seq: 1,
            rx: Guard::default(),
        }
    }

    fn peer(&self) -> Sender {
        match self.us {
            Sender::Machine => Sender::Bridge,
            Sender::Bridge => Sender::Machine,
        }
    }

    /// Checks a tagged datagram of this session: id, tag, then sequence number (a forged
    /// datagram must not move the guard).
    fn open(&mut self, d: &Datagram<'_>) -> Result<(), Drop> {
        if !d.tagged {
            return Err(Drop::Unauthenticated);
        }
        if d.session != self.key.id {
            return Err(Drop::WrongSession);
        }
        if !d.verify(&self.key, self.peer()) {
            return Err(Drop::BadTag);
        }
        self.rx.accept(d.seq)
    }

    fn write(&mut self, out: &mut [u8], channel: Channel, payload: &[u8]) -> usize {
        let seq = self.tx_seq;
        self.tx_seq += 1;
        write_datagram(
            out,
            channel,
            Some((&self.key, self.us)),
            self.key.id,
            seq,
            payload,
        )
    }
}

/// The machine's end of the fast link, without I/O and without allocation: the hv's NIC
/// driver hands it each received frame and sends the frames it gives back. It answers ARP for
/// its address and the handshake itself, and then reports what the authenticated bridge asked
/// for, as the serial [`super::endpoint::Endpoint`] does.
pub struct NetEndpoint {
    handshake: Handshake,
    handshake_counters: HandshakeCounters,
    us: Host,
    /// Where the handshake's replies go (the hello's source) until a response verifies.
    asker: Option<Host>,
    /// The authenticated bridge.
    peer: Option<Host>,
    session: Option<Tagged>,
    ip_id: u16,
    counters: NetCounters,
}

impl NetEndpoint {
    /// An endpoint at `mac`, `ip`, UDP `port`, serving a bridge holding `key` (an empty key
    /// serves nobody; keys longer than `endpoint::MAX_KEY` are cut).
    pub fn new(key: &[u8], mac: [u8; 6], ip: [u8; 4], port: u16) -> NetEndpoint {
        NetEndpoint {
            handshake: Handshake::new(key),
            handshake_counters: HandshakeCounters::default(),
            us: Host { mac, ip, port },
            asker: None,
            peer: None,
            session: None,
            ip_id: 0,
            counters: NetCounters::default(),
        }
    }

    /// Where the handshake stands.
    pub fn state(&self) -> State {
        self.handshake.state
    }

    /// Drops by reason, and what got through.
    pub fn counters(&self) -> NetCounters {
        NetCounters {
            wrong_key: self.handshake_counters.wrong_key,
            ..self.counters
        }
    }

    /// The authenticated bridge: MAC, IP, UDP port.
    pub fn peer(&self) -> Option<([u8; 6], [u8; 4], u16)> {
        self.peer.map(|h| (h.mac, h.ip, h.port))
    }

    /// One received Ethernet frame. Replies (ARP, the handshake, `Pong`) go out through `tx`
    /// as whole Ethernet frames; `nonce` gives a fresh random challenge when one is needed.
    /// Returns what the authenticated bridge asked for; its bytes borrow `frame`.
    pub fn receive<'a>(
        &'a mut self,
        frame: &'a [u8],
        nonce: &mut dyn FnMut() -> [u8; auth::LEN],
        tx: &mut dyn FnMut(&[u8]),
    ) -> Option<Event<'a>> {
        match self.take(frame, nonce, tx) {
            Ok(ev) => ev,
            Err(d) => {
                self.counters.count(d);
                None
            }
        }
    }

    fn take<'a>(
        &mut self,
        frame: &'a [u8],
        nonce: &mut dyn FnMut() -> [u8; auth::LEN],
        tx: &mut dyn FnMut(&[u8]),
    ) -> Result<Option<Event<'a>>, Drop> {
        let udp = match parse_frame(frame, Some(self.us.mac))? {
            Packet::Arp(a) => return self.arp(&a, tx).map(|()| None),
            Packet::Udp(u) => u,
        };
        if udp.dst.ip != self.us.ip || udp.dst.port != self.us.port {
            return Err(Drop::NotForUs);
        }
        let d = Datagram::parse(udp.payload)?;
        if !d.tagged {
            return self.handshake_step(&d, udp.src, nonce, tx).map(|()| None);
        }
        if self.peer != Some(udp.src) {
            return Err(match self.peer {
                Some(_) => Drop::Spoofed,
                None => Drop::Unauthenticated,
            });
        }
        let session = self.session.as_mut().ok_or(Drop::Unauthenticated)?;
        session.open(&d)?;
        self.counters.accepted += 1;
        let (ev, replies) =
            self.handshake
                .handle(d.channel, d.payload, &mut self.handshake_counters);
        for m in replies.iter() {
            self.send_control(m, tx);
        }
        Ok(ev)
    }

    /// ARP: a request for our address is answered; anything else is not for us.
    fn arp(&mut self, a: &Arp, tx: &mut dyn FnMut(&[u8])) -> Result<(), Drop> {
        if a.op != 1 || a.target_ip != self.us.ip {
            return Err(Drop::NotForUs);
        }
        let reply = Arp {
            op: 2,
            sender_mac: self.us.mac,
            sender_ip: self.us.ip,
            target_mac: a.sender_mac,
            target_ip: a.sender_ip,
        };
        let mut out = [0u8; MAX_FRAME];
        let n = build_arp(&mut out, &reply);
        self.counters.arp_answered += 1;
        tx(&out[..n]);
        Ok(())
    }

    /// An untagged datagram: only the bridge's hello and its response to the challenge.
    fn handshake_step(
        &mut self,
        d: &Datagram<'_>,
        src: Host,
        nonce: &mut dyn FnMut() -> [u8; auth::LEN],
        tx: &mut dyn FnMut(&[u8]),
    ) -> Result<(), Drop> {
        if d.session != 0 {
            return Err(Drop::Unauthenticated);
        }
        if let Some(version) = Handshake::bridge_hello(d.channel, d.payload) {
            // A hello from anyone ends the session and starts a handshake with its sender,
            // as on the serial link: a restarted bridge must get in without the machine
            // noticing it went. The price: anyone who can reach the port can end a session
            // (a denial of service, never access: serving still takes the key). The bridge
            // then falls back to the serial link and says hello again.
            self.session = None;
            self.peer = None;
            self.asker = Some(src);
            self.counters.accepted += 1;
            let replies = self.handshake.hello(version, nonce);
            for m in replies.iter() {
                self.send_untagged(src, m, tx);
            }
            return Ok(());
        }
        let is_response = matches!(
            (d.channel, Message::decode(d.payload)),
            (Channel::Control, Ok(Message::Response { .. }))
        );
        if !is_response || self.handshake.state != State::Challenged {
            return Err(Drop::Unauthenticated);
        }
        self.counters.accepted += 1;
        let (_, replies) =
            self.handshake
                .handle(d.channel, d.payload, &mut self.handshake_counters);
        if self.handshake.state == State::Authenticated {
            // The bridge is where the verified response came from; the session's key and id
            // come from the challenge it answered.
            self.peer = Some(src);
            self.session = Some(Tagged::new(
                SessionKey::derive(self.handshake.key(), &self.handshake.nonce),
                Sender::Machine,
            ));
            for m in replies.iter() {
                self.send_control(m, tx);
            }
        } else {
            for m in replies.iter() {
                self.send_untagged(src, m, tx);
            }
        }
        Ok(())
    }

    fn next_ip_id(&mut self) -> u16 {
        self.ip_id = self.ip_id.wrapping_add(1);
        self.ip_id
    }

    fn send_untagged(&mut self, to: Host, m: Message, tx: &mut dyn FnMut(&[u8])) {
        let mut b = [0u8; 33];
        let n = m.encode(&mut b);
        let mut out = [0u8; MAX_FRAME];
        let len = write_datagram(
            &mut out[UDP_PAYLOAD..],
            Channel::Control,
            None,
            0,
            0,
            &b[..n],
        );
        let id = self.next_ip_id();
        let f = udp_headers(&mut out, self.us, to, id, len);
        self.counters.sent += 1;
        tx(&out[..f]);
    }

    /// Sends `payload` on `channel` to the authenticated bridge, cut into as many datagrams
    /// as it takes (nothing while no bridge is authenticated); `tx` gets each whole frame.
    pub fn send(&mut self, channel: Channel, payload: &[u8], tx: &mut dyn FnMut(&[u8])) {
        self.send_in_place(channel, payload, &mut |build: &mut Build<'_>| {
            let mut out = [0u8; MAX_FRAME];
            let n = build(&mut out);
            tx(&out[..n]);
        });
    }

    /// As [`NetEndpoint::send`], but each frame is built where it will be sent from: `tx` is
    /// given the builder, which writes the frame into the buffer it is handed (a NIC
    /// driver's) and returns its length. This saves copying every frame once more, which
    /// under QEMU's emulation costs as much as the rest of the building.
    pub fn send_in_place(
        &mut self,
        channel: Channel,
        payload: &[u8],
        tx: &mut dyn FnMut(&mut Build<'_>),
    ) {
        let (Some(peer), Some(_)) = (self.peer, self.session) else {
            return;
        };
        let us = self.us;
        for chunk in payload.chunks(MAX_PAYLOAD) {
            let id = self.next_ip_id();
            let Some(session) = self.session.as_mut() else {
                return;
            };
            tx(&mut |out: &mut [u8; MAX_FRAME]| {
                let len = session.write(&mut out[UDP_PAYLOAD..], channel, chunk);
                udp_headers(out, us, peer, id, len)
            });
            self.counters.sent += 1;
        }
    }

    /// Sends a control message to the authenticated bridge.
    pub fn send_control(&mut self, m: Message, tx: &mut dyn FnMut(&[u8])) {
        let mut b = [0u8; 33];
        let n = m.encode(&mut b);
        self.send(Channel::Control, &b[..n], tx);
    }

    /// Sends a checkpoint message (a reply, a list entry, an event) to the authenticated
    /// bridge.
    pub fn send_checkpoint(&mut self, m: checkpoint::Message, tx: &mut dyn FnMut(&[u8])) {
        let mut b = [0u8; checkpoint::MAX_LEN];
        let n = m.encode(&mut b);
        self.send(Channel::Control, &b[..n], tx);
    }
}

/// What a datagram from the machine meant to the bridge.
#[derive(Debug, PartialEq, Eq)]
pub enum BridgeEvent<'a> {
    /// The machine's hello: nothing to do.
    Hello { version: u16 },
    /// The challenge: the response to send is in the caller's buffer, this long.
    Respond(usize),
    /// The machine accepted the key: the session runs.
    Authenticated,
    /// The machine refused.
    Refused(super::control::Refusal),
    /// A payload of the running session.
    Data { channel: Channel, payload: &'a [u8] },
}

/// The bridge's end of the fast link's datagrams (the UDP payloads; Ethernet, IP and ARP are
/// the caller's, or the OS's): says hello, answers the challenge, checks and tags the
/// session's datagrams.
pub struct BridgeSession {
    key: [u8; super::endpoint::MAX_KEY],
    key_len: usize,
    challenge: Option<[u8; auth::LEN]>,
    /// The session being opened (between the response and `AuthOk`) or running.
    session: Option<Tagged>,
    authenticated: bool,
    /// Drops by reason, and what got through.
    pub counters: NetCounters,
}

impl BridgeSession {
    /// A session for `key` (keys longer than `endpoint::MAX_KEY` are cut, as the machine
    /// does).
    pub fn new(key: &[u8]) -> BridgeSession {
        let key_len = key.len().min(super::endpoint::MAX_KEY);
        let mut k = [0u8; super::endpoint::MAX_KEY];
        k[..key_len].copy_from_slice(&key[..key_len]);
        BridgeSession {
            key: k,
            key_len,
            challenge: None,
            session: None,
            authenticated: false,
            counters: NetCounters::default(),
        }
    }

    /// Whether the machine accepted the key.
    pub fn authenticated(&self) -> bool {
        self.authenticated
    }

    /// The hello (untagged, session 0) into `out`; returns its length. Ends any session.
    pub fn hello(&mut self, out: &mut [u8; MAX_DATAGRAM]) -> usize {
        self.challenge = None;
        self.session = None;
        self.authenticated = false;
        let mut b = [0u8; 33];
        let n = Message::Hello {
            version: super::LINK_VERSION,
            role: super::control::Role::Bridge,
        }
        .encode(&mut b);
        self.counters.sent += 1;
        write_datagram(out, Channel::Control, None, 0, 0, &b[..n])
    }

    /// A datagram from the machine; a reply to send (the response) is written to `out`.
    pub fn receive<'a>(
        &mut self,
        datagram: &'a [u8],
        out: &mut [u8; MAX_DATAGRAM],
    ) -> Result<BridgeEvent<'a>, Drop> {
        let r = self.take(datagram, out);
        match &r {
            Ok(_) => self.counters.accepted += 1,
            Err(d) => self.counters.count(*d),
        }
        r
    }

    fn take<'a>(
        &mut self,
        datagram: &'a [u8],
        out: &mut [u8; MAX_DATAGRAM],
    ) -> Result<BridgeEvent<'a>, Drop> {
        use super::control::Role;
        let d = Datagram::parse(datagram)?;
        if !d.tagged {
            if d.session != 0 || d.channel != Channel::Control {
                return Err(Drop::Unauthenticated);
            }
            return match Message::decode(d.payload) {
                Ok(Message::Hello {
                    version,
                    role: Role::Machine,
                }) => Ok(BridgeEvent::Hello { version }),
                Ok(Message::Challenge { nonce }) if !self.authenticated => {
                    let key = &self.key[..self.key_len];
                    self.challenge = Some(nonce);
                    self.session =
                        Some(Tagged::new(SessionKey::derive(key, &nonce), Sender::Bridge));
                    let mut b = [0u8; 33];
                    let n = Message::Response {
                        mac: auth::respond(key, &nonce),
                    }
                    .encode(&mut b);
                    self.counters.sent += 1;
                    Ok(BridgeEvent::Respond(write_datagram(
                        out,
                        Channel::Control,
                        None,
                        0,
                        0,
                        &b[..n],
                    )))
                }
                Ok(Message::Refused(r)) if !self.authenticated => {
                    self.session = None;
                    Ok(BridgeEvent::Refused(r))
                }
                _ => Err(Drop::Unauthenticated),
            };
        }
        let session = self.session.as_mut().ok_or(Drop::Unauthenticated)?;
        session.open(&d)?;
        if !self.authenticated {
            return match (d.channel, Message::decode(d.payload)) {
                (Channel::Control, Ok(Message::AuthOk)) => {
                    self.authenticated = true;
                    Ok(BridgeEvent::Authenticated)
                }
                _ => Err(Drop::Unauthenticated),
            };
        }
        Ok(BridgeEvent::Data {
            channel: d.channel,
            payload: d.payload,
        })
    }

    /// A datagram of the running session carrying `payload` (at most [`MAX_PAYLOAD`]) into
    /// `out`; returns its length, or None while no session runs.
    pub fn wrap(
        &mut self,
        channel: Channel,
        payload: &[u8],
        out: &mut [u8; MAX_DATAGRAM],
    ) -> Option<usize> {
        if !self.authenticated {
            return None;
        }
        let n = self.session.as_mut()?.write(out, channel, payload);
        self.counters.sent += 1;
        Some(n)
    }
}

#[cfg(test)]
mod tests;
