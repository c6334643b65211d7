//! The harness the integration tests (`tests/`, `xtask/tests/`) and the benchmarks
//! (`cargo xtask bench`) share: boot the test kernel under QEMU, drive real gdb and
//! `qs-bridge`, and the [`Machine`] fixture that puts them together. It only finds what
//! `cargo xtask setup` and `cargo xtask build` left; it never builds anything (xtask depends
//! on it, not the other way round).
//!
//! - [`paths`]: the repository, `<target>/qs`, `.cache`, the QEMU binary.
//! - [`artifacts`]: the cached kernel ([`Kernel`]) and the built parts ([`Artifacts`]).
//! - [`child`]: every child process (QEMU, gdb, the bridge) is started, watched and killed by
//!   [`child::Process`].
//! - [`initramfs`]: newc archives; a run appends its script and files to the base.
//! - [`qemu`]: boot with a script, capture the console, enforce a timeout ([`Qemu`],
//!   [`Running`], [`RunOutput`]); QEMU's monitor ([`qemu::hmp`]).
//! - [`gdb`]: real GNU gdb on a pipe ([`Gdb`]) and parsers of what it prints.
//! - [`bridge`]: `qs-bridge` on a guest's link ([`Bridge`]).
//! - [`machine`]: a guest with the link and a gdbstub to attach to ([`Machine`]).
//!
//! A test typically does:
//!
//! ```no_run
//! let artifacts = qs_testkit::Artifacts::locate()?;
//! let out = artifacts.qemu("smoke").smp(2).noload().run_script("uname -r")?;
//! out.ensure_success()?;
//! assert!(out.console.contains(&artifacts.kernel.release));
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod artifacts;
pub mod bridge;
pub mod child;
pub mod control;
pub mod gdb;
pub mod initramfs;
pub mod machine;
pub mod paths;
pub mod qemu;

pub use artifacts::{Artifacts, Kernel, KernelId, LocateError};
pub use bridge::Bridge;
pub use gdb::{Gdb, GdbError, Symbols};
pub use machine::{Machine, MachineConfig, MachineError, Stub};
pub use qemu::{FastLinkNic, Qemu, QemuError, RunOutput, Running};
