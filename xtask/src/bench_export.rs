//! `cargo xtask bench export`: what exporting a checkpoint costs, against what the same path
//! can carry, measured in one run.
//!
//! - **In the guest** (1 GiB, 2 CPUs): `qsctl export ID DISK` (`.qsc`) and `--elf`, each onto a
//!   virtio disk, against `dd` writing as many bytes onto a third disk with `O_DIRECT` in the
//!   same boot: the disk's raw rate, which an export cannot beat.
//! - **On the operator's machine**: `qs-checkpoint to-elf` of that `.qsc`, against copying a
//!   file of the core's size (`cp`, the host disk's rate).
//! - **qs-tui**: one redraw at 200x60 with 100 checkpoints listed (its own benchmark test, in a
//!   release build).
//!
//! - **Over the link** (256 MiB, 2 CPUs, the serial link under QEMU): `qs-bridge`'s `export`
//!   of a checkpoint of the booted machine, against `link-test` in the same boot (pages that
//!   do not compress, sent the way an export's are): the link's raw rate, on the wire and in
//!   payload, measured before and after the export and the faster taken. From both, what
//!   1 GiB takes on a real 115200-baud line.
//!
//! Results: `target/bench/export.json` and a Markdown table for BENCHMARKS.md.

use anyhow::{bail, Context, Result};
use qs_testkit::Artifacts;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Default, Serialize)]
pub struct Export {
    pub memory_mib: u32,
    /// `.qsc` export: bytes written, seconds, MiB/s of file written and of RAM covered.
    pub qsc_bytes: u64,
    pub qsc_s: f64,
    pub qsc_file_mib_s: f64,
    pub qsc_ram_mib_s: f64,
    /// ELF export: the same.
    pub elf_bytes: u64,
    pub elf_s: f64,
    pub elf_file_mib_s: f64,
    /// `dd ... oflag=direct` onto the third disk in the same boot (MiB/s).
    pub disk_raw_mib_s: f64,
    /// ELF export's file rate / the disk's raw rate.
    pub elf_vs_disk: f64,
    /// `qs-checkpoint to-elf` on the host (MiB/s of core written), and `cp` of a file that size.
    pub to_elf_mib_s: f64,
    pub host_cp_mib_s: f64,
    pub to_elf_vs_cp: f64,
    /// qs-tui: one redraw at 200x60 with 100 checkpoints (µs).
    pub tui_redraw_us: f64,
    /// Over the link: see [`Link`].
    pub link: Link,
}

/// The export over the link, and the link's raw rate in the same boot.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Link {
    pub memory_mib: u32,
    /// `link-test`: bytes per second on the wire, and of payload (what an export's pages get).
    pub raw_wire_bytes_s: f64,
    pub raw_payload_bytes_s: f64,
    /// The two `link-test`s' payload rates, before and after the export (the faster is the
    /// one above).
    pub raw_payload_before_bytes_s: f64,
    pub raw_payload_after_bytes_s: f64,
    /// The export: seconds, bytes that crossed (zero pages never do; pages deflate), its
    /// payload rate while it ran, the RAM it covered per second, the file.
    pub export_s: f64,
    pub export_link_bytes: u64,
    pub export_link_bytes_s: f64,
    pub export_ram_bytes_s: f64,
    pub file_bytes: u64,
    /// The export's payload rate / the link's payload rate (goal 0.8), and its RAM rate / the
    /// link's payload rate (what zero pages and deflate win).
    pub link_use: f64,
    pub ram_vs_raw: f64,
    /// Hours for 1 GiB over a real 115200-baud line (11 520 bytes/s, 8N1) at this run's
    /// framing efficiency and link use: pages that do not compress, and this machine's mix.
    pub gib_115200_worst_h: f64,
    pub gib_115200_like_this_h: f64,
}

/// An export of a checkpoint of a booted 256 MiB machine over its link, and `link-test`.
fn over_the_link(a: &Artifacts) -> Result<Link> {
    use qs_testkit::control::Client;
    use qs_testkit::machine::Machine;
    let memory_mib = 256;
    let script = r#"
start_workload
qsctl checkpoint
echo GUEST-READY
wait_host
qsctl checkpoint --delete all
stop_workload
"#;
    let mut config = Machine::config("bench-export-link", 2, script, "GUEST-READY");
    config.memory = Some(format!("{memory_mib}M"));
    config.cmdline.push("quicksilver.ckpt_mem=64M".into());
    config.timeout = Duration::from_secs(1800);
    let mut m = Machine::start(a, &config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut c = Client::connect(m.control_path().context("no control socket")?);
    // The link's rate is measured before and after the export, and the faster taken: under
    // QEMU it swings by a fifth between runs with what else the host runs, and the ratio is
    // meant against the most the link carried.
    let link_test = |c: &mut Client| -> Result<serde_json::Value> {
        let raw = c.ask("link-test 512");
        if raw["ok"] != true {
            bail!("link-test: {raw}");
        }
        Ok(raw)
    };
    let before = link_test(&mut c)?;
    let file = a.dir.join("run").join("bench-export-link.qsc");
    let _ = std::fs::remove_file(&file);
    let r = c.ask(&format!("export 1 {} qsc", file.display()));
    if r["ok"] != true {
        bail!("export: {r}");
    }
    let end = loop {
        std::thread::sleep(Duration::from_secs(1));
        let e = c.ask("export-status")["export"].clone();
        if e["state"] != "running" {
            break e;
        }
    };
    if end["state"] != "done" {
        bail!("the export over the link did not finish: {end}");
    }
    let after = link_test(&mut c)?;
    let payload = |v: &serde_json::Value| v["payload_bytes_per_s"].as_f64().unwrap_or(0.0);
    let raw = if payload(&after) > payload(&before) {
        after.clone()
    } else {
        before.clone()
    };
    m.send("go");
    m.finish();
    let _ = std::fs::remove_file(&file);
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    let (raw_wire, raw_payload) = (f(&raw["wire_bytes_per_s"]), f(&raw["payload_bytes_per_s"]));
    let export_s = f(&end["seconds"]);
    let link_bytes = end["link_bytes"].as_u64().unwrap_or(0);
    let ram = end["total_bytes"].as_u64().unwrap_or(0);
    let export_link_bytes_s = link_bytes as f64 / export_s.max(1e-9);
    let export_ram_bytes_s = ram as f64 / export_s.max(1e-9);
    let link_use = export_link_bytes_s / raw_payload.max(1e-9);
    // A real line: 11 520 bytes/s on the wire, this run's payload share of the wire, and
    // this run's link use.
    let real_payload = 11_520.0 * raw_payload / raw_wire.max(1e-9) * link_use;
    let gib = (1u64 << 30) as f64;
    Ok(Link {
        memory_mib,
        raw_wire_bytes_s: raw_wire,
        raw_payload_bytes_s: raw_payload,
        raw_payload_before_bytes_s: payload(&before),
        raw_payload_after_bytes_s: payload(&after),
        export_s,
        export_link_bytes: link_bytes,
        export_link_bytes_s,
        export_ram_bytes_s,
        file_bytes: end["file_bytes"].as_u64().unwrap_or(0),
        link_use,
        ram_vs_raw: export_ram_bytes_s / raw_payload.max(1e-9),
        gib_115200_worst_h: gib / real_payload.max(1e-9) / 3600.0,
        gib_115200_like_this_h: gib * (link_bytes as f64 / ram.max(1) as f64)
            / real_payload.max(1e-9)
            / 3600.0,
    })
}

#[derive(Serialize)]
struct Report<'a> {
    benchmark: &'static str,
    anchors: &'static str,
    results: &'a Export,
}

/// "DD 1024 MiB from 5.12 to 13.12" (the guest's uptime around busybox dd, which prints no
/// rate): MiB/s.
fn dd_rate(console: &str) -> Result<f64> {
    let l = console
        .lines()
        .find_map(|l| l.split("DD ").nth(1))
        .context("no DD line")?;
    let w: Vec<&str> = l.split_whitespace().collect();
    let (mib, from, to): (f64, f64, f64) = match w.as_slice() {
        [m, "MiB", "from", f, "to", t, ..] => (m.parse()?, f.parse()?, t.parse()?),
        _ => bail!("a DD line I cannot read: {l}"),
    };
    Ok(mib / (to - from))
}

/// qsctl export's line for `dev`: (bytes, seconds).
fn export_line(console: &str, dev: &str) -> Result<(u64, f64)> {
    let l = console
        .lines()
        .find(|l| l.contains(&format!("exported to {dev} ")))
        .with_context(|| format!("no export line for {dev}"))?;
    let bytes = l
        .split(" bytes (")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .context("bytes")?
        .parse()?;
    let secs = l
        .split(" CPUs, in ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .context("seconds")?
        .parse()?;
    Ok((bytes, secs))
}

fn disk(dir: &Path, name: &str, mib: u64) -> Result<PathBuf> {
    let p = dir.join(format!("bench-export-{name}.img"));
    std::fs::File::create(&p)?.set_len(mib << 20)?;
    Ok(p)
}

pub fn export(a: &Artifacts) -> Result<Export> {
    let memory_mib = 1024u32;
    let dir = a.dir.join("run");
    std::fs::create_dir_all(&dir)?;
    let disks = [
        disk(&dir, "qsc", 1200)?,
        disk(&dir, "elf", 1200)?,
        disk(&dir, "raw", 1200)?,
    ];
    let mut q = a
        .qemu("bench-export")
        .smp(2)
        .memory(&format!("{memory_mib}M"))
        .cmdline("quicksilver.ckpt_mem=128M")
        .timeout(Duration::from_secs(1800));
    for (i, d) in disks.iter().enumerate() {
        q = q.args([
            "-drive".to_string(),
            format!("file={},if=none,format=raw,id=d{i}", d.display()),
            "-device".to_string(),
            format!("virtio-blk-pci,drive=d{i}"),
        ]);
    }
    let script = format!(
        r#"set -e
trap 'echo BENCH-FAILED; qsctl stats; qsctl checkpoints; dmesg | tail -n 40' ERR
for m in $(cat /lib/quicksilver/disk-modules); do insmod $m; done
sleep 1
t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/zero of=/dev/vdc bs=1M count={memory_mib} oflag=direct 2>/dev/null
echo "DD {memory_mib} MiB from $t0 to $(cut -d' ' -f1 /proc/uptime)"
qsctl checkpoint
qsctl export 1 /dev/vda
qsctl export 1 /dev/vdb --elf
qsctl checkpoint --delete all
"#
    );
    let run = q.run_script(&script)?;
    run.ensure_success()?;
    let c = &run.console;
    let disk_raw = dd_rate(c)?;
    let (qsc_bytes, qsc_s) = export_line(c, "/dev/vda")?;
    let (elf_bytes, elf_s) = export_line(c, "/dev/vdb")?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    // On the host: the .qsc cut to its length, converted; a copy of the core's size, timed.
    let qsc = dir.join("bench-export.qsc");
    {
        use std::io::{Read, Write};
        let mut src = std::fs::File::open(&disks[0])?.take(qsc_bytes);
        let mut dst = std::fs::File::create(&qsc)?;
        std::io::copy(&mut src, &mut dst)?;
        dst.flush()?;
    }
    let tool = build_release_tool()?;
    let core = dir.join("bench-export.core");
    let t0 = Instant::now();
    let st = Command::new(&tool)
        .args(["to-elf"])
        .arg(&qsc)
        .arg(&core)
        .status()?;
    if !st.success() {
        bail!("qs-checkpoint to-elf failed");
    }
    let to_elf_s = t0.elapsed().as_secs_f64();
    let core_bytes = std::fs::metadata(&core)?.len();
    let copy = dir.join("bench-export.copy");
    let t0 = Instant::now();
    let st = Command::new("cp").arg(&disks[1]).arg(&copy).status()?;
    let cp_s = t0.elapsed().as_secs_f64();
    if !st.success() {
        bail!("cp failed");
    }
    let cp_bytes = std::fs::metadata(&copy)?.len();
    let tui_redraw_us = tui_redraw()?;
    let link = over_the_link(a)?;
    for p in disks.iter().chain([&qsc, &core, &copy]) {
        let _ = std::fs::remove_file(p);
    }
    let e = Export {
        memory_mib,
        qsc_bytes,
        qsc_s,
        qsc_file_mib_s: mib(qsc_bytes) / qsc_s,
        qsc_ram_mib_s: memory_mib as f64 / qsc_s,
        elf_bytes,
        elf_s,
        elf_file_mib_s: mib(elf_bytes) / elf_s,
        disk_raw_mib_s: disk_raw,
        elf_vs_disk: mib(elf_bytes) / elf_s / disk_raw,
        to_elf_mib_s: mib(core_bytes) / to_elf_s,
        host_cp_mib_s: mib(cp_bytes) / cp_s,
        to_elf_vs_cp: (mib(core_bytes) / to_elf_s) / (mib(cp_bytes) / cp_s),
        tui_redraw_us,
        link,
    };
    let l = &e.link;
    let kib = |b: f64| b / 1024.0;
    let r2 = |v: f64| crate::bench::round(v, 2);
    let md = format!(
        "| what | figure | anchor, same run | ratio |\n| --- | --- | --- | --- |\n\
         | `qsctl export` `.qsc`, {memory_mib} MiB guest | {:.1} s, {:.1} MiB/s of RAM ({} MiB file) | | |\n\
         | `qsctl export --elf` | {:.1} s, {:.1} MiB/s written | `dd oflag=direct` to the same kind of disk: {:.1} MiB/s | {} |\n\
         | `qs-checkpoint to-elf` (host) | {:.1} MiB/s written | `cp` of the core: {:.1} MiB/s | {} |\n\
         | qs-tui redraw, 200x60, 100 checkpoints | {:.0} µs | | |\n\
         | export over the link, {} MiB guest (`.qsc`) | {:.0} s; {:.0} KiB/s of payload crossed ({} MiB: zero pages stay, pages deflate) | `link-test`, the faster of before and after: {:.0} KiB/s of payload ({:.0} and {:.0}), {:.0} KiB/s on the wire | {} (goal 0.8) |\n\
         | the same, RAM covered | {:.0} KiB/s of RAM | the link's payload rate | {} |\n\
         | 1 GiB over a real 115200-baud line (estimate) | {:.1} h for pages that do not compress; {:.1} h for pages like these | 11 520 bytes/s on the wire | |\n",
        e.qsc_s,
        e.qsc_ram_mib_s,
        qsc_bytes >> 20,
        e.elf_s,
        e.elf_file_mib_s,
        e.disk_raw_mib_s,
        r2(e.elf_vs_disk),
        e.to_elf_mib_s,
        e.host_cp_mib_s,
        r2(e.to_elf_vs_cp),
        e.tui_redraw_us,
        l.memory_mib,
        l.export_s,
        kib(l.export_link_bytes_s),
        l.export_link_bytes >> 20,
        kib(l.raw_payload_bytes_s),
        kib(l.raw_payload_before_bytes_s),
        kib(l.raw_payload_after_bytes_s),
        kib(l.raw_wire_bytes_s),
        r2(l.link_use),
        kib(l.export_ram_bytes_s),
        r2(l.ram_vs_raw),
        l.gib_115200_worst_h,
        l.gib_115200_like_this_h,
    );
    crate::bench::write_report(
        "export",
        &Report {
            benchmark: "export",
            anchors:
                "ELF export vs dd oflag=direct in the same boot; to-elf vs cp on the same host; export over the link vs link-test in the same boot",
            results: &e,
        },
        &md,
    )?;
    Ok(e)
}

/// `qs-checkpoint`, built for release.
fn build_release_tool() -> Result<PathBuf> {
    let st = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "quicksilver-checkpoint"])
        .status()?;
    if !st.success() {
        bail!("cargo build --release -p quicksilver-checkpoint failed");
    }
    Ok(crate::target_dir().join("release").join("qs-checkpoint"))
}

/// qs-tui's redraw benchmark (a test of its own, release build): µs per frame.
fn tui_redraw() -> Result<f64> {
    let out = Command::new(env!("CARGO"))
        .args([
            "test",
            "--release",
            "-p",
            "qs-tui",
            "redraw_200x60",
            "--",
            "--ignored",
            "--nocapture",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("QS-BENCH "))
        .context("no QS-BENCH line from qs-tui's redraw benchmark")?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    v["redraw_us"].as_f64().context("redraw_us")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dd_and_export_lines_are_read_as_they_are_printed() {
        let c = "[  11.8] DD 1024 MiB from 4.00 to 12.00\n\
                 checkpoint 1 exported to /dev/vdb (ELF core: crash --kaslr=auto --no_panic vmlinux FILE, or gdb vmlinux FILE): 536313856 bytes (511 MiB) for 511 MiB of RAM (130934 pages, 107160 of them zero), 2 CPUs, in 3.5 s (144.7 MiB/s of RAM)";
        assert!((dd_rate(c).unwrap() - 128.0).abs() < 0.01);
        assert_eq!(export_line(c, "/dev/vdb").unwrap(), (536313856, 3.5));
    }
}
