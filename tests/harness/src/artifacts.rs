//! What `cargo xtask setup` and `cargo xtask build` leave behind, found without running
//! anything: the cached Debian kernel ([`Kernel`]) and the built guest parts ([`Artifacts`]).
//! Fetching and building them is xtask's (`xtask/src/kernel.rs`, `xtask/src/build.rs`).

use std::path::{Path, PathBuf};

use crate::qemu::Qemu;

/// The kernel flavour: the cloud kernel is LZ4-compressed and boots fast under TCG.
pub const FLAVOUR: &str = "cloud-amd64";

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

/// Paths into the extracted kernel packages in `<repo>/.cache/kernel` (layout: see
/// `xtask/src/kernel.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// Debian's kernel ABI, e.g. `6.1.0-56`.
    pub abi: String,
    /// The release `uname -r` prints, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// Where the packages are extracted.
    pub root: PathBuf,
    /// The bootable kernel (`boot/vmlinuz-<release>`).
    pub vmlinuz: PathBuf,
    /// The flavour headers to build modules against (`make -C <headers_dir> M=...`).
    pub headers_dir: PathBuf,
    /// The kernel's modules (`lib/modules/<release>`).
    pub modules_dir: PathBuf,
    /// The static busybox for the initramfs.
    pub busybox: PathBuf,
    /// The kernel's ELF with debug info (`vmlinux-<release>` in the cache, from the `-dbg`
    /// package), for `gdb <vmlinux>`. Fetched by setup after the rest.
    pub vmlinux: PathBuf,
}

/// `<repo>/.cache/kernel`.
pub fn kernel_cache_dir() -> PathBuf {
    crate::paths::cache_dir().join("kernel")
}

impl Kernel {
    /// The paths for `abi` in the cache at `dir` (nothing is checked).
    pub fn in_cache(dir: &Path, abi: &str) -> Kernel {
        let root = dir.join("root");
        let release = format!("{abi}-{FLAVOUR}");
        Kernel {
            abi: abi.to_string(),
            vmlinuz: root.join(format!("boot/vmlinuz-{release}")),
            headers_dir: root.join(format!("usr/src/linux-headers-{release}")),
            modules_dir: root.join(format!("lib/modules/{release}")),
            busybox: root.join("bin/busybox"),
            vmlinux: dir.join(format!("vmlinux-{release}")),
            release,
            root,
        }
    }

    /// The kernel a completed `cargo xtask setup` left in the cache, without running
    /// anything.
    pub fn locate() -> Result<Kernel, LocateError> {
        let dir = kernel_cache_dir();
        let not_ready = || LocateError::KernelNotReady { dir: dir.clone() };
        let abi = std::fs::read_to_string(dir.join("ready")).map_err(|_| not_ready())?;
        let kernel = Kernel::in_cache(&dir, abi.trim());
        if !kernel.is_complete() {
            return Err(not_ready());
        }
        Ok(kernel)
    }

    /// Whether the files later steps need are all there.
    pub fn is_complete(&self) -> bool {
        [
            &self.vmlinuz,
            &self.headers_dir.join("Makefile"),
            &self.modules_dir,
            &self.busybox,
        ]
        .iter()
        .all(|p| p.exists())
    }
}

/// Paths of everything `cargo xtask build` makes (layout: see `xtask/src/build.rs`).
#[derive(Clone, Debug)]
pub struct Artifacts {
    /// `<target>/qs`.
    pub dir: PathBuf,
    /// The kernel the guest boots.
    pub kernel: Kernel,
    /// `hv.img`.
    pub hv_image: PathBuf,
    /// `quicksilver.ko`.
    pub agent: PathBuf,
    /// The static `qsctl`.
    pub qsctl: PathBuf,
    /// The static `qs-workload`.
    pub workload: PathBuf,
    /// The base initramfs.
    pub initrd: PathBuf,
    /// The kernel's ELF with debug info, for `gdb <vmlinux>` (= `kernel.vmlinux`).
    pub vmlinux: PathBuf,
    /// The host's `qs-bridge`.
    pub bridge: PathBuf,
}

impl Artifacts {
    /// Where the artifacts for `kernel` are (or will be); nothing is checked.
    pub fn at(kernel: Kernel) -> Artifacts {
        let dir = crate::paths::out_dir();
        Artifacts {
            hv_image: dir.join("hv.img"),
            agent: dir.join("quicksilver.ko"),
            qsctl: dir.join("qsctl"),
            workload: dir.join("qs-workload"),
            initrd: dir.join("initrd.cpio"),
            bridge: dir.join("qs-bridge"),
            vmlinux: kernel.vmlinux.clone(),
            kernel,
            dir,
        }
    }

    /// The artifacts of an earlier `cargo xtask build`: checks that the kernel, its debug
    /// info and the initramfs are there. (The hv image, the agent and the bridge may be
    /// missing if they failed to build; [`Artifacts::require_agent`] checks the first two.)
    pub fn locate() -> Result<Artifacts, LocateError> {
        let artifacts = Artifacts::at(Kernel::locate()?);
        if !artifacts.vmlinux.exists() {
            return Err(LocateError::NoVmlinux {
                path: artifacts.vmlinux,
            });
        }
        if !artifacts.initrd.exists() {
            return Err(LocateError::NotBuilt {
                what: "the initramfs",
                path: artifacts.initrd,
            });
        }
        Ok(artifacts)
    }

    /// Fails unless the hv image and the agent module were built (and so are in the initramfs).
    pub fn require_agent(&self) -> Result<(), LocateError> {
        for (what, path) in [
            ("the hv image", &self.hv_image),
            ("the agent module", &self.agent),
        ] {
            if !path.exists() {
                return Err(LocateError::NotBuilt {
                    what,
                    path: path.clone(),
                });
            }
        }
        Ok(())
    }

    /// Where console logs of runs go.
    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// A QEMU runner for this build, logging to `logs/<name>.log`.
    pub fn qemu(&self, name: &str) -> Qemu {
        Qemu::new(self, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_paths_follow_debian_naming() {
        let k = Kernel::in_cache(Path::new("/c"), "6.1.0-56");
        assert_eq!(k.release, "6.1.0-56-cloud-amd64");
        assert_eq!(
            k.vmlinuz,
            Path::new("/c/root/boot/vmlinuz-6.1.0-56-cloud-amd64")
        );
        assert_eq!(
            k.headers_dir,
            Path::new("/c/root/usr/src/linux-headers-6.1.0-56-cloud-amd64")
        );
        assert_eq!(
            k.modules_dir,
            Path::new("/c/root/lib/modules/6.1.0-56-cloud-amd64")
        );
        assert_eq!(k.vmlinux, Path::new("/c/vmlinux-6.1.0-56-cloud-amd64"));
    }
}
