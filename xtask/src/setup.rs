//! `cargo xtask setup`: everything the build and the tests need on this machine. Each step
//! checks before it acts, so a second run does nothing and takes well under a second.

use std::process::Command;

use anyhow::{bail, Context as _};

use crate::cmd::{run_captured, run_inherit, stdout_of};
use crate::note;
use crate::{Kernel, KernelId};

/// Debian packages the build and the tests run: QEMU for the guest, a C toolchain and the
/// libraries of kbuild's prebuilt `modpost`/`objtool` for the agent module, `pahole`
/// (dwarves), with which 6.12's kbuild gives the module its BTF, xz, which unpacks 6.12's
/// compressed modules for the initramfs, and DKMS (with kmod's `modinfo`), which the package's
/// tests build the agent with as an installation would.
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

/// Whether dpkg reports `package` as installed (not merely known, or removed with its
/// configuration left behind).
pub fn dpkg_installed(package: &str) -> bool {
    let Ok(output) = Command::new("dpkg").args(["-s", package]).output() else {
        return false;
    };
    output.status.success()
        && String::from_utf8_lossy(&output.stdout)
            .lines()
            .any(|l| l.starts_with("Status:") && l.ends_with("install ok installed"))
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

/// apt, updating the package lists at most once per run and only when needed.
#[derive(Debug, Default)]
pub(crate) struct Apt {
    updated: bool,
}

impl Apt {
    /// Runs `apt-get update` unless this run already did; returns whether it ran now.
    pub(crate) fn update_once(&mut self) -> anyhow::Result<bool> {
        if self.updated {
            return Ok(false);
        }
        self.update()?;
        Ok(true)
    }

    /// Runs `apt-get update` (again, after the sources changed).
    pub(crate) fn update(&mut self) -> anyhow::Result<()> {
        note("apt-get update");
        run_captured(Command::new("apt-get").arg("update"))
            .context("apt-get update failed: check the network and /etc/apt/sources.list")?;
        self.updated = true;
        Ok(())
    }

    /// Installs those of `packages` that dpkg does not have; returns whether any were missing.
    pub(crate) fn install_missing(&mut self, packages: &[&str]) -> anyhow::Result<bool> {
        let missing: Vec<&str> = packages
            .iter()
            .copied()
            .filter(|p| !dpkg_installed(p))
            .collect();
        if missing.is_empty() {
            return Ok(false);
        }
        self.install(&missing)?;
        Ok(true)
    }

    /// Installs `packages` non-interactively (after one `apt-get update`).
    pub(crate) fn install(&mut self, packages: &[&str]) -> anyhow::Result<()> {
        if !is_root() {
            bail!(
                "missing packages {}: run `sudo apt-get install {}` or run setup as root",
                packages.join(" "),
                packages.join(" ")
            );
        }
        self.update_once()?;
        note(format!("apt-get install {}", packages.join(" ")));
        run_inherit(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .with_context(|| format!("installing {} failed", packages.join(" ")))
    }
}

/// Whether this process runs as root: `/proc/self` belongs to the effective user.
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
