//! `qsctl export ID FILE [--elf]`: a kept checkpoint into a file, through the kernel's own
//! filesystem, while the machine runs on: Quicksilver's own format (`.qsc`, which
//! `qs-checkpoint` reads), or an ELF core that `crash` and `gdb` open.
//!
//! The hv hands out the checkpoint's pages as they were when it was taken (`CHECKPOINT_READ`,
//! up to 255 pages a call); the file's own writes are the kernel's, so they change pages the
//! checkpoint keeps copies of, never the checkpoint.

use crate::{checkpoint::parse_id, ioctl, open, status_error};
use anyhow::{bail, Context, Result};
use quicksilver_checkpoint::assemble::{self, build_id, cpu_record_from_bytes};
use quicksilver_checkpoint::elf;
use quicksilver_checkpoint::model::{Meta, RamRange, PAGE};
use quicksilver_proto::abi::{Status, CHECKPOINT_PERIODIC};
use quicksilver_proto::ioctl::READ_MAX_PAGES;
use std::fs::File;
use std::io;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub fn export(id: &str, path: &str, as_elf: bool) -> Result<()> {
    let id = parse_id(id)?;
    let dev = open()?;
    let (_, kept) = ioctl::checkpoints(&dev).context("cannot list the checkpoints")?;
    let Some(info) = kept.iter().find(|c| c.id == id) else {
        bail!("no checkpoint {id} is kept: qsctl checkpoints lists the ones there are");
    };
    let (xi, ram) = ioctl::export_info(&dev).context("cannot ask the agent about RAM")?;
    let ram: Vec<RamRange> = ram
        .into_iter()
        .map(|(start, end)| RamRange { start, end })
        .collect();
    let t0 = Instant::now();
    let vmcoreinfo = vmcoreinfo(&dev, id, &ram).unwrap_or_default();

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let uts = uname();
    let meta = Meta {
        id,
        parent: info.parent,
        periodic: info.flags & CHECKPOINT_PERIODIC != 0,
        taken_unix_ns: now.saturating_sub(info.age_ns),
        pause_us: info.pause_us,
        hostname: uts.0,
        kernel_release: uts.1,
        build_id: build_id(&vmcoreinfo),
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        ram: ram.clone(),
        page_offset: xi.page_offset,
        vmcoreinfo,
    };
    let mut cpus = Vec::new();
    for cpu in 0..xi.cpus {
        let (status, bytes) = ioctl::checkpoint_cpu(&dev, id, cpu)?;
        if status != 0 {
            return Err(gone(status, id));
        }
        cpus.push(cpu_record_from_bytes(cpu, &bytes).with_context(|| {
            format!("CPU {cpu}'s record is shorter than its header says: the agent and qsctl come from different trees? rebuild both")
        })?);
    }
    let (status, bytes) = ioctl::checkpoint_devices(&dev, id)?;
    if status != 0 {
        return Err(gone(status, id));
    }
    let devices: Vec<_> = assemble::devices_record_from_bytes(&bytes)
        .into_iter()
        .collect();
    let mut out = Direct::create(path)?;
    let mut pages = Live::new(&dev, id, &ram);
    let written = if as_elf {
        elf::write(&cpus, &meta, &mut pages, &mut out).and_then(|_| out.finish())
    } else {
        assemble::write_qsc(&cpus, &devices, &meta, &mut pages, out)
            .and_then(|mut out| out.finish())
    };
    let bytes = match written {
        Ok(n) => n,
        Err(e) => {
            // A file, not a device written in place.
            if std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
                let _ = std::fs::remove_file(path);
            }
            return Err(match pages.refused {
                Some(s) => gone(s, id),
                None => anyhow::Error::new(e).context(format!("writing {path}")),
            })
            .context(format!("{path} is incomplete (a file is removed)"));
        }
    };
    let secs = t0.elapsed().as_secs_f64();
    let ram_bytes: u64 = ram.iter().map(|r| r.end - r.start).sum();
    println!(
        "checkpoint {id} exported to {path} ({}): {bytes} bytes ({} MiB) for {} MiB of RAM ({} pages, {} of them zero), {} CPUs, in {secs:.1} s ({:.1} MiB/s of RAM)",
        if as_elf {
            "ELF core: crash --kaslr=auto --no_panic vmlinux FILE, or gdb vmlinux FILE"
        } else {
            "Quicksilver checkpoint file: qs-checkpoint inspect FILE"
        },
        bytes >> 20,
        ram_bytes >> 20,
        pages.pages,
        pages.zero,
        cpus.len(),
        ram_bytes as f64 / (1 << 20) as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// The error for a read the hv refused midway: the checkpoint went (a rollback to an older
/// one, a delete, the periodic ring out of memory), or another refusal.
fn gone(status: i64, id: u32) -> anyhow::Error {
    if Status::from_i64(status) == Some(Status::NoSuchCheckpoint) {
        anyhow::anyhow!(
            "checkpoint {id} is no longer kept (deleted, dropped by a rollback to an older one, or by the periodic ring for memory) while it was being exported"
        )
    } else {
        status_error(status).context(format!("reading checkpoint {id}"))
    }
}

/// The output, written around the page cache (`O_DIRECT`) where the file system allows it:
/// every page the kernel writes while a checkpoint is kept costs a page of checkpoint memory
/// (its old contents are kept), and an export through the page cache would write as many as
/// it exports, dropping checkpoints, the exported one first, once that memory is full.
/// Writes go out in aligned blocks; the last is padded, then the file cut to its length.
struct Direct {
    file: File,
    direct: bool,
    buf: Aligned,
    len: usize,
    written: u64,
}

/// A 1 MiB buffer aligned to a page, as `O_DIRECT` needs.
struct Aligned(Box<[AlignedPage]>);
#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct AlignedPage([u8; PAGE]);

const DIRECT_BLOCK: usize = 256 * PAGE;

impl Aligned {
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the boxed slice is `DIRECT_BLOCK / PAGE` pages of plain bytes, contiguous
        // (`repr(C)`, size a multiple of its alignment), owned by `self` for the borrow.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), DIRECT_BLOCK) }
    }
    fn bytes_ref(&self) -> &[u8] {
        // SAFETY: as in `bytes`, shared.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), DIRECT_BLOCK) }
    }
}

impl Direct {
    fn create(path: &str) -> Result<Direct> {
        use std::os::unix::fs::OpenOptionsExt;
        // A device is written in place; a file is made anew.
        let device = std::fs::metadata(path).is_ok_and(|m| !m.is_file());
        let open = |flags| {
            std::fs::OpenOptions::new()
                .write(true)
                .create(!device)
                .truncate(!device)
                .custom_flags(flags)
                .open(path)
        };
        let (file, direct) = match open(libc::O_DIRECT) {
            Ok(f) => (f, true),
            Err(e) => {
                eprintln!("qsctl: {path}: cannot write around the page cache ({e}): writing through it, which costs checkpoint memory as it goes");
                (
                    open(0).with_context(|| format!("cannot create {path}"))?,
                    false,
                )
            }
        };
        Ok(Direct {
            file,
            direct,
            buf: Aligned(vec![AlignedPage([0; PAGE]); DIRECT_BLOCK / PAGE].into_boxed_slice()),
            len: 0,
            written: 0,
        })
    }

    /// Writes what is buffered, padded to whole pages; then cuts a regular file to its length.
    /// Returns the bytes written (without padding).
    fn finish(&mut self) -> io::Result<u64> {
        let n = self.written + self.len as u64;
        let padded = self.len.next_multiple_of(PAGE);
        let at = self.len;
        self.buf.bytes()[at..padded].fill(0);
        self.len = padded;
        io::Write::flush(self)?;
        if self.file.metadata()?.is_file() {
            self.file.set_len(n)?;
        }
        self.file.sync_all()?;
        Ok(n)
    }
}

impl io::Write for Direct {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let k = b.len().min(DIRECT_BLOCK - self.len);
        let at = self.len;
        self.buf.bytes()[at..at + k].copy_from_slice(&b[..k]);
        self.len += k;
        if self.len == DIRECT_BLOCK {
            self.flush()?;
        }
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        // Only whole pages go out with O_DIRECT: a partial block waits for `finish`.
        let whole = if self.direct {
            self.len - self.len % PAGE
        } else {
            self.len
        };
        if whole == 0 {
            return Ok(());
        }
        io::Write::write_all(&mut self.file, &self.buf.bytes_ref()[..whole])?;
        self.written += whole as u64;
        let rest = self.len - whole;
        self.buf.bytes().copy_within(whole..whole + rest, 0);
        self.len = rest;
        Ok(())
    }
}

/// The checkpoint's pages, fetched from the hv a chunk at a time, in ascending order.
struct Live<'a> {
    dev: &'a File,
    id: u32,
    ram: Vec<RamRange>,
    buf: Vec<u8>,
    /// The chunk in `buf`: its first page and how many.
    first: u64,
    n: u64,
    pages: u64,
    zero: u64,
    /// The hv's status when it refused a read.
    refused: Option<i64>,
}

impl<'a> Live<'a> {
    fn new(dev: &'a File, id: u32, ram: &[RamRange]) -> Self {
        Live {
            dev,
            id,
            ram: ram.to_vec(),
            buf: vec![0u8; READ_MAX_PAGES as usize * PAGE],
            first: 0,
            n: 0,
            pages: 0,
            zero: 0,
            refused: None,
        }
    }
}

impl elf::Pages for Live<'_> {
    fn read_page(&mut self, gpa: u64, out: &mut [u8; PAGE]) -> io::Result<()> {
        if !(self.first..self.first + self.n * PAGE as u64).contains(&gpa) {
            let Some(r) = self.ram.iter().find(|r| r.contains(gpa)) else {
                return Err(io::Error::other(format!("{gpa:#x} is not in RAM")));
            };
            let n = ((r.end - gpa) / PAGE as u64).min(READ_MAX_PAGES as u64);
            let status =
                ioctl::checkpoint_read(self.dev, self.id, gpa, &mut self.buf[..n as usize * PAGE])?;
            if status != 0 {
                self.refused = Some(status);
                return Err(io::Error::other(format!(
                    "the hv refused a read ({status})"
                )));
            }
            (self.first, self.n) = (gpa, n);
        }
        let at = (gpa - self.first) as usize;
        out.copy_from_slice(&self.buf[at..at + PAGE]);
        self.pages += 1;
        if out.iter().all(|&b| b == 0) {
            self.zero += 1;
        }
        Ok(())
    }
}

/// The machine's name and the kernel's release.
fn uname() -> (String, String) {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    (
        read("/proc/sys/kernel/hostname"),
        read("/proc/sys/kernel/osrelease"),
    )
}

/// The kernel's VMCOREINFO note text as the checkpoint holds it: `/sys/kernel/vmcoreinfo`
/// says where the note is ("PHYS SIZE", both hex), and the note is RAM.
fn vmcoreinfo(dev: &File, id: u32, ram: &[RamRange]) -> Option<Vec<u8>> {
    let s = std::fs::read_to_string("/sys/kernel/vmcoreinfo").ok()?;
    let mut it = s.split_whitespace();
    let pa = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
    let size = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
    assemble::vmcoreinfo(&mut Live::new(dev, id, ram), pa, size)
}
