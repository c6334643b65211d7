//! `cargo xtask bench mode-switch [--kernel K]`: how long a switch of every CPU takes, how
//! close that is to the floor the platform sets (two IPIs to every CPU with nothing to do,
//! measured in the same boot), and what the hv costs the kernel while dormant and active.
//!
//! For each CPU count (1, 2, 4) and each clock — wall time under TCG, and QEMU's instruction
//! counter (`-icount shift=0`, one instruction = 1 ns of guest time, reproducible) — two boots:
//! one without the agent (the native baseline) and one with it, where the guest runs
//! `qs-workload --fixed-work` dormant, then `qsctl bench-switch N`, then the workload again
//! with the hv active. Medians throughout. Results: `target/bench/mode-switch-<kernel>.json`
//! and a Markdown table (`target/bench/mode-switch-<kernel>.md`) for BENCHMARKS.md.

use anyhow::{bail, Context, Result};
use qs_testkit::Artifacts;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::time::Duration;

/// One configuration's figures, as `mode-switch-<kernel>.json` lists them (rounded by [`round`]).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ModeSwitch {
    /// The kernel booted (`6.12-generic`).
    pub kernel: String,
    pub smp: u32,
    pub clock: &'static str,
    pub switches: u32,
    #[serde(serialize_with = "one_decimal")]
    pub activate_us: f64,
    #[serde(serialize_with = "one_decimal")]
    pub deactivate_us: f64,
    #[serde(serialize_with = "one_decimal")]
    pub roundtrip_us: f64,
    #[serde(serialize_with = "one_decimal")]
    pub roundtrip_hv_us: f64,
    /// Two calls of an empty function on every CPU (`on_each_cpu`), in the same boot: what a
    /// round trip cannot go below.
    #[serde(serialize_with = "one_decimal")]
    pub ipi_floor_us: f64,
    /// `roundtrip_us / ipi_floor_us`: how close the switch is to the platform's limit (the goal
    /// is at most 1.2).
    #[serde(serialize_with = "three_decimals")]
    pub floor_ratio: f64,
    /// Workload time with the agent loaded and dormant / without the agent.
    #[serde(serialize_with = "three_decimals")]
    pub dormant_ratio: f64,
    /// Workload time with the hv active / native (before the agent was loaded).
    #[serde(serialize_with = "three_decimals")]
    pub active_ratio: f64,
    #[serde(serialize_with = "one_decimal")]
    pub exits_per_s_active: f64,
}

/// `value` rounded to `decimals` places: the JSON keeps the precision the figures have.
pub fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

fn one_decimal<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(round(*v, 1))
}

fn three_decimals<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(round(*v, 3))
}

/// What `qsctl bench-switch` prints after `QS-BENCH `.
#[derive(Debug, Deserialize)]
struct SwitchBench {
    activate_us: f64,
    deactivate_us: f64,
    roundtrip_us: f64,
    roundtrip_hv_us: f64,
    ipi_floor_us: f64,
}

/// `mode-switch-<kernel>.json`.
#[derive(Serialize)]
struct Report<'a> {
    benchmark: &'static str,
    anchors: Anchors,
    results: &'a [ModeSwitch],
}

/// Published figures the results are read against (BENCHMARKS.md says where from).
#[derive(Serialize)]
struct Anchors {
    mercury_switch_us: u32,
    bitvisor_insert_us: u32,
    bitvisor_remove_us: u32,
    dichotomy_us: u32,
    king_hosted_overhead: [f64; 2],
}

const WORK_RUNS: usize = 9;

/// Median of the `QS-WORK-MS` values after `PHASE <phase>` (up to the next PHASE line),
/// which must be `runs` of them.
pub fn phase_median_ms(console: &str, phase: &str, runs: usize) -> Result<f64> {
    let mut inside = false;
    let mut v = Vec::new();
    for line in console.lines() {
        if let Some(p) = line.split("PHASE ").nth(1) {
            inside = p.trim() == phase;
        } else if inside {
            if let Some(rest) = line.split("QS-WORK-MS ").nth(1) {
                v.push(
                    rest.split_whitespace()
                        .next()
                        .unwrap_or("")
                        .parse::<f64>()?,
                );
            }
        }
    }
    if v.len() != runs {
        bail!(
            "phase {phase}: {} workload results, expected {runs}",
            v.len()
        );
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// Sum of the exit counters in a `qsctl stats` table that follows `marker`.
fn total_exits(console: &str, marker: &str) -> Result<u64> {
    let mut lines = console.lines().skip_while(|l| !l.contains(marker)).skip(1);
    lines
        .find(|l| l.contains("cpu  state"))
        .context("no stats table")?;
    let mut total = 0;
    for line in lines {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // Console lines may carry a "[ time]" prefix from the log; find the state column.
        let Some(at) = cols.iter().position(|c| *c == "active" || *c == "native") else {
            break;
        };
        total += cols[at + 1..at + 9]
            .iter()
            .map(|c| c.parse::<u64>().unwrap_or(0))
            .sum::<u64>();
    }
    Ok(total)
}

/// Runs one configuration.
pub fn mode_switch_one(a: &Artifacts, smp: u32, icount: bool, switches: u32) -> Result<ModeSwitch> {
    let clock = if icount { "icount" } else { "wall" };
    let guest = |name: &str| {
        let q = a
            .qemu(&format!("bench-{name}-smp{smp}-{clock}"))
            .smp(smp)
            .timeout(Duration::from_secs(1800));
        if icount {
            q.icount(0)
        } else {
            q
        }
    };
    // One boot, phases interleaved round by round (native, dormant, active; the agent loaded
    // and unloaded each round) so that drift of the emulator's speed cancels out, after a
    // warm-up round: TCG translates code on its first run. Then the switch benchmark and the
    // exit count of the active phase.
    let ko = "insmod /lib/quicksilver/quicksilver.ko image=/lib/quicksilver/hv.img";
    let work = "qs-workload --fixed-work";
    let script = format!(
        "set -e\n{work} >/dev/null\nfor r in $(seq {WORK_RUNS}); do\n\
         echo PHASE native; {work}\n{ko}\necho PHASE dormant; {work}\n\
         qsctl activate >/dev/null\necho PHASE active; {work}\necho PHASE none\n\
         qsctl deactivate >/dev/null\nrmmod quicksilver\ndone\n\
         {ko}\nqsctl bench-switch {switches}\nqsctl activate\necho STATS-BEFORE\nqsctl stats\n\
         {work} >/dev/null\n{work} >/dev/null\n{work} >/dev/null\necho STATS-AFTER\nqsctl stats\nqsctl deactivate\n"
    );
    let run = guest("run").noload().run_script(&script)?;
    run.ensure_success()?;
    let c = &run.console;
    let line = c
        .lines()
        .find(|l| l.contains("QS-BENCH"))
        .context("no QS-BENCH line")?;
    let json = line.split_once("QS-BENCH ").map_or("", |(_, json)| json);
    let bench: SwitchBench = serde_json::from_str(json.trim())
        .with_context(|| format!("the QS-BENCH line is not the JSON qsctl prints: {line}"))?;
    let native_ms = phase_median_ms(c, "native", WORK_RUNS)?;
    let dormant_ms = phase_median_ms(c, "dormant", WORK_RUNS)?;
    let active_ms = phase_median_ms(c, "active", WORK_RUNS)?;
    let exits = total_exits(c, "STATS-AFTER")?.saturating_sub(total_exits(c, "STATS-BEFORE")?);
    Ok(ModeSwitch {
        kernel: a.kernel.id.to_string(),
        smp,
        clock,
        switches,
        activate_us: bench.activate_us,
        deactivate_us: bench.deactivate_us,
        roundtrip_us: bench.roundtrip_us,
        roundtrip_hv_us: bench.roundtrip_hv_us,
        ipi_floor_us: bench.ipi_floor_us,
        floor_ratio: bench.roundtrip_us / bench.ipi_floor_us,
        dormant_ratio: dormant_ms / native_ms,
        active_ratio: active_ms / native_ms,
        exits_per_s_active: exits as f64 / (active_ms * 3.0 / 1000.0),
    })
}

/// Writes `target/bench/NAME.json` (pretty JSON) and `NAME.md` (the Markdown table for
/// BENCHMARKS.md), and prints the table.
pub fn write_report(name: &str, report: &impl Serialize, md: &str) -> Result<()> {
    let dir = crate::target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let mut json = serde_json::to_string_pretty(report)?;
    json.push('\n');
    std::fs::write(dir.join(format!("{name}.json")), json)?;
    std::fs::write(dir.join(format!("{name}.md")), md)?;
    println!("{md}");
    println!(
        "xtask bench: wrote {}",
        dir.join(format!("{name}.json")).display()
    );
    Ok(())
}

/// Every configuration, or with `smps` given those CPU counts on the wall clock; writes the
/// JSON and the Markdown table.
pub fn mode_switch(a: &Artifacts, switches: u32, smps: &[u32]) -> Result<Vec<ModeSwitch>> {
    let mut rows = Vec::new();
    // QEMU 7.2 with -icount does not bring up secondary CPUs of this kernel (it stops at
    // "x86: Booting SMP configuration"), so the instruction-count clock is measured on 1 CPU.
    let configs: Vec<(u32, bool)> = if smps.is_empty() {
        vec![(1, false), (2, false), (4, false), (1, true)]
    } else {
        smps.iter().map(|&n| (n, false)).collect()
    };
    {
        for (smp, icount) in configs {
            eprintln!(
                "xtask bench: mode-switch smp {smp} {}",
                if icount { "icount" } else { "wall" }
            );
            let r = mode_switch_one(a, smp, icount, switches)?;
            eprintln!("xtask bench: {r:?}");
            rows.push(r);
        }
    }
    let mut md = String::from("| kernel | smp | clock | activate µs | deactivate µs | roundtrip µs | hv part µs | IPI floor µs | roundtrip / floor | roundtrip / Mercury 200 µs | dormant_ratio | active_ratio | exits/s active |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.1}x | {:.3} | {:.3} | {:.0} |",
            r.kernel,
            r.smp,
            r.clock,
            r.activate_us,
            r.deactivate_us,
            r.roundtrip_us,
            r.roundtrip_hv_us,
            r.ipi_floor_us,
            r.floor_ratio,
            r.roundtrip_us / 200.0,
            r.dormant_ratio,
            r.active_ratio,
            r.exits_per_s_active
        );
    }
    let report = Report {
        benchmark: "mode-switch",
        anchors: Anchors {
            mercury_switch_us: 200,
            bitvisor_insert_us: 20000,
            bitvisor_remove_us: 30000,
            dichotomy_us: 80000,
            king_hosted_overhead: [0.14, 0.35],
        },
        results: &rows,
    };
    write_report(&format!("mode-switch-{}", a.kernel.id), &report, &md)?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switch_figures_come_from_qsctls_json_and_go_out_rounded() {
        let line = r#"QS-BENCH {"switches":100,"activate_us":812.3,"deactivate_us":640.0,"roundtrip_us":1452.7,"roundtrip_hv_us":33.1,"ipi_floor_us":1300.0}"#;
        let bench: SwitchBench =
            serde_json::from_str(line.split_once("QS-BENCH ").unwrap().1).unwrap();
        assert_eq!(
            (bench.activate_us, bench.roundtrip_hv_us, bench.ipi_floor_us),
            (812.3, 33.1, 1300.0)
        );
        let row = ModeSwitch {
            smp: 2,
            clock: "wall",
            floor_ratio: 1.11746,
            dormant_ratio: 1.00049,
            exits_per_s_active: 1234.56,
            ..ModeSwitch::default()
        };
        let json = serde_json::to_value(&row).unwrap();
        assert_eq!(json["dormant_ratio"], 1.0);
        assert_eq!(json["exits_per_s_active"], 1234.6);
        assert_eq!(json["floor_ratio"], 1.117);
        assert_eq!(json["clock"], "wall");
        assert_eq!(json.as_object().unwrap().len(), 13);
    }
}
