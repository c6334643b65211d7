//! apt for setup's steps: the package lists updated at most once per run, packages installed
//! only when dpkg lacks them; and reading Debian's kernel package names. Shared by setup, the
//! kernel fetchers and the emulator build.

use std::process::Command;

use anyhow::{bail, Context as _};

use crate::cmd::{run_captured, run_inherit};
use crate::note;

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

/// The first package in a `Depends:` field that `pick` accepts.
pub(crate) fn dependency(depends: &str, pick: impl Fn(&str) -> bool) -> Option<String> {
    depends
        .split([',', '|'])
        .filter_map(|item| item.split_whitespace().next())
        .find(|name| pick(name))
        .map(str::to_string)
}

/// The ABI in a kernel package's name: `linux-image-6.1.0-56-amd64` with `prefix`
/// `linux-image-` and `flavour` `amd64` → `6.1.0-56`. (`amd64` must not match the
/// `...-cloud-amd64` packages.)
pub(crate) fn abi_of(package: &str, prefix: &str, flavour: &str) -> Option<String> {
    let abi = package
        .strip_prefix(prefix)?
        .strip_suffix(flavour)?
        .strip_suffix('-')?;
    (!abi.ends_with("-cloud")).then(|| abi.to_string())
}
