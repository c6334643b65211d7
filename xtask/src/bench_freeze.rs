//! `cargo xtask bench freeze`: what stopping every CPU costs the running kernel, for any client
//! of the rendezvous (the debugger, `qsctl freeze`, the checkpoint engine to come).
//!
//! For 1, 2 and 4 CPUs, one boot each with `qs-workload` busy on every CPU and the hv active:
//! `qsctl bench-freeze N` makes N freezes of 0 ms, then N with `--check` (each CPU writes its
//! whole captured state back, captures it again and compares). Medians of how long every CPU
//! took to stop after the request (the hv's count) and of the whole pause as the caller sees it
//! (the ioctl, from user space to user space). Results: `target/bench/freeze.json` and a
//! Markdown table for BENCHMARKS.md. The anchor is Mercury's 0.2 ms mode switch: a pause of
//! every CPU that costs less than one switch is cheap enough to take often.

use anyhow::{Context, Result};
use qs_testkit::Artifacts;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::time::Duration;

/// One CPU count's figures, as `freeze.json` lists them.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Freeze {
    #[serde(default)]
    pub smp: u32,
    pub freezes: u32,
    /// Median microseconds from the request until every CPU was stopped (the hv's count).
    pub gather_us: u64,
    /// Median microseconds of the whole freeze of 0 ms as the caller sees it.
    pub pause_us: f64,
    /// The same with the state check (write back, capture again, compare).
    pub check_gather_us: u64,
    pub check_pause_us: f64,
    /// Checks in which every CPU's state came back identical.
    pub checks_identical: u32,
    /// Freezes in which a CPU did not stop (it ran on: no consistent cut).
    #[serde(default)]
    pub incomplete: u32,
}

#[derive(Serialize)]
struct Report<'a> {
    benchmark: &'static str,
    anchors: Anchors,
    results: &'a [Freeze],
}

#[derive(Serialize)]
struct Anchors {
    mercury_switch_us: u32,
}

/// One CPU count.
pub fn freeze_one(a: &Artifacts, smp: u32, freezes: u32) -> Result<Freeze> {
    let script = format!(
        "set -e\nqsctl activate >/dev/null\nqs-workload --seconds 100000 >/dev/null 2>&1 &\n\
         sleep 1\nqsctl bench-freeze {freezes}\nkill %1\nqsctl deactivate\n"
    );
    let run = a
        .qemu(&format!("bench-freeze-smp{smp}"))
        .smp(smp)
        .timeout(Duration::from_secs(1800))
        .run_script(&script)?;
    run.ensure_success()?;
    let line = run
        .console
        .lines()
        .find(|l| l.contains("QS-BENCH"))
        .context("no QS-BENCH line")?;
    let json = line.split_once("QS-BENCH ").map_or("", |(_, json)| json);
    let mut f: Freeze = serde_json::from_str(json.trim())
        .with_context(|| format!("the QS-BENCH line is not the JSON qsctl prints: {line}"))?;
    f.smp = smp;
    Ok(f)
}

/// Every CPU count; writes the JSON and the Markdown table.
pub fn freeze(a: &Artifacts, freezes: u32) -> Result<Vec<Freeze>> {
    let mut rows = Vec::new();
    for smp in [1, 2, 4] {
        eprintln!("xtask bench: freeze smp {smp}");
        let r = freeze_one(a, smp, freezes)?;
        eprintln!("xtask bench: {r:?}");
        rows.push(r);
    }
    let mut md = String::from(
        "| smp | every CPU stopped after µs | pause µs | with check: stopped after µs | pause µs | pause / Mercury 200 µs | checks identical | incomplete |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {} | {:.0} | {:.1}x | {} of {} | {} of {} |",
            r.smp,
            r.gather_us,
            r.pause_us,
            r.check_gather_us,
            r.check_pause_us,
            r.pause_us / 200.0,
            r.checks_identical,
            r.freezes,
            r.incomplete,
            2 * r.freezes
        );
    }
    let report = Report {
        benchmark: "freeze",
        anchors: Anchors {
            mercury_switch_us: 200,
        },
        results: &rows,
    };
    crate::bench::write_report("freeze", &report, &md)?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_freeze_figures_come_from_qsctls_json() {
        let line = r#"QS-BENCH {"freezes":50,"gather_us":35,"pause_us":412.5,"check_gather_us":40,"check_pause_us":980.0,"checks_identical":50,"incomplete":1}"#;
        let f: Freeze = serde_json::from_str(line.split_once("QS-BENCH ").unwrap().1).unwrap();
        assert_eq!(
            (f.freezes, f.gather_us, f.checks_identical, f.incomplete),
            (50, 35, 50, 1)
        );
        assert_eq!(f.check_pause_us, 980.0);
    }
}
