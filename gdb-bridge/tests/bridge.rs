//! `qs-bridge` as a user runs it, against the machine's end of the link (`Endpoint` from
//! `quicksilver-proto`, the code the agent and the hv run) behind a Unix socket, as QEMU's
//! chardev would be. The fake machine answers attention with `Stopped` (when told to), echoes
//! gdb's bytes, answers a detach or kill with `Ended`, sends [`BULK`] bytes on the bulk
//! channel when gdb's bytes ask for it ([`BULK_PLEASE`]), and injects corrupt, replayed and
//! garbage frames, which must change nothing. It also serves an export's reads from a small
//! RAM of its own ([`fake_page`]), spoiling the first read of pages. (The real machine is
//! tests/tests/gdb.rs and tests/tests/export.rs.)

use quicksilver_proto::abi;
use quicksilver_proto::link::checkpoint as ck;
use quicksilver_proto::link::control::{End, Message};
use quicksilver_proto::link::endpoint::{Endpoint, Event};
use quicksilver_proto::link::{self, auth, Channel};
use std::io::{BufRead, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::*;

const KEY: &[u8] = b"correct horse battery staple";
const CPUS: u32 = 2;
const ATTENTION_CONSOLE: &[u8] = b"machine: attention received\n";
/// gdb bytes that make the fake machine send [`BULK`] bytes on the bulk channel (as
/// checkpoint export will) before it echoes them.
const BULK_PLEASE: &[u8] = b"$qQsBulk#";
/// gdb bytes after which the fake machine ends the session by itself, as the hv does when
/// gdb's stream breaks its protocol (no `OK`, just `Ended`).
const BREAK_PLEASE: &[u8] = b"$qQsBreak#";
/// Bytes the fake machine sends per [`BULK_PLEASE`]: three frames (1024 + 1024 + 952).
const BULK: usize = 3000;

fn frame(channel: Channel, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; link::MAX_WIRE];
    let n = link::encode(channel, seq, payload, &mut out).unwrap();
    out.truncate(n);
    out
}

/// The fake machine: the real `Endpoint` with `key`. Its log has "attention", "stopped" (just
/// before `Stopped` goes out) and "gdb:<bytes>" for what arrives on the gdb channel.
struct Machine {
    log: Log,
    conn: Arc<Mutex<Option<UnixStream>>>,
}

impl Machine {
    /// Closes the link, as a machine (QEMU) that went away would.
    fn hang_up(&self) {
        if let Some(s) = self.conn.lock().unwrap().take() {
            s.shutdown(std::net::Shutdown::Both).unwrap();
        }
    }
}

/// Starts the machine on `listener`. `stop_after`: when to say `Stopped` after attention
/// (`None`: never).
fn machine(listener: UnixListener, key: &'static [u8], stop_after: Option<Duration>) -> Machine {
    machine_deaf_at_first(listener, key, stop_after, Duration::ZERO, Deaf::Loses)
}

/// What a machine whose agent has not taken the port yet does with what arrives.
#[derive(Clone, Copy)]
enum Deaf {
    /// Loses it (the UART's driver drops it).
    Loses,
    /// Reads nothing: it waits in the socket and arrives all at once later.
    Queues,
}

/// [`machine`], but deaf for `deaf` after the bridge connects.
fn machine_deaf_at_first(
    listener: UnixListener,
    key: &'static [u8],
    stop_after: Option<Duration>,
    deaf: Duration,
    how: Deaf,
) -> Machine {
    let log = Log::default();
    let machine_log = log.clone();
    let conn = Arc::new(Mutex::new(None));
    let machine_conn = conn.clone();
    std::thread::spawn(move || {
        let Ok((s, _)) = listener.accept() else {
            return;
        };
        *machine_conn.lock().unwrap() = Some(s.try_clone().unwrap());
        let mut r = s.try_clone().unwrap();
        let until = Instant::now() + deaf;
        let mut lost = [0u8; 256];
        if let Deaf::Queues = how {
            std::thread::sleep(deaf);
        }
        while let Some(left) = until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        {
            r.set_read_timeout(Some(left)).unwrap();
            if let Ok(n) = r.read(&mut lost) {
                machine_log.push(format!("lost {n} bytes"));
            }
        }
        r.set_read_timeout(None).unwrap();
        let mut r = s.try_clone().unwrap();
        // The endpoint and the socket's write side, shared with the thread that says Stopped.
        let shared = Arc::new(Mutex::new((Endpoint::new(key), s)));
        // A new challenge each time, as on the machine.
        let mut challenges = 0u8;
        let mut buf = [0u8; 2048];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            for &b in &buf[..n] {
                let mut guard = shared.lock().unwrap();
                let (e, s) = &mut *guard;
                let mut out = Vec::new();
                let mut nonce = || {
                    challenges = challenges.wrapping_add(1);
                    [challenges; auth::LEN]
                };
                let mut tx = |w: &[u8]| out.extend_from_slice(w);
                match e.push(b, &mut nonce, &mut tx) {
                    Some(Event::Attention) => {
                        machine_log.push("attention".into());
                        out.extend_from_slice(&[0x13, 0x37, 0x00]);
                        let mut bad = frame(Channel::Gdb, 1000, b"BAD-CRC");
                        bad[3] ^= 0x20;
                        out.extend(bad);
                        out.extend(frame(Channel::Gdb, 1, b"BAD-REPLAY"));
                        e.send(Channel::Console, ATTENTION_CONSOLE, &mut |w: &[u8]| {
                            out.extend_from_slice(w)
                        });
                        if let Some(delay) = stop_after {
                            let (shared, log) = (shared.clone(), machine_log.clone());
                            std::thread::spawn(move || {
                                std::thread::sleep(delay);
                                let mut guard = shared.lock().unwrap();
                                let (e, s) = &mut *guard;
                                let mut out = Vec::new();
                                e.send_control(
                                    Message::Stopped { cpus: CPUS },
                                    &mut |w: &[u8]| out.extend_from_slice(w),
                                );
                                log.push("stopped".into());
                                let _ = s.write_all(&out);
                            });
                        }
                    }
                    Some(Event::Gdb(p)) => {
                        let p = p.to_vec();
                        machine_log.push(format!("gdb:{}", String::from_utf8_lossy(&p)));
                        let mut tx = |w: &[u8]| out.extend_from_slice(w);
                        if p.windows(5).any(|w| w == b"$D#44") {
                            e.send(Channel::Gdb, b"+$OK#9a", &mut tx);
                            e.send_control(Message::Ended(End::Detached), &mut tx);
                        } else if p.windows(BREAK_PLEASE.len()).any(|w| w == BREAK_PLEASE) {
                            // As the hv does when gdb's bytes break the protocol.
                            e.send_control(Message::Ended(End::Detached), &mut tx);
                        } else if p.windows(5).any(|w| w == b"$k#6b") {
                            e.send_control(Message::Ended(End::Killed), &mut tx);
                        } else {
                            if p.windows(BULK_PLEASE.len()).any(|w| w == BULK_PLEASE) {
                                let bulk: Vec<u8> = (0..BULK).map(|i| i as u8).collect();
                                e.send(Channel::Bulk, &bulk, &mut tx);
                            }
                            e.send(Channel::Gdb, &[b"echo:", &p[..]].concat(), &mut tx);
                        }
                    }
                    Some(Event::Checkpoint(r)) => {
                        machine_log.push(format!("checkpoint request {:?}", r.op));
                        checkpoint_answer(e, r, &mut out);
                    }
                    // The fake machine, like the hv today, has no consumer for these.
                    Some(Event::Control(_) | Event::Bulk(_)) | None => {}
                }
                let _ = s.write_all(&out);
            }
        }
    });
    Machine { log, conn }
}

/// The fake machine's checkpoints: a take answers with id 7 and its event; a list has two
/// entries; a rollback to 7 answers, then an old reply (tag 0: no request of the bridge
/// has it) as a rolled-back agent would send, then the event; anything else is refused as
/// the hv refuses an unknown checkpoint.
fn checkpoint_answer(e: &mut Endpoint, r: ck::Request, out: &mut Vec<u8>) {
    let mut tx = |w: &[u8]| out.extend_from_slice(w);
    let ok = ck::Done {
        tag: r.tag,
        ..ck::Done::default()
    };
    let event = ck::Event {
        what: ck::Happened::Taken,
        id: 7,
        count: 0,
        pause_us: 900,
        pages: 3,
        bytes: 8192,
        age_ns: 0,
        periodic_taken: 0,
    };
    match r.op {
        ck::Op::Take => {
            let d = ck::Done {
                id: 7,
                cpus: CPUS,
                pause_us: 900,
                pages: 3,
                bytes: 8192,
                ..ok
            };
            e.send_checkpoint(ck::Message::Done(d), &mut tx);
            e.send_checkpoint(ck::Message::Event(event), &mut tx);
        }
        ck::Op::List => {
            e.send_checkpoint(ck::Message::Done(ck::Done { count: 2, ..ok }), &mut tx);
            // Out of order: the bridge puts them in place by index.
            for (index, id) in [(1u16, 7u32), (0, 6)] {
                let entry = ck::Entry {
                    tag: r.tag,
                    index,
                    total: 2,
                    id,
                    parent: id - 1,
                    flags: abi::CHECKPOINT_CURRENT * u32::from(id == 7),
                    cpus: CPUS,
                    age_ns: 2_000_000_000,
                    pause_us: 800,
                    pages: 1,
                    bytes: 4096,
                };
                e.send_checkpoint(ck::Message::Entry(entry), &mut tx);
            }
        }
        ck::Op::Rollback { id: 7 } => {
            let d = ck::Done {
                id: 7,
                age_ns: 1_500_000_000,
                pages: 12,
                ..ok
            };
            e.send_checkpoint(ck::Message::Done(d), &mut tx);
            let stale = ck::Done {
                tag: 0,
                id: 7,
                ..ok
            };
            e.send_checkpoint(ck::Message::Done(stale), &mut tx);
            let rolled = ck::Event {
                what: ck::Happened::RolledBack,
                age_ns: 1_500_000_000,
                ..event
            };
            e.send_checkpoint(ck::Message::Event(rolled), &mut tx);
        }
        ck::Op::ReadMeta
        | ck::Op::ReadCpu { id: 7, .. }
        | ck::Op::ReadPages { id: 7, .. }
        | ck::Op::ReadDevices { id: 7 } => serve_read(e, r, out),
        ck::Op::Rollback { .. }
        | ck::Op::Delete { .. }
        | ck::Op::ReadCpu { .. }
        | ck::Op::ReadPages { .. }
        | ck::Op::ReadFill { .. }
        | ck::Op::ReadChanged { .. }
        | ck::Op::ReadDevices { .. }
        | ck::Op::ReadStats
        | ck::Op::Periodic { .. } => {
            let d = ck::Done {
                status: abi::Status::NoSuchCheckpoint as i32,
                ..ok
            };
            e.send_checkpoint(ck::Message::Done(d), &mut tx);
        }
    }
}

/// The fake machine's RAM for an export: pages from 0x1000, each filled with its number, every
/// fifth all zero; the VMCOREINFO note on the page at [`NOTE_PA`].
const RAM: (u64, u64) = (0x1000, 0x1000 + 70 * 4096);
const NOTE_PA: u64 = 0x3000;
const VMCOREINFO: &[u8] = b"OSRELEASE=6.1.0-fake\nKERNELOFFSET=0\nBUILD-ID=0aff\n";

fn fake_page(gpa: u64) -> Vec<u8> {
    let n = gpa / 4096;
    if n.is_multiple_of(5) {
        return vec![0; 4096];
    }
    let mut p = vec![n as u8; 4096];
    if gpa == NOTE_PA {
        // An ELF note: namesz, descsz, type, "VMCOREINFO\0" padded to 4, the text.
        let mut note = Vec::new();
        note.extend_from_slice(&11u32.to_le_bytes());
        note.extend_from_slice(&(VMCOREINFO.len() as u32).to_le_bytes());
        note.extend_from_slice(&0u32.to_le_bytes());
        note.extend_from_slice(b"VMCOREINFO\0\0");
        note.extend_from_slice(VMCOREINFO);
        p[..note.len()].copy_from_slice(&note);
    }
    p
}

/// Reads of pages answered so far (the first one's end is spoiled).
static PAGE_READS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// An export's read, answered as the agent does: the items in data frames (pages deflated
/// where that is shorter, zero pages left out), then the end with the count and CRC-32.
fn serve_read(e: &mut Endpoint, r: ck::Request, out: &mut Vec<u8>) {
    use link::bulk;
    use std::io::Write as _;
    let mut items: Vec<(u32, Vec<u8>)> = Vec::new();
    let mut zero_mask = 0u64;
    let mut spoil = false;
    match r.op {
        ck::Op::ReadMeta => {
            let mut m = vec![0u8; std::mem::size_of::<abi::ExportMeta>()];
            let mut put = |at: usize, v: &[u8]| m[at..at + v.len()].copy_from_slice(v);
            put(
                std::mem::offset_of!(abi::ExportMeta, page_offset),
                &0xffff_8880_0000_0000u64.to_le_bytes(),
            );
            put(
                std::mem::offset_of!(abi::ExportMeta, vmcoreinfo_pa),
                &NOTE_PA.to_le_bytes(),
            );
            put(
                std::mem::offset_of!(abi::ExportMeta, vmcoreinfo_size),
                &1024u32.to_le_bytes(),
            );
            put(
                std::mem::offset_of!(abi::ExportMeta, cpus),
                &CPUS.to_le_bytes(),
            );
            put(
                std::mem::offset_of!(abi::ExportMeta, ram_ranges),
                &1u32.to_le_bytes(),
            );
            m.extend_from_slice(&RAM.0.to_le_bytes());
            m.extend_from_slice(&RAM.1.to_le_bytes());
            m.extend_from_slice(b"fake-machine\x006.1.0-fake\x00f00d-boot\x00");
            items.push((0, m));
        }
        ck::Op::ReadCpu { cpu, .. } => {
            let mut c = vec![0u8; std::mem::size_of::<abi::CheckpointCpu>()];
            let mut put = |at: usize, v: &[u8]| c[at..at + v.len()].copy_from_slice(v);
            put(
                std::mem::offset_of!(abi::CheckpointCpu, apic_id),
                &cpu.to_le_bytes(),
            );
            put(
                std::mem::offset_of!(abi::CheckpointCpu, rip),
                &(0xffff_ffff_8100_0000u64 + u64::from(cpu)).to_le_bytes(),
            );
            put(
                std::mem::offset_of!(abi::CheckpointCpu, xsave_len),
                &3u32.to_le_bytes(),
            );
            c.extend_from_slice(&[1, 2, 3]);
            items.push((0, c));
        }
        ck::Op::ReadDevices { .. } => {
            let mut d = vec![0u8; std::mem::size_of::<abi::CheckpointDevices>()];
            let mut put = |at: usize, v: &[u8]| d[at..at + v.len()].copy_from_slice(v);
            put(
                std::mem::offset_of!(abi::CheckpointDevices, version),
                &1u32.to_le_bytes(),
            );
            put(
                std::mem::offset_of!(abi::CheckpointDevices, len),
                &40u64.to_le_bytes(),
            );
            d.extend_from_slice(&[9; 40]);
            items.push((0, d));
        }
        ck::Op::ReadPages {
            first_gpa, count, ..
        } => {
            spoil = PAGE_READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0;
            for i in 0..count {
                let p = fake_page(first_gpa + u64::from(i) * 4096);
                if p.iter().all(|&b| b == 0) {
                    zero_mask |= 1 << i;
                    continue;
                }
                let mut z =
                    flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
                z.write_all(&p).unwrap();
                let d = z.finish().unwrap();
                // Every other page deflated, as a page that deflates well would be.
                items.push((i, if i % 2 == 0 && d.len() < 4096 { d } else { p }));
            }
        }
        _ => unreachable!(),
    }
    let mut tx = |w: &[u8]| out.extend_from_slice(w);
    let mut all = Vec::new();
    for (item, bytes) in &items {
        for (k, piece) in bytes.chunks(bulk::MAX_DATA).enumerate() {
            let mut buf = [0u8; link::MAX_PAYLOAD];
            let n = bulk::Data {
                tag: r.tag,
                item: *item,
                offset: (k * bulk::MAX_DATA) as u32,
                bytes: piece,
            }
            .encode(&mut buf);
            e.send(Channel::Bulk, &buf[..n], &mut tx);
        }
        all.extend_from_slice(bytes);
    }
    let mut end = [0u8; bulk::END_LEN];
    let n = bulk::End {
        tag: r.tag,
        status: 0,
        zero_mask,
        crc: quicksilver_proto::crc32(&all) ^ u32::from(spoil),
        total: all.len() as u64,
    }
    .encode(&mut end);
    e.send(Channel::Bulk, &end[..n], &mut tx);
}

/// A fake machine that stops at once when asked, and a bridge authenticated to it.
fn authenticated_to_a_stopping_machine(name: &str) -> (Machine, Bridge) {
    let dir = tempdir(name);
    let m = machine(
        UnixListener::bind(dir.join("link")).unwrap(),
        KEY,
        Some(Duration::ZERO),
    );
    let b = bridge(&dir, KEY, &[]);
    b.stderr.wait_for("authenticated", LONG);
    (m, b)
}

fn gdb_packets(log: &Log) -> Vec<String> {
    log.lines()
        .into_iter()
        .filter(|l| l.starts_with("gdb:"))
        .collect()
}

#[test]
fn authenticates_then_carries_gdb_bytes_and_ignores_bad_frames() {
    let dir = tempdir("ok");
    let _m = machine(
        UnixListener::bind(dir.join("link")).unwrap(),
        KEY,
        Some(Duration::ZERO),
    );
    let b = bridge(&dir, KEY, &[]);
    let line = b.stderr.wait_for("authenticated", LONG);
    assert!(
        line.contains(&format!("target remote 127.0.0.1:{}", b.port)),
        "{line}"
    );

    let mut gdb = b.gdb();
    gdb.write_all(b"$qSupported#37").unwrap();
    let got = read_some(&mut gdb, b"echo:$qSupported#37".len());
    assert_eq!(
        got, b"echo:$qSupported#37",
        "only the sound frame reaches gdb"
    );

    // A second client is turned away while the first is attached.
    let mut second = b.gdb();
    let mut msg = String::new();
    let _ = second.read_to_string(&mut msg);
    assert!(msg.contains("another gdb is attached"), "{msg:?}");

    let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    assert!(
        console.contains("machine: attention received"),
        "{console:?}"
    );
}

#[test]
fn gdb_bytes_wait_until_every_cpu_is_stopped() {
    let dir = tempdir("stop");
    let m = machine(
        UnixListener::bind(dir.join("link")).unwrap(),
        KEY,
        Some(Duration::from_millis(1500)),
    );
    let b = bridge(&dir, KEY, &[]);
    b.stderr.wait_for("authenticated", LONG);

    let mut gdb = b.gdb();
    let connected = Instant::now();
    // gdb speaks at once; the machine would lose these bytes before it says Stopped.
    gdb.write_all(b"$qSupported#37").unwrap();
    let got = read_some(&mut gdb, b"echo:$qSupported#37".len());
    assert_eq!(got, b"echo:$qSupported#37");
    assert!(
        connected.elapsed() >= Duration::from_millis(1400),
        "answered after {:?}, before the machine stopped",
        connected.elapsed()
    );
    let log = m.log.lines();
    let stopped = log.iter().position(|l| l == "stopped").expect("stopped");
    let first_gdb = log.iter().position(|l| l.starts_with("gdb:")).unwrap();
    assert!(
        stopped < first_gdb,
        "gdb's bytes came before Stopped: {log:?}"
    );
    b.stderr
        .wait_for("every CPU stopped (2 CPUs); gdb is served", LONG);

    // gdb detaches itself: the bridge says so, closes its side, and adds no detach of its own.
    gdb.write_all(b"$D#44").unwrap();
    assert_eq!(
        read_some(&mut gdb, 64),
        b"+$OK#9a",
        "then the bridge closes"
    );
    b.stderr
        .wait_for("gdb detached; the kernel runs natively again", LONG);
    drop(gdb);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        gdb_packets(&m.log),
        ["gdb:$qSupported#37", "gdb:$D#44"],
        "nothing else went to the machine"
    );
}

#[test]
fn a_gdb_that_reconnects_at_once_after_a_detach_is_served() {
    // The session's end closes the old client's connection; it must never close the new one
    // (a gdb script's `detach` then `target remote` once got "Remote connection closed").
    let (_m, b) = authenticated_to_a_stopping_machine("reconnect");
    let mut gdb = b.gdb();
    for session in 1..=40 {
        gdb.write_all(b"$g#67").unwrap();
        let got = read_some(&mut gdb, b"echo:$g#67".len());
        assert_eq!(got, b"echo:$g#67", "session {session}: served");
        gdb.write_all(b"$D#44").unwrap();
        // As gdb does: close on the OK, connect again at once (not waiting for our close).
        assert_eq!(
            read_some(&mut gdb, 7),
            b"+$OK#9a",
            "session {session}: detached"
        );
        gdb = b.gdb();
    }
}

#[test]
fn a_machine_that_does_not_stop_gets_gdb_closed_with_the_reason() {
    let dir = tempdir("nostop");
    let m = machine(UnixListener::bind(dir.join("link")).unwrap(), KEY, None);
    let b = bridge(&dir, KEY, &["--timeout", "2"]);
    b.stderr.wait_for("authenticated", LONG);
    let mut gdb = b.gdb();
    gdb.write_all(b"$qSupported#37").unwrap();
    let started = Instant::now();
    assert_eq!(read_some(&mut gdb, 1), b"", "gdb's connection is closed");
    assert!(started.elapsed() < Duration::from_secs(8));
    let why = b.stderr.wait_for("did not stop within 2 s", LONG);
    assert!(
        why.contains("link_port=") && why.contains("qsctl stats"),
        "{why}"
    );
    m.log.wait_for("attention", LONG);
    assert!(gdb_packets(&m.log).is_empty(), "{:?}", m.log.lines());
    // The bridge lives on, and the next gdb is not turned away.
    let mut again = b.gdb();
    let mut first = [0u8; 1];
    let n = again.read(&mut first).unwrap_or(0);
    assert_eq!(n, 0, "closed after the wait, not refused");
}

#[test]
fn a_machine_that_stops_after_gdb_gave_up_is_let_go() {
    let dir = tempdir("late");
    let m = machine(
        UnixListener::bind(dir.join("link")).unwrap(),
        KEY,
        Some(Duration::from_millis(2500)),
    );
    let b = bridge(&dir, KEY, &["--timeout", "1"]);
    b.stderr.wait_for("authenticated", LONG);
    let mut gdb = b.gdb();
    gdb.write_all(b"$qSupported#37").unwrap();
    assert_eq!(read_some(&mut gdb, 1), b"");
    b.stderr.wait_for("did not stop within 1 s", LONG);
    // Nobody would ever detach that stopped machine: the bridge does.
    m.log.wait_for("gdb:+$D#44", LONG);
    b.stderr.wait_for("no gdb waits for it any more", LONG);
    assert_eq!(
        gdb_packets(&m.log),
        ["gdb:+$D#44"],
        "gdb's bytes were dropped"
    );
}

#[test]
fn a_session_the_machine_ends_by_itself_is_not_called_a_detach() {
    let (_m, b) = authenticated_to_a_stopping_machine("broken");
    let mut gdb = b.gdb();
    gdb.write_all(b"$qQsBreak#00").unwrap();
    b.stderr.wait_for(
        "the machine ended the session though gdb did not detach",
        LONG,
    );
    // gdb hears of it: its connection closes.
    let mut rest = Vec::new();
    let _ = gdb.read_to_end(&mut rest);
    let said = b.stderr.lines();
    assert!(
        !said.iter().any(|l| l.contains("gdb detached")),
        "the bridge called it a detach:\n{}",
        said.join("\n")
    );
}

#[test]
fn a_gdb_that_vanishes_mid_session_is_detached_on_its_behalf() {
    let (m, b) = authenticated_to_a_stopping_machine("vanish");
    let mut gdb = b.gdb();
    gdb.write_all(b"$g#67").unwrap();
    assert_eq!(read_some(&mut gdb, 10), b"echo:$g#67");
    drop(gdb); // gdb crashed
    m.log.wait_for("gdb:+$D#44", LONG);
    b.stderr.wait_for("sent a detach on its behalf", LONG);
    b.stderr
        .wait_for("gdb detached; the kernel runs natively again", LONG);
}

#[test]
fn a_kill_is_a_detach_and_the_bridge_says_so() {
    let (m, b) = authenticated_to_a_stopping_machine("kill");
    let mut gdb = b.gdb();
    b.stderr.wait_for("gdb is served", LONG);
    gdb.write_all(b"$k#6b").unwrap();
    assert_eq!(read_some(&mut gdb, 1), b"", "the session is over");
    b.stderr.wait_for(
        "gdb asked to kill the machine: Quicksilver never kills it; detached instead",
        LONG,
    );
    drop(gdb);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        gdb_packets(&m.log),
        ["gdb:$k#6b"],
        "no detach after the end"
    );
}

#[test]
fn the_control_socket_reports_the_session() {
    let dir = tempdir("control");
    let sock = dir.join("ctl.sock");
    // A socket left by a killed bridge is replaced.
    drop(UnixListener::bind(&sock).unwrap());
    let _m = machine(
        UnixListener::bind(dir.join("link")).unwrap(),
        KEY,
        Some(Duration::from_millis(500)),
    );
    let b = bridge(&dir, KEY, &["--control", sock.to_str().unwrap()]);
    b.stderr.wait_for("authenticated", LONG);

    let mut c = control(&sock);
    let s = ask(&mut c, "status");
    assert_eq!(s["link"], "authenticated", "{s}");
    assert_eq!(s["gdb_client"], false, "{s}");
    assert_eq!(s["session"], "none", "{s}");
    assert!(s["cpus"].is_null(), "{s}");
    assert_eq!(s["sessions"], 0, "{s}");
    assert_eq!(s["console_bytes"], 0, "{s}");

    let mut gdb = b.gdb();
    let s = status_until(&mut c, |s| s["session"] == "stopped");
    assert_eq!(s["gdb_client"], true, "{s}");
    assert_eq!(s["cpus"], CPUS, "{s}");
    assert_eq!(s["sessions"], 1, "{s}");
    assert_eq!(s["console_bytes"], ATTENTION_CONSOLE.len(), "{s}");

    // A second control client at the same time.
    let mut c2 = control(&sock);
    let e = ask(&mut c2, "bogus");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("unknown command 'bogus': try help"),
        "{e}"
    );
    let h = ask(&mut c2, "help");
    assert_eq!(h["commands"][0], "status", "{h}");
    // (While gdb holds every CPU, the machine refuses a checkpoint with what to do instead:
    // `tests/tests/control.rs`, against the real hv.)
    assert_eq!(ask(&mut c, "status")["session"], "stopped");

    gdb.write_all(b"$D#44").unwrap();
    let _ = read_some(&mut gdb, 64);
    drop(gdb);
    let s = status_until(&mut c2, |s| s["gdb_client"] == false);
    assert_eq!(s["session"], "ended", "{s}");
    drop(b);
}

#[test]
fn control_clients_take_list_and_roll_back_checkpoints_and_subscribers_hear_of_them() {
    let dir = tempdir("control-checkpoints");
    let sock = dir.join("ctl.sock");
    let m = machine(UnixListener::bind(dir.join("link")).unwrap(), KEY, None);
    let b = bridge(&dir, KEY, &["--control", sock.to_str().unwrap()]);
    b.stderr.wait_for("authenticated", LONG);
    let mut c = control(&sock);
    let mut sub = control(&sock);
    assert_eq!(ask(&mut sub, "subscribe")["subscribed"], true);

    let t = ask(&mut c, "checkpoint");
    assert_eq!(
        (t["ok"].clone(), t["id"].clone()),
        (true.into(), 7.into()),
        "{t}"
    );
    assert_eq!(t["pause_us"], 900, "{t}");
    m.log.wait_for("checkpoint request Take", LONG);
    let mut line = String::new();
    sub.read_line(&mut line).unwrap();
    let ev: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (ev["event"].clone(), ev["id"].clone()),
        ("checkpoint".into(), 7.into()),
        "{ev}"
    );

    let l = ask(&mut c, "checkpoints");
    assert_eq!(l["count"], 2, "{l}");
    assert_eq!(l["checkpoints"][0]["id"], 6, "{l}");
    assert_eq!(l["checkpoints"][1]["current"], true, "{l}");
    assert_eq!(l["checkpoints"][1]["age_ms"], 2000, "{l}");

    let r = ask(&mut c, "rollback 7");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["age_ms"], 1500, "{r}");
    line.clear();
    sub.read_line(&mut line).unwrap();
    assert!(line.contains(r#""event":"rollback""#), "{line}");
    b.stderr.wait_for("nobody waits for any more", LONG);

    let e = ask(&mut c, "rollback 5");
    assert_eq!(e["ok"], false, "{e}");
    let msg = e["error"].as_str().unwrap();
    assert!(msg.starts_with("rollback to 5 refused: "), "{e}");
    assert!(msg.contains(abi::Status::NoSuchCheckpoint.message()), "{e}");
    for (bad, says) in [
        ("rollback", "rollback ID"),
        ("rollback abc", "'abc' is not a checkpoint id"),
        ("delete", "delete all"),
    ] {
        let e = ask(&mut c, bad);
        assert_eq!(e["ok"], false, "{e}");
        assert!(e["error"].as_str().unwrap().contains(says), "{bad}: {e}");
    }
    // The link still carries everything after the stale reply.
    assert_eq!(ask(&mut c, "checkpoints")["count"], 2);
    drop(b);
}

#[test]
fn an_export_over_the_link_asks_a_spoiled_read_again_and_writes_the_checkpoint() {
    let dir = tempdir("export");
    let sock = dir.join("ctl.sock");
    let _m = machine(UnixListener::bind(dir.join("link")).unwrap(), KEY, None);
    let b = bridge(&dir, KEY, &["--control", sock.to_str().unwrap()]);
    b.stderr.wait_for("authenticated", LONG);
    let mut c = control(&sock);
    let file = dir.join("seven.qsc");
    let r = ask(&mut c, &format!("export 7 {}", file.display()));
    assert_eq!(r["ok"], true, "{r}");
    let again = ask(&mut c, &format!("export 6 {}", file.display()));
    assert!(again["error"].to_string().contains("under way"), "{again}");
    let deadline = Instant::now() + LONG;
    let end = loop {
        let s = ask(&mut c, "export-status");
        if s["export"]["state"] != "running" {
            break s["export"].clone();
        }
        assert!(Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(end["state"], "done", "{end}");
    assert!(
        end["retries"].as_u64().unwrap() >= 1,
        "the spoiled read was asked again: {end}"
    );
    b.stderr.wait_for("checksum does not match", LONG);
    assert!(
        !dir.join("seven.qsc.part").exists(),
        "the staging file is gone"
    );
    // The file: the machine's facts, its CPUs, every page (the zero ones too).
    let f = quicksilver_checkpoint::qsc::read::Archive::open_path(&file).unwrap();
    let e = &f.checkpoints()[0];
    let meta = &e.section.meta;
    assert_eq!(
        (
            meta.id,
            meta.parent,
            meta.hostname.as_str(),
            meta.kernel_release.as_str(),
            meta.boot_id.as_str()
        ),
        (7, 6, "fake-machine", "6.1.0-fake", "f00d-boot")
    );
    assert_eq!(meta.vmcoreinfo, VMCOREINFO);
    assert_eq!(meta.build_id, [0x0a, 0xff]);
    assert_eq!(e.cpus.len(), 2);
    assert_eq!(e.cpus[1].rip, 0xffff_ffff_8100_0001);
    assert_eq!(e.cpus[1].xsave.bytes, [1, 2, 3]);
    assert_eq!(e.devices.len(), 1);
    assert_eq!(
        (e.devices[0].state.version, &e.devices[0].state.bytes[..]),
        (1, &[9u8; 40][..])
    );
    for gpa in (RAM.0..RAM.1).step_by(4096) {
        let mut p = [0u8; 4096];
        f.read_page(0, gpa, &mut p).unwrap();
        assert_eq!(p.to_vec(), fake_page(gpa), "page {gpa:#x}");
    }
}

#[test]
fn bulk_frames_without_a_consumer_are_counted_on_the_control_socket_and_said_once() {
    let dir = tempdir("bulk");
    let sock = dir.join("ctl.sock");
    let _m = machine(
        UnixListener::bind(dir.join("link")).unwrap(),
        KEY,
        Some(Duration::ZERO),
    );
    let b = bridge(&dir, KEY, &["--control", sock.to_str().unwrap()]);
    b.stderr.wait_for("authenticated", LONG);
    let mut c = control(&sock);
    let s = ask(&mut c, "status");
    assert_eq!(s["bulk_dropped_frames"], 0, "{s}");
    assert_eq!(s["bulk_dropped_bytes"], 0, "{s}");

    let mut gdb = b.gdb();
    let ask_bulk = [BULK_PLEASE, b"00"].concat();
    let echo = [b"echo:", &ask_bulk[..]].concat();
    for round in 1..=2u64 {
        gdb.write_all(&ask_bulk).unwrap();
        // The machine sent the bulk frames before the echo, and the link keeps their order.
        assert_eq!(read_some(&mut gdb, echo.len()), echo, "round {round}");
        let s = ask(&mut c, "status");
        assert_eq!(s["bulk_dropped_frames"], 3 * round, "{s}");
        assert_eq!(s["bulk_dropped_bytes"], BULK as u64 * round, "{s}");
    }
    // Said once, not once per frame; and gdb was served throughout.
    b.stderr.wait_for("bulk_dropped_frames", LONG);
    let said = b.stderr.lines();
    let said = said
        .iter()
        .filter(|l| l.contains("the machine sent bulk data"))
        .count();
    assert_eq!(said, 1, "{:?}", b.stderr.lines());
}

#[test]
fn a_control_path_that_is_not_a_socket_is_refused() {
    let dir = tempdir("control-file");
    let path = dir.join("precious.txt");
    std::fs::write(&path, "keep me").unwrap();
    let _m = machine(UnixListener::bind(dir.join("link")).unwrap(), KEY, None);
    let b = bridge(&dir, KEY, &["--control", path.to_str().unwrap()]);
    let (status, all) = b.finish();
    assert!(!status.success());
    assert!(all.contains("is not a socket"), "{all}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
}

#[test]
fn with_retry_the_bridge_waits_for_a_machine_that_is_still_booting() {
    let dir = tempdir("retry");
    let link = dir.join("link");
    let b = bridge(&dir, KEY, &["--retry", "30", "--timeout", "1"]);
    // QEMU not started yet: no socket for a while.
    std::thread::sleep(Duration::from_millis(1000));
    let m = machine_deaf_at_first(
        UnixListener::bind(&link).unwrap(),
        KEY,
        Some(Duration::ZERO),
        Duration::from_millis(1500),
        Deaf::Loses,
    );
    b.stderr.wait_for("authenticated", LONG);
    m.log.wait_for("lost", LONG);
    b.stderr.wait_for("saying hello again", LONG);
}

#[test]
fn with_retry_hellos_that_queued_up_answer_only_the_last_challenge() {
    let dir = tempdir("queued");
    let _m = machine_deaf_at_first(
        UnixListener::bind(dir.join("link")).unwrap(),
        KEY,
        Some(Duration::ZERO),
        Duration::from_millis(3500),
        Deaf::Queues,
    );
    let b = bridge(&dir, KEY, &["--retry", "30", "--timeout", "1"]);
    b.stderr.wait_for("saying hello again", LONG);
    b.stderr.wait_for("authenticated", LONG);
    let mut gdb = b.gdb();
    gdb.write_all(b"$g#67").unwrap();
    assert_eq!(read_some(&mut gdb, 10), b"echo:$g#67");
}

#[test]
fn a_wrong_key_is_refused_with_the_fix() {
    let dir = tempdir("wrong");
    let _m = machine(UnixListener::bind(dir.join("link")).unwrap(), KEY, None);
    let (status, all) = bridge(&dir, b"not the key", &[]).finish();
    assert!(!status.success());
    assert!(all.contains("the machine refused our key"), "{all}");
    assert!(all.contains("--key FILE"), "{all}");
}

#[test]
fn a_machine_without_a_key_serves_nobody() {
    let dir = tempdir("nokey");
    let _m = machine(UnixListener::bind(dir.join("link")).unwrap(), b"", None);
    let (status, all) = bridge(&dir, KEY, &[]).finish();
    assert!(!status.success());
    assert!(all.contains("no link key configured"), "{all}");
}

#[test]
fn an_unreachable_link_says_so() {
    let dir = tempdir("unreachable");
    let (status, all) = bridge(&dir, KEY, &[]).finish();
    assert!(!status.success());
    assert!(all.contains("link not reachable"), "{all}");
}

#[test]
fn a_lost_link_closes_gdb_and_exits_non_zero() {
    let (m, b) = authenticated_to_a_stopping_machine("lost");
    let mut gdb = b.gdb();
    b.stderr.wait_for("gdb is served", LONG);
    m.hang_up();
    assert_eq!(read_some(&mut gdb, 1), b"", "gdb's connection is closed");
    let (status, all) = b.finish();
    assert!(!status.success());
    assert!(
        all.contains("the link closed: the machine keeps running; restart qs-bridge"),
        "{all}"
    );
}
