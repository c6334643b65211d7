//! The fast link (`--net`): the machine's own NIC, UDP datagrams of `proto`'s wire format
//! (`quicksilver_proto::link::net`), beside the serial link. After the serial handshake the
//! bridge does the fast link's; while it is up, gdb's bytes, checkpoint requests and bulk data
//! go over it (the machine answers on the link the bridge last spoke on). A `Ping` every
//! [`PING_EVERY`] keeps watch: [`MISSED_PINGS`] unanswered in a row (or a closed socket) and
//! the link is down: the serial link carries the session again (the owner is told, so that it
//! pings the machine there and resends a gdb read whose answer was lost), and the bridge keeps
//! trying the fast link in the background, moving back once its handshake succeeds again.
//!
//! Threads: one reads (handshake replies, pongs, data for the demultiplexer); one ticks
//! (pings, liveness, reconnects).

pub mod transport;

use crate::rate::Rate;
use anyhow::{bail, Result};
use quicksilver_proto::link::control::Message;
use quicksilver_proto::link::net::{BridgeEvent, BridgeSession, NetCounters, MAX_DATAGRAM};
use quicksilver_proto::link::Channel;
use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use transport::{Received, Transport};

/// How often the bridge pings the machine on the fast link.
pub const PING_EVERY: Duration = Duration::from_millis(200);
/// Pings unanswered in a row after which the fast link is down.
pub const MISSED_PINGS: u32 = 3;
/// How often a down fast link is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Round trips kept for the median.
const RTTS_KEPT: usize = 16;

/// Where the fast link is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetAddr {
    /// QEMU's `-netdev stream,server=on,addr.type=unix,addr.path=PATH`.
    Stream(String),
    /// The machine's UDP address.
    Udp(String),
}

impl NetAddr {
    /// Parses `stream:PATH` or `udp:HOST:PORT`.
    pub fn parse(s: &str) -> Result<NetAddr> {
        if let Some(p) = s.strip_prefix("stream:").filter(|p| !p.is_empty()) {
            Ok(NetAddr::Stream(p.to_string()))
        } else if let Some(a) = s.strip_prefix("udp:").filter(|a| a.contains(':')) {
            Ok(NetAddr::Udp(a.to_string()))
        } else {
            bail!("--net {s:?}: give stream:PATH (QEMU's -netdev stream socket) or udp:HOST:PORT (the machine's fast link address, net_ip= and net_port= of the agent)")
        }
    }

    /// As the user gave it.
    pub fn describe(&self) -> String {
        match self {
            NetAddr::Stream(p) => format!("stream:{p}"),
            NetAddr::Udp(a) => format!("udp:{a}"),
        }
    }
}

/// How the bridge addresses the machine on a `stream` Ethernet.
#[derive(Clone, Copy, Debug)]
pub struct NetOptions {
    /// The bridge's own IP address there.
    pub ip: Ipv4Addr,
    /// The machine's IP address and UDP port.
    pub peer: SocketAddrV4,
}

/// Where the fast link stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetState {
    /// Not up yet: connecting, resolving, or in the handshake.
    Connecting,
    /// Authenticated and answering pings: the session's traffic goes over it.
    Up,
    /// It was up and stopped answering (or closed); being tried again.
    Down,
}

impl NetState {
    pub fn as_str(self) -> &'static str {
        match self {
            NetState::Connecting => "connecting",
            NetState::Up => "up",
            NetState::Down => "down",
        }
    }
}

/// What the owner (the serial link) is told when the fast link goes down.
pub struct Fallback {
    /// gdb's read packet whose answer had not come when the link went down.
    pub unanswered_read: Option<Vec<u8>>,
}

/// What the fast link hands to its owner.
pub struct Hooks {
    /// A payload from the machine.
    pub deliver: Box<dyn Fn(Channel, Vec<u8>) + Send + Sync>,
    /// The link went down.
    pub fallback: Box<dyn Fn(Fallback) + Send + Sync>,
}

struct Inner {
    state: NetState,
    transport: Option<Arc<Transport>>,
    /// Why the link is not up, for the status.
    why: Option<String>,
    next_ping: u32,
    /// Pings in flight: number and when sent.
    pings: VecDeque<(u32, Instant)>,
    rtts: VecDeque<Duration>,
    /// gdb's last read packet over the fast link, until the machine's gdb bytes come.
    unanswered_read: Option<Vec<u8>>,
    last_try: Option<Instant>,
    times_up: u64,
    times_down: u64,
}

/// The fast link.
pub struct NetLink {
    addr: NetAddr,
    opts: NetOptions,
    session: Mutex<BridgeSession>,
    inner: Mutex<Inner>,
    changed: Condvar,
    hooks: Hooks,
    rx: Rate,
    tx: Rate,
}

impl NetLink {
    /// Starts the fast link to `addr` with `key`: its threads connect, resolve, authenticate
    /// and keep watch from now on.
    pub fn start(addr: NetAddr, opts: NetOptions, key: &[u8], hooks: Hooks) -> Arc<NetLink> {
        let link = Arc::new(NetLink {
            addr,
            opts,
            session: Mutex::new(BridgeSession::new(key)),
            inner: Mutex::new(Inner {
                state: NetState::Connecting,
                transport: None,
                why: None,
                next_ping: 1,
                pings: VecDeque::new(),
                rtts: VecDeque::new(),
                unanswered_read: None,
                last_try: None,
                times_up: 0,
                times_down: 0,
            }),
            changed: Condvar::new(),
            hooks,
            rx: Rate::default(),
            tx: Rate::default(),
        });
        let (r, t) = (link.clone(), link.clone());
        std::thread::spawn(move || r.read_loop());
        std::thread::spawn(move || t.tick_loop());
        link
    }

    /// Where it stands.
    pub fn state(&self) -> NetState {
        self.inner.lock().expect("net").state
    }

    /// Waits up to `timeout` for the link to be up; whether it is.
    pub fn wait_up(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut inner = self.inner.lock().expect("net");
        while inner.state != NetState::Up {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            inner = self.changed.wait_timeout(inner, left).expect("net").0;
        }
        true
    }

    /// Sends `payload` on `channel` over the fast link if it is up, cut into datagrams;
    /// whether it went (if not, the caller sends it on the serial link).
    pub fn send(&self, channel: Channel, payload: &[u8]) -> bool {
        let transport = {
            let mut inner = self.inner.lock().expect("net");
            if inner.state != NetState::Up {
                return false;
            }
            if channel == Channel::Gdb {
                if let Some(p) = crate::rsp::last_packet(payload) {
                    inner.unanswered_read = crate::rsp::is_read(p).then(|| p.to_vec());
                }
            }
            inner.transport.clone()
        };
        let Some(t) = transport else { return false };
        let mut out = [0u8; MAX_DATAGRAM];
        let chunks = payload
            .chunks(quicksilver_proto::link::net::MAX_PAYLOAD)
            .chain(payload.is_empty().then_some(&[][..]));
        for chunk in chunks {
            // The session's lock is held until the datagram is out, so that sequence numbers
            // leave in order.
            let mut session = self.session.lock().expect("session");
            let Some(n) = session.wrap(channel, chunk, &mut out) else {
                return false;
            };
            if let Err(e) = t.send(&out[..n]) {
                drop(session);
                self.down(&format!("sending failed: {e}"));
                return false;
            }
            self.tx.add(n as u64);
        }
        true
    }

    fn read_loop(self: Arc<Self>) {
        let mut out = [0u8; MAX_DATAGRAM];
        loop {
            let Some(t) = self.inner.lock().expect("net").transport.clone() else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            let bytes = match t.recv() {
                Err(e) => {
                    self.closed(&t, &format!("the socket closed ({e})"));
                    continue;
                }
                Ok(Received::Nothing) => continue,
                Ok(Received::Dropped(d)) => {
                    self.session.lock().expect("session").counters.count(d);
                    continue;
                }
                Ok(Received::Datagram(b)) => b,
            };
            self.rx.add(bytes.len() as u64);
            let mut session = self.session.lock().expect("session");
            let ev = match session.receive(&bytes, &mut out) {
                Ok(ev) => ev,
                Err(_) => continue, // counted by the session
            };
            match ev {
                BridgeEvent::Respond(n) => {
                    let _ = t.send(&out[..n]);
                }
                BridgeEvent::Authenticated => {
                    drop(session);
                    self.up();
                }
                BridgeEvent::Refused(r) => {
                    drop(session);
                    self.note(r.message());
                }
                BridgeEvent::Hello { .. } => {}
                BridgeEvent::Data { channel, payload } => {
                    let payload = payload.to_vec();
                    drop(session);
                    self.data(channel, payload);
                }
            }
        }
    }

    fn data(&self, channel: Channel, payload: Vec<u8>) {
        if channel == Channel::Control {
            if let Ok(Message::Pong { n }) = Message::decode(&payload) {
                self.pong(n);
                return;
            }
        }
        if channel == Channel::Gdb {
            self.inner.lock().expect("net").unanswered_read = None;
        }
        (self.hooks.deliver)(channel, payload);
    }

    fn pong(&self, n: u32) {
        let mut inner = self.inner.lock().expect("net");
        while let Some(&(m, at)) = inner.pings.front() {
            if m > n {
                break;
            }
            inner.pings.pop_front();
            if m == n {
                if inner.rtts.len() == RTTS_KEPT {
                    inner.rtts.pop_front();
                }
                inner.rtts.push_back(at.elapsed());
            }
        }
    }

    fn tick_loop(self: Arc<Self>) {
        loop {
            std::thread::sleep(PING_EVERY);
            let (state, due) = {
                let inner = self.inner.lock().expect("net");
                let due = inner.last_try.is_none_or(|t| t.elapsed() >= RETRY_EVERY);
                (inner.state, due)
            };
            match state {
                NetState::Up => self.ping(),
                NetState::Connecting | NetState::Down if due => self.try_again(),
                _ => {}
            }
        }
    }

    fn ping(&self) {
        let n = {
            let mut inner = self.inner.lock().expect("net");
            // A ping without a pong after two periods is missed (a pong answers every ping
            // before it too): the round trip under QEMU's TCG is well under a millisecond,
            // but a loaded host or a machine busy in its hv may be slow for a moment.
            let missed = inner
                .pings
                .iter()
                .filter(|(_, at)| at.elapsed() >= PING_EVERY * 2)
                .count() as u32;
            if missed >= MISSED_PINGS {
                drop(inner);
                self.down(&format!("{MISSED_PINGS} pings unanswered"));
                return;
            }
            let n = inner.next_ping;
            inner.next_ping += 1;
            inner.pings.push_back((n, Instant::now()));
            n
        };
        let mut b = [0u8; 33];
        let len = Message::Ping { n }.encode(&mut b);
        self.send(Channel::Control, &b[..len]);
    }

    /// Connects if need be, resolves the machine's MAC, says hello.
    fn try_again(&self) {
        self.inner.lock().expect("net").last_try = Some(Instant::now());
        let existing = self.inner.lock().expect("net").transport.clone();
        let t = match existing {
            Some(t) => t,
            None => {
                let t = match &self.addr {
                    NetAddr::Stream(p) => Transport::stream(p, self.opts.ip, self.opts.peer),
                    NetAddr::Udp(a) => Transport::udp(a),
                };
                match t {
                    Ok(t) => {
                        let t = Arc::new(t);
                        self.inner.lock().expect("net").transport = Some(t.clone());
                        t
                    }
                    Err(e) => {
                        self.note(&format!("{e:#}"));
                        return;
                    }
                }
            }
        };
        if !t.ready() {
            if let Err(e) = t.resolve() {
                self.closed(&t, &format!("asking for the machine's MAC failed ({e})"));
                return;
            }
            // The reply comes within a round trip from a machine that is there: say hello in
            // the same try rather than a second later.
            let asked = Instant::now();
            while !t.ready() && asked.elapsed() < PING_EVERY {
                std::thread::sleep(Duration::from_millis(2));
            }
            if !t.ready() {
                self.note(&format!(
                    "no ARP reply yet from the machine's {}",
                    self.opts.peer.ip()
                ));
                return;
            }
        }
        let mut out = [0u8; MAX_DATAGRAM];
        let n = self.session.lock().expect("session").hello(&mut out);
        match t.send(&out[..n]) {
            Ok(()) => self.note("no answer to the hello yet"),
            Err(e) => self.closed(&t, &format!("sending failed ({e})")),
        }
    }

    fn note(&self, why: &str) {
        self.inner.lock().expect("net").why = Some(why.to_string());
    }

    /// The transport `t` failed: forget it (the next try connects again) and go down.
    fn closed(&self, t: &Arc<Transport>, why: &str) {
        {
            let mut inner = self.inner.lock().expect("net");
            if inner.transport.as_ref().is_some_and(|c| Arc::ptr_eq(c, t)) {
                inner.transport = None;
            }
        }
        t.shutdown();
        self.down(why);
        self.note(why);
        // A closed stream is read at once again: give the machine's side time to come back.
        std::thread::sleep(Duration::from_millis(100));
    }

    fn up(&self) {
        let again = {
            let mut inner = self.inner.lock().expect("net");
            inner.state = NetState::Up;
            inner.why = None;
            inner.pings.clear();
            inner.times_up += 1;
            inner.times_up > 1
        };
        self.changed.notify_all();
        eprintln!(
            "qs-bridge: the fast link is {} ({}): gdb's bytes, checkpoint requests and bulk data go over it",
            if again { "up again" } else { "up" },
            self.addr.describe()
        );
    }

    fn down(&self, why: &str) {
        let unanswered_read = {
            let mut inner = self.inner.lock().expect("net");
            if inner.state != NetState::Up {
                return;
            }
            inner.state = NetState::Down;
            inner.why = Some(why.to_string());
            inner.pings.clear();
            inner.times_down += 1;
            // Try again after a pause, not at once: the machine's side may be just gone.
            inner.last_try = Some(Instant::now());
            inner.unanswered_read.take()
        };
        self.changed.notify_all();
        eprintln!(
            "qs-bridge: the fast link is down ({why}): the session goes on over the serial link; trying the fast link again in the background"
        );
        (self.hooks.fallback)(Fallback { unanswered_read });
    }

    /// Bytes received so far.
    pub fn rx_bytes(&self) -> u64 {
        self.rx.total()
    }

    /// Drops by reason, as the bridge sees them, and what got through.
    pub fn counters(&self) -> NetCounters {
        self.session.lock().expect("session").counters
    }

    /// The fast link for the control socket's `status`.
    pub fn status_json(&self) -> serde_json::Value {
        let c = self.counters();
        let inner = self.inner.lock().expect("net");
        let rtt = median(&inner.rtts);
        serde_json::json!({
            "address": self.addr.describe(),
            "state": inner.state.as_str(),
            "why": inner.why,
            "rtt_median_us": rtt.map(|d| d.as_micros() as u64),
            "times_up": inner.times_up,
            "times_down": inner.times_down,
            "rx_bytes": self.rx.total(),
            "tx_bytes": self.tx.total(),
            "rx_bytes_per_s": self.rx.per_second(),
            "tx_bytes_per_s": self.tx.per_second(),
            "datagrams_in": c.accepted,
            "datagrams_out": c.sent,
            "dropped": {
                "malformed": c.malformed,
                "fragmented": c.fragmented,
                "oversized": c.oversized,
                "not_for_us": c.not_for_us,
                "bad_magic": c.bad_magic,
                "unauthenticated": c.unauthenticated,
                "bad_tag": c.bad_tag,
                "wrong_session": c.wrong_session,
                "replayed": c.replayed,
                "spoofed": c.spoofed,
            },
        })
    }

    /// Lines for gdb's `monitor link`.
    pub fn report(&self) -> String {
        let inner = self.inner.lock().expect("net");
        let rtt = median(&inner.rtts);
        let mut s = format!(
            "fast link {}: {}",
            self.addr.describe(),
            inner.state.as_str()
        );
        if let Some(why) = inner.why.as_ref().filter(|_| inner.state != NetState::Up) {
            s += &format!(" ({why})");
        }
        s += "\n";
        s += &format!(
            "  round trip {} (median of the last {} pings); in {} B/s, out {} B/s; {} datagrams dropped\n",
            rtt.map_or("-".into(), |d| format!("{} us", d.as_micros())),
            inner.rtts.len(),
            self.rx.per_second(),
            self.tx.per_second(),
            self.session.lock().expect("session").counters.dropped(),
        );
        s
    }
}

/// The median of round trips.
fn median(rtts: &VecDeque<Duration>) -> Option<Duration> {
    let mut v: Vec<Duration> = rtts.iter().copied().collect();
    v.sort();
    v.get(v.len() / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_addresses_parse_or_say_what_to_give() {
        assert_eq!(
            NetAddr::parse("stream:/tmp/n").unwrap(),
            NetAddr::Stream("/tmp/n".into())
        );
        assert_eq!(
            NetAddr::parse("udp:10.0.0.2:50000").unwrap(),
            NetAddr::Udp("10.0.0.2:50000".into())
        );
        for bad in ["stream:", "udp:host", "tcp:h:1", "/tmp/x"] {
            let e = NetAddr::parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("stream:PATH") && e.contains("udp:HOST:PORT"),
                "{e}"
            );
        }
    }
}
