//! Checkpoint messages on the `control` channel: the bridge's requests (take, list, roll back,
//! delete), the machine's replies, and the events the machine pushes when a checkpoint is
//! taken, a rollback happens or checkpoints are deleted, whoever asked (`qsctl`, gdb's
//! `monitor`, the bridge).
//!
//! One type byte, then fixed little-endian fields, like [`super::control::Message`] (whose
//! type bytes are 1 to 8; these are 16 to 19, so one payload is never both). Every message
//! fits one frame: a list is one [`Done`] (with how many entries follow) and then one
//! [`Entry`] frame per checkpoint, each with its index and the total, so that a bridge can
//! tell when it has them all and a lost frame shows as a gap rather than a wrong list.
//!
//! Every request carries a tag the bridge chose; the replies carry it back. A rollback rolls
//! the agent back too: a reply the rolled-back agent sends again for an older request carries
//! that older tag, which the bridge no longer waits for, and drops.

use crate::abi::CHECKPOINT_ALL;

/// Longest checkpoint message.
pub const MAX_LEN: usize = 64;

/// What a request asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Take a checkpoint.
    Take,
    /// List the checkpoints kept.
    List,
    /// Roll the machine back to checkpoint `id`.
    Rollback { id: u32 },
    /// Delete checkpoint `id`, or every one ([`CHECKPOINT_ALL`]).
    Delete { id: u32 },
    /// What an export needs of the kernel (an `abi::ExportMeta` and the RAM ranges), on the
    /// bulk channel ([`super::bulk`]).
    ReadMeta,
    /// CPU `cpu`'s state in checkpoint `id`, on the bulk channel.
    ReadCpu { id: u32, cpu: u32 },
    /// `count` pages (1 to `abi::LINK_READ_MAX_PAGES`) of checkpoint `id` from `first_gpa`
    /// (page-aligned), on the bulk channel: the pages that are not all zero.
    ReadPages { id: u32, first_gpa: u64, count: u32 },
    /// `count` pages (1 to `abi::LINK_READ_MAX_PAGES`) of bytes that do not compress, on the
    /// bulk channel: what the link carries, measured.
    ReadFill { count: u32 },
    /// The pages written between checkpoints `a` and `b` (either older; 0: since `a`), on the
    /// bulk channel: an `abi::CheckpointChanged`, then its runs.
    ReadChanged { a: u32, b: u32 },
    /// The platform devices' record of checkpoint `id`, on the bulk channel.
    ReadDevices { id: u32 },
    /// The hv's statistics block (each CPU's mode, exits by reason), on the bulk channel.
    ReadStats,
    /// The periodic ring: a checkpoint every `every_ms` milliseconds (0: off; at least
    /// `abi::PERIODIC_MIN_MS`), the last `keep` kept. Answered with a [`Done`].
    Periodic { every_ms: u32, keep: u32 },
}

impl Op {
    /// The op's number in [`crate::abi::LinkRequest::op`] (the list never leaves the hv).
    pub fn number(self) -> u32 {
        match self {
            Op::Take => crate::abi::LINK_OP_TAKE,
            Op::List => 2,
            Op::Rollback { .. } => crate::abi::LINK_OP_ROLLBACK,
            Op::Delete { .. } => crate::abi::LINK_OP_DELETE,
            Op::ReadMeta => crate::abi::LINK_OP_READ_META,
            Op::ReadCpu { .. } => crate::abi::LINK_OP_READ_CPU,
            Op::ReadPages { .. } => crate::abi::LINK_OP_READ_PAGES,
            Op::ReadFill { .. } => crate::abi::LINK_OP_READ_FILL,
            Op::ReadChanged { .. } => crate::abi::LINK_OP_READ_CHANGED,
            Op::ReadDevices { .. } => crate::abi::LINK_OP_READ_DEVICES,
            Op::ReadStats => crate::abi::LINK_OP_READ_STATS,
            Op::Periodic { .. } => crate::abi::LINK_OP_PERIODIC,
        }
    }

    /// The checkpoint the op names (0 for take, list and the meta).
    pub fn id(self) -> u32 {
        match self {
            Op::Take | Op::List | Op::ReadMeta | Op::ReadFill { .. } | Op::ReadStats => 0,
            Op::Rollback { id }
            | Op::Delete { id }
            | Op::ReadCpu { id, .. }
            | Op::ReadPages { id, .. }
            | Op::ReadChanged { a: id, .. }
            | Op::ReadDevices { id }
            | Op::Periodic { every_ms: id, .. } => id,
        }
    }

    /// A read's two more fields: (the CPU or the page count, the first page's address).
    pub fn read_args(self) -> (u32, u64) {
        match self {
            Op::ReadCpu { cpu, .. } => (cpu, 0),
            Op::ReadPages {
                first_gpa, count, ..
            } => (count, first_gpa),
            Op::ReadFill { count } => (count, 0),
            Op::ReadChanged { b, .. } => (b, 0),
            Op::Periodic { keep, .. } => (keep, 0),
            _ => (0, 0),
        }
    }

    /// Whether the op carries [`Op::read_args`] on the wire (the reads, and the ring's setting).
    fn has_args(self) -> bool {
        self.is_read() || matches!(self, Op::Periodic { .. })
    }

    /// Whether this op is a read, answered on the bulk channel.
    pub fn is_read(self) -> bool {
        matches!(
            self,
            Op::ReadMeta
                | Op::ReadCpu { .. }
                | Op::ReadPages { .. }
                | Op::ReadFill { .. }
                | Op::ReadChanged { .. }
                | Op::ReadDevices { .. }
                | Op::ReadStats
        )
    }

    /// The op for a number, an id and a read's fields ([`Op::read_args`]), if the number is
    /// one.
    pub fn from_number(op: u32, id: u32, arg: u32, gpa: u64) -> Option<Op> {
        Some(match op {
            crate::abi::LINK_OP_TAKE => Op::Take,
            2 => Op::List,
            crate::abi::LINK_OP_ROLLBACK => Op::Rollback { id },
            crate::abi::LINK_OP_DELETE => Op::Delete { id },
            crate::abi::LINK_OP_READ_META => Op::ReadMeta,
            crate::abi::LINK_OP_READ_CPU => Op::ReadCpu { id, cpu: arg },
            crate::abi::LINK_OP_READ_PAGES => Op::ReadPages {
                id,
                first_gpa: gpa,
                count: arg,
            },
            crate::abi::LINK_OP_READ_FILL => Op::ReadFill { count: arg },
            crate::abi::LINK_OP_READ_CHANGED => Op::ReadChanged { a: id, b: arg },
            crate::abi::LINK_OP_READ_DEVICES => Op::ReadDevices { id },
            crate::abi::LINK_OP_READ_STATS => Op::ReadStats,
            crate::abi::LINK_OP_PERIODIC => Op::Periodic {
                every_ms: id,
                keep: arg,
            },
            _ => return None,
        })
    }
}

/// Bridge to machine: a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Chosen by the bridge; the reply carries it back.
    pub tag: u32,
    pub op: Op,
}

/// Machine to bridge: a request's outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Done {
    /// The request's tag.
    pub tag: u32,
    /// The hv's `Status` (`abi::status_message` says what it means).
    pub status: i32,
    /// Take: the new checkpoint; rollback, delete: the one named; list: the periodic ring's
    /// interval in milliseconds (0: off).
    pub id: u32,
    /// List: entries that follow; delete: checkpoints deleted; rollback: newer ones dropped.
    pub count: u32,
    /// Take: CPUs in the checkpoint; list: CPUs in guest mode now (0: the hv is dormant).
    pub cpus: u32,
    /// Take refused as not quiescent: the CPU and what it was doing (as `CheckpointArgs`);
    /// list: `busy_what` is how many periodic checkpoints the ring keeps.
    pub busy_cpu: i32,
    pub busy_what: u32,
    /// Take, rollback: microseconds every CPU was stopped.
    pub pause_us: u64,
    /// Take: pages written since the previous checkpoint; rollback: pages restored; list:
    /// the checkpoint memory's size in pages.
    pub pages: u64,
    /// Take: bytes of checkpoint memory it holds; list: bytes of checkpoint memory used.
    pub bytes: u64,
    /// Rollback: how old the checkpoint was, in nanoseconds.
    pub age_ns: u64,
}

/// Machine to bridge: one checkpoint of a list (the fields `qsctl checkpoints` prints).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// The list request's tag.
    pub tag: u32,
    /// This entry's place (from 0), and how many the list has.
    pub index: u16,
    pub total: u16,
    pub id: u32,
    /// The checkpoint it was taken after; 0 if none.
    pub parent: u32,
    /// `abi::CHECKPOINT_PERIODIC`, `abi::CHECKPOINT_CURRENT`.
    pub flags: u32,
    pub cpus: u32,
    pub age_ns: u64,
    pub pause_us: u64,
    pub pages: u64,
    pub bytes: u64,
}

/// What happened, for an [`Event`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Happened {
    /// A checkpoint was taken (by anyone; the periodic ring's are counted, not announced).
    Taken = 1,
    /// The machine was rolled back.
    RolledBack = 2,
    /// Checkpoints were deleted (`id` may be [`CHECKPOINT_ALL`]).
    Deleted = 3,
}

/// Machine to bridge, unsolicited: something happened to the checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub what: Happened,
    /// The checkpoint (taken, rolled back to, deleted; [`CHECKPOINT_ALL`]: every one).
    pub id: u32,
    /// Rolled back: newer checkpoints dropped; deleted: how many.
    pub count: u32,
    /// Taken, rolled back: microseconds every CPU was stopped.
    pub pause_us: u64,
    /// Taken: pages written since the previous one; rolled back: pages restored.
    pub pages: u64,
    /// Taken: bytes of checkpoint memory it holds.
    pub bytes: u64,
    /// Rolled back: how old the checkpoint was, in nanoseconds.
    pub age_ns: u64,
    /// Periodic checkpoints taken so far (the ring's are not announced one by one).
    pub periodic_taken: u64,
}

/// Any checkpoint message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    Request(Request),
    Done(Done),
    Entry(Entry),
    Event(Event),
}

/// A payload that is not a checkpoint message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadMessage;

const REQUEST: u8 = 16;
const DONE: u8 = 17;
const ENTRY: u8 = 18;
const EVENT: u8 = 19;

/// Appends little-endian fields.
struct Writer<'a> {
    out: &'a mut [u8; MAX_LEN],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) -> &mut Self {
        self.out[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
        self
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.put(&[v])
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.put(&v.to_le_bytes())
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.put(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.put(&v.to_le_bytes())
    }
}

/// Takes little-endian fields; any shortfall is a [`BadMessage`].
struct Reader<'a> {
    p: &'a [u8],
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], BadMessage> {
        let (head, rest) = self.p.split_first_chunk::<N>().ok_or(BadMessage)?;
        self.p = rest;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, BadMessage> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, BadMessage> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32, BadMessage> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, BadMessage> {
        self.take().map(u64::from_le_bytes)
    }
    /// The end: bytes left over make the message bad too.
    fn end<T>(self, v: T) -> Result<T, BadMessage> {
        if self.p.is_empty() {
            Ok(v)
        } else {
            Err(BadMessage)
        }
    }
}

impl Message {
    /// Encodes into `out`; returns the length.
    pub fn encode(&self, out: &mut [u8; MAX_LEN]) -> usize {
        let mut w = Writer { out, at: 0 };
        match *self {
            Message::Request(r) => {
                w.u8(REQUEST)
                    .u32(r.tag)
                    .u8(r.op.number() as u8)
                    .u32(r.op.id());
                if r.op.has_args() {
                    let (arg, gpa) = r.op.read_args();
                    w.u32(arg).u64(gpa);
                }
            }
            Message::Done(d) => {
                w.u8(DONE)
                    .u32(d.tag)
                    .u32(d.status as u32)
                    .u32(d.id)
                    .u32(d.count)
                    .u32(d.cpus)
                    .u32(d.busy_cpu as u32)
                    .u32(d.busy_what)
                    .u64(d.pause_us)
                    .u64(d.pages)
                    .u64(d.bytes)
                    .u64(d.age_ns);
            }
            Message::Entry(e) => {
                w.u8(ENTRY)
                    .u32(e.tag)
                    .u16(e.index)
                    .u16(e.total)
                    .u32(e.id)
                    .u32(e.parent)
                    .u32(e.flags)
                    .u32(e.cpus)
                    .u64(e.age_ns)
                    .u64(e.pause_us)
                    .u64(e.pages)
                    .u64(e.bytes);
            }
            Message::Event(e) => {
                w.u8(EVENT)
                    .u8(e.what as u8)
                    .u32(e.id)
                    .u32(e.count)
                    .u64(e.pause_us)
                    .u64(e.pages)
                    .u64(e.bytes)
                    .u64(e.age_ns)
                    .u64(e.periodic_taken);
            }
        }
        w.at
    }

    /// Decodes a payload; any length or value out of place is an error.
    pub fn decode(p: &[u8]) -> Result<Message, BadMessage> {
        let mut r = Reader { p };
        match r.u8()? {
            REQUEST => {
                let tag = r.u32()?;
                let op = r.u8()?;
                let id = r.u32()?;
                let read = matches!(
                    op.into(),
                    crate::abi::LINK_OP_READ_META
                        | crate::abi::LINK_OP_READ_CPU
                        | crate::abi::LINK_OP_READ_PAGES
                        | crate::abi::LINK_OP_READ_FILL
                        | crate::abi::LINK_OP_READ_CHANGED
                        | crate::abi::LINK_OP_READ_DEVICES
                        | crate::abi::LINK_OP_READ_STATS
                        | crate::abi::LINK_OP_PERIODIC
                );
                let (arg, gpa) = if read { (r.u32()?, r.u64()?) } else { (0, 0) };
                let op = Op::from_number(op.into(), id, arg, gpa).ok_or(BadMessage)?;
                // Take, list and the meta name no checkpoint; a rollback or a read needs a
                // real one; a read of pages, whole pages within its limit.
                let real = id != 0 && id != CHECKPOINT_ALL;
                let sound = match op {
                    Op::Take | Op::List => id == 0,
                    Op::ReadMeta | Op::ReadStats => id == 0 && arg == 0 && gpa == 0,
                    Op::Rollback { .. } => real,
                    Op::ReadCpu { .. } => real && gpa == 0,
                    Op::ReadPages {
                        first_gpa, count, ..
                    } => {
                        real && first_gpa % 4096 == 0
                            && (1..=crate::abi::LINK_READ_MAX_PAGES).contains(&count)
                    }
                    Op::ReadFill { count } => {
                        id == 0
                            && gpa == 0
                            && (1..=crate::abi::LINK_READ_MAX_PAGES).contains(&count)
                    }
                    Op::ReadChanged { b, .. } => real && b != CHECKPOINT_ALL && gpa == 0,
                    Op::ReadDevices { .. } => real && arg == 0 && gpa == 0,
                    Op::Periodic { every_ms, keep } => {
                        gpa == 0
                            && (every_ms == 0
                                || (every_ms >= crate::abi::PERIODIC_MIN_MS
                                    && (1..=crate::abi::MAX_CHECKPOINTS).contains(&keep)))
                    }
                    Op::Delete { id } => id != 0,
                };
                if !sound {
                    return Err(BadMessage);
                }
                r.end(Message::Request(Request { tag, op }))
            }
            DONE => {
                let d = Done {
                    tag: r.u32()?,
                    status: r.u32()? as i32,
                    id: r.u32()?,
                    count: r.u32()?,
                    cpus: r.u32()?,
                    busy_cpu: r.u32()? as i32,
                    busy_what: r.u32()?,
                    pause_us: r.u64()?,
                    pages: r.u64()?,
                    bytes: r.u64()?,
                    age_ns: r.u64()?,
                };
                r.end(Message::Done(d))
            }
            ENTRY => {
                let e = Entry {
                    tag: r.u32()?,
                    index: r.u16()?,
                    total: r.u16()?,
                    id: r.u32()?,
                    parent: r.u32()?,
                    flags: r.u32()?,
                    cpus: r.u32()?,
                    age_ns: r.u64()?,
                    pause_us: r.u64()?,
                    pages: r.u64()?,
                    bytes: r.u64()?,
                };
                if e.index >= e.total {
                    return Err(BadMessage);
                }
                r.end(Message::Entry(e))
            }
            EVENT => {
                let what = match r.u8()? {
                    1 => Happened::Taken,
                    2 => Happened::RolledBack,
                    3 => Happened::Deleted,
                    _ => return Err(BadMessage),
                };
                let e = Event {
                    what,
                    id: r.u32()?,
                    count: r.u32()?,
                    pause_us: r.u64()?,
                    pages: r.u64()?,
                    bytes: r.u64()?,
                    age_ns: r.u64()?,
                    periodic_taken: r.u64()?,
                };
                r.end(Message::Event(e))
            }
            _ => Err(BadMessage),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        let done = Done {
            tag: 7,
            status: -3,
            id: 4,
            count: 2,
            cpus: 2,
            busy_cpu: -1,
            busy_what: 0x30,
            pause_us: 1234,
            pages: 99,
            bytes: 1 << 20,
            age_ns: u64::MAX,
        };
        let entry = Entry {
            tag: 8,
            index: 1,
            total: 3,
            id: 5,
            parent: 4,
            flags: 3,
            cpus: 2,
            age_ns: 5_000_000_000,
            pause_us: 800,
            pages: 12,
            bytes: 65536,
        };
        let event = Event {
            what: Happened::RolledBack,
            id: 3,
            count: 1,
            pause_us: 1,
            pages: 2,
            bytes: 3,
            age_ns: 4,
            periodic_taken: 5,
        };
        vec![
            Message::Request(Request {
                tag: 1,
                op: Op::Take,
            }),
            Message::Request(Request {
                tag: 2,
                op: Op::List,
            }),
            Message::Request(Request {
                tag: 3,
                op: Op::Rollback { id: 9 },
            }),
            Message::Request(Request {
                tag: u32::MAX,
                op: Op::Delete { id: CHECKPOINT_ALL },
            }),
            Message::Request(Request {
                tag: 4,
                op: Op::ReadMeta,
            }),
            Message::Request(Request {
                tag: 5,
                op: Op::ReadCpu { id: 2, cpu: 3 },
            }),
            Message::Request(Request {
                tag: 7,
                op: Op::ReadFill { count: 64 },
            }),
            Message::Request(Request {
                tag: 8,
                op: Op::ReadChanged { a: 3, b: 0 },
            }),
            Message::Request(Request {
                tag: 9,
                op: Op::ReadDevices { id: 3 },
            }),
            Message::Request(Request {
                tag: 10,
                op: Op::ReadStats,
            }),
            Message::Request(Request {
                tag: 11,
                op: Op::Periodic {
                    every_ms: 100,
                    keep: 10,
                },
            }),
            Message::Request(Request {
                tag: 12,
                op: Op::Periodic {
                    every_ms: 0,
                    keep: 0,
                },
            }),
            Message::Request(Request {
                tag: 6,
                op: Op::ReadPages {
                    id: 2,
                    first_gpa: 0x1_0000_0000,
                    count: 64,
                },
            }),
            Message::Done(done),
            Message::Entry(entry),
            Message::Event(event),
            Message::Event(Event {
                what: Happened::Deleted,
                id: CHECKPOINT_ALL,
                ..event
            }),
        ]
    }

    #[test]
    fn every_message_round_trips_and_wrong_lengths_do_not() {
        for m in samples() {
            let mut buf = [0u8; MAX_LEN];
            let n = m.encode(&mut buf);
            assert!(n <= crate::link::MAX_PAYLOAD);
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
    }

    #[test]
    fn requests_out_of_place_are_refused() {
        let encode = |tag: u32, op: u8, id: u32| {
            let mut v = vec![REQUEST];
            v.extend_from_slice(&tag.to_le_bytes());
            v.push(op);
            v.extend_from_slice(&id.to_le_bytes());
            v
        };
        assert!(Message::decode(&encode(1, 1, 0)).is_ok());
        // An unknown op, a rollback to no checkpoint or to "all", a take naming one.
        assert_eq!(Message::decode(&encode(1, 9, 0)), Err(BadMessage));
        assert_eq!(Message::decode(&encode(1, 3, 0)), Err(BadMessage));
        assert_eq!(
            Message::decode(&encode(1, 3, CHECKPOINT_ALL)),
            Err(BadMessage)
        );
        assert_eq!(Message::decode(&encode(1, 1, 5)), Err(BadMessage));
        assert_eq!(Message::decode(&encode(1, 4, 0)), Err(BadMessage));
        // Reads: pages unaligned, too many or none; a CPU of no checkpoint.
        let read = |id: u32, arg: u32, gpa: u64| {
            let mut v = encode(1, 7, id);
            v.extend_from_slice(&arg.to_le_bytes());
            v.extend_from_slice(&gpa.to_le_bytes());
            v
        };
        assert!(Message::decode(&read(1, 64, 0x1000)).is_ok());
        assert_eq!(Message::decode(&read(1, 65, 0x1000)), Err(BadMessage));
        assert_eq!(Message::decode(&read(1, 0, 0x1000)), Err(BadMessage));
        assert_eq!(Message::decode(&read(1, 1, 0x1001)), Err(BadMessage));
        assert_eq!(Message::decode(&read(0, 1, 0x1000)), Err(BadMessage));
        let mut cpu = read(0, 1, 0);
        cpu[5] = 6;
        assert_eq!(Message::decode(&cpu), Err(BadMessage));
        // An entry past its list's end; an event of an unknown kind.
        let mut buf = [0u8; MAX_LEN];
        let n = Message::Entry(Entry {
            index: 0,
            total: 1,
            ..Entry::default()
        })
        .encode(&mut buf);
        buf[5..7].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(Message::decode(&buf[..n]), Err(BadMessage));
        let n = Message::Event(Event {
            what: Happened::Taken,
            id: 1,
            count: 0,
            pause_us: 0,
            pages: 0,
            bytes: 0,
            age_ns: 0,
            periodic_taken: 0,
        })
        .encode(&mut buf);
        buf[1] = 9;
        assert_eq!(Message::decode(&buf[..n]), Err(BadMessage));
    }

    #[test]
    fn no_checkpoint_message_is_a_control_message_and_back() {
        for m in samples() {
            let mut buf = [0u8; MAX_LEN];
            let n = m.encode(&mut buf);
            assert!(super::super::control::Message::decode(&buf[..n]).is_err());
        }
        let mut b = [0u8; 33];
        let n = super::super::control::Message::Attention.encode(&mut b);
        assert_eq!(Message::decode(&b[..n]), Err(BadMessage));
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder, and what decodes encodes to the same bytes.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(m) = Message::decode(&bytes) {
                let mut buf = [0u8; MAX_LEN];
                let n = m.encode(&mut buf);
                prop_assert_eq!(&buf[..n], &bytes[..]);
            }
        }
    }
}
