//! `cargo xtask bench mode-switch`: how long a switch of every CPU takes, and what the hv
//! costs the kernel while dormant and while active.
//!
//! For each CPU count (1, 2, 4) and each clock — wall time under TCG, and QEMU's instruction
//! counter (`-icount shift=0`, one instruction = 1 ns of guest time, reproducible) — two boots:
//! one without the agent (the native baseline) and one with it, where the guest runs
//! `qs-workload --fixed-work` dormant, then `qsctl bench-switch N`, then the workload again
//! with the hv active. Medians throughout. Results: `target/bench/mode-switch.json` and a
//! Markdown table (`target/bench/mode-switch.md`) for BENCHMARKS.md.

use crate::build::Artifacts;
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::time::Duration;

/// One configuration's figures.
#[derive(Clone, Debug, Default)]
pub struct ModeSwitch {
    pub smp: u32,
    pub clock: &'static str,
    pub switches: u32,
    pub activate_us: f64,
    pub deactivate_us: f64,
    pub roundtrip_us: f64,
    pub roundtrip_hv_us: f64,
    /// Workload time with the agent loaded and dormant / without the agent.
    pub dormant_ratio: f64,
    /// Workload time with the hv active / native (before the agent was loaded).
    pub active_ratio: f64,
    pub exits_per_s_active: f64,
}

const WORK_RUNS: usize = 9;

/// Median of the `QS-WORK-MS` values that follow `marker` (up to the next `PHASE` line).
fn phase_work_ms(console: &str, marker: &str) -> Result<f64> {
    let mut inside = false;
    let mut v = Vec::new();
    for line in console.lines() {
        if line.contains("PHASE ") {
            inside = line.contains(marker);
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
    if v.len() != WORK_RUNS {
        bail!(
            "phase {marker}: {} workload results, expected {WORK_RUNS}",
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

fn json_field(line: &str, key: &str) -> Result<f64> {
    let pat = format!("\"{key}\":");
    let rest = line
        .split(&pat)
        .nth(1)
        .with_context(|| format!("no {key} in {line}"))?;
    let num: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    Ok(num.parse()?)
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
    let bench = c
        .lines()
        .find(|l| l.contains("QS-BENCH"))
        .context("no QS-BENCH line")?;
    let native_ms = phase_work_ms(c, "native")?;
    let dormant_ms = phase_work_ms(c, "dormant")?;
    let active_ms = phase_work_ms(c, "active")?;
    let exits = total_exits(c, "STATS-AFTER")?.saturating_sub(total_exits(c, "STATS-BEFORE")?);
    Ok(ModeSwitch {
        smp,
        clock,
        switches,
        activate_us: json_field(bench, "activate_us")?,
        deactivate_us: json_field(bench, "deactivate_us")?,
        roundtrip_us: json_field(bench, "roundtrip_us")?,
        roundtrip_hv_us: json_field(bench, "roundtrip_hv_us")?,
        dormant_ratio: dormant_ms / native_ms,
        active_ratio: active_ms / native_ms,
        exits_per_s_active: exits as f64 / (active_ms * 3.0 / 1000.0),
    })
}

/// Every configuration; writes the JSON and the Markdown table.
pub fn mode_switch(a: &Artifacts, switches: u32) -> Result<Vec<ModeSwitch>> {
    let mut rows = Vec::new();
    // QEMU 7.2 with -icount does not bring up secondary CPUs of this kernel (it stops at
    // "x86: Booting SMP configuration"), so the instruction-count clock is measured on 1 CPU.
    let configs = [(1, false), (2, false), (4, false), (1, true)];
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
    let dir = crate::target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let mut json = String::from("{\n  \"benchmark\": \"mode-switch\",\n  \"anchors\": {\"mercury_switch_us\": 200, \"bitvisor_insert_us\": 20000, \"bitvisor_remove_us\": 30000, \"dichotomy_us\": 80000, \"king_hosted_overhead\": [0.14, 0.35]},\n  \"results\": [\n");
    let mut md = String::from("| smp | clock | activate µs | deactivate µs | roundtrip µs | hv part µs | roundtrip / Mercury 200 µs | dormant_ratio | active_ratio | exits/s active |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for (i, r) in rows.iter().enumerate() {
        let _ = writeln!(
            json,
            "    {{\"smp\": {}, \"clock\": \"{}\", \"switches\": {}, \"activate_us\": {:.1}, \"deactivate_us\": {:.1}, \"roundtrip_us\": {:.1}, \"roundtrip_hv_us\": {:.1}, \"dormant_ratio\": {:.3}, \"active_ratio\": {:.3}, \"exits_per_s_active\": {:.1}}}{}",
            r.smp, r.clock, r.switches, r.activate_us, r.deactivate_us, r.roundtrip_us, r.roundtrip_hv_us,
            r.dormant_ratio, r.active_ratio, r.exits_per_s_active, if i + 1 < rows.len() { "," } else { "" }
        );
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1}x | {:.3} | {:.3} | {:.0} |",
            r.smp,
            r.clock,
            r.activate_us,
            r.deactivate_us,
            r.roundtrip_us,
            r.roundtrip_hv_us,
            r.roundtrip_us / 200.0,
            r.dormant_ratio,
            r.active_ratio,
            r.exits_per_s_active
        );
    }
    json.push_str("  ]\n}\n");
    std::fs::write(dir.join("mode-switch.json"), json)?;
    std::fs::write(dir.join("mode-switch.md"), &md)?;
    println!("{md}");
    println!(
        "xtask bench: wrote {}",
        dir.join("mode-switch.json").display()
    );
    Ok(rows)
}
