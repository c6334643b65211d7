//! Debian 13's kernels (6.12, generic and cloud) and the Debian 13 system that builds modules
//! for them. Debian 13 builds its kernels with gcc-14, and a module must be built with the
//! kernel's compiler (the headers' `.kernelvariables` name it); Debian 12 has no gcc-14, and
//! Debian 13's kbuild tools need Debian 13's C library. So setup makes one minimal Debian 13
//! system with debootstrap, `<repo>/.cache/kernel/debian13`, installs both flavours' kernel
//! images and headers in it with Debian 13's own apt, and builds in a chroot there
//! ([`Kernel::command`]). Each kernel's cache folder links its `root` to that system.
//!
//! ```text
//! debian13/root    the Debian 13 system (minbase, both kernels and their headers, make,
//!                  dwarves, busybox-static, dkms): about 1 GB, one minute to make
//! debian13/ready   written last: root/ is complete
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

use qs_testkit::{Kernel, KernelId};

use crate::apt::{abi_of, dependency};
use crate::cmd::{ensure_symlink, run_captured, stdout_of};
use crate::note;

/// What the Debian 13 system holds besides its minimal base: both flavours' kernels (images
/// with their modules, and headers, which bring gcc-14 and kbuild), and what building and
/// packaging the agent there needs.
const PACKAGES: &[&str] = &[
    "linux-image-amd64",
    "linux-image-cloud-amd64",
    "linux-headers-amd64",
    "linux-headers-cloud-amd64",
    "make",
    "dwarves",
    "busybox-static",
    "dkms",
];

/// Where Debian 13 comes from.
const MIRROR: &str = "http://deb.debian.org/debian";

/// `<repo>/.cache/kernel/debian13`.
fn system_dir() -> PathBuf {
    crate::cache_dir().join("kernel").join("debian13")
}

/// Makes Debian 13's kernel `id` ready in its cache folder `dir`: the Debian 13 system, then
/// `dir/root` linked to it, the ABI its apt installed, and `dir/ready`.
pub(crate) fn prepare(id: KernelId, dir: &Path) -> anyhow::Result<Kernel> {
    let root = ensure_system()?;
    ensure_symlink(&root, &dir.join("root"))?;
    let abi = installed_abi(&root, id)?;
    let kernel = Kernel::in_cache(dir, id, &abi);
    if !kernel.is_complete() {
        bail!(
            "the Debian 13 system {} lacks a file of kernel {} (one of {}, {}, {}, {}): remove {} and run `cargo xtask setup --kernel {id}` again",
            root.display(),
            kernel.release,
            kernel.vmlinuz.display(),
            kernel.headers_dir.display(),
            kernel.modules_dir.display(),
            kernel.busybox.display(),
            system_dir().display()
        );
    }
    std::fs::write(dir.join("abi"), format!("{abi}\n"))?;
    std::fs::write(dir.join("ready"), format!("{abi}\n"))?;
    note(format!(
        "kernel {} ready in {} (builds in a Debian 13 chroot)",
        kernel.release,
        root.display()
    ));
    Ok(kernel)
}

/// The ABI of the kernel the flavour's metapackage installed in the Debian 13 system:
/// `linux-headers-amd64` depends on `linux-headers-6.12.117+deb13-amd64`.
fn installed_abi(root: &Path, id: KernelId) -> anyhow::Result<String> {
    let meta = format!("linux-headers-{}", id.flavour_suffix());
    let depends = stdout_of(Command::new("chroot").arg(root).args([
        "dpkg-query",
        "-W",
        "-f",
        "${Depends}",
        &meta,
    ]))
    .with_context(|| format!("asking the Debian 13 system which kernel {meta} installed"))?;
    let flavour = id.flavour_suffix();
    dependency(&depends, |p| abi_of(p, "linux-headers-", flavour).is_some())
        .and_then(|p| abi_of(&p, "linux-headers-", flavour))
        .with_context(|| format!("{meta} depends on no kernel's headers: {depends:?}"))
}

/// The Debian 13 system, made once (`debian13/ready` marks it complete).
fn ensure_system() -> anyhow::Result<PathBuf> {
    let dir = system_dir();
    let root = dir.join("root");
    let ready = dir.join("ready");
    if ready.exists() {
        return Ok(root);
    }
    std::fs::create_dir_all(&dir)?;
    if root.exists() {
        std::fs::remove_dir_all(&root)
            .with_context(|| format!("removing the incomplete {}", root.display()))?;
    }
    note(format!(
        "debootstrap: a minimal Debian 13 system in {} with both 6.12 kernels, their headers and gcc-14 (about 1 GB, a minute or two; once)",
        root.display()
    ));
    run_captured(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", PACKAGES.join(",")))
            .arg("trixie")
            .arg(&root)
            .arg(MIRROR),
    )
    .context("debootstrap of Debian 13 failed: is deb.debian.org reachable?")?;
    // apt inside needs a resolver to fetch the -dbg packages later.
    std::fs::copy("/etc/resolv.conf", root.join("etc/resolv.conf"))
        .context("copying /etc/resolv.conf into the Debian 13 system")?;
    std::fs::write(&ready, "trixie\n")?;
    Ok(root)
}

/// Downloads `package` with the Debian 13 system's apt into `into` (a folder under its root);
/// returns the `.deb`.
pub(crate) fn download(kernel: &Kernel, package: &str, into: &Path) -> anyhow::Result<PathBuf> {
    let inside = kernel.inside(into);
    let script = format!(
        "cd {} && apt-get download -o APT::Sandbox::User=root {package} || {{ apt-get update && apt-get download -o APT::Sandbox::User=root {package}; }}",
        inside.display()
    );
    run_captured(kernel.command("sh").args(["-c", &script]))
        .with_context(|| format!("downloading {package} in the Debian 13 system failed"))?;
    std::fs::read_dir(into)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .with_context(|| format!("apt-get download left no .deb for {package}"))
}
