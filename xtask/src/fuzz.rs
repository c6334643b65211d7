//! `cargo xtask fuzz`: the coverage-guided fuzzers in `fuzz/` (cargo-fuzz, libFuzzer) for what
//! reads hostile bytes: the link's frame decoder, the machine's end of the handshake, and
//! qs-bridge's gdb packet filter. They need a nightly toolchain and cargo-fuzz, which this
//! installs when missing. `cargo xtask test` runs each for a few seconds (a smoke run); the
//! full campaign is `cargo xtask fuzz` (10 million inputs per target).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context as _};

use crate::cmd::{run_inherit, stdout_of};
use crate::note;

/// The targets, with the extra libFuzzer arguments each wants.
pub const TARGETS: &[(&str, &[&str])] = &[
    ("link_decoder", &[]),
    ("handshake", &[]),
    ("rsp_filter", &["-dict=rsp.dict", "-max_len=512"]),
    ("net_endpoint", &[]),
];

/// How long a run is.
#[derive(Clone, Copy, Debug)]
pub enum Budget {
    /// This many inputs per target.
    Runs(u64),
    /// This many seconds per target.
    Seconds(u64),
}

fn fuzz_dir() -> PathBuf {
    crate::repo_root().join("fuzz")
}

/// Runs every target (or the one named) for `budget`; fails on the first crash, which leaves
/// its input in `fuzz/artifacts/TARGET/`.
pub fn run(only: Option<&str>, budget: Budget) -> anyhow::Result<()> {
    if let Some(name) = only {
        if !TARGETS.iter().any(|(t, _)| *t == name) {
            let names: Vec<&str> = TARGETS.iter().map(|(t, _)| *t).collect();
            bail!(
                "no fuzz target {name:?}: the targets are {}",
                names.join(", ")
            );
        }
    }
    ensure_tools()?;
    for (target, extra) in TARGETS.iter().filter(|(t, _)| only.is_none_or(|o| o == *t)) {
        std::fs::create_dir_all(fuzz_dir().join("corpus").join(target))?;
        let limit = match budget {
            Budget::Runs(n) => format!("-runs={n}"),
            Budget::Seconds(s) => format!("-max_total_time={s}"),
        };
        let mut cmd = Command::new("cargo");
        cmd.current_dir(fuzz_dir())
            .args(["+nightly", "fuzz", "run", target, "--"])
            .arg(&limit)
            .arg("-print_final_stats=1")
            .args(*extra);
        note(format!("fuzz {target} ({limit})"));
        run_inherit(&mut cmd).with_context(|| {
            format!(
                "the fuzzer {target} found a crash or could not run: its input is in fuzz/artifacts/{target}/ \
                 (replay: cd fuzz && cargo +nightly fuzz run {target} FILE)"
            )
        })?;
    }
    Ok(())
}

/// Installs the nightly toolchain and cargo-fuzz unless they are there.
fn ensure_tools() -> anyhow::Result<()> {
    let toolchains = stdout_of(Command::new("rustup").args(["toolchain", "list"]))
        .context("cannot list Rust toolchains: is rustup installed (https://rustup.rs)?")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        note("rustup toolchain install nightly --profile minimal (the fuzzers need it)");
        run_inherit(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context("cannot install the nightly toolchain the fuzzers need")?;
    }
    let has_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_fuzz {
        note("cargo install cargo-fuzz --locked (once; a few minutes)");
        run_inherit(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
            .context("cannot install cargo-fuzz")?;
    }
    Ok(())
}
