//! `export ID PATH [elf]`: a kept checkpoint into a file on the operator's machine, read over
//! the link while the machine runs on: `.qsc` (Quicksilver's own) or an ELF core for `crash`
//! and `gdb`, the same files `qsctl export` writes in the guest (`quicksilver_checkpoint::
//! assemble` builds both).
//!
//! The machine answers reads ([`crate::checkpoints::Checkpoints::read`]): the kernel's facts,
//! each CPU, then the pages, 64 at a time, only those that are not all zero crossing the link.
//! Pages land in a sparse staging file (`PATH.part`, RAM in order, a page per 4 KiB) and a
//! journal (`PATH.part.json`) says how many chunks are in; so a read the link spoiled is asked
//! again, and an export cut short (the link or the bridge died) continues where it stopped
//! when asked again with the same checkpoint and path. At the end the file is written from the
//! staging file, next to it, and renamed into place; the staging files go.
//!
//! One export at a time; `export-status` and the subscribers' `export` events (at most two a
//! second, and every change of state) say how far it is; `export-cancel` stops it between
//! chunks and removes what it staged.

use crate::checkpoints::{Checkpoints, Command, ReadError, ReadReply};
use crate::facts::{page, parse_facts, Facts};
use quicksilver_checkpoint::assemble::{self, build_id, cpu_record_from_bytes};
use quicksilver_checkpoint::elf::{self, Pages};
use quicksilver_checkpoint::model::{CpuRecord, DeviceRecord, Meta, RamRange, PAGE};
use quicksilver_proto::abi::LINK_READ_MAX_PAGES;
use quicksilver_proto::link::checkpoint::Op;
use serde_json::{json, Value};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long the machine may stay silent in a read (a real serial line sends a page in a third
/// of a second).
const IDLE: Duration = Duration::from_secs(10);
/// Reads the link spoiled in a row before the export gives up (it can be asked again, and
/// continues then).
const TRIES: u32 = 12;
/// How long an export waits for the link to come up.
const LINK_WAIT: Duration = Duration::from_secs(90);
/// Progress events at most this often.
const EVENT_EVERY: Duration = Duration::from_millis(500);
/// The journal at most this often.
const JOURNAL_EVERY: Duration = Duration::from_secs(2);

/// The file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Qsc,
    Elf,
}

/// How far an export is: the control socket's `export-status` and the `export` events.
#[derive(Clone, Debug)]
pub struct Progress {
    pub id: u32,
    pub path: PathBuf,
    pub format: Format,
    /// running, done, failed, cancelled.
    pub state: &'static str,
    /// What it does now: meta, cpus, pages, writing.
    pub phase: &'static str,
    /// Bytes of RAM read (all-zero pages count without crossing the link), of all.
    pub done: u64,
    pub total: u64,
    /// Where this run started (a resumed export's chunks already staged).
    pub resumed_from: u64,
    /// Bytes that crossed the link (data only) in this run.
    pub link_bytes: u64,
    /// Reads asked again.
    pub retries: u64,
    /// The file's size once written.
    pub file_bytes: u64,
    pub error: Option<String>,
    started: Instant,
    ended: Option<Instant>,
}

impl Progress {
    fn seconds(&self) -> f64 {
        self.ended
            .unwrap_or_else(Instant::now)
            .duration_since(self.started)
            .as_secs_f64()
    }

    /// The progress as a JSON object; with `event: "export"` for subscribers.
    pub fn to_json(&self) -> Value {
        let secs = self.seconds().max(1e-3);
        let ram_rate = (self.done - self.resumed_from) as f64 / secs;
        let eta = (self.state == "running" && ram_rate > 0.0)
            .then(|| ((self.total - self.done) as f64 / ram_rate).round() as u64);
        json!({
            "id": self.id,
            "path": self.path.display().to_string(),
            "format": match self.format { Format::Qsc => "qsc", Format::Elf => "elf" },
            "state": self.state,
            "phase": self.phase,
            "done_bytes": self.done,
            "total_bytes": self.total,
            "resumed_from_bytes": self.resumed_from,
            "link_bytes": self.link_bytes,
            "link_bytes_per_s": (self.link_bytes as f64 / secs).round() as u64,
            "ram_bytes_per_s": ram_rate.round() as u64,
            "eta_s": eta,
            "seconds": (secs * 10.0).round() / 10.0,
            "retries": self.retries,
            "file_bytes": self.file_bytes,
            "error": self.error,
        })
    }
}

/// The export of the moment (or the last one), shared with its thread.
#[derive(Default)]
pub struct Exports {
    job: Mutex<Option<Arc<Job>>>,
}

struct Job {
    progress: Mutex<Progress>,
    cancel: AtomicBool,
}

impl Exports {
    /// Starts exporting checkpoint `id` to `path` (on its own thread); the reply says so, or
    /// why not.
    /// `owner` is what holds the bridge's checkpoints (its state), kept by the export's
    /// thread.
    pub fn start<S: AsRef<Checkpoints> + Send + Sync + 'static>(
        &self,
        owner: &Arc<S>,
        id: u32,
        path: PathBuf,
        format: Format,
    ) -> Value {
        let mut slot = self.job.lock().expect("export");
        if let Some(j) = slot.as_ref() {
            let p = j.progress.lock().expect("progress");
            if p.state == "running" {
                return crate::checkpoints::error(format!(
                    "an export is under way (checkpoint {} to {}): wait for it, or export-cancel",
                    p.id,
                    p.path.display()
                ));
            }
        }
        let job = Arc::new(Job {
            progress: Mutex::new(Progress {
                id,
                path,
                format,
                state: "running",
                phase: "meta",
                done: 0,
                total: 0,
                resumed_from: 0,
                link_bytes: 0,
                retries: 0,
                file_bytes: 0,
                error: None,
                started: Instant::now(),
                ended: None,
            }),
            cancel: AtomicBool::new(false),
        });
        *slot = Some(job.clone());
        let reply =
            json!({ "ok": true, "export": job.progress.lock().expect("progress").to_json() });
        let owner = owner.clone();
        std::thread::spawn(move || {
            let cps = (*owner).as_ref();
            let mut run = Run {
                job: &job,
                cps,
                last_event: Instant::now(),
            };
            let outcome = run.export();
            let v = {
                let mut p = job.progress.lock().expect("progress");
                p.ended = Some(Instant::now());
                match outcome {
                    Ok(bytes) => {
                        p.state = "done";
                        p.file_bytes = bytes;
                    }
                    Err(Stop::Cancelled) => p.state = "cancelled",
                    Err(Stop::Failed(e)) => {
                        p.state = "failed";
                        p.error = Some(e);
                    }
                }
                p.to_json()
            };
            eprintln!("qs-bridge: export: {v}");
            cps.publish_json(&event(v));
        });
        reply
    }

    /// The export of the moment, or the last one (`null` if none).
    pub fn status(&self) -> Value {
        let p = self
            .job
            .lock()
            .expect("export")
            .as_ref()
            .map(|j| j.progress.lock().expect("progress").to_json());
        json!({ "ok": true, "export": p })
    }

    /// Stops the running export between two chunks.
    pub fn cancel(&self) -> Value {
        match self.job.lock().expect("export").as_ref() {
            Some(j) if j.progress.lock().expect("progress").state == "running" => {
                j.cancel.store(true, Ordering::Relaxed);
                json!({ "ok": true, "cancelling": true })
            }
            _ => crate::checkpoints::error(
                "no export is running (export-status says how the last one ended)",
            ),
        }
    }
}

/// `link-test [PAGES]`: the machine sends `pages` pages of bytes that do not compress, as it
/// sends an export's, 64 at a time; what crossed and how fast, in payload and on the wire.
/// What an export of N bytes that do not compress takes is N over `payload_bytes_per_s`.
pub fn link_test(cps: &Checkpoints, pages: u32) -> Value {
    let (t0, wire0) = (Instant::now(), cps.wire_bytes());
    let mut payload = 0u64;
    let mut left = pages;
    while left > 0 {
        let count = left.min(LINK_READ_MAX_PAGES);
        match cps.read(Op::ReadFill { count }, IDLE) {
            Ok(r) => payload += r.items.values().map(|v| v.len() as u64).sum::<u64>(),
            Err(e) => return crate::checkpoints::error(format!("link-test: {e}")),
        }
        left -= count;
    }
    let secs = t0.elapsed().as_secs_f64().max(1e-6);
    let wire = cps.wire_bytes() - wire0;
    json!({
        "ok": true,
        "payload_bytes": payload,
        "wire_bytes": wire,
        "seconds": secs,
        "payload_bytes_per_s": (payload as f64 / secs).round() as u64,
        "wire_bytes_per_s": (wire as f64 / secs).round() as u64,
    })
}

fn event(mut v: Value) -> Value {
    v["event"] = json!("export");
    v
}

/// Why an export stopped early.
enum Stop {
    Cancelled,
    Failed(String),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Stop {
        Stop::Failed(e.to_string())
    }
}

struct Run<'a> {
    job: &'a Job,
    cps: &'a Checkpoints,
    last_event: Instant,
}

impl Run<'_> {
    fn update(&mut self, f: impl FnOnce(&mut Progress)) {
        let v = {
            let mut p = self.job.progress.lock().expect("progress");
            f(&mut p);
            p.to_json()
        };
        if self.last_event.elapsed() >= EVENT_EVERY {
            self.last_event = Instant::now();
            self.cps.publish_json(&event(v));
        }
    }

    fn check_cancel(&self) -> Result<(), Stop> {
        if self.job.cancel.load(Ordering::Relaxed) {
            Err(Stop::Cancelled)
        } else {
            Ok(())
        }
    }

    /// A read, asked again while the link spoils it.
    fn read(&mut self, op: Op) -> Result<ReadReply, Stop> {
        let mut tries = 0;
        loop {
            self.check_cancel()?;
            match self.cps.read(op, IDLE) {
                Ok(r) => {
                    let n: usize = r.items.values().map(Vec::len).sum();
                    self.update(|p| p.link_bytes += n as u64);
                    return Ok(r);
                }
                Err(ReadError::Refused(e)) => return Err(Stop::Failed(e)),
                Err(ReadError::Lost(e)) => {
                    tries += 1;
                    if tries == TRIES {
                        return Err(Stop::Failed(format!(
                            "{e}; gave up after {TRIES} tries: ask again to continue where it stopped"
                        )));
                    }
                    eprintln!("qs-bridge: export: {e}: asking again");
                    self.update(|p| p.retries += 1);
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }

    fn export(&mut self) -> Result<u64, Stop> {
        let (id, path, format) = {
            let p = self.job.progress.lock().expect("progress");
            (p.id, p.path.clone(), p.format)
        };
        // A bridge just started serves its control socket before the link is up: an export
        // asked of it then (a TUI that reconnected, continuing its export) waits for the link.
        if !self.cps.wait_link(LINK_WAIT) {
            return Err(Stop::Failed(format!(
                "the link to the machine did not come up in {} s: status says where it stands",
                LINK_WAIT.as_secs()
            )));
        }
        let entry = self.entry(id)?;
        let facts = self.facts()?;
        self.update(|p| {
            p.total = assemble::ram_bytes(&facts.ram);
            p.phase = "cpus";
        });
        let mut cpus: Vec<CpuRecord> = Vec::new();
        for cpu in 0..facts.cpus {
            let r = self.read(Op::ReadCpu { id, cpu })?;
            let bytes = r.items.get(&0).map_or(&[][..], Vec::as_slice);
            cpus.push(cpu_record_from_bytes(cpu, bytes).ok_or_else(|| {
                Stop::Failed(format!(
                    "CPU {cpu}'s record is shorter than its header says"
                ))
            })?);
        }
        let r = self.read(Op::ReadDevices { id })?;
        let devices: Vec<_> =
            assemble::devices_record_from_bytes(r.items.get(&0).map_or(&[][..], Vec::as_slice))
                .into_iter()
                .collect();
        let mut staged = Staging::open(&path, id, &facts)?;
        let chunks = chunks(&facts.ram);
        let start = staged.done.min(chunks.len());
        let staged_bytes: u64 = chunks[..start]
            .iter()
            .map(|c| c.1 as u64 * PAGE as u64)
            .sum();
        if start > 0 {
            eprintln!(
                "qs-bridge: export: continuing checkpoint {id} into {} from {} MiB of {} MiB staged",
                path.display(),
                staged_bytes >> 20,
                assemble::ram_bytes(&facts.ram) >> 20
            );
        }
        self.update(|p| {
            p.phase = "pages";
            p.done = staged_bytes;
            p.resumed_from = staged_bytes;
        });
        let mut journaled = Instant::now();
        for &(first_gpa, count) in &chunks[start..] {
            let r = self.read(Op::ReadPages {
                id,
                first_gpa,
                count,
            })?;
            for (&item, bytes) in &r.items {
                let page = (item < count && r.zero_mask & (1 << item) == 0)
                    .then(|| page(bytes))
                    .flatten()
                    .ok_or_else(|| {
                        Stop::Failed(format!(
                            "the machine sent page {item} of a read of {count} wrongly ({} bytes that are no page, nor one deflated)",
                            bytes.len()
                        ))
                    })?;
                staged.put(first_gpa + u64::from(item) * PAGE as u64, &page)?;
            }
            staged.done += 1;
            if journaled.elapsed() >= JOURNAL_EVERY {
                staged.save()?;
                journaled = Instant::now();
            }
            self.update(|p| p.done += count as u64 * PAGE as u64);
        }
        staged.save()?;
        self.update(|p| p.phase = "writing");
        let vmcoreinfo = assemble::vmcoreinfo(&mut staged, facts.vmcoreinfo.0, facts.vmcoreinfo.1)
            .unwrap_or_default();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let meta = Meta {
            id,
            parent: entry.parent,
            periodic: entry.periodic,
            taken_unix_ns: now.saturating_sub(entry.age_ms * 1_000_000),
            pause_us: entry.pause_us,
            hostname: facts.hostname.clone(),
            kernel_release: facts.release.clone(),
            build_id: build_id(&vmcoreinfo),
            boot_id: facts.boot_id.clone(),
            ram: facts.ram.clone(),
            page_offset: facts.page_offset,
            vmcoreinfo,
        };
        let bytes = write_file(&path, format, &cpus, &devices, &meta, &mut staged)?;
        staged.remove();
        Ok(bytes)
    }

    /// The checkpoint's line of the list (its parent, age, pause).
    fn entry(&mut self, id: u32) -> Result<Entry, Stop> {
        let list = self.cps.run(Command::List);
        if list["ok"] != true {
            return Err(Stop::Failed(
                list["error"].as_str().unwrap_or("no list").into(),
            ));
        }
        let e = list["checkpoints"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["id"] == id))
            .ok_or_else(|| {
                Stop::Failed(format!(
                    "no checkpoint {id} is kept: checkpoints lists the ones there are"
                ))
            })?;
        Ok(Entry {
            parent: e["parent"].as_u64().unwrap_or(0) as u32,
            periodic: e["periodic"] == true,
            age_ms: e["age_ms"].as_u64().unwrap_or(0),
            pause_us: e["pause_us"].as_u64().unwrap_or(0),
        })
    }

    fn facts(&mut self) -> Result<Facts, Stop> {
        let r = self.read(Op::ReadMeta)?;
        let bytes = r.items.get(&0).map_or(&[][..], Vec::as_slice);
        parse_facts(bytes).ok_or_else(|| {
            Stop::Failed("the machine's facts (RAM, CPUs, VMCOREINFO) came malformed: the agent and qs-bridge come from different trees? rebuild both".into())
        })
    }
}

struct Entry {
    parent: u32,
    periodic: bool,
    age_ms: u64,
    pause_us: u64,
}

/// The reads of pages: at most 64 pages each, never across a RAM range's end.
fn chunks(ram: &[RamRange]) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    for r in ram {
        let mut gpa = r.start;
        while gpa < r.end {
            let n = ((r.end - gpa) / PAGE as u64).min(LINK_READ_MAX_PAGES.into()) as u32;
            out.push((gpa, n));
            gpa += u64::from(n) * PAGE as u64;
        }
    }
    out
}

/// The staging file (RAM in order, sparse: pages not written read as zero) and its journal.
struct Staging {
    file: File,
    part: PathBuf,
    journal: PathBuf,
    ram: Vec<RamRange>,
    /// Chunks in, in order.
    done: usize,
    /// What the journal names: a staging file of another checkpoint or boot is started anew.
    key: Value,
}

impl Staging {
    fn open(path: &Path, id: u32, facts: &Facts) -> io::Result<Staging> {
        let part = with_suffix(path, ".part");
        let journal = with_suffix(path, ".part.json");
        let ram: Vec<[u64; 2]> = facts.ram.iter().map(|r| [r.start, r.end]).collect();
        let key = json!({ "id": id, "boot_id": facts.boot_id, "ram": ram });
        let done = std::fs::read(&journal)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .filter(|j| j["key"] == key && part.exists())
            .and_then(|j| j["chunks_done"].as_u64())
            .unwrap_or(0) as usize;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(done == 0)
            .open(&part)?;
        file.set_len(assemble::ram_bytes(&facts.ram))?;
        Ok(Staging {
            file,
            part,
            journal,
            ram: facts.ram.clone(),
            done,
            key,
        })
    }

    /// Where a page is in the staging file.
    fn offset(&self, gpa: u64) -> io::Result<u64> {
        let mut before = 0;
        for r in &self.ram {
            if r.contains(gpa) {
                return Ok(before + (gpa - r.start));
            }
            before += r.end - r.start;
        }
        Err(io::Error::other(format!(
            "{gpa:#x} is not in the checkpoint's RAM"
        )))
    }

    fn put(&self, gpa: u64, page: &[u8]) -> io::Result<()> {
        self.file.write_all_at(page, self.offset(gpa)?)
    }

    /// The journal, after the pages it counts are on disk.
    fn save(&self) -> io::Result<()> {
        self.file.sync_data()?;
        let tmp = with_suffix(&self.journal, ".new");
        std::fs::write(
            &tmp,
            json!({ "version": 1, "key": self.key, "chunks_done": self.done }).to_string(),
        )?;
        std::fs::rename(tmp, &self.journal)
    }

    fn remove(&self) {
        let _ = std::fs::remove_file(&self.part);
        let _ = std::fs::remove_file(&self.journal);
    }
}

impl Pages for Staging {
    fn read_page(&mut self, gpa: u64, buf: &mut [u8; PAGE]) -> io::Result<()> {
        self.file.read_exact_at(buf, self.offset(gpa)?)
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The file, written next to `path` and renamed into place; its size.
fn write_file(
    path: &Path,
    format: Format,
    cpus: &[CpuRecord],
    devices: &[DeviceRecord],
    meta: &Meta,
    pages: &mut Staging,
) -> io::Result<u64> {
    let tmp = with_suffix(path, ".new");
    let out = io::BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    let file = match format {
        Format::Qsc => assemble::write_qsc(cpus, devices, meta, pages, out)?,
        Format::Elf => {
            let mut out = out;
            elf::write(cpus, meta, pages, &mut out)?;
            out
        }
    };
    let file = file.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    let bytes = file.metadata()?.len();
    std::fs::rename(&tmp, path)?;
    Ok(bytes)
}

/// Cancelled: the staging files go too (an export cut short otherwise keeps them, to continue).
impl Drop for Run<'_> {
    fn drop(&mut self) {
        if self.job.cancel.load(Ordering::Relaxed) {
            let p = self.job.progress.lock().expect("progress");
            let _ = std::fs::remove_file(with_suffix(&p.path, ".part"));
            let _ = std::fs::remove_file(with_suffix(&p.path, ".part.json"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_ram_and_stop_at_each_range() {
        let ram = [
            RamRange {
                start: 0x1000,
                end: 0x9f000,
            },
            RamRange {
                start: 0x100000,
                end: 0x100000 + 130 * 4096,
            },
        ];
        let c = chunks(&ram);
        let pages: u64 = c.iter().map(|&(_, n)| u64::from(n)).sum();
        assert_eq!(pages * 4096, assemble::ram_bytes(&ram));
        assert_eq!(c[0], (0x1000, 64));
        assert!(c.iter().all(|&(_, n)| (1..=64).contains(&n)));
        assert_eq!(c.iter().filter(|&&(g, _)| g == 0x100000).count(), 1);
        assert_eq!(*c.last().unwrap(), (0x100000 + 128 * 4096, 2));
    }
}
