//! Quicksilver's build tool, as a library so that `cargo xtask` and its tests share it. The
//! harness that boots and drives the guest (QEMU, gdb, qs-bridge, the `Machine` fixture) is
//! the `qs-testkit` crate in `tests/harness`, which the integration tests use too.
//!
//! - [`mod@setup`]: host packages, the Rust target, the patched QEMU ([`emulator`]), and a
//!   stock Debian kernel per supported series and flavour (image, headers, modules) plus
//!   busybox, fetched into `<repo>/.cache/kernel/<id>` and never installed ([`kernel`]).
//! - [`mod@build`]: the hv image, the agent module, the guest binaries and the initramfs, all in
//!   `<repo>/target/qs` ([`Artifacts`]).
//! - [`demo`]: the demo's link: a random key, the link socket, `qs-bridge` serving gdb.
//! - [`bench`], [`bench_gdb`]: the benchmarks.
//! - [`mod@package`]: the Debian packages (the agent's for DKMS, and qs-bridge's); what they
//!   read from the agent's C source is in [`agent_source`].

pub mod abi_header;
pub mod agent_source;
pub mod apt;
pub mod bench;
pub mod bench_checkpoint;
pub mod bench_export;
pub mod bench_freeze;
pub mod bench_gdb;
pub mod bench_link;
pub mod boot_summary;
pub mod build;
pub mod cmd;
mod debian13;
pub mod demo;
pub mod emulator;
pub mod fuzz;
pub mod image;
pub mod initrd;
pub mod kernel;
pub mod lint;
pub mod package;
pub mod setup;

pub use build::{build, build_all};
pub use qs_testkit::paths::{cache_dir, out_dir, repo_root, target_dir};
pub use qs_testkit::{Artifacts, Kernel, KernelId, LocateError};
pub use setup::{setup, setup_all};

/// Prints a progress line of `cargo xtask` (to stderr, so that a script's console output on
/// stdout stays clean).
pub fn note(message: impl std::fmt::Display) {
    eprintln!("xtask: {message}");
}
