//! The bridge's checkpoint requests, and the events every bridge hears.
//!
//! A request arrives in the link's interrupt handler, where no checkpoint can be taken (that
//! CPU has a vector in service: the engine would refuse it as not quiescent) and a dormant hv
//! cannot be activated. So it waits here, one at a time, for the agent's thread
//! (`Op::LinkRequest` hands it out; the thread calls what the ioctls call, then
//! `Op::LinkReply`). A list needs no CPU stopped: the hv answers it at once, one frame per
//! checkpoint.
//!
//! This state is the hv's, which a rollback does not touch; the agent's is rolled back. So
//! the hv, not the agent, answers a bridge's rollback (the agent that asked is back at the
//! checkpoint's instant and never returns from its call), answers with `RolledBack` any other
//! request the rolled-back agent was serving, and drops a reply for a request no longer in
//! flight (the rolled-back agent finishing a call it made before the checkpoint). The link's
//! session (sequence numbers, authentication) lives in the hv too, so a bridge session spans
//! a rollback unchanged.
//!
//! Events: the engine announces every checkpoint taken (but the periodic ring's, which are
//! only counted, so that a ring every 100 ms does not fill a 115200-baud link), every rollback
//! and every deletion, whoever asked.

use super::send_checkpoint;
use crate::checkpoint::{read, write};
use crate::vmm;
use core::sync::atomic::{AtomicU64, Ordering::*};
use quicksilver_proto::abi::{
    CheckpointArgs, LinkBulk, LinkRequest, RollbackNotice, Status, CHECKPOINT_PERIODIC,
    LINK_BULK_END, LINK_REQUEST_FAST,
};
use quicksilver_proto::link::bulk::{self, Data};
use quicksilver_proto::link::checkpoint::{Done, Entry, Event, Happened, Message, Op, Request};
use quicksilver_proto::link::{net, Channel};
use spin::Mutex;

/// The request waiting for the agent's thread, or handed to it (`handed`), and when it came.
struct Pending {
    req: Request,
    handed: bool,
    since: u64,
}

static PENDING: Mutex<Option<Pending>> = Mutex::new(None);

/// A request older than this is given up (its agent thread was rolled back before it took
/// it, or is gone): a new one replaces it rather than being refused as busy forever.
const STALE_MS: u64 = 30_000;

/// Periodic checkpoints taken, for the events (the ring's are not announced one by one).
static PERIODIC_TAKEN: AtomicU64 = AtomicU64::new(0);

/// Replies from the agent for requests no longer in flight, dropped (`qsctl stats`).
pub static STALE_REPLIES: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> u64 {
    let khz = vmm::get().map_or(1, |hv| hv.tsc_khz.max(1)) as u64;
    crate::arch::instr::rdtsc() / khz
}

fn done(tag: u32, status: Status) -> Done {
    Done {
        tag,
        status: status as i32,
        ..Done::default()
    }
}

/// A request from an authenticated bridge (link lock released). True when the agent's thread
/// must serve it.
pub fn request(r: Request) -> bool {
    if r.op == Op::List {
        send_list(r.tag);
        return false;
    }
    // gdb attached but letting the kernel run is no obstacle: the engine keeps gdb's INT3s
    // out of the checkpoint (gdb holding the CPUs is `request_stopped`).
    let mut p = PENDING.lock();
    let now = now_ms();
    if p.as_ref()
        .is_some_and(|old| now.wrapping_sub(old.since) < STALE_MS)
    {
        drop(p);
        send_checkpoint(Message::Done(done(r.tag, Status::LinkRequestPending)));
        return false;
    }
    *p = Some(Pending {
        req: r,
        handed: false,
        since: now,
    });
    true
}

/// A request while gdb holds every CPU (the debugger polls the link): a list is answered,
/// anything else refused with what to do instead.
pub fn request_stopped(r: Request) {
    match r.op {
        Op::List => send_list(r.tag),
        _ => send_checkpoint(Message::Done(done(r.tag, Status::DebuggerHoldsCpus))),
    }
}

/// The list, one frame per checkpoint after a `Done` saying how many follow. Each entry is
/// read under the engine's lock on its own: the link is slow, and the engine's lock is taken
/// at every copy-on-write fault.
fn send_list(tag: u32) {
    let Some(hv) = vmm::get() else {
        send_checkpoint(Message::Done(done(tag, Status::NotInitialized)));
        return;
    };
    let total = crate::checkpoint::kept_count() as u16;
    let (capacity, used) = crate::checkpoint::memory();
    let (every_ms, keep) = crate::checkpoint::periodic_setting();
    send_checkpoint(Message::Done(Done {
        count: total.into(),
        id: every_ms,
        busy_what: keep,
        cpus: crate::vmm::COUNTERS.active_cpus.load(Relaxed),
        bytes: used,
        pages: capacity / 4096,
        ..done(tag, Status::Ok)
    }));
    for index in 0..total {
        let Some(c) = crate::checkpoint::nth_kept(hv, index.into()) else {
            break;
        };
        send_checkpoint(Message::Entry(Entry {
            tag,
            index,
            total,
            id: c.id,
            parent: c.parent,
            flags: c.flags,
            cpus: c.cpus,
            age_ns: c.age_ns,
            pause_us: c.pause_us,
            pages: c.pages,
            bytes: c.bytes,
        }));
    }
}

/// `Op::LinkRequest`: hands the waiting request to the agent's thread (`op` 0 if none).
pub fn hand_out(buf: &mut [u8]) -> Status {
    if buf.len() < core::mem::size_of::<LinkRequest>() {
        return Status::BufferTooSmall;
    }
    let mut out = LinkRequest::default();
    if let Some(p) = PENDING.lock().as_mut().filter(|p| !p.handed) {
        p.handed = true;
        out.tag = p.req.tag;
        out.op = p.req.op.number();
        out.id = p.req.op.id();
        (out.index, out.first_gpa) = p.req.op.read_args();
        if let Op::ReadPages { count, .. }
        | Op::ReadFill { count }
        | Op::Periodic { keep: count, .. } = p.req.op
        {
            (out.index, out.count) = (0, count);
        }
        // ReadChanged: `id` is a, `index` b (read_args); ReadDevices: `id`.
        if crate::net::preferred() {
            out.flags = LINK_REQUEST_FAST;
        }
    }
    write(buf, &out);
    Status::Ok
}

/// `Op::LinkReply`: the agent's outcome, sent to the bridge if that request is in flight.
pub fn reply(buf: &mut [u8]) -> Status {
    let Some(a) = read::<LinkRequest>(buf) else {
        return Status::BufferTooSmall;
    };
    {
        let mut p = PENDING.lock();
        match p.as_ref() {
            Some(q) if q.handed && q.req.tag == a.tag => *p = None,
            _ => {
                STALE_REPLIES.fetch_add(1, Relaxed);
                return Status::Ok;
            }
        }
    }
    send_checkpoint(Message::Done(Done {
        tag: a.tag,
        status: a.status as i32,
        id: a.id,
        count: a.count,
        cpus: a.cpus,
        busy_cpu: a.busy_cpu,
        busy_what: a.busy_what,
        pause_us: a.pause_us,
        pages: a.pages,
        bytes: a.bytes,
        age_ns: 0,
    }));
    Status::Ok
}

/// `Op::LinkBulk`: its records ([`LinkBulk`], each followed by its bytes and padded to 8), one
/// after the other; the first that does not parse ends the call with `BadArgument`.
pub fn bulk(buf: &mut [u8]) -> Status {
    let mut at = 0;
    while at < buf.len() {
        match bulk_record(&mut buf[at..]) {
            Ok(n) => at += n,
            Err(s) => return s,
        }
    }
    Status::Ok
}

/// One `Op::LinkBulk` record: bytes the agent's thread read for the read request in flight,
/// sent on the bulk channel in frames of their own; or, with `LINK_BULK_END`, the request's
/// end. Each renews the request's time, so a long read being served is never given up as
/// stale. Bytes for a request no longer in flight are dropped (`NoSuchRequest` in the header
/// tells the agent to stop). Returns the record's length.
fn bulk_record(buf: &mut [u8]) -> Result<usize, Status> {
    let Some(h) = read::<LinkBulk>(buf) else {
        return Err(Status::BufferTooSmall);
    };
    let at = core::mem::size_of::<LinkBulk>();
    let Some(data) = buf.get(at..at + h.len as usize) else {
        return Err(Status::BadArgument);
    };
    let record = (at + h.len as usize).next_multiple_of(8).min(buf.len());
    let end = h.flags & LINK_BULK_END != 0;
    let live = {
        let mut p = PENDING.lock();
        match p.as_mut() {
            Some(q) if q.handed && q.req.tag == h.tag && q.req.op.is_read() => {
                q.since = now_ms();
                if end {
                    *p = None;
                }
                true
            }
            _ => false,
        }
    };
    if !live {
        STALE_REPLIES.fetch_add(1, Relaxed);
        write(
            buf,
            &LinkBulk {
                status: Status::NoSuchRequest as i64,
                ..h
            },
        );
        return Ok(record);
    }
    if end {
        let mut out = [0u8; bulk::END_LEN];
        let n = bulk::End {
            tag: h.tag,
            status: h.outcome as i32,
            zero_mask: h.zero_mask,
            crc: h.crc,
            total: h.total,
        }
        .encode(&mut out);
        super::send(Channel::Bulk, &out[..n]);
    } else {
        // Pieces as large as the link that will carry them takes in one frame: a fast link's
        // datagram holds 1419 bytes of data, a serial frame 1011, so a page is 3 datagrams
        // instead of 5. (Should the bridge move to the serial link meanwhile, a larger piece
        // arrives in two frames, the bridge finds the gap, and asks again.)
        let max = if crate::net::preferred() {
            net::MAX_PAYLOAD - bulk::DATA_HEADER
        } else {
            bulk::MAX_DATA
        };
        let mut out = [0u8; net::MAX_PAYLOAD];
        for (k, piece) in data.chunks(max).enumerate() {
            let d = Data {
                tag: h.tag,
                item: h.item,
                offset: h.offset + (k * max) as u32,
                bytes: piece,
            };
            if let Some(n) = d.encode_into(&mut out) {
                super::send(Channel::Bulk, &out[..n]);
            }
        }
    }
    write(
        buf,
        &LinkBulk {
            status: Status::Ok as i64,
            ..h
        },
    );
    Ok(record)
}

fn event(what: Happened, id: u32) -> Event {
    Event {
        what,
        id,
        count: 0,
        pause_us: 0,
        pages: 0,
        bytes: 0,
        age_ns: 0,
        periodic_taken: PERIODIC_TAKEN.load(Relaxed),
    }
}

/// A checkpoint was taken (every CPU runs again, or gdb holds them).
pub fn taken(a: &CheckpointArgs) {
    if a.flags & CHECKPOINT_PERIODIC != 0 {
        PERIODIC_TAKEN.fetch_add(1, Relaxed);
        return;
    }
    send_checkpoint(Message::Event(Event {
        pause_us: a.pause_us,
        pages: a.pages_before,
        bytes: a.bytes,
        ..event(Happened::Taken, a.id)
    }));
}

/// The machine was rolled back: the bridge's own rollback request is answered here (its
/// asker never returns), any other it had handed to the agent is over, then the event.
pub fn rolled_back(n: &RollbackNotice) {
    let in_flight = PENDING.lock().take_if(|p| p.handed);
    if let Some(p) = in_flight {
        let d = match p.req.op {
            Op::Rollback { id } if id == n.id => Done {
                id,
                count: n.dropped,
                pause_us: n.pause_us,
                pages: n.pages,
                age_ns: n.age_ns,
                ..done(p.req.tag, Status::Ok)
            },
            _ => done(p.req.tag, Status::RolledBack),
        };
        send_checkpoint(Message::Done(d));
    }
    send_checkpoint(Message::Event(Event {
        count: n.dropped,
        pause_us: n.pause_us,
        pages: n.pages,
        age_ns: n.age_ns,
        ..event(Happened::RolledBack, n.id)
    }));
}

/// Checkpoints were deleted (`id` may be `CHECKPOINT_ALL`).
pub fn deleted(id: u32, count: u32) {
    if count == 0 {
        return;
    }
    send_checkpoint(Message::Event(Event {
        count,
        ..event(Happened::Deleted, id)
    }));
}
