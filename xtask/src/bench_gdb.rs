//! `cargo xtask bench gdb`: Quicksilver's gdbstub against QEMU's own (`-gdb tcp::PORT`), in
//! the same run, on the same guest: 2 CPUs, the agent loaded with the link on the second UART,
//! a `qs-workload --getpid-loop` pinned to every CPU (so that every CPU runs, and the getpid
//! handler is called all the time).
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
//!   system-call return, user space and the next call): `stepi_per_s`.
//!
//! A figure that could not be measured is `null` in the JSON (with the `error`), and the
//! command fails after writing what it measured.
//!
//! QEMU's stub does not know the KASLR offset: gdb gets it from the guest's `/proc/kallsyms`
//! (`symbol-file -o`). Quicksilver's stub answers `qOffsets`, so gdb is given plain `vmlinux`.
//! Results: `target/bench/gdb.json` and a Markdown table (`target/bench/gdb.md`) for
//! BENCHMARKS.md.

use crate::build::Artifacts;
use crate::gdb::{free_port, Bridge, Gdb, Symbols};
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::time::Duration;

/// `stepi`s timed per stub.
pub const STEPS: u32 = 1000;
/// Bytes of kernel memory read per stub.
pub const READ_BYTES: u64 = 1 << 20;
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
fn measure(gdb: &mut Gdb, addr: &str, label: &str, f: &mut Figures) -> Result<()> {
    gdb.run("set code-cache off")?;
    gdb.run("set stack-cache off")?;
    for cycle in 0..CYCLES {
        let ms = attach(gdb, addr, &format!("{label}: attach {cycle}"))?;
        f.attaches_ms.push(ms);
        f.attach_ms = Some(median(&f.attaches_ms));
        if cycle == 0 {
            let threads = gdb.run("info threads")?;
            eprintln!("xtask bench: {label}: attached:\n{threads}");
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
    detach(gdb, &format!("{label}: detach after stepping"))?;
    Ok(())
}

/// QEMU's gdbstub on the benchmark guest.
pub fn qemu_stub(a: &Artifacts) -> Figures {
    figures(a, qemu_stub_into)
}

/// Quicksilver's gdbstub, through `qs-bridge`, on the benchmark guest.
pub fn quicksilver_stub(a: &Artifacts) -> Figures {
    figures(a, quicksilver_stub_into)
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
    let port = free_port();
    let sock = a
        .dir
        .join("run")
        .join(format!("bench-gdb-qemu-{}.sock", std::process::id()));
    let mut running = a
        .qemu("bench-gdb-qemu")
        .smp(SMP)
        .timeout(Duration::from_secs(1800))
        .link(&sock, KEY)
        .args(["-gdb".to_string(), format!("tcp:127.0.0.1:{port}")])
        .spawn_script(SCRIPT)?;
    running.wait_for(crate::gdb::TEXT_MARKER, Duration::from_secs(300))?;
    // The marker's whole line has arrived once the next marker has.
    running.wait_for("BENCH-READY", Duration::from_secs(60))?;
    let offset =
        crate::gdb::kaslr_offset(&running.console()).context("no _text address from the guest")?;
    let mut gdb = Gdb::start(
        "bench-gdb-qemu",
        &Symbols::Offset(a.vmlinux.clone(), offset),
        Some(&a.logs_dir().join("bench-gdb-qemu.gdb.log")),
    )?;
    measure(&mut gdb, &format!("127.0.0.1:{port}"), "QEMU's gdbstub", f)?;
    gdb.quit();
    running.send("bench-done\n")?;
    let out = running.wait()?;
    let _ = std::fs::remove_file(&sock);
    out.ensure_success()?;
    Ok(())
}

fn quicksilver_stub_into(a: &Artifacts, f: &mut Figures) -> Result<()> {
    a.require_agent()?;
    let sock = a
        .dir
        .join("run")
        .join(format!("bench-gdb-qs-{}.sock", std::process::id()));
    let mut running = a
        .qemu("bench-gdb-quicksilver")
        .smp(SMP)
        .timeout(Duration::from_secs(1800))
        .link(&sock, KEY)
        .spawn_script(SCRIPT)?;
    running.wait_for("BENCH-READY", Duration::from_secs(300))?;
    let bridge = Bridge::start(
        &a.bridge,
        &sock,
        KEY.as_bytes(),
        &a.logs_dir(),
        "bench-gdb-quicksilver",
        Duration::from_secs(60),
    )?;
    let mut gdb = Gdb::start(
        "bench-gdb-quicksilver",
        &Symbols::File(a.vmlinux.clone()),
        Some(&a.logs_dir().join("bench-gdb-quicksilver.gdb.log")),
    )?;
    measure(&mut gdb, &bridge.addr(), "Quicksilver's gdbstub", f)
        .with_context(|| format!("qs-bridge said:\n{}", bridge.log()))?;
    gdb.quit();
    running.send("bench-done\n")?;
    let out = running.wait()?;
    let _ = std::fs::remove_file(&sock);
    // The script checked the getpid loops and that every CPU is native again.
    out.ensure_success()?;
    Ok(())
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn fmt_opt(v: Option<f64>, precision: usize) -> String {
    v.map_or("null".into(), |v| format!("{v:.precision$}"))
}

/// Both stubs; writes the JSON and the Markdown table, then fails if either stub could not
/// be measured in full.
pub fn gdb(a: &Artifacts) -> Result<()> {
    eprintln!("xtask bench: gdb, QEMU's gdbstub");
    let q = qemu_stub(a);
    eprintln!("xtask bench: QEMU: {q:?}");
    eprintln!("xtask bench: gdb, Quicksilver's gdbstub");
    let s = quicksilver_stub(a);
    eprintln!("xtask bench: Quicksilver: {s:?}");
    let dir = crate::target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut json = String::from("{\n  \"benchmark\": \"gdb\",\n");
    let _ = writeln!(
        json,
        "  \"smp\": {SMP},\n  \"steps\": {STEPS},\n  \"read_bytes\": {READ_BYTES},\n  \"cycles\": {CYCLES},"
    );
    let _ = writeln!(
        json,
        "  \"targets\": {{\"stepi_ratio_min\": 0.5, \"read_ratio_min\": 0.5, \"attach_ms_max\": 50}},"
    );
    for (key, v, p) in [
        ("stepi_per_s", s.stepi_per_s, 1),
        ("stepi_per_s_qemu", q.stepi_per_s, 1),
        ("read_kib_s", s.read_kib_s, 1),
        ("read_kib_s_qemu", q.read_kib_s, 1),
        ("attach_ms", s.attach_ms, 2),
        ("attach_ms_qemu", q.attach_ms, 2),
        ("detach_ms", s.detach_ms, 2),
        ("detach_ms_qemu", q.detach_ms, 2),
    ] {
        let _ = writeln!(json, "  \"{key}\": {},", fmt_opt(v, p));
    }
    let _ = writeln!(
        json,
        "  \"attaches_ms\": [{}],\n  \"detaches_ms\": [{}],\n  \"attaches_ms_qemu\": [{}],\n  \"detaches_ms_qemu\": [{}],",
        list(&s.attaches_ms),
        list(&s.detaches_ms),
        list(&q.attaches_ms),
        list(&q.detaches_ms)
    );
    let error = |e: &Option<String>| e.as_deref().map_or("null".into(), json_string);
    let _ = writeln!(
        json,
        "  \"error\": {},\n  \"error_qemu\": {}\n}}",
        error(&s.error),
        error(&q.error)
    );

    let cell = |v: Option<f64>, p: usize| v.map_or("—".into(), |v| format!("{v:.p$}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}", a / b),
        _ => "—".into(),
    };
    let mut md = String::from(
        "| measure | Quicksilver | QEMU's gdbstub | Quicksilver / QEMU | target |\n|---|---|---|---|---|\n",
    );
    for (what, qs, qemu, p, target) in [
        (
            format!("stepi per s ({STEPS} steps)"),
            s.stepi_per_s,
            q.stepi_per_s,
            1,
            "≥ 0.5 × QEMU",
        ),
        (
            "memory read KiB/s (1 MiB of kernel text)".to_string(),
            s.read_kib_s,
            q.read_kib_s,
            1,
            "≥ 0.5 × QEMU",
        ),
        (
            format!("attach ms (median of {CYCLES})"),
            s.attach_ms,
            q.attach_ms,
            2,
            "< 50 ms",
        ),
        (
            format!("detach ms (median of {CYCLES})"),
            s.detach_ms,
            q.detach_ms,
            2,
            "",
        ),
    ] {
        let _ = writeln!(
            md,
            "| {what} | {} | {} | {} | {target} |",
            cell(qs, p),
            cell(qemu, p),
            ratio(qs, qemu)
        );
    }
    std::fs::write(dir.join("gdb.json"), json)?;
    std::fs::write(dir.join("gdb.md"), &md)?;
    println!("{md}");
    println!("xtask bench: wrote {}", dir.join("gdb.json").display());
    match (&q.error, &s.error) {
        (None, None) => Ok(()),
        (qe, se) => {
            let mut why = String::new();
            if let Some(e) = qe {
                let _ = writeln!(why, "QEMU's gdbstub: {e}");
            }
            if let Some(e) = se {
                let _ = writeln!(why, "Quicksilver's gdbstub: {e}");
            }
            bail!("not every figure was measured:\n{why}")
        }
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
    fn errors_become_json_strings() {
        assert_eq!(json_string("a \"b\"\n\\c\u{1b}"), r#""a \"b\"\n\\c\u001b""#);
    }
}
