//! The control socket's checkpoint commands (`checkpoint`, `checkpoints`, `rollback ID`,
//! `delete ID|all`) and the events the machine pushes (`subscribe`).
//!
//! A command becomes one request on the link with a tag of its own; the demultiplexer hands
//! each reply to the command waiting for that tag ([`Checkpoints::deliver`]) and each event to
//! every subscribed client ([`Checkpoints::publish`]). A reply whose tag nobody waits for any
//! more (the command timed out, or a rolled-back agent answered again a request it served
//! before the checkpoint) is dropped: tags are never reused.

use crate::link::Link;
use quicksilver_proto::abi::{
    self, Status, CHECKPOINT_ALL, CHECKPOINT_CURRENT, CHECKPOINT_PERIODIC,
};
use quicksilver_proto::link::checkpoint::{Done, Entry, Event, Happened, Message, Op, Request};
use quicksilver_proto::link::{bulk, Channel};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a command waits for the machine's answer: a checkpoint may activate the hv and
/// retry while a CPU is busy; under QEMU's TCG a rollback of a busy machine takes seconds.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a list waits for each of its entries once the machine said how many follow.
const ENTRY_TIMEOUT: Duration = Duration::from_secs(5);

/// A control client's writer, shared by its own thread (replies) and the link's (events).
pub type ClientWriter = Arc<Mutex<UnixStream>>;

/// The link (once authenticated), the commands waiting for replies, the subscribed clients.
#[derive(Default)]
pub struct Checkpoints {
    link: Mutex<Option<Arc<Link>>>,
    next_tag: AtomicU32,
    waiting: Mutex<HashMap<u32, Sender<Answer>>>,
    subscribers: Mutex<Vec<ClientWriter>>,
    /// Held while a command waits for the machine: the machine serves one request at a time,
    /// so a second client's command waits here rather than being refused there.
    one_at_a_time: Mutex<()>,
}

/// What the machine sends for a request: a checkpoint message (a reply, a list's entry, a
/// read refused), or a read's data and end (the bulk channel).
#[derive(Debug)]
enum Answer {
    Message(Message),
    Data {
        item: u32,
        offset: u32,
        bytes: Vec<u8>,
    },
    End(bulk::End),
}

/// A read's items, each whole (a page each for a read of pages, one for a CPU or the meta),
/// and which of its pages were all zero (not sent).
#[derive(Debug, Default)]
pub struct ReadReply {
    pub items: BTreeMap<u32, Vec<u8>>,
    pub zero_mask: u64,
}

/// Why a read brought nothing.
#[derive(Debug)]
pub enum ReadError {
    /// Asking again will not help: the machine refused (the message says why and what to do).
    Refused(String),
    /// Asking again may: the link lost or spoiled something, or the machine was busy.
    Lost(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Refused(m) | ReadError::Lost(m) => f.write_str(m),
        }
    }
}

/// A command the control socket parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Take,
    List,
    Rollback(u32),
    Delete(u32),
    /// The periodic ring: every `every_ms` ms (0: off), the last `keep` kept.
    Periodic {
        every_ms: u32,
        keep: u32,
    },
}

impl Command {
    /// Parses a checkpoint command line; `None` if it is no checkpoint command, `Err` with
    /// what to type if it is one, badly given.
    pub fn parse(line: &str) -> Option<Result<Command, String>> {
        let mut words = line.split_whitespace();
        let verb = words.next()?;
        let arg = words.next();
        let extra = words.next();
        let cmd = match (verb, arg) {
            ("checkpoint", None) => Ok(Command::Take),
            ("checkpoints", None) => Ok(Command::List),
            ("rollback", None) => Err(
                "rollback needs the checkpoint's id: rollback ID (checkpoints lists them)".into(),
            ),
            ("rollback", Some(id)) => parse_id(id).map(Command::Rollback),
            ("delete", None) => Err(
                "delete needs what to delete: delete ID (checkpoints lists them) or delete all"
                    .into(),
            ),
            ("delete", Some("all")) => Ok(Command::Delete(CHECKPOINT_ALL)),
            ("periodic", Some("off")) => Ok(Command::Periodic {
                every_ms: 0,
                keep: 0,
            }),
            ("periodic", arg) => {
                // `periodic MS [KEEP]`: KEEP is the second argument (20 if not given, as
                // `qsctl checkpoint --every`).
                let keep = match extra {
                    None => Ok(20),
                    Some(k) => k.parse::<u32>().map_err(|_| format!("'{k}' is not a count")),
                };
                let every = arg.map(str::parse::<u32>);
                return Some(match (every, keep) {
                    (Some(Ok(ms)), Ok(keep))
                        if ms >= abi::PERIODIC_MIN_MS
                            && (1..=abi::MAX_CHECKPOINTS).contains(&keep) =>
                    {
                        match words.next() {
                            None => Ok(Command::Periodic { every_ms: ms, keep }),
                            Some(x) => Err(format!("'{x}': periodic MS [KEEP] at most")),
                        }
                    }
                    _ => Err(format!(
                        "periodic MS [KEEP] | periodic off: a checkpoint every MS milliseconds (at least {}), the last KEEP (1 to {}, 20 by default) kept",
                        abi::PERIODIC_MIN_MS,
                        abi::MAX_CHECKPOINTS
                    )),
                });
            }
            ("delete", Some(id)) => parse_id(id).map(Command::Delete),
            ("checkpoint" | "checkpoints", Some(a)) => Err(format!(
                "{verb} takes no argument (got '{a}'): to delete one, delete ID|all; to roll back, rollback ID"
            )),
            _ => return None,
        };
        Some(match (cmd, extra) {
            (Ok(_), Some(x)) => Err(format!("'{x}': one argument at most; try help")),
            (c, _) => c,
        })
    }

    fn op(self) -> Op {
        match self {
            Command::Take => Op::Take,
            Command::List => Op::List,
            Command::Rollback(id) => Op::Rollback { id },
            Command::Delete(id) => Op::Delete { id },
            Command::Periodic { every_ms, keep } => Op::Periodic { every_ms, keep },
        }
    }
}

fn parse_id(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(id) if id != 0 && id != CHECKPOINT_ALL => Ok(id),
        _ => Err(format!(
            "'{s}' is not a checkpoint id: give the number checkpoints lists"
        )),
    }
}

/// `{"ok":false,"error":...}`.
pub fn error(msg: impl Into<String>) -> Value {
    json!({ "ok": false, "error": msg.into() })
}

/// What a refused request's status means, after what was refused.
fn refused(what: &str, d: &Done) -> Value {
    let mut msg = format!("{what}: {}", abi::status_message(d.status.into()));
    if d.status == Status::NotQuiescent as i32 {
        msg = format!(
            "{what}: CPU {} was {}: {}",
            d.busy_cpu,
            abi::BusyWhat(d.busy_what),
            abi::status_message(d.status.into())
        );
    }
    error(msg)
}

fn ms(ns: u64) -> u64 {
    ns / 1_000_000
}

fn entry_json(e: &Entry) -> Value {
    json!({
        "id": e.id,
        "parent": e.parent,
        "age_ms": ms(e.age_ns),
        "pause_us": e.pause_us,
        "pages": e.pages,
        "bytes": e.bytes,
        "cpus": e.cpus,
        "periodic": e.flags & CHECKPOINT_PERIODIC != 0,
        "current": e.flags & CHECKPOINT_CURRENT != 0,
    })
}

/// An event as the JSON line subscribers get.
pub fn event_json(e: &Event) -> Value {
    match e.what {
        Happened::Taken => json!({
            "event": "checkpoint",
            "id": e.id,
            "pause_us": e.pause_us,
            "pages": e.pages,
            "bytes": e.bytes,
            "periodic_taken": e.periodic_taken,
        }),
        Happened::RolledBack => json!({
            "event": "rollback",
            "id": e.id,
            "age_ms": ms(e.age_ns),
            "pause_us": e.pause_us,
            "pages": e.pages,
            "dropped": e.count,
            "periodic_taken": e.periodic_taken,
        }),
        Happened::Deleted => json!({
            "event": "delete",
            "id": if e.id == CHECKPOINT_ALL { json!("all") } else { json!(e.id) },
            "deleted": e.count,
            "periodic_taken": e.periodic_taken,
        }),
    }
}

/// Takes the waiter for a tag out of the table when the command is over, however it ends.
struct Waiter<'a> {
    owner: &'a Checkpoints,
    tag: u32,
    rx: Receiver<Answer>,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.owner
            .waiting
            .lock()
            .expect("waiting")
            .remove(&self.tag);
    }
}

impl Checkpoints {
    /// The link is authenticated: commands go out on it from now on.
    pub fn set_link(&self, link: Arc<Link>) {
        // Tags start somewhere of this bridge's own: the machine may still be answering a
        // bridge that died (an export's read) when this one starts, and its frames must not
        // pass for answers to this one's requests.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| {
                d.subsec_nanos() ^ (d.as_secs() as u32).rotate_left(16)
            });
        self.next_tag.store(seed, Ordering::Relaxed);
        *self.link.lock().expect("link") = Some(link);
    }

    /// Bytes read from the link so far (0 before it is up).
    pub fn wire_bytes(&self) -> u64 {
        self.link
            .lock()
            .expect("link")
            .as_ref()
            .map_or(0, |l| l.wire_bytes())
    }

    /// Waits (up to `timeout`) until the link is authenticated; whether it is.
    pub fn wait_link(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.link.lock().expect("link").is_none() {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    }

    /// Adds a client that wants every event.
    pub fn subscribe(&self, client: ClientWriter) {
        self.subscribers.lock().expect("subscribers").push(client);
    }

    /// Sends `e` to every subscribed client; clients that are gone are forgotten.
    pub fn publish(&self, e: &Event) {
        self.publish_json(&event_json(e));
    }

    /// Sends an event line to every subscribed client; clients that are gone are forgotten.
    pub fn publish_json(&self, v: &Value) {
        let line = format!("{v}\n");
        self.subscribers.lock().expect("subscribers").retain(|c| {
            let mut s = c.lock().expect("client");
            s.write_all(line.as_bytes())
                .and_then(|()| s.flush())
                .is_ok()
        });
    }

    /// A reply from the machine: to the command waiting for its tag, or dropped.
    pub fn deliver(&self, m: Message) {
        let tag = match m {
            Message::Done(d) => d.tag,
            Message::Entry(e) => e.tag,
            Message::Request(_) | Message::Event(_) => return,
        };
        self.hand(tag, Answer::Message(m));
    }

    /// A bulk frame from the machine: to the read waiting for its tag, or dropped. False if it
    /// is no bulk message.
    pub fn deliver_bulk(&self, payload: &[u8]) -> bool {
        match bulk::Message::decode(payload) {
            Ok(bulk::Message::Data(d)) => self.hand(
                d.tag,
                Answer::Data {
                    item: d.item,
                    offset: d.offset,
                    bytes: d.bytes.to_vec(),
                },
            ),
            Ok(bulk::Message::End(e)) => self.hand(e.tag, Answer::End(e)),
            Err(_) => return false,
        }
        true
    }

    fn hand(&self, tag: u32, a: Answer) {
        let data = matches!(a, Answer::Data { .. });
        let sent = self
            .waiting
            .lock()
            .expect("waiting")
            .get(&tag)
            .is_some_and(|tx| tx.send(a).is_ok());
        // A read given up goes on arriving for a while: one line for its end, not each piece.
        if !sent && !data {
            eprintln!(
                "qs-bridge: dropped a reply for request {tag}, which nobody waits for any more (timed out, or answered again by a machine rolled back since)"
            );
        }
    }

    fn expect(&self) -> Waiter<'_> {
        let mut tag = 0;
        while tag == 0 {
            tag = self
                .next_tag
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
        }
        let (tx, rx) = mpsc::channel();
        self.waiting.lock().expect("waiting").insert(tag, tx);
        Waiter {
            owner: self,
            tag,
            rx,
        }
    }

    /// Runs a command against the machine; the JSON reply.
    /// Whether gdb holds the CPUs or lets them run, the machine knows (the bridge sees only
    /// that a session is open): it answers `DebuggerHoldsCpus` in the first case.
    pub fn run(&self, cmd: Command) -> Value {
        let Some(link) = self.link.lock().expect("link").clone() else {
            return error(format!(
                "{}: the link to the machine is not up yet (status says where it stands): ask again once it is authenticated",
                what(cmd)
            ));
        };
        // A command that timed out leaves nothing behind here; the machine gives its request
        // up after 30 s (then a new one is served).
        let _turn = self.one_at_a_time.lock().unwrap_or_else(|e| e.into_inner());
        let waiter = self.expect();
        let mut buf = [0u8; quicksilver_proto::link::checkpoint::MAX_LEN];
        let n = Message::Request(Request {
            tag: waiter.tag,
            op: cmd.op(),
        })
        .encode(&mut buf);
        if let Err(e) = link.send(Channel::Control, &buf[..n]) {
            return error(format!("{}: {e:#}", what(cmd)));
        }
        let done = match waiter.rx.recv_timeout(ANSWER_TIMEOUT) {
            Ok(Answer::Message(Message::Done(d))) => d,
            Ok(_) | Err(_) => {
                return error(format!(
                    "{}: the machine did not answer in {} s: is the agent loaded (qsctl status in the guest), and the link up (status)?",
                    what(cmd),
                    ANSWER_TIMEOUT.as_secs()
                ))
            }
        };
        if done.status != Status::Ok as i32 {
            return refused(&what(cmd), &done);
        }
        match cmd {
            Command::Take => json!({
                "ok": true,
                "id": done.id,
                "pause_us": done.pause_us,
                "cpus": done.cpus,
                "pages": done.pages,
                "bytes": done.bytes,
            }),
            Command::Rollback(_) => json!({
                "ok": true,
                "id": done.id,
                "age_ms": ms(done.age_ns),
                "pause_us": done.pause_us,
                "pages": done.pages,
                "dropped": done.count,
            }),
            Command::Delete(_) => json!({ "ok": true, "deleted": done.count }),
            Command::Periodic { every_ms, keep } => {
                json!({ "ok": true, "every_ms": every_ms, "keep": keep })
            }
            Command::List => {
                let mut v = list(&waiter, done.count);
                if v["ok"] == true {
                    v["memory"] = json!({
                        "capacity_bytes": done.pages * 4096,
                        "used_bytes": done.bytes,
                    });
                    v["active_cpus"] = json!(done.cpus);
                    v["periodic"] = json!({ "every_ms": done.id, "keep": done.busy_what });
                }
                v
            }
        }
    }
}

impl Checkpoints {
    /// A read for an export (`Op::ReadMeta`, `ReadCpu`, `ReadPages`): its items once the
    /// machine's end says they are whole (every piece in place, the count and CRC-32 of the
    /// bytes as sent). `idle` is how long the machine may stay silent. A piece missing (the
    /// link dropped a frame) spoils the read, which still waits for the end: a new request
    /// before it would be refused as the machine is busy with this one.
    pub fn read(&self, op: Op, idle: Duration) -> Result<ReadReply, ReadError> {
        let Some(link) = self.link.lock().expect("link").clone() else {
            return Err(ReadError::Lost(
                "the link to the machine is not up yet".into(),
            ));
        };
        let _turn = self.one_at_a_time.lock().unwrap_or_else(|e| e.into_inner());
        let waiter = self.expect();
        let mut buf = [0u8; quicksilver_proto::link::checkpoint::MAX_LEN];
        let n = Message::Request(Request {
            tag: waiter.tag,
            op,
        })
        .encode(&mut buf);
        link.send(Channel::Control, &buf[..n])
            .map_err(|e| ReadError::Lost(format!("{e:#}")))?;
        let mut reply = ReadReply::default();
        let mut spoiled = None;
        loop {
            match waiter.rx.recv_timeout(idle) {
                Ok(Answer::Data {
                    item,
                    offset,
                    bytes,
                }) => {
                    let v = reply.items.entry(item).or_default();
                    if offset as usize == v.len() {
                        v.extend_from_slice(&bytes);
                    } else {
                        spoiled.get_or_insert(format!(
                            "item {item} has a gap at byte {} (the link dropped a frame)",
                            v.len()
                        ));
                    }
                }
                Ok(Answer::End(e)) => {
                    if e.status != Status::Ok as i32 {
                        return Err(ReadError::Refused(
                            abi::status_message(e.status.into()).into(),
                        ));
                    }
                    if let Some(why) = spoiled {
                        return Err(ReadError::Lost(why));
                    }
                    let all: Vec<u8> = reply.items.values().flatten().copied().collect();
                    if all.len() as u64 != e.total || quicksilver_proto::crc32(&all) != e.crc {
                        return Err(ReadError::Lost(format!(
                            "the read's checksum does not match ({} bytes came, the machine sent {})",
                            all.len(),
                            e.total
                        )));
                    }
                    reply.zero_mask = e.zero_mask;
                    return Ok(reply);
                }
                Ok(Answer::Message(Message::Done(d))) => {
                    let busy = [
                        Status::LinkRequestPending,
                        Status::DebuggerHoldsCpus,
                        Status::RolledBack,
                    ]
                    .iter()
                    .any(|s| *s as i32 == d.status);
                    let msg = abi::status_message(d.status.into()).to_string();
                    return Err(if busy {
                        ReadError::Lost(msg)
                    } else {
                        ReadError::Refused(msg)
                    });
                }
                Ok(Answer::Message(_)) => {}
                Err(_) => {
                    return Err(ReadError::Lost(format!(
                        "the machine sent nothing for {} s",
                        idle.as_secs()
                    )))
                }
            }
        }
    }
}

/// The entries of a list whose `Done` said `count` follow.
fn list(waiter: &Waiter<'_>, count: u32) -> Value {
    let mut entries: Vec<Option<Entry>> = vec![None; count as usize];
    while entries.iter().any(Option::is_none) {
        match waiter.rx.recv_timeout(ENTRY_TIMEOUT) {
            Ok(Answer::Message(Message::Entry(e))) if (e.index as usize) < entries.len() => {
                entries[e.index as usize] = Some(e)
            }
            Ok(_) => {}
            Err(_) => {
                let got = entries.iter().flatten().count();
                return error(format!(
                    "cannot list checkpoints: {got} of {count} entries came (the link lost some): ask again"
                ));
            }
        }
    }
    let list: Vec<Value> = entries.iter().flatten().map(entry_json).collect();
    json!({ "ok": true, "count": list.len(), "checkpoints": list })
}

fn what(cmd: Command) -> String {
    match cmd {
        Command::Take => "checkpoint refused".into(),
        Command::List => "cannot list checkpoints".into(),
        Command::Rollback(id) => format!("rollback to {id} refused"),
        Command::Delete(CHECKPOINT_ALL) => "cannot delete all checkpoints".into(),
        Command::Delete(id) => format!("cannot delete checkpoint {id}"),
        Command::Periodic { every_ms: 0, .. } => "cannot stop the periodic ring".into(),
        Command::Periodic { .. } => "cannot set the periodic ring".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_or_say_what_to_type() {
        assert_eq!(Command::parse("checkpoint"), Some(Ok(Command::Take)));
        assert_eq!(Command::parse("checkpoints"), Some(Ok(Command::List)));
        assert_eq!(Command::parse("rollback 3"), Some(Ok(Command::Rollback(3))));
        assert_eq!(
            Command::parse("delete all"),
            Some(Ok(Command::Delete(CHECKPOINT_ALL)))
        );
        assert_eq!(Command::parse("delete 7"), Some(Ok(Command::Delete(7))));
        assert_eq!(Command::parse("status"), None);
        let err = |l: &str| Command::parse(l).unwrap().unwrap_err();
        assert!(
            err("rollback").contains("rollback ID"),
            "{}",
            err("rollback")
        );
        assert!(err("rollback abc").contains("'abc' is not a checkpoint id"));
        assert!(err("rollback 0").contains("not a checkpoint id"));
        assert!(err("delete").contains("delete all"));
        assert!(err("rollback 1 2").contains("one argument"));
        assert!(err("checkpoint 5").contains("takes no argument"));
        assert_eq!(
            Command::parse("periodic 100 5"),
            Some(Ok(Command::Periodic {
                every_ms: 100,
                keep: 5
            }))
        );
        assert_eq!(
            Command::parse("periodic 1000"),
            Some(Ok(Command::Periodic {
                every_ms: 1000,
                keep: 20
            }))
        );
        assert_eq!(
            Command::parse("periodic off"),
            Some(Ok(Command::Periodic {
                every_ms: 0,
                keep: 0
            }))
        );
        assert!(err("periodic 1").contains("at least"));
        assert!(err("periodic").contains("periodic MS"));
        assert!(err("periodic 100 0").contains("1 to"));
    }

    #[test]
    fn refusals_name_cause_and_fix() {
        let d = Done {
            status: Status::NoSuchCheckpoint as i32,
            ..Done::default()
        };
        let v = refused("rollback to 9 refused", &d);
        assert_eq!(v["ok"], false);
        let e = v["error"].as_str().unwrap();
        assert!(e.starts_with("rollback to 9 refused: "), "{e}");
        assert!(e.contains(Status::NoSuchCheckpoint.message()), "{e}");
        let d = Done {
            status: Status::NotQuiescent as i32,
            busy_cpu: 1,
            busy_what: 0xec,
            ..Done::default()
        };
        let e = refused("checkpoint refused", &d)["error"].to_string();
        assert!(
            e.contains("CPU 1 was handling interrupt vector 0xec"),
            "{e}"
        );
    }

    #[test]
    fn a_command_without_a_link_is_refused() {
        let c = Checkpoints::default();
        let e = c.run(Command::Take)["error"].to_string();
        assert!(e.contains("not up yet"), "{e}");
    }

    #[test]
    fn events_read_as_json() {
        let e = Event {
            what: Happened::Deleted,
            id: CHECKPOINT_ALL,
            count: 3,
            pause_us: 0,
            pages: 0,
            bytes: 0,
            age_ns: 0,
            periodic_taken: 4,
        };
        let v = event_json(&e);
        assert_eq!(v["event"], "delete");
        assert_eq!(v["id"], "all");
        assert_eq!(v["deleted"], 3);
        let v = event_json(&Event {
            what: Happened::RolledBack,
            id: 2,
            age_ns: 3_500_000_000,
            ..e
        });
        assert_eq!(v["event"], "rollback");
        assert_eq!(v["age_ms"], 3500);
    }
}
