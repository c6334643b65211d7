//! `cargo xtask bench gdb`: Quicksilver's gdbstub, over the serial link and over the fast link
//! (issue 13: a virtio-net NIC the hv drives, `qs-bridge --net`), against QEMU's own
//! (`-gdb tcp::PORT`), in the same run, on the same guest: 2 CPUs, the agent loaded with the
//! link on the second UART (and `net=` for the fast link), a `qs-workload --getpid-loop`
//! pinned to every CPU (so that every CPU runs, and the getpid handler is called all the
//! time).
//!
//! For each stub, one boot, and real GNU gdb timing itself with its Python (`time.perf_counter`
//! around `gdb.execute`):
//!
//! - attach: `target remote` until gdb's prompt is back (every CPU stopped, registers and the
//!   first frame read); detach: `detach` until gdb is back. Medians over [`CYCLES`] rounds.
//! - memory, in the first round: `dump binary memory` of 1 MiB from `_text` (kernel text),
//!   with gdb's caches off: `read_kib_s`.
//! - stepping, in a session of its own after the rounds: a breakpoint on `__x64_sys_getpid`,
//!   `continue` until it hits, delete it, then [`STEPS`] `stepi` (through the handler, the
//!   system-call return, user space and the next call): `stepi_per_s`. Then the breakpoint
//!   again and [`HITS`] `continue`s, each until it hits: `bp_hits_per_s`.
//!
//! A figure that could not be measured is `null` in the JSON (with the `error`), and the
//! command fails after writing what it measured.
//!
//! QEMU's stub does not know the KASLR offset: gdb gets it from the guest's `/proc/kallsyms`
//! (`symbol-file -o`). Quicksilver's stub answers `qOffsets`, so gdb is given plain `vmlinux`.
//! Results: `target/bench/gdb.json` and a Markdown table (`target/bench/gdb.md`) for
//! BENCHMARKS.md.

use crate::bench::round;
use anyhow::{bail, Context, Result};
use qs_testkit::qemu::FastLinkNic;
use qs_testkit::{Artifacts, Gdb, Machine, MachineConfig, Stub};
use serde::Serialize;
use std::fmt::Write as _;
use std::time::Duration;

/// `stepi`s timed per stub.
pub const STEPS: u32 = 1000;
/// Bytes of kernel memory read per stub.
pub const READ_BYTES: u64 = 1 << 20;
/// Breakpoint hits timed per stub.
pub const HITS: u32 = 100;
/// Attach/detach rounds per stub (medians).
pub const CYCLES: usize = 9;
/// Guest CPUs.
pub const SMP: u32 = 2;
/// The link key of the benchmark guest.
const KEY: &str = "qs-bench-gdb-key";

/// One stub's figures; those not measured are `None` (see `error`).
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub stepi_per_s: Option<f64>,
    pub bp_hits_per_s: Option<f64>,
    pub read_kib_s: Option<f64>,
    pub attach_ms: Option<f64>,
    pub detach_ms: Option<f64>,
    /// Every attach, in order.
    pub attaches_ms: Vec<f64>,
    /// Every detach, in order.
    pub detaches_ms: Vec<f64>,
    /// What failed (the figures measured before it are kept).
    pub error: Option<String>,
}

/// Guest script: a getpid loop pinned to each CPU, the kernel's `_text` for QEMU's stub, then
/// wait for the host's `bench-done` line, stop the loops and check them and the CPUs' state.
const SCRIPT: &str = r#"n=$(nproc)
for c in $(seq 0 $((n - 1))); do
    taskset -c $c qs-workload --getpid-loop 0 > /tmp/getpid.$c 2>&1 &
done
sleep 1
echo "KALLSYMS-TEXT $(grep -w _text /proc/kallsyms | cut -d' ' -f1)"
echo BENCH-READY
read -r line
echo "host said: $line"
kill -TERM $(jobs -p) 2>/dev/null
wait
cat /tmp/getpid.*
if grep -q FAIL /tmp/getpid.*; then exit 1; fi
if grep -q '^quicksilver ' /proc/modules; then qsctl probe --expect native || exit 1; fi
"#;

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The number after `marker` in `text`.
fn figure(text: &str, marker: &str) -> Result<f64> {
    let rest = text
        .split(marker)
        .nth(1)
        .with_context(|| format!("no {marker} in gdb's output:\n{text}"))?;
    rest.split_whitespace()
        .next()
        .unwrap_or("")
        .parse()
        .with_context(|| format!("{marker} is not followed by a number: {text}"))
}

/// Runs gdb's Python `code` (one line) timing `what`; returns the seconds it printed.
fn timed(gdb: &mut Gdb, what: &str, timeout: Duration) -> Result<(f64, String)> {
    let out = gdb.run_timeout(
        &format!(
            "python import time; t0 = time.perf_counter(); {what}; print('QS-BENCH-SECONDS %.9f' % (time.perf_counter() - t0))"
        ),
        timeout,
    )?;
    Ok((figure(&out, "QS-BENCH-SECONDS")?, out))
}

/// Fails unless a timed gdb command went through.
fn ensure_ok(out: &str, what: &str) -> Result<()> {
    if out.contains("Error") || out.contains("Traceback") {
        bail!("{what} failed:\n{out}");
    }
    Ok(())
}

/// `target remote`, timed.
fn attach(gdb: &mut Gdb, addr: &str, what: &str) -> Result<f64> {
    let (secs, out) = timed(
        gdb,
        &format!("gdb.execute('target remote {addr}', to_string=True)"),
        Duration::from_secs(120),
    )
    .with_context(|| what.to_string())?;
    ensure_ok(&out, what)?;
    Ok(secs * 1000.0)
}

/// `detach`, timed.
fn detach(gdb: &mut Gdb, what: &str) -> Result<f64> {
    let (secs, out) = timed(
        gdb,
        "gdb.execute('detach', to_string=True)",
        Duration::from_secs(120),
    )
    .with_context(|| what.to_string())?;
    ensure_ok(&out, what)?;
    Ok(secs * 1000.0)
}

/// The measurements into `f`, with gdb connected to nothing yet and the stub at `addr`:
/// attach/detach rounds (the memory read in the first), then stepping in a session of its
/// own, last (a stub that loses a step leaves gdb waiting for good).
fn measure(gdb: &mut Gdb, addr: &str, label: &str, fast: bool, f: &mut Figures) -> Result<()> {
    gdb.run("set code-cache off")?;
    gdb.run("set stack-cache off")?;
    for cycle in 0..CYCLES {
        let ms = attach(gdb, addr, &format!("{label}: attach {cycle}"))?;
        f.attaches_ms.push(ms);
        f.attach_ms = Some(median(&f.attaches_ms));
        if cycle == 0 {
            let threads = gdb.run("info threads")?;
            eprintln!("xtask bench: {label}: attached:\n{threads}");
            if fast {
                let link = gdb.run("monitor link")?;
                if !link.contains("carried by the fast link") {
                    bail!("{label}: the fast link does not carry the session:\n{link}");
                }
            }
            let text = figure(
                &gdb.run(
                    "python print('QS-TEXT %d' % int(gdb.parse_and_eval('(unsigned long)&_text')))",
                )?,
                "QS-TEXT",
            )? as u64;
            let dump =
                std::env::temp_dir().join(format!("qs-bench-gdb-{}.bin", std::process::id()));
            let (secs, out) = timed(
                gdb,
                &format!(
                    "gdb.execute('dump binary memory {} {text:#x} {:#x}', to_string=True)",
                    dump.display(),
                    text + READ_BYTES
                ),
                Duration::from_secs(300),
            )
            .with_context(|| format!("{label}: reading memory"))?;
            let len = std::fs::metadata(&dump).map(|m| m.len()).unwrap_or(0);
            let _ = std::fs::remove_file(&dump);
            ensure_ok(&out, &format!("{label}: reading memory"))?;
            if len != READ_BYTES {
                bail!("{label}: dump wrote {len} bytes, not {READ_BYTES}:\n{out}");
            }
            f.read_kib_s = Some((READ_BYTES / 1024) as f64 / secs);
        }
        let ms = detach(gdb, &format!("{label}: detach {cycle}"))?;
        f.detaches_ms.push(ms);
        f.detach_ms = Some(median(&f.detaches_ms));
        // Let the guest run between rounds (and the bridge see the session end).
        std::thread::sleep(Duration::from_millis(500));
    }

    attach(gdb, addr, &format!("{label}: attach for stepping"))?;
    let out = gdb.run("break __x64_sys_getpid")?;
    if !out.contains("Breakpoint 1 at") {
        bail!("{label}: break __x64_sys_getpid:\n{out}");
    }
    let out = gdb.run_timeout("continue", Duration::from_secs(120))?;
    if !out.contains("Breakpoint 1, ") {
        bail!("{label}: the getpid breakpoint did not hit:\n{out}");
    }
    gdb.run("delete")?;
    let (secs, out) = timed(
        gdb,
        &format!("[gdb.execute('stepi', to_string=True) for i in range({STEPS})]"),
        Duration::from_secs(300),
    )
    .with_context(|| format!("{label}: stepping"))?;
    ensure_ok(&out, &format!("{label}: stepping"))?;
    f.stepi_per_s = Some(f64::from(STEPS) / secs);
    let out = gdb.run("break __x64_sys_getpid")?;
    if !out.contains("Breakpoint 2 at") {
        bail!("{label}: break __x64_sys_getpid again:\n{out}");
    }
    let (secs, out) = timed(
        gdb,
        &format!("[gdb.execute('continue', to_string=True) for i in range({HITS})]"),
        Duration::from_secs(600),
    )
    .with_context(|| format!("{label}: breakpoint hits"))?;
    ensure_ok(&out, &format!("{label}: breakpoint hits"))?;
    let hits = gdb.run("info breakpoints")?;
    if !hits.contains(&format!("breakpoint already hit {HITS} time")) {
        bail!("{label}: not {HITS} hits more:\n{hits}");
    }
    f.bp_hits_per_s = Some(f64::from(HITS) / secs);
    gdb.run("delete")?;
    detach(gdb, &format!("{label}: detach after stepping"))?;
    Ok(())
}

/// QEMU's gdbstub on the benchmark guest.
pub fn qemu_stub(a: &Artifacts) -> Figures {
    figures(a, qemu_stub_into)
}

/// Quicksilver's gdbstub, through `qs-bridge` and the serial link, on the benchmark guest.
pub fn quicksilver_stub(a: &Artifacts) -> Figures {
    figures(a, quicksilver_stub_into)
}

/// Quicksilver's gdbstub, through `qs-bridge` and the fast link (virtio-net).
pub fn fast_link_stub(a: &Artifacts) -> Figures {
    figures(a, fast_link_stub_into)
}

/// Quicksilver's gdbstub, through `qs-bridge` and the fast link on the 82574L (`e1000e`).
pub fn fast_link_e1000e_stub(a: &Artifacts) -> Figures {
    figures(a, fast_link_e1000e_stub_into)
}

/// What `measure_into` measured, with its error if it stopped early.
fn figures(a: &Artifacts, measure_into: fn(&Artifacts, &mut Figures) -> Result<()>) -> Figures {
    let mut f = Figures::default();
    if let Err(e) = measure_into(a, &mut f) {
        f.error = Some(format!("{e:#}"));
    }
    f
}

fn qemu_stub_into(a: &Artifacts, f: &mut Figures) -> Result<()> {
    stub_into(a, Stub::Qemu, None, "bench-gdb-qemu", "QEMU's gdbstub", f)
}

fn fast_link_stub_into(a: &Artifacts, f: &mut Figures) -> Result<()> {
    stub_into(
        a,
        Stub::Quicksilver,
        Some(FastLinkNic::VirtioNet),
        "bench-gdb-fast",
        "Quicksilver's gdbstub over the fast link",
        f,
    )
}

fn fast_link_e1000e_stub_into(a: &Artifacts, f: &mut Figures) -> Result<()> {
    stub_into(
        a,
        Stub::Quicksilver,
        Some(FastLinkNic::E1000e),
        "bench-gdb-e1000e",
        "Quicksilver's gdbstub over the fast link (e1000e)",
        f,
    )
}

fn quicksilver_stub_into(a: &Artifacts, f: &mut Figures) -> Result<()> {
    stub_into(
        a,
        Stub::Quicksilver,
        None,
        "bench-gdb-quicksilver",
        "Quicksilver's gdbstub",
        f,
    )
}

/// One boot of the benchmark guest with `stub` (over the fast link on `fast`), measured into
/// `f`.
fn stub_into(
    a: &Artifacts,
    stub: Stub,
    fast: Option<FastLinkNic>,
    name: &str,
    label: &str,
    f: &mut Figures,
) -> Result<()> {
    let mut config = MachineConfig::new(name, SMP, SCRIPT, "BENCH-READY");
    config.stub = stub;
    config.fast_link = fast;
    config.key = KEY.into();
    config.timeout = Duration::from_secs(1800);
    config.boot_timeout = Duration::from_secs(300);
    let mut machine = Machine::start(a, &config)?;
    let mut gdb = machine.try_gdb()?;
    let addr = machine.addr().to_string();
    measure(&mut gdb, &addr, label, fast.is_some(), f).with_context(|| {
        format!(
            "qs-bridge said:\n{}\nthe CPUs are at:\n{}",
            machine.bridge_log(),
            machine.cpu_states()
        )
    })?;
    gdb.quit();
    machine.try_send("bench-done")?;
    // The script checked the getpid loops and that every CPU is native again.
    machine.try_finish()?.ensure_success()?;
    Ok(())
}

/// `gdb.json`: every stub's figures, Quicksilver's over the serial link plain, over the fast
/// link (virtio-net) with `_fast`, QEMU's with `_qemu`, and over the fast link on the 82574L
/// in `fast_e1000e`; a figure not measured is `null`, and `error` says why.
#[derive(Debug, Serialize)]
struct Report {
    benchmark: &'static str,
    smp: u32,
    steps: u32,
    hits: u32,
    read_bytes: u64,
    cycles: usize,
    targets: Targets,
    stepi_per_s: Option<f64>,
    stepi_per_s_fast: Option<f64>,
    stepi_per_s_qemu: Option<f64>,
    bp_hits_per_s: Option<f64>,
    bp_hits_per_s_fast: Option<f64>,
    bp_hits_per_s_qemu: Option<f64>,
    read_kib_s: Option<f64>,
    read_kib_s_fast: Option<f64>,
    read_kib_s_qemu: Option<f64>,
    attach_ms: Option<f64>,
    attach_ms_fast: Option<f64>,
    attach_ms_qemu: Option<f64>,
    detach_ms: Option<f64>,
    detach_ms_fast: Option<f64>,
    detach_ms_qemu: Option<f64>,
    attaches_ms: Vec<f64>,
    detaches_ms: Vec<f64>,
    attaches_ms_fast: Vec<f64>,
    detaches_ms_fast: Vec<f64>,
    attaches_ms_qemu: Vec<f64>,
    detaches_ms_qemu: Vec<f64>,
    error: Option<String>,
    error_fast: Option<String>,
    error_qemu: Option<String>,
    fast_e1000e: StubReport,
}

/// One stub's figures, as [`Report`] has them for the others.
#[derive(Debug, Serialize)]
struct StubReport {
    stepi_per_s: Option<f64>,
    bp_hits_per_s: Option<f64>,
    read_kib_s: Option<f64>,
    attach_ms: Option<f64>,
    detach_ms: Option<f64>,
    attaches_ms: Vec<f64>,
    detaches_ms: Vec<f64>,
    error: Option<String>,
}

impl StubReport {
    fn new(f: &Figures) -> StubReport {
        StubReport {
            stepi_per_s: f.stepi_per_s.map(|v| round(v, 1)),
            bp_hits_per_s: f.bp_hits_per_s.map(|v| round(v, 1)),
            read_kib_s: f.read_kib_s.map(|v| round(v, 1)),
            attach_ms: f.attach_ms.map(|v| round(v, 2)),
            detach_ms: f.detach_ms.map(|v| round(v, 2)),
            attaches_ms: f.attaches_ms.iter().map(|&v| round(v, 2)).collect(),
            detaches_ms: f.detaches_ms.iter().map(|&v| round(v, 2)).collect(),
            error: f.error.clone(),
        }
    }
}

/// What the figures should reach (BENCHMARKS.md): the serial link's (issue 9), and the fast
/// link's (issue 13: QEMU's own stub's rates, attach under 10 ms).
#[derive(Debug, Serialize)]
struct Targets {
    stepi_ratio_min: f64,
    read_ratio_min: f64,
    attach_ms_max: u32,
    fast_ratio_min: f64,
    fast_attach_ms_max: u32,
}

impl Report {
    /// The report of Quicksilver's figures over the serial link `s`, the fast link `f` and
    /// the fast link on the 82574L `e`, and QEMU's `q`, rounded to the precision they have
    /// (rates to 0.1, times to 0.01 ms).
    fn new(s: &Figures, f: &Figures, e: &Figures, q: &Figures) -> Report {
        let r = |v: Option<f64>, d| v.map(|v| round(v, d));
        let all = |v: &[f64]| v.iter().map(|&v| round(v, 2)).collect();
        Report {
            benchmark: "gdb",
            smp: SMP,
            steps: STEPS,
            hits: HITS,
            read_bytes: READ_BYTES,
            cycles: CYCLES,
            targets: Targets {
                stepi_ratio_min: 0.5,
                read_ratio_min: 0.5,
                attach_ms_max: 50,
                fast_ratio_min: 1.0,
                fast_attach_ms_max: 10,
            },
            stepi_per_s: r(s.stepi_per_s, 1),
            stepi_per_s_fast: r(f.stepi_per_s, 1),
            stepi_per_s_qemu: r(q.stepi_per_s, 1),
            bp_hits_per_s: r(s.bp_hits_per_s, 1),
            bp_hits_per_s_fast: r(f.bp_hits_per_s, 1),
            bp_hits_per_s_qemu: r(q.bp_hits_per_s, 1),
            read_kib_s: r(s.read_kib_s, 1),
            read_kib_s_fast: r(f.read_kib_s, 1),
            read_kib_s_qemu: r(q.read_kib_s, 1),
            attach_ms: r(s.attach_ms, 2),
            attach_ms_fast: r(f.attach_ms, 2),
            attach_ms_qemu: r(q.attach_ms, 2),
            detach_ms: r(s.detach_ms, 2),
            detach_ms_fast: r(f.detach_ms, 2),
            detach_ms_qemu: r(q.detach_ms, 2),
            attaches_ms: all(&s.attaches_ms),
            detaches_ms: all(&s.detaches_ms),
            attaches_ms_fast: all(&f.attaches_ms),
            detaches_ms_fast: all(&f.detaches_ms),
            attaches_ms_qemu: all(&q.attaches_ms),
            detaches_ms_qemu: all(&q.detaches_ms),
            error: s.error.clone(),
            error_fast: f.error.clone(),
            error_qemu: q.error.clone(),
            fast_e1000e: StubReport::new(e),
        }
    }
}

/// The Markdown table of the serial link's `s`, the fast link's `f` (virtio-net) and `e`
/// (82574L), and QEMU's `q`.
fn table(s: &Figures, f: &Figures, e: &Figures, q: &Figures) -> String {
    let cell = |v: Option<f64>, p: usize| v.map_or("—".into(), |v| format!("{v:.p$}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}", a / b),
        _ => "—".into(),
    };
    let mut md = String::from(
        "| measure | Quicksilver, serial link | Quicksilver, fast link (virtio-net) | Quicksilver, fast link (e1000e) | QEMU's gdbstub | serial / QEMU | fast virtio-net / QEMU | fast e1000e / QEMU | target: serial; fast |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    type Pick = fn(&Figures) -> Option<f64>;
    let rows: [(String, Pick, usize, &str); 5] = [
        (
            format!("stepi per s ({STEPS} steps)"),
            |x| x.stepi_per_s,
            1,
            "≥ 0.5 × QEMU; ≥ 1 × QEMU",
        ),
        (
            format!("breakpoint hits per s ({HITS} `continue`s)"),
            |x| x.bp_hits_per_s,
            1,
            "; ≥ 1 × QEMU",
        ),
        (
            "memory read KiB/s (1 MiB of kernel text)".to_string(),
            |x| x.read_kib_s,
            1,
            "≥ 0.5 × QEMU; ≥ 1 × QEMU",
        ),
        (
            format!("attach ms (median of {CYCLES})"),
            |x| x.attach_ms,
            2,
            "< 50 ms; < 10 ms",
        ),
        (
            format!("detach ms (median of {CYCLES})"),
            |x| x.detach_ms,
            2,
            "",
        ),
    ];
    for (what, pick, p, target) in rows {
        let _ = writeln!(
            md,
            "| {what} | {} | {} | {} | {} | {} | {} | {} | {target} |",
            cell(pick(s), p),
            cell(pick(f), p),
            cell(pick(e), p),
            cell(pick(q), p),
            ratio(pick(s), pick(q)),
            ratio(pick(f), pick(q)),
            ratio(pick(e), pick(q)),
        );
    }
    md
}

/// Every stub; writes the JSON and the Markdown table, then fails if any stub could not be
/// measured in full.
pub fn gdb(a: &Artifacts) -> Result<()> {
    eprintln!("xtask bench: gdb, QEMU's gdbstub");
    let q = qemu_stub(a);
    eprintln!("xtask bench: QEMU: {q:?}");
    eprintln!("xtask bench: gdb, Quicksilver's gdbstub over the serial link");
    let s = quicksilver_stub(a);
    eprintln!("xtask bench: Quicksilver, serial link: {s:?}");
    eprintln!("xtask bench: gdb, Quicksilver's gdbstub over the fast link");
    let f = fast_link_stub(a);
    eprintln!("xtask bench: Quicksilver, fast link: {f:?}");
    eprintln!("xtask bench: gdb, Quicksilver's gdbstub over the fast link on the 82574L");
    let e = fast_link_e1000e_stub(a);
    eprintln!("xtask bench: Quicksilver, fast link (e1000e): {e:?}");
    let dir = crate::target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let mut json = serde_json::to_string_pretty(&Report::new(&s, &f, &e, &q))?;
    json.push('\n');
    let md = table(&s, &f, &e, &q);
    std::fs::write(dir.join("gdb.json"), json)?;
    std::fs::write(dir.join("gdb.md"), &md)?;
    println!("{md}");
    println!("xtask bench: wrote {}", dir.join("gdb.json").display());
    let mut why = String::new();
    for (who, e) in [
        ("QEMU's gdbstub", &q.error),
        ("Quicksilver's gdbstub, serial link", &s.error),
        ("Quicksilver's gdbstub, fast link", &f.error),
        ("Quicksilver's gdbstub, fast link (e1000e)", &e.error),
    ] {
        if let Some(e) = e {
            let _ = writeln!(why, "{who}: {e}");
        }
    }
    if why.is_empty() {
        Ok(())
    } else {
        bail!("not every figure was measured:\n{why}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_follow_their_marker() {
        let out = "Breakpoint 1, x\nQS-BENCH-SECONDS 1.250000000\n";
        assert_eq!(figure(out, "QS-BENCH-SECONDS").unwrap(), 1.25);
        assert!(figure("nothing", "QS-BENCH-SECONDS").is_err());
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn the_report_has_every_field_and_null_for_what_was_not_measured() {
        let s = Figures {
            stepi_per_s: Some(275.04),
            attaches_ms: vec![23.456, 24.0],
            error: Some("a \"quoted\"\nerror".into()),
            ..Figures::default()
        };
        let none = Figures::default();
        let json = serde_json::to_value(Report::new(&s, &none, &none, &none)).unwrap();
        assert_eq!(json["stepi_per_s"], 275.0);
        assert_eq!(json["attaches_ms"], serde_json::json!([23.46, 24.0]));
        assert!(json["read_kib_s"].is_null() && json["error_qemu"].is_null());
        assert!(json["fast_e1000e"]["stepi_per_s"].is_null());
        assert_eq!(json["error"], "a \"quoted\"\nerror");
        assert_eq!(json["targets"]["attach_ms_max"], 50);
        // The fields the hand-written JSON had, and the fast link's and breakpoint hits'.
        let mut keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "attach_ms",
                "attach_ms_fast",
                "attach_ms_qemu",
                "attaches_ms",
                "attaches_ms_fast",
                "attaches_ms_qemu",
                "benchmark",
                "bp_hits_per_s",
                "bp_hits_per_s_fast",
                "bp_hits_per_s_qemu",
                "cycles",
                "detach_ms",
                "detach_ms_fast",
                "detach_ms_qemu",
                "detaches_ms",
                "detaches_ms_fast",
                "detaches_ms_qemu",
                "error",
                "error_fast",
                "error_qemu",
                "fast_e1000e",
                "hits",
                "read_bytes",
                "read_kib_s",
                "read_kib_s_fast",
                "read_kib_s_qemu",
                "smp",
                "stepi_per_s",
                "stepi_per_s_fast",
                "stepi_per_s_qemu",
                "steps",
                "targets"
            ]
        );
    }
}
