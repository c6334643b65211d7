//! Quicksilver's build and run infrastructure, as a library so that the integration tests and
//! benchmarks use exactly what `cargo xtask` uses.
//!
//! - [`mod@setup`]: host packages, the Rust target, and a stock Debian cloud kernel (image,
//!   headers, modules) plus busybox, fetched into `<repo>/.cache/kernel` and never installed
//!   ([`Kernel`]).
//! - [`mod@build`]: the hv image, the agent module, the guest binaries and the initramfs, all in
//!   `<repo>/target/qs` ([`Artifacts`]).
//! - [`demo`]: the demo's link: a random key, the link socket, `qs-bridge` serving gdb.
//! - [`qemu`]: boot that kernel under QEMU/TCG with a script, capture its console, enforce a
//!   timeout ([`Qemu`], [`Running`], [`RunOutput`]).
//!
//! A test typically does:
//!
//! ```no_run
//! let artifacts = xtask::Artifacts::locate()?;
//! let out = artifacts.qemu("smoke").smp(2).noload().run_script("uname -r")?;
//! out.ensure_success()?;
//! assert!(out.console.contains("cloud-amd64"));
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod abi_header;
pub mod bench;
pub mod bench_gdb;
pub mod build;
pub mod cmd;
pub mod cpio;
pub mod demo;
pub mod emulator;
pub mod gdb;
pub mod image;
pub mod initrd;
pub mod kernel;
pub mod qemu;
pub mod setup;

use std::path::{Path, PathBuf};

pub use build::{build, Artifacts};
pub use kernel::Kernel;
pub use qemu::{Qemu, QemuError, RunOutput, Running};
pub use setup::setup;

/// The repository's root (where the workspace `Cargo.toml` is).
pub fn repo_root() -> PathBuf {
    // xtask lives one level below the root; the path is fixed when xtask is compiled, which is
    // also when the tests that link it are.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` if set, else `<repo>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => repo_root().join(dir),
        None => repo_root().join("target"),
    }
}

/// Where `cargo xtask build` puts everything: `<target>/qs`.
pub fn out_dir() -> PathBuf {
    target_dir().join("qs")
}

/// Downloads and extracted packages: `<repo>/.cache`.
pub fn cache_dir() -> PathBuf {
    repo_root().join(".cache")
}

/// Something that `cargo xtask setup` or `cargo xtask build` should have produced is not
/// there.
#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error("the kernel cache {} is not ready: run `cargo xtask setup` first", .dir.display())]
    KernelNotReady { dir: PathBuf },
    #[error("{what} is missing ({}): run `cargo xtask build` first", .path.display())]
    NotBuilt { what: &'static str, path: PathBuf },
    #[error("the kernel's debug info {} is missing (gdb needs it): run `cargo xtask setup` (it fetches linux-image-<release>-dbg once)", .path.display())]
    NoVmlinux { path: PathBuf },
}

/// Prints a progress line of `cargo xtask` (to stderr, so that a script's console output on
/// stdout stays clean).
pub fn note(message: impl std::fmt::Display) {
    eprintln!("xtask: {message}");
}
