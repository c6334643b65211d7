//! The hv's end of the serial link: the protocol endpoint from `quicksilver-proto` behind a
//! lock, fed by the agent (its UART interrupt handler forwards received bytes, by direct call
//! while dormant and by hypercall while active), answering through the UART itself with
//! polled port I/O, which works the same in the kernel's context and in host mode.
//! [`checkpoint`] serves the bridge's checkpoint requests and sends the engine's events.
//!
//! Every sending function here answers on the link the bridge last spoke on: the fast link
//! (`crate::net`) when that was it and it is authenticated, else this one.

pub mod checkpoint;

use crate::arch::instr;
use crate::net::Outgoing;
use core::sync::atomic::{AtomicU64, Ordering::*};
use quicksilver_proto::abi::{Status, LINK_RX_ATTENTION, LINK_RX_CHECKPOINT};
use quicksilver_proto::link::auth;
use quicksilver_proto::link::control::Message;
use quicksilver_proto::link::endpoint::{Endpoint, Event, State, MAX_KEY};
use quicksilver_proto::link::{Channel, MAX_PAYLOAD};
use quicksilver_proto::stats::StatsHeader;
use spin::Mutex;

struct Link {
    port: u16,
    endpoint: Endpoint,
    key: Key,
}

/// A copy of the link's key, for the fast link's endpoint (which serves the same bridge).
#[derive(Clone, Copy)]
pub struct Key {
    bytes: [u8; MAX_KEY],
    len: usize,
}

impl Key {
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Most bytes of gdb's protocol one poll hands the debugger: a datagram's payload on the fast
/// link (a serial frame's is at most `MAX_PAYLOAD`).
pub const POLL_MAX: usize = 2048;

static LINK: Mutex<Option<Link>> = Mutex::new(None);

/// Frames an authenticated bridge sent that nothing in the hv consumes yet (bulk data, control
/// messages other than attention and checkpoint requests, requests past the few one read
/// takes): counted, for `qsctl stats`, then dropped.
static UNROUTED: AtomicU64 = AtomicU64::new(0);

/// Writes bytes to the 16550A UART at `port`, polling its transmitter (bounded, so that a
/// dead UART cannot hang the caller). With the FIFO on (the agent sets it up), TEMT means the
/// 16-byte transmit FIFO and the shift register are both empty: one poll per 16 bytes, which
/// matters when every port access is an emulated I/O operation. THRE is not enough: QEMU
/// sets it while the last byte still waits for its backend, and a FIFO written full behind
/// such a byte drops bytes.
fn uart_write(port: u16, bytes: &[u8]) {
    const TEMT: u8 = 0x40;
    for chunk in bytes.chunks(16) {
        for _ in 0..1_000_000 {
            // SAFETY: reading the line status register of the link's UART, which the agent
            // handed to the hv (LinkConfig), has no side effect.
            if unsafe { instr::inb(port + 5) } & TEMT != 0 {
                break;
            }
        }
        for &b in chunk {
            // SAFETY: the transmit holding register of the link's UART, which the hv owns
            // for writing.
            unsafe { instr::outb(port, b) };
        }
    }
}

/// A fresh challenge: RDRAND where the CPU has it, mixed with the TSC either way.
pub(crate) fn nonce() -> [u8; auth::LEN] {
    let has_rdrand = instr::cpuid(1, 0)[2] & (1 << 30) != 0;
    let mut out = [0u8; auth::LEN];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut v = instr::rdtsc().rotate_left(17 * i as u32) ^ 0x9E37_79B9_7F4A_7C15;
        if has_rdrand {
            for _ in 0..10 {
                let (r, ok): (u64, u8);
                // SAFETY: RDRAND exists (CPUID.1:ECX[30]) and only writes its operand and CF.
                unsafe {
                    core::arch::asm!("rdrand {}", "setc {}", out(reg) r, out(reg_byte) ok,
                                     options(nomem, nostack))
                };
                if ok == 1 {
                    v ^= r;
                    break;
                }
            }
        }
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// The link's part of the statistics block.
pub fn write_stats(h: &mut StatsHeader) {
    h.link_unrouted = UNROUTED.load(Relaxed);
    h.link_stale_replies = checkpoint::STALE_REPLIES.load(Relaxed);
    let Some(link) = &*LINK.lock() else {
        return;
    };
    let e = &link.endpoint;
    // 1 = configured, 2 = a bridge is authenticated (0, off, is the header's default).
    h.link_state = if e.state() == State::Authenticated {
        2
    } else {
        1
    };
    h.link_dropped = e.drops().total();
    h.link_wrong_keys = e.counters.wrong_key;
    h.link_unauthenticated = e.counters.unauthenticated;
}

/// `LinkConfig`: port (u16 LE), then the key.
pub fn configure(buf: &[u8]) -> Status {
    let Some((port, key)) = buf.split_first_chunk::<2>() else {
        return Status::BadArgument;
    };
    let port = u16::from_le_bytes(*port);
    if port == 0 {
        return Status::BadArgument;
    }
    let mut k = Key {
        bytes: [0; MAX_KEY],
        len: key.len().min(MAX_KEY),
    };
    k.bytes[..k.len].copy_from_slice(&key[..k.len]);
    *LINK.lock() = Some(Link {
        port,
        endpoint: Endpoint::new(key),
        key: k,
    });
    Status::Ok
}

/// The link's key, once `LinkConfig` gave it.
pub fn key() -> Option<Key> {
    LINK.lock().as_ref().map(|l| l.key)
}

/// `LinkRx`: feeds received bytes (from the agent's interrupt handler), then routes what they
/// made to its consumer. An attention request arriving in a hypercall (`in_guest`) stops every
/// CPU when that hypercall completes; arriving by a direct call (this CPU is native: dormant,
/// or a detach is stepping the CPUs out) it sets [`LINK_RX_ATTENTION`] in the answer, and the agent
/// activates if needed and makes the hypercall that stops them. A checkpoint request the
/// agent's thread must serve sets [`LINK_RX_CHECKPOINT`].
pub fn receive(bytes: &[u8], in_guest: bool) -> i64 {
    let mut gdb = [0u8; 2 * MAX_PAYLOAD];
    let mut gdb_len = 0;
    let mut attention = false;
    let mut requests = [None; 4];
    let mut n_requests = 0;
    {
        let mut guard = LINK.lock();
        let Some(link) = guard.as_mut() else {
            return Status::NotInitialized as i64;
        };
        let port = link.port;
        for &b in bytes {
            let mut tx = |w: &[u8]| uart_write(port, w);
            let event = link.endpoint.push(b, &mut nonce, &mut tx);
            if event.is_some() {
                crate::net::spoke_on_serial();
            }
            match event {
                Some(Event::Attention) => attention = true,
                Some(Event::Gdb(p)) => {
                    let n = p.len().min(gdb.len() - gdb_len);
                    gdb[gdb_len..gdb_len + n].copy_from_slice(&p[..n]);
                    gdb_len += n;
                }
                Some(Event::Checkpoint(r)) => match requests.get_mut(n_requests) {
                    Some(slot) => {
                        *slot = Some(r);
                        n_requests += 1;
                    }
                    None => unrouted(),
                },
                // Answered inside; it only says which link the bridge speaks on.
                Some(Event::Control(Message::Ping { .. })) => {}
                Some(Event::Control(_) | Event::Bulk(_)) => unrouted(),
                None => {}
            }
        }
    }
    // The link lock is released: the debugger may answer through it.
    // The UART's interrupt is edge-triggered: Linux acknowledged it before its handler ran,
    // so the stop may be made in this hypercall.
    route(&Routed::Gdb(&gdb[..gdb_len]), true);
    if attention {
        route(&Routed::Attention, in_guest);
    }
    let mut wake = false;
    for r in requests.iter().flatten() {
        wake |= checkpoint::request(*r);
    }
    (if attention && !in_guest {
        LINK_RX_ATTENTION
    } else {
        0
    }) | if wake { LINK_RX_CHECKPOINT } else { 0 }
}

/// What the link delivers to the hv's clients.
pub enum Routed<'a> {
    /// An authenticated bridge asks for the debugger.
    Attention,
    /// Bytes of gdb's remote protocol.
    Gdb(&'a [u8]),
}

/// The one place that knows which client consumes which channel (bulk and other control
/// messages have no consumer yet: `unrouted`). A stop they ask for is made when the next
/// hypercall completes (this one, if it is one) if `any_hypercall`; otherwise the hv holds it
/// for the agent's `Op::AgentStop`, and true says the agent must be told.
pub(crate) fn route(r: &Routed<'_>, any_hypercall: bool) -> bool {
    match r {
        Routed::Attention => {
            crate::debug::session::request_attach(any_hypercall);
            !any_hypercall
        }
        Routed::Gdb([]) => false,
        Routed::Gdb(bytes) => crate::debug::session::gdb_input(bytes, any_hypercall),
    }
}

pub(crate) fn unrouted() {
    UNROUTED.fetch_add(1, Relaxed);
}

/// Reads the UART directly (host mode, CPUs parked: no interrupt handler runs) until it has
/// no more bytes or one event for the stopped machine's client (the debugger, which polls) is
/// complete: gdb's bytes into `out`, or an attention request; then the fast link's NIC the
/// same way. A checkpoint request is answered on the spot (a list) or refused (anything
/// else: gdb holds the CPUs).
pub fn poll(out: &mut [u8; POLL_MAX]) -> Option<Routed<'_>> {
    match poll_uart(out).or_else(|| crate::net::poll_stopped(out))? {
        Polled::Attention => Some(Routed::Attention),
        Polled::Gdb(n) => Some(Routed::Gdb(&out[..n])),
    }
}

/// What one poll of a link found for the debugger (gdb's bytes are in the caller's buffer).
pub(crate) enum Polled {
    Attention,
    Gdb(usize),
}

fn poll_uart(out: &mut [u8; POLL_MAX]) -> Option<Polled> {
    let mut guard = LINK.lock();
    let link = guard.as_mut()?;
    let port = link.port;
    // SAFETY: the link UART's line status register (bit 0: data ready) and receive buffer;
    // the agent handed the port to the hv, and no interrupt handler runs now.
    while unsafe { instr::inb(port + 5) } & 1 != 0 {
        // SAFETY: as above.
        let b = unsafe { instr::inb(port) };
        let mut tx = |w: &[u8]| uart_write(port, w);
        let event = link.endpoint.push(b, &mut nonce, &mut tx);
        if event.is_some() {
            crate::net::spoke_on_serial();
        }
        match event {
            Some(Event::Attention) => return Some(Polled::Attention),
            Some(Event::Gdb(p)) => {
                let n = p.len();
                out[..n].copy_from_slice(p);
                return Some(Polled::Gdb(n));
            }
            Some(Event::Checkpoint(r)) => {
                drop(guard);
                checkpoint::request_stopped(r);
                return None;
            }
            // Answered inside; it only says which link the bridge speaks on.
            Some(Event::Control(Message::Ping { .. })) => {}
            Some(Event::Control(_) | Event::Bulk(_)) => unrouted(),
            None => {}
        }
    }
    None
}

/// Sends `bytes` on `channel` (only to an authenticated bridge), on the link it last spoke on.
pub fn send(channel: Channel, bytes: &[u8]) {
    if crate::net::preferred() && crate::net::send(Outgoing::Bytes(channel, bytes)) {
        return;
    }
    if let Some(link) = LINK.lock().as_mut() {
        if link.endpoint.state() == State::Authenticated {
            let port = link.port;
            link.endpoint
                .send(channel, bytes, &mut |w| uart_write(port, w));
        }
    }
}

/// Sends a checkpoint message (only to an authenticated bridge).
pub fn send_checkpoint(m: quicksilver_proto::link::checkpoint::Message) {
    if crate::net::preferred() && crate::net::send(Outgoing::Checkpoint(m)) {
        return;
    }
    if let Some(link) = LINK.lock().as_mut() {
        if link.endpoint.state() == State::Authenticated {
            let port = link.port;
            link.endpoint
                .send_checkpoint(m, &mut |w| uart_write(port, w));
        }
    }
}

/// Sends a control message (only to an authenticated bridge).
pub fn send_control(m: Message) {
    if crate::net::preferred() && crate::net::send(Outgoing::Control(m)) {
        return;
    }
    if let Some(link) = LINK.lock().as_mut() {
        if link.endpoint.state() == State::Authenticated {
            let port = link.port;
            link.endpoint.send_control(m, &mut |w| uart_write(port, w));
        }
    }
}
