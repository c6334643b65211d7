//! The fast link's hv end: a NIC the agent claimed for the hv (`Op::NetConfig`), driven by
//! polling, carrying the link's channels as authenticated UDP datagrams
//! (`quicksilver_proto::link::net`). Beside the serial link, not instead of it: the bridge
//! asks for attention on either, and the hv answers on the one the bridge last spoke on
//! (`crate::link`'s sending functions ask [`preferred`]), so a bridge that loses the network
//! goes on over serial.
//!
//! While the kernel runs, the NIC's interrupt is the agent's doorbell (`Op::NetPoll`, like
//! `Op::LinkRx` for the UART); while every CPU is parked the debugger's leader polls it
//! ([`poll_stopped`]). The device is reset before the hv uses it and when it gives it back
//! (`Op::NetRelease`), its registers are hidden from the guest (`mapping`), and its rings and
//! buffers live in the image (`dma`, `virtio`).

pub mod config_space;
mod dma;
mod e1000e;
mod mapping;
mod virtio;

use crate::arch::instr;
use crate::link::{self, Polled, Routed, POLL_MAX};
use crate::vmm::Hv;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use quicksilver_proto::abi::{
    NetConfig, Status, LINK_RX_ATTENTION, LINK_RX_CHECKPOINT, NET_BARS, NET_POLL_OURS,
    NET_POLL_STOP,
};
use quicksilver_proto::link::endpoint::{Event, State};
use quicksilver_proto::link::net::{Build, NetEndpoint, MAX_FRAME};
use quicksilver_proto::link::{checkpoint, control, Channel};
use quicksilver_proto::stats::NetRecord;
use spin::Mutex;

/// A NIC the hv drives: one Ethernet frame at a time, polled.
pub trait Nic {
    /// The device's own address.
    fn mac(&self) -> [u8; 6];
    /// Sends one frame, which `build` writes into the driver's buffer (and returns its
    /// length); false if it was dropped, and then `build` was not called.
    fn send_in_place(&mut self, build: &mut Build<'_>) -> bool;
    /// Sends one frame (copied into a buffer of the driver's); false if it was dropped.
    fn send(&mut self, frame: &[u8]) -> bool {
        self.send_in_place(&mut copy_of(frame))
    }
    /// Passes the next received frame to `f` and gives its buffer back to the device; false
    /// when none has arrived.
    fn receive(&mut self, f: &mut dyn FnMut(&[u8])) -> bool;
    /// Acknowledges the device's interrupt: true if it had raised one.
    fn ack_interrupt(&mut self) -> bool;
}

/// A builder that copies a frame already built elsewhere (an ARP answer, a control message).
fn copy_of(frame: &[u8]) -> impl FnMut(&mut [u8; MAX_FRAME]) -> usize + '_ {
    let n = frame.len().min(MAX_FRAME);
    move |buf: &mut [u8; MAX_FRAME]| {
        buf[..n].copy_from_slice(&frame[..n]);
        n
    }
}

/// One console line on the fast link: frames taken and sent, and what the endpoint made of
/// them. For a gdb session that broke on lost bytes.
pub fn describe(w: &mut dyn core::fmt::Write) {
    let guard = NET.lock();
    let Some(net) = guard.as_ref() else { return };
    let c = net.endpoint.counters();
    let _ = writeln!(
        w,
        "quicksilver hv: fast link: {} frames in ({} accepted, {} dropped: `qsctl stats` says why), {} out",
        RX_FRAMES.load(Relaxed),
        c.accepted,
        c.dropped(),
        TX_FRAMES.load(Relaxed)
    );
}

/// The BARs the agent mapped, for the driver's `Hal` (which has no `self`) and for
/// `Hv::owns`: written by `configure` and `release` while dormant, read anywhere.
pub struct Bars {
    pa: [AtomicU64; NET_BARS],
    len: [AtomicU64; NET_BARS],
    va: [AtomicU64; NET_BARS],
}

pub(crate) static BARS: Bars = Bars {
    pa: [const { AtomicU64::new(0) }; NET_BARS],
    len: [const { AtomicU64::new(0) }; NET_BARS],
    va: [const { AtomicU64::new(0) }; NET_BARS],
};

impl Bars {
    fn set(&self, cfg: Option<&NetConfig>) {
        for i in 0..NET_BARS {
            let (pa, len, va) = cfg.map_or((0, 0, 0), |c| (c.bar_pa[i], c.bar_len[i], c.bar_va[i]));
            self.len[i].store(0, Release);
            self.pa[i].store(pa, Release);
            self.va[i].store(va, Release);
            self.len[i].store(if va == 0 { 0 } else { len }, Release);
        }
    }

    /// Where `[pa, pa + size)` is mapped, if it lies inside one mapped BAR.
    fn va(&self, pa: u64, size: u64) -> Option<u64> {
        (0..NET_BARS).find_map(|i| {
            let (base, len) = (self.pa[i].load(Acquire), self.len[i].load(Acquire));
            let inside = pa >= base && pa.checked_add(size)? <= base + len && len != 0;
            inside.then(|| self.va[i].load(Acquire) + (pa - base))
        })
    }

    /// The BARs, as whole pages (what the guest's nested tables leave out).
    pub fn ranges(&self) -> impl Iterator<Item = core::ops::Range<u64>> + '_ {
        (0..NET_BARS).filter_map(|i| {
            let (pa, len) = (self.pa[i].load(Acquire), self.len[i].load(Acquire));
            (len != 0).then(|| (pa & !0xFFF)..(pa + len).next_multiple_of(0x1000))
        })
    }

    /// Is `gpa` inside a BAR of the NIC the hv drives?
    pub fn contains(&self, gpa: u64) -> bool {
        self.va(gpa, 1).is_some()
    }
}

/// The drivers, one of which runs (no heap for a `Box<dyn Nic>`; the one value lives in a
/// static, so the variants' sizes do not matter).
#[allow(clippy::large_enum_variant)]
enum Driver {
    Virtio(virtio::VirtioNet),
    E1000e(e1000e::E1000e),
}

impl Driver {
    /// The driver for the NIC `cfg` describes, its device reset and running.
    fn start(hv: &Hv, cfg: &NetConfig) -> Result<Driver, Status> {
        let (vendor, device) = (cfg.config[0] as u16, (cfg.config[0] >> 16) as u16);
        if e1000e::E1000e::matches(vendor, device) {
            // The link comes up within 500 ms of the reset in QEMU, about 1 s on silicon
            // (autonegotiation): wait up to 3 s.
            let wait = u64::from(hv.tsc_khz) * 3000;
            return e1000e::E1000e::new(cfg, wait)
                .map(Driver::E1000e)
                .map_err(|e| match e {
                    e1000e::Error::Unsupported => Status::NetUnsupported,
                    e1000e::Error::Device => Status::NetDeviceFailed,
                });
        }
        virtio::VirtioNet::new(cfg)
            .map(Driver::Virtio)
            .map_err(|e| match e {
                virtio::Error::Unsupported => Status::NetUnsupported,
                virtio::Error::Device => Status::NetDeviceFailed,
            })
    }

    fn nic(&mut self) -> &mut dyn Nic {
        match self {
            Driver::Virtio(n) => n,
            Driver::E1000e(n) => n,
        }
    }
}

struct Net {
    cfg: NetConfig,
    nic: Driver,
    endpoint: NetEndpoint,
    /// The frame being served (here rather than on a stack: see [`DELIVERY`]); one byte
    /// longer than a frame may be, so that a longer one reaches the endpoint longer than
    /// allowed and is dropped as oversized, not cut to size and served.
    frame: [u8; MAX_FRAME + 1],
}

static NET: Mutex<Option<Net>> = Mutex::new(None);

/// The guest's configuration-space accesses, refused for the NIC the hv drives.
pub static CONFIG: config_space::Guard<{ crate::vmm::MAX_CPUS as usize }> =
    config_space::Guard::new();

/// The bridge last spoke on the fast link (not the serial one): answers go there.
static PREFERRED: AtomicBool = AtomicBool::new(false);
/// Frames received and sent, for `qsctl stats`.
static RX_FRAMES: AtomicU64 = AtomicU64::new(0);
static TX_FRAMES: AtomicU64 = AtomicU64::new(0);
/// TSC cycles in `send`, and in the driver's part of it.
static SEND_CYCLES: AtomicU64 = AtomicU64::new(0);
static NIC_CYCLES: AtomicU64 = AtomicU64::new(0);

/// `Op::NetConfig` (dormant, after `LinkConfig`: the fast link serves the same key).
pub fn configure(hv: &Hv, buf: &[u8]) -> Status {
    if buf.len() < size_of::<NetConfig>() {
        return Status::BadArgument;
    }
    // SAFETY: `buf` holds at least a `NetConfig`, a plain-data struct for which any bytes
    // are a value; read unaligned (the agent's buffer need not be aligned for u64).
    let cfg = unsafe { buf.as_ptr().cast::<NetConfig>().read_unaligned() };
    let Some(key) = link::key() else {
        return Status::NetNotConfigured;
    };
    let mut net = NET.lock();
    if net.is_some() {
        return Status::AlreadyActive;
    }
    BARS.set(Some(&cfg));
    if let Err(s) = mapping::map(hv, &cfg) {
        mapping::unmap(hv, &cfg);
        BARS.set(None);
        return s;
    }
    let mut nic = match Driver::start(hv, &cfg) {
        Ok(nic) => nic,
        Err(s) => {
            dma::reset();
            mapping::unmap(hv, &cfg);
            BARS.set(None);
            return s;
        }
    };
    CONFIG.guard(Some(cfg.bdf));
    let mac = nic.nic().mac();
    let endpoint = NetEndpoint::new(key.as_slice(), mac, cfg.ip.to_be_bytes(), cfg.port);
    *net = Some(Net {
        cfg,
        nic,
        endpoint,
        frame: [0; MAX_FRAME + 1],
    });
    Status::Ok
}

/// `Op::NetRelease` (dormant): the device is reset (dropping the driver resets it), its
/// memory taken back and its registers given back to the guest.
pub fn release(hv: &Hv) -> Status {
    let Some(net) = NET.lock().take() else {
        return Status::NetNotConfigured;
    };
    let cfg = net.cfg;
    drop(net);
    CONFIG.guard(None);
    dma::reset();
    mapping::unmap(hv, &cfg);
    BARS.set(None);
    PREFERRED.store(false, Relaxed);
    Status::Ok
}

/// What one frame asked for besides gdb's bytes (which go into the caller's buffer).
struct Received {
    gdb_len: usize,
    attention: bool,
    request: Option<checkpoint::Request>,
}

/// gdb's bytes from the NIC on their way to the debugger while the kernel runs
/// (`Op::NetPoll`): not on the stack, which is the kernel's interrupt stack while dormant
/// (16 KiB, shared with whatever was interrupted) and the hv's 32 KiB without a guard page.
static DELIVERY: Mutex<[u8; POLL_MAX]> = Mutex::new([0; POLL_MAX]);

/// Receives one frame and serves it (ARP, the handshake and pings are answered inside),
/// gdb's bytes into `gdb`; `None` when nothing has arrived.
fn receive_one(net: &mut Net, gdb: &mut [u8; POLL_MAX]) -> Option<Received> {
    let Net {
        nic,
        endpoint,
        frame,
        ..
    } = net;
    let nic = nic.nic();
    let mut len = 0;
    if !nic.receive(&mut |f| {
        len = f.len().min(frame.len());
        frame[..len].copy_from_slice(&f[..len]);
    }) {
        return None;
    }
    RX_FRAMES.fetch_add(1, Relaxed);
    let mut out = Received {
        gdb_len: 0,
        attention: false,
        request: None,
    };
    let mut tx = |f: &[u8]| {
        TX_FRAMES.fetch_add(1, Relaxed);
        nic.send(f);
    };
    let event = endpoint.receive(&frame[..len], &mut link::nonce, &mut tx);
    if event.is_some() {
        PREFERRED.store(true, Relaxed);
    }
    match event {
        Some(Event::Attention) => out.attention = true,
        Some(Event::Gdb(p)) => {
            out.gdb_len = p.len().min(POLL_MAX);
            gdb[..out.gdb_len].copy_from_slice(&p[..out.gdb_len]);
        }
        Some(Event::Checkpoint(r)) => out.request = Some(r),
        // Answered inside; it only says which link the bridge speaks on.
        Some(Event::Control(control::Message::Ping { .. })) => {}
        Some(Event::Control(_) | Event::Bulk(_)) => link::unrouted(),
        None => {}
    }
    Some(out)
}

/// `Op::NetPoll`, from the agent's interrupt handler (`in_guest`: by hypercall): the same
/// answer bits as `Op::LinkRx`, with [`NET_POLL_OURS`] when the NIC had interrupted and
/// [`NET_POLL_STOP`] when a stop waits for the agent's timer.
pub fn poll(in_guest: bool) -> i64 {
    let mut bits = 0;
    let mut ours = false;
    // Bounded: a flood must not keep the interrupted CPU here; what is left raises the
    // interrupt again.
    for _ in 0..64 {
        let mut gdb = DELIVERY.lock();
        let got = {
            let mut guard = NET.lock();
            let Some(net) = guard.as_mut() else {
                return Status::NetNotConfigured as i64;
            };
            ours |= net.nic.nic().ack_interrupt();
            receive_one(net, &mut gdb)
        };
        let Some(r) = got else { break };
        // The net lock is released: the debugger may answer through it. INTx is
        // level-triggered: Linux acknowledges it when this handler returns, so a stop is not
        // made here (it could not be checkpointed) but held for the agent's timer.
        let stop = link::route(&Routed::Gdb(&gdb[..r.gdb_len]), false);
        drop(gdb);
        let attention = r.attention && link::route(&Routed::Attention, false);
        if in_guest && (stop || attention) {
            bits |= NET_POLL_STOP;
        } else if attention {
            bits |= LINK_RX_ATTENTION;
        }
        if let Some(req) = r.request {
            if link::checkpoint::request(req) {
                bits |= LINK_RX_CHECKPOINT;
            }
        }
    }
    bits | if ours { NET_POLL_OURS } else { 0 }
}

/// Polls the NIC with every CPU parked (the debugger's leader), as `link::poll` does the
/// UART: gdb's bytes into `out`, an attention request, or a checkpoint request answered or
/// refused on the spot.
pub(crate) fn poll_stopped(out: &mut [u8; POLL_MAX]) -> Option<Polled> {
    let r = {
        let mut guard = NET.lock();
        receive_one(guard.as_mut()?, out)?
    };
    if let Some(req) = r.request {
        link::checkpoint::request_stopped(req);
    }
    if r.attention {
        return Some(Polled::Attention);
    }
    Some(Polled::Gdb(r.gdb_len))
}

/// Should answers go out on the fast link (the bridge last spoke there, and it is
/// authenticated)? The serial link marks itself with [`spoke_on_serial`].
pub fn preferred() -> bool {
    PREFERRED.load(Relaxed)
}

/// The bridge spoke on the serial link: answer there from now on.
pub fn spoke_on_serial() {
    PREFERRED.store(false, Relaxed);
}

/// Sends on the fast link; false when it cannot carry it (not configured or no authenticated
/// bridge), and the caller uses the serial link.
pub fn send(what: Outgoing<'_>) -> bool {
    let mut guard = NET.lock();
    let Some(Net { nic, endpoint, .. }) = guard.as_mut() else {
        return false;
    };
    if endpoint.state() != State::Authenticated {
        return false;
    }
    let nic = nic.nic();
    let t0 = instr::rdtsc();
    // The driver's part: each frame's time in its `send_in_place`, less the building there.
    let mut in_nic = 0;
    let mut tx = |build: &mut Build<'_>| {
        TX_FRAMES.fetch_add(1, Relaxed);
        let t = instr::rdtsc();
        let mut building = 0;
        nic.send_in_place(&mut |buf: &mut [u8; MAX_FRAME]| {
            let b = instr::rdtsc();
            let n = build(buf);
            building += instr::rdtsc().wrapping_sub(b);
            n
        });
        in_nic += instr::rdtsc().wrapping_sub(t).wrapping_sub(building);
    };
    match what {
        Outgoing::Bytes(channel, bytes) => endpoint.send_in_place(channel, bytes, &mut tx),
        // Control messages are small: built on the stack, then copied.
        Outgoing::Control(m) => endpoint.send_control(m, &mut |f: &[u8]| tx(&mut copy_of(f))),
        Outgoing::Checkpoint(m) => endpoint.send_checkpoint(m, &mut |f: &[u8]| tx(&mut copy_of(f))),
    }
    SEND_CYCLES.fetch_add(instr::rdtsc().wrapping_sub(t0), Relaxed);
    NIC_CYCLES.fetch_add(in_nic, Relaxed);
    true
}

/// The fast link's part of the statistics block.
pub fn stats_record() -> NetRecord {
    let guard = NET.lock();
    let Some(net) = guard.as_ref() else {
        return NetRecord::default();
    };
    let c = net.endpoint.counters();
    let tx_dropped = match &net.nic {
        Driver::Virtio(n) => n.tx_dropped,
        Driver::E1000e(n) => n.tx_dropped,
    };
    NetRecord {
        state: match net.endpoint.state() {
            State::Authenticated if preferred() => 3,
            State::Authenticated => 2,
            _ => 1,
        },
        rx_frames: RX_FRAMES.load(Relaxed),
        tx_frames: TX_FRAMES.load(Relaxed),
        tx_dropped,
        accepted: c.accepted,
        sent: c.sent,
        arp_answered: c.arp_answered,
        wrong_key: c.wrong_key,
        malformed: c.malformed,
        fragmented: c.fragmented,
        oversized: c.oversized,
        not_for_us: c.not_for_us,
        bad_magic: c.bad_magic,
        unauthenticated: c.unauthenticated,
        bad_tag: c.bad_tag,
        wrong_session: c.wrong_session,
        replayed: c.replayed,
        spoofed: c.spoofed,
        config_refused: CONFIG.refused.load(Relaxed),
        send_cycles: SEND_CYCLES.load(Relaxed),
        nic_cycles: NIC_CYCLES.load(Relaxed),
    }
}

/// What `crate::link` sends.
pub enum Outgoing<'a> {
    Bytes(Channel, &'a [u8]),
    Control(control::Message),
    Checkpoint(checkpoint::Message),
}
