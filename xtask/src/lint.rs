//! `cargo xtask lint`: rustfmt and clippy over every crate, for the host and for the hv's own
//! target, so that the workspace's `deny` lints (undocumented unsafe blocks, missing safety
//! docs, unsafe operations in unsafe fns) are enforced, not remembered. `cargo xtask test`
//! runs it before the tests (hermit's `xtask/src/clippy.rs` is the model).

use std::process::Command;

use anyhow::Context as _;

use crate::cmd::{run_inherit, stdout_of};
use crate::note;
use crate::setup::HV_TARGET;

/// The rustup components the lint needs.
const COMPONENTS: &[&str] = &["rustfmt", "clippy"];

/// Runs every check; the first that fails says what to run to fix it.
pub fn lint() -> anyhow::Result<()> {
    ensure_components()?;
    let root = crate::repo_root();
    note("rustfmt: cargo fmt --all -- --check");
    run_inherit(
        Command::new(cargo())
            .current_dir(&root)
            .args(["fmt", "--all", "--", "--check"]),
    )
    .context("code is not formatted as rustfmt would: run `cargo fmt --all` and commit")?;
    note("clippy, host crates: cargo clippy --workspace --all-targets -- -D warnings");
    run_inherit(Command::new(cargo()).current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy found problems in the host crates (above): fix them")?;
    note(format!("clippy, the hv image for {HV_TARGET}"));
    run_inherit(
        Command::new(cargo())
            .current_dir(&root)
            .arg("clippy")
            .args(crate::build::HV_IMAGE_ARGS)
            .args(["--", "-D", "warnings"]),
    )
    .context("clippy found problems in the hv image (above): fix them")?;
    Ok(())
}

fn cargo() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Adds rustfmt and clippy to the toolchain unless they are there.
fn ensure_components() -> anyhow::Result<()> {
    let installed = stdout_of(Command::new("rustup").args(["component", "list", "--installed"]))
        .context("cannot list Rust components: is rustup installed (https://rustup.rs)?")?;
    for c in COMPONENTS {
        if !installed.lines().any(|l| l.starts_with(c)) {
            note(format!("rustup component add {c}"));
            run_inherit(Command::new("rustup").args(["component", "add", c]))
                .with_context(|| format!("cannot add the Rust component {c}"))?;
        }
    }
    Ok(())
}
