//! `qs-checkpoint`: checkpoint files offline. What is in one (`inspect`), whether it is intact
//! (`verify`), what changed between two checkpoints (`diff`), and a kdump-compatible ELF core
//! of one (`to-elf`) that `crash vmlinux CORE` and `gdb vmlinux CORE` open.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use quicksilver_checkpoint::model::{seg, PAGE};
use quicksilver_checkpoint::qsc::read::{Archive, Entry};
use quicksilver_checkpoint::{diff, elf};
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

#[derive(Parser)]
#[command(
    version,
    about = "Checkpoint files offline: inspect, verify, diff, convert to an ELF core"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// What a file holds: each checkpoint's time, kernel, CPUs, devices and memory.
    Inspect { file: PathBuf },
    /// Checks every byte of each file (checksums, lengths, order); exits 1 if one is not intact.
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// What changed from one checkpoint to another: pages per RAM range, and CPU registers.
    /// With one file, its last two checkpoints (or --from/--to); with two, the last of each.
    Diff {
        a: PathBuf,
        b: Option<PathBuf>,
        /// The checkpoint id to compare from (in the first file).
        #[arg(long)]
        from: Option<u32>,
        /// The checkpoint id to compare to (in the second file, or the first).
        #[arg(long)]
        to: Option<u32>,
        /// How many changed page addresses to list.
        #[arg(long, default_value_t = 16)]
        list: usize,
    },
    /// Writes an ELF core of one checkpoint (the last, or --id) for kdump's tools.
    ToElf {
        file: PathBuf,
        out: PathBuf,
        #[arg(long)]
        id: Option<u32>,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("qs-checkpoint: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Inspect { file } => inspect(&file),
        Cmd::Verify { files } => {
            let mut bad = 0;
            for f in &files {
                match open(f) {
                    Ok(a) => {
                        let pages: usize = a.checkpoints().iter().map(|e| e.pages.len()).sum();
                        println!(
                            "{}: intact: {} checkpoint(s), {pages} pages, every checksum matches",
                            f.display(),
                            a.checkpoints().len()
                        );
                    }
                    Err(e) => {
                        println!("{}: {e:#}", f.display());
                        bad += 1;
                    }
                }
            }
            if bad > 0 {
                bail!("{bad} of {} file(s) not intact", files.len());
            }
            Ok(())
        }
        Cmd::Diff {
            a,
            b,
            from,
            to,
            list,
        } => diff_cmd(&a, b.as_deref(), from, to, list),
        Cmd::ToElf { file, out, id } => {
            let a = open(&file)?;
            let i = pick(&a, id, a.checkpoints().len() - 1)?;
            let f =
                File::create(&out).with_context(|| format!("cannot create {}", out.display()))?;
            let e = &a.checkpoints()[i];
            let mut pages = elf::FromArchive {
                archive: &a,
                index: i,
            };
            let n = elf::write(&e.cpus, &e.section.meta, &mut pages, BufWriter::new(f))
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "{}: ELF core of checkpoint {}: {} MiB ({n} bytes); open it with `crash vmlinux {}` or `gdb vmlinux {}`",
                out.display(),
                a.checkpoints()[i].section.meta.id,
                n >> 20,
                out.display(),
                out.display()
            );
            Ok(())
        }
    }
}

fn open(path: &Path) -> Result<Archive<File>> {
    Archive::open_path(path).with_context(|| format!("{}", path.display()))
}

/// The index of checkpoint `id`, or `default`.
fn pick<S: quicksilver_checkpoint::qsc::read::Source + ?Sized>(
    a: &Archive<S>,
    id: Option<u32>,
    default: usize,
) -> Result<usize> {
    match id {
        None => Ok(default),
        Some(id) => a.find(id).with_context(|| {
            let ids: Vec<String> = a
                .checkpoints()
                .iter()
                .map(|e| e.section.meta.id.to_string())
                .collect();
            format!("no checkpoint {id} in the file (it has {})", ids.join(", "))
        }),
    }
}

fn when(unix_ns: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_nanos(unix_ns)).to_string()
}

fn inspect(path: &Path) -> Result<()> {
    let a = open(path)?;
    let bytes = std::fs::metadata(path)?.len();
    println!(
        "{}: Quicksilver checkpoint file, format {}, {} checkpoint(s), {} KiB",
        path.display(),
        quicksilver_checkpoint::qsc::format::VERSION,
        a.checkpoints().len(),
        bytes >> 10
    );
    for e in a.checkpoints() {
        describe(e);
    }
    Ok(())
}

fn describe(e: &Entry) {
    let (s, m) = (&e.section, &e.section.meta);
    println!(
        "checkpoint {} (parent {}, {}): taken {}, every CPU stopped {} us",
        m.id,
        m.parent,
        if m.periodic { "periodic" } else { "manual" },
        when(m.taken_unix_ns),
        m.pause_us
    );
    let build: String = m.build_id.iter().map(|b| format!("{b:02x}")).collect();
    println!(
        "  machine {}, kernel {} (build id {}), boot {}",
        or_unknown(&m.hostname),
        or_unknown(&m.kernel_release),
        or_unknown(&build),
        or_unknown(&m.boot_id)
    );
    let ram_pages: u64 = m.ram.iter().map(|r| r.pages()).sum();
    let kept = match s.delta_of {
        None => "full (pages not listed are zero)".to_string(),
        Some(d) => format!("the pages that differ from checkpoint {d}"),
    };
    println!(
        "  memory: {} MiB of RAM in {} range(s); this checkpoint lists {} pages ({} KiB): {kept}",
        (ram_pages * PAGE as u64) >> 20,
        m.ram.len(),
        e.pages.len(),
        (e.pages.len() * PAGE) >> 10
    );
    for c in &e.cpus {
        println!(
            "  cpu {} (APIC {}): rip {:#x} rsp {:#x} cr3 {:#x} cpl {} gs.base {:#x}",
            c.index,
            c.apic_id,
            c.rip,
            c.gprs[quicksilver_checkpoint::model::gpr::RSP],
            c.cr3,
            c.cpl,
            c.segments[seg::GS].base
        );
    }
    let names: Vec<&str> = e.devices.iter().map(|d| d.name.as_str()).collect();
    println!(
        "  devices: {}",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    );
    match m.vmcoreinfo.len() {
        0 => println!(
            "  vmcoreinfo: none (an ELF core of it needs crash's --kaslr and phys_base by hand)"
        ),
        n => println!("  vmcoreinfo: {n} bytes"),
    }
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() {
        "unknown"
    } else {
        s
    }
}

fn diff_cmd(
    pa: &Path,
    pb: Option<&Path>,
    from: Option<u32>,
    to: Option<u32>,
    list: usize,
) -> Result<()> {
    let a = open(pa)?;
    let b_owned = pb.map(open).transpose()?;
    let b = b_owned.as_ref().unwrap_or(&a);
    let n = a.checkpoints().len();
    let (ia, ib) = if pb.is_some() {
        (
            pick(&a, from, n - 1)?,
            pick(b, to, b.checkpoints().len() - 1)?,
        )
    } else {
        if n < 2 && (from.is_none() || to.is_none()) {
            bail!(
                "{} holds one checkpoint: give a second file to compare with",
                pa.display()
            );
        }
        (pick(&a, from, n - 2)?, pick(&a, to, n - 1)?)
    };
    let (ea, eb) = (&a.checkpoints()[ia], &b.checkpoints()[ib]);
    let (ma, mb) = (&ea.section.meta, &eb.section.meta);
    println!(
        "from checkpoint {} ({}) to checkpoint {} ({})",
        ma.id,
        when(ma.taken_unix_ns),
        mb.id,
        when(mb.taken_unix_ns)
    );
    if ma.boot_id != mb.boot_id || ma.build_id != mb.build_id {
        println!(
            "  note: not the same boot of the same kernel ({} vs {})",
            or_unknown(&ma.boot_id),
            or_unknown(&mb.boot_id)
        );
    }
    let d = diff::memory(&a, ia, b, ib, list)?;
    println!(
        "memory: {} pages differ ({} KiB)",
        d.total,
        (d.total * PAGE as u64) >> 10
    );
    for (r, k) in &d.ranges {
        println!(
            "  [{:#x}, {:#x}): {k} of {} pages",
            r.start,
            r.end,
            r.pages()
        );
    }
    if !d.first.is_empty() {
        let first: Vec<String> = d.first.iter().map(|g| format!("{g:#x}")).collect();
        println!("  first: {}", first.join(" "));
    }
    for (ca, cb) in ea.cpus.iter().zip(&eb.cpus) {
        let regs = diff::cpu(ca, cb);
        if regs.is_empty() {
            println!("cpu {}: no register changed", ca.index);
        } else {
            let r: Vec<String> = regs
                .iter()
                .map(|(n, x, y)| format!("{n} {x:#x} -> {y:#x}"))
                .collect();
            println!("cpu {}: {}", ca.index, r.join(", "));
        }
    }
    Ok(())
}
