//! What `cargo xtask setup` and `cargo xtask build` leave behind, found without running
//! anything: the cached Debian kernel ([`Kernel`]) and the built guest parts ([`Artifacts`]).
//! Fetching and building them is xtask's (`xtask/src/kernel.rs`, `xtask/src/build.rs`).

use std::path::{Path, PathBuf};

use crate::qemu::Qemu;

/// A Debian kernel series: 6.1 is Debian 12's, 6.12 Debian 13's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Series {
    V6_1,
    V6_12,
}

/// A Debian kernel flavour: `cloud` is built for virtual machines (fewer drivers, LZ4, boots
/// fast under TCG), `generic` (Debian's `amd64`, `linux-image-amd64`) is what bare-metal
/// servers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Flavour {
    Cloud,
    Generic,
}

/// Which kernel a run boots: a series and a flavour, spelled `6.12`, `6.12-cloud`,
/// `6.1-generic` (the flavour defaults to generic).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelId {
    pub series: Series,
    pub flavour: Flavour,
}

/// Environment variable that picks the kernel of `cargo xtask` and the tests (`6.1-generic`);
/// `--kernel` sets it for the runs it starts.
pub const KERNEL_ENV: &str = "QS_KERNEL";

impl KernelId {
    /// What the whole suite and the demo boot: the kernel a new user is most likely to run,
    /// Debian 13's series in the flavour bare-metal servers run (`linux-image-amd64`).
    pub const DEFAULT: KernelId = KernelId {
        series: Series::V6_12,
        flavour: Flavour::Generic,
    };
    /// Every kernel Quicksilver supports, the default first.
    pub const ALL: [KernelId; 4] = [
        KernelId::DEFAULT,
        KernelId {
            series: Series::V6_12,
            flavour: Flavour::Cloud,
        },
        KernelId {
            series: Series::V6_1,
            flavour: Flavour::Cloud,
        },
        KernelId {
            series: Series::V6_1,
            flavour: Flavour::Generic,
        },
    ];

    /// `$QS_KERNEL`, else [`KernelId::DEFAULT`].
    pub fn from_env() -> Result<KernelId, LocateError> {
        match std::env::var(KERNEL_ENV) {
            Ok(value) if !value.trim().is_empty() => value.parse(),
            _ => Ok(KernelId::DEFAULT),
        }
    }

    /// The series as Debian's package names spell it: `6.1`, `6.12`.
    pub fn series_name(self) -> &'static str {
        match self.series {
            Series::V6_1 => "6.1",
            Series::V6_12 => "6.12",
        }
    }

    /// The flavour as Debian's package names end: `cloud-amd64`, `amd64`.
    pub fn flavour_suffix(self) -> &'static str {
        match self.flavour {
            Flavour::Cloud => "cloud-amd64",
            Flavour::Generic => "amd64",
        }
    }

    /// The flavour as the user spells it: `cloud`, `generic`.
    pub fn flavour_name(self) -> &'static str {
        match self.flavour {
            Flavour::Cloud => "cloud",
            Flavour::Generic => "generic",
        }
    }
}

impl std::fmt::Display for KernelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.series_name(), self.flavour_name())
    }
}

impl std::str::FromStr for KernelId {
    type Err = LocateError;

    fn from_str(s: &str) -> Result<KernelId, LocateError> {
        let bad = || LocateError::UnknownKernel {
            given: s.to_string(),
        };
        let (series, flavour) = s
            .trim()
            .split_once('-')
            .unwrap_or((s.trim(), KernelId::DEFAULT.flavour_name()));
        let series = match series {
            "6.1" => Series::V6_1,
            "6.12" => Series::V6_12,
            _ => return Err(bad()),
        };
        let flavour = match flavour {
            "cloud" | "cloud-amd64" => Flavour::Cloud,
            "generic" | "amd64" => Flavour::Generic,
            _ => return Err(bad()),
        };
        Ok(KernelId { series, flavour })
    }
}

/// Something that `cargo xtask setup` or `cargo xtask build` should have produced is not
/// there.
#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error("the kernel cache {} is not ready: run `cargo xtask setup --kernel {id}` first", .dir.display())]
    KernelNotReady { id: KernelId, dir: PathBuf },
    #[error("{given:?} is not a kernel Quicksilver supports: say 6.12 or 6.1, optionally with -cloud or -generic (6.12-generic)")]
    UnknownKernel { given: String },
    #[error("{what} is missing ({}): run `cargo xtask build` first", .path.display())]
    NotBuilt { what: &'static str, path: PathBuf },
    #[error("the kernel's debug info {} is missing (gdb needs it): run `cargo xtask setup --kernel K` (it fetches linux-image-<release>-dbg once)", .path.display())]
    NoVmlinux { path: PathBuf },
}

/// Paths into the extracted kernel packages in `<repo>/.cache/kernel/<id>` (layout: see
/// `xtask/src/kernel.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// Which supported kernel this is.
    pub id: KernelId,
    /// Debian's kernel ABI, e.g. `6.1.0-56` or `6.12.117+deb13`.
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
    /// Where modules for it are built, if not on this machine: Debian 13's kernels are built
    /// with gcc-14, which Debian 12 lacks, so their `root` is a Debian 13 system (debootstrap)
    /// that builds in a chroot ([`Kernel::command`]).
    pub chroot: Option<PathBuf>,
}

/// `<repo>/.cache/kernel/<id>`: one folder per supported kernel.
pub fn kernel_cache_dir(id: KernelId) -> PathBuf {
    crate::paths::cache_dir()
        .join("kernel")
        .join(id.to_string())
}

impl Kernel {
    /// The paths for `abi` in the cache at `dir` (nothing is checked).
    pub fn in_cache(dir: &Path, id: KernelId, abi: &str) -> Kernel {
        let root = dir.join("root");
        let release = format!("{abi}-{}", id.flavour_suffix());
        Kernel {
            id,
            abi: abi.to_string(),
            vmlinuz: root.join(format!("boot/vmlinuz-{release}")),
            headers_dir: root.join(format!("usr/src/linux-headers-{release}")),
            modules_dir: root.join(format!("lib/modules/{release}")),
            busybox: root.join("bin/busybox"),
            vmlinux: dir.join(format!("vmlinux-{release}")),
            chroot: (id.series == Series::V6_12).then(|| root.clone()),
            release,
            root,
        }
    }

    /// `program`, to run where this kernel's modules build: in its chroot, or here.
    pub fn command(&self, program: &str) -> std::process::Command {
        match &self.chroot {
            Some(root) => {
                let mut cmd = std::process::Command::new("chroot");
                cmd.arg(root).arg(program);
                cmd
            }
            None => std::process::Command::new(program),
        }
    }

    /// `path` (under the chroot, if any) as a [`Kernel::command`] sees it.
    pub fn inside(&self, path: &Path) -> PathBuf {
        let Some(root) = &self.chroot else {
            return path.to_path_buf();
        };
        // `root` may be a link to the system (the cache's is), `path` canonical.
        let canonical = root.canonicalize().unwrap_or_else(|_| root.clone());
        match path
            .strip_prefix(root)
            .or_else(|_| path.strip_prefix(&canonical))
        {
            Ok(rel) => Path::new("/").join(rel),
            Err(_) => path.to_path_buf(),
        }
    }

    /// A folder for scratch work that [`Kernel::command`] can reach: under the chroot's
    /// `/qs`, or the system's temporary folder.
    pub fn scratch_base(&self) -> PathBuf {
        match &self.chroot {
            Some(root) => root.join("qs"),
            None => std::env::temp_dir(),
        }
    }

    /// The kernel `$QS_KERNEL` names (else the default), as a completed `cargo xtask setup`
    /// left it in the cache, without running anything.
    pub fn locate() -> Result<Kernel, LocateError> {
        Kernel::locate_id(KernelId::from_env()?)
    }

    /// Kernel `id`, as a completed `cargo xtask setup` left it in the cache.
    pub fn locate_id(id: KernelId) -> Result<Kernel, LocateError> {
        let dir = kernel_cache_dir(id);
        let not_ready = || LocateError::KernelNotReady {
            id,
            dir: dir.clone(),
        };
        let abi = std::fs::read_to_string(dir.join("ready")).map_err(|_| not_ready())?;
        let kernel = Kernel::in_cache(&dir, id, abi.trim());
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
    /// `kernels/<id>/quicksilver.ko`: the agent built for `kernel`.
    pub agent: PathBuf,
    /// The static `qsctl`.
    pub qsctl: PathBuf,
    /// The static `qs-workload`.
    pub workload: PathBuf,
    /// `kernels/<id>/initrd.cpio`: the base initramfs, with `kernel`'s modules.
    pub initrd: PathBuf,
    /// The kernel's ELF with debug info, for `gdb <vmlinux>` (= `kernel.vmlinux`).
    pub vmlinux: PathBuf,
    /// The host's `qs-bridge`.
    pub bridge: PathBuf,
    /// The host's `qs-tui`.
    pub tui: PathBuf,
}

impl Artifacts {
    /// Where the artifacts for `kernel` are (or will be); nothing is checked.
    pub fn at(kernel: Kernel) -> Artifacts {
        let dir = crate::paths::out_dir();
        let for_kernel = dir.join("kernels").join(kernel.id.to_string());
        Artifacts {
            hv_image: dir.join("hv.img"),
            agent: for_kernel.join("quicksilver.ko"),
            qsctl: dir.join("qsctl"),
            workload: dir.join("qs-workload"),
            initrd: for_kernel.join("initrd.cpio"),
            bridge: dir.join("qs-bridge"),
            tui: dir.join("qs-tui"),
            vmlinux: kernel.vmlinux.clone(),
            kernel,
            dir,
        }
    }

    /// The artifacts of an earlier `cargo xtask build` for the kernel `$QS_KERNEL` names (else
    /// the default): checks that the kernel, its debug info and the initramfs are there. (The
    /// hv image, the agent and the bridge may be missing if they failed to build;
    /// [`Artifacts::require_agent`] checks the first two.)
    pub fn locate() -> Result<Artifacts, LocateError> {
        let artifacts = Artifacts::locate_id(KernelId::from_env()?)?;
        if !artifacts.vmlinux.exists() {
            return Err(LocateError::NoVmlinux {
                path: artifacts.vmlinux,
            });
        }
        Ok(artifacts)
    }

    /// The artifacts built for kernel `id`, which need not have its debug info (the matrix
    /// runs on the other kernels use /proc/kallsyms instead).
    pub fn locate_id(id: KernelId) -> Result<Artifacts, LocateError> {
        let artifacts = Artifacts::at(Kernel::locate_id(id)?);
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
        let k = Kernel::in_cache(Path::new("/c"), "6.1-cloud".parse().unwrap(), "6.1.0-56");
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
        assert_eq!(k.chroot, None);
        assert_eq!(k.inside(&k.headers_dir), k.headers_dir);
        let g = Kernel::in_cache(
            Path::new("/c"),
            "6.12-generic".parse().unwrap(),
            "6.12.117+deb13",
        );
        assert_eq!(g.release, "6.12.117+deb13-amd64");
        assert_eq!(g.chroot.as_deref(), Some(Path::new("/c/root")));
        assert_eq!(
            g.inside(&g.headers_dir),
            Path::new("/usr/src/linux-headers-6.12.117+deb13-amd64")
        );
    }

    #[test]
    fn kernel_spellings() {
        for id in KernelId::ALL {
            assert_eq!(id.to_string().parse::<KernelId>().unwrap(), id);
        }
        assert_eq!("6.12".parse::<KernelId>().unwrap(), KernelId::DEFAULT);
        assert_eq!(
            "6.1".parse::<KernelId>().unwrap().to_string(),
            "6.1-generic"
        );
        assert_eq!(
            "6.1-amd64".parse::<KernelId>().unwrap().to_string(),
            "6.1-generic"
        );
        for bad in ["6.2", "6.12-rt", "", "generic", "6.12-"] {
            let err = bad.parse::<KernelId>().unwrap_err().to_string();
            assert!(err.contains("6.12-generic"), "{bad}: {err}");
        }
    }
}
