//! `cargo xtask setup`: everything the build and the tests need on this machine. Each step
//! checks before it acts, so a second run does nothing and takes well under a second.

use std::process::Command;

use anyhow::Context as _;

use crate::apt::Apt;
use crate::cmd::{run_inherit, stdout_of};
use crate::note;
use crate::{Kernel, KernelId};

/// Debian packages the build and the tests run: QEMU for the guest, a C toolchain and the
/// libraries of kbuild's prebuilt `modpost`/`objtool` for the agent module, `pahole`
/// (dwarves), with which 6.12's kbuild gives the module its BTF, xz, which unpacks 6.12's
/// compressed modules for the initramfs, DKMS (with kmod's `modinfo`), which the package's
/// tests build the agent with as an installation would, and debootstrap, which makes the
/// Debian 13 system that builds for Debian 13's kernels (crate::debian13), crash, which the
/// tests open an exported checkpoint's ELF core with, tmux, which runs qs-tui for its tests,
/// and gdb.
pub const APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "gcc",
    "make",
    "libelf1",
    "libssl3",
    "zlib1g",
    "dwarves",
    "xz-utils",
    "dkms",
    "debootstrap",
    "crash",
    "tmux",
    "gdb",
];

/// The Rust target the hv image is built for.
pub const HV_TARGET: &str = "x86_64-unknown-none";

/// Installs what is missing and prepares kernel `id` with its debug info; returns the kernel's
/// paths.
pub fn setup(id: KernelId) -> anyhow::Result<Kernel> {
    let mut apt = host(id)?;
    crate::kernel::prepare_with(id, &mut apt)
}

/// [`setup`] for `suite`, the kernel of the whole suite, and every other supported kernel
/// (the matrix's), `suite` first.
pub fn setup_all(suite: KernelId) -> anyhow::Result<Vec<Kernel>> {
    let mut apt = host(suite)?;
    let mut kernels = vec![crate::kernel::prepare_with(suite, &mut apt)?];
    for id in KernelId::ALL.into_iter().filter(|&id| id != suite) {
        kernels.push(crate::kernel::prepare_with(id, &mut apt)?);
    }
    Ok(kernels)
}

/// The host's part of setup: packages, the Rust target, QEMU.
fn host(id: KernelId) -> anyhow::Result<Apt> {
    note(format!("setting up for kernel {id}"));
    let mut apt = Apt::default();
    if !apt.install_missing(APT_PACKAGES)? {
        note(format!(
            "host packages present ({})",
            APT_PACKAGES.join(", ")
        ));
    }
    ensure_rust_target(HV_TARGET)?;
    crate::emulator::ensure(&mut apt)?;
    Ok(apt)
}

/// Adds a rustup target unless it is already installed.
pub fn ensure_rust_target(target: &str) -> anyhow::Result<()> {
    let installed = stdout_of(Command::new("rustup").args(["target", "list", "--installed"]))
        .context("cannot list Rust targets: is rustup installed (https://rustup.rs)?")?;
    if installed.lines().any(|l| l.trim() == target) {
        note(format!("Rust target {target} present"));
        return Ok(());
    }
    note(format!("rustup target add {target}"));
    run_inherit(Command::new("rustup").args(["target", "add", target]))
}
