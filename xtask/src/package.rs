//! `cargo xtask package`: Quicksilver as two Debian packages (12 and 13), in
//! `<target>/qs/package`:
//!
//! ```text
//! quicksilver_<version>_amd64.deb   for the machine to debug
//!   /usr/sbin/qsctl                      static
//!   <image= default>                     hv.img, where the agent looks by default
//!                                        (/usr/lib/quicksilver/hv.img)
//!   /usr/src/quicksilver-<version>/      the agent's source and dkms.conf: DKMS builds it
//!                                        for each kernel with headers
//!   /etc/modprobe.d/quicksilver.conf     key_file= (a conffile)
//!   postinst: makes /etc/quicksilver/link.key once (0600), dkms add, dkms install for each
//!   kernel with headers; prerm: dkms remove --all; postrm purge: removes the key
//! qs-bridge_<version>_amd64.deb     for the operator's machine
//!   /usr/bin/qs-bridge                   static
//! bin/                              the binaries the packages were made from
//! quicksilver/, qs-bridge/          the staged trees
//! ```
//!
//! The packages are assembled by hand and built with `dpkg-deb --build --root-owner-group`
//! (dpkg is on every Debian machine) rather than with cargo-deb: half of the agent's package
//! is not a cargo binary (C sources under /usr/src, dkms.conf, maintainer scripts that drive
//! DKMS and make the key), which cargo-deb would take as a list of assets and scripts anyway,
//! at the cost of a tool to install and its metadata in Cargo.toml.
//!
//! The binaries are built as the guest's are (release, static, without debug info): a static
//! binary runs on any Debian release and needs no `Depends:` on a libc, and the dev build that
//! `cargo xtask build` makes of `qs-bridge` for the tests is eight times larger (20 MB).

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

use crate::agent_source;
use crate::build::{build_guest_binary, build_hv_image};
use crate::cmd::{remove_if_exists, run_captured};

/// The agent's files that DKMS needs, from `guest-agent/linux` (not the whole folder: a
/// `make` there leaves kbuild's outputs, `quicksilver.mod.c` among them).
pub const AGENT_SOURCES: &[&str] = &["Kbuild", "Makefile", "quicksilver.c", "qs_abi.h"];
/// The module's name, DKMS's `PACKAGE_NAME`, and the agent package's name.
pub const AGENT_PACKAGE: &str = "quicksilver";
/// The operator's package.
pub const BRIDGE_PACKAGE: &str = "qs-bridge";
/// Where the postinst puts the link key.
pub const LINK_KEY: &str = "/etc/quicksilver/link.key";

const POSTINST: &str = include_str!("package/postinst");
const PRERM: &str = include_str!("package/prerm");
const POSTRM: &str = include_str!("package/postrm");
const DKMS_CONF: &str = include_str!("package/dkms.conf");
const MODPROBE_CONF: &str = include_str!("package/modprobe.conf");
const MODPROBE_CONF_PATH: &str = "etc/modprobe.d/quicksilver.conf";
const MAINTAINER: &str = "The Quicksilver developers <quicksilver@invalid>";

/// Where `cargo xtask package` writes: `<target>/qs/package`.
pub fn out_dir() -> PathBuf {
    crate::out_dir().join("package")
}

/// The version of both packages and of the DKMS module: the workspace's crate version, with
/// a pre-release's `-` as Debian's `~` so that `0.2.0-rc.1` sorts before `0.2.0`.
pub fn version() -> String {
    debian_version(env!("CARGO_PKG_VERSION"))
}

fn debian_version(cargo_version: &str) -> String {
    // Build metadata (`+...`) is allowed in Debian versions as it is.
    cargo_version.replacen('-', "~", 1)
}

/// What goes into the packages besides text from this repository.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub hv_image: PathBuf,
    pub qsctl: PathBuf,
    pub bridge: PathBuf,
}

/// The built packages.
#[derive(Clone, Debug)]
pub struct Packages {
    /// `quicksilver_<version>_amd64.deb`, for the machine to debug.
    pub agent: PathBuf,
    /// `qs-bridge_<version>_amd64.deb`, for the operator's machine.
    pub bridge: PathBuf,
}

/// Builds the binaries and both packages into `out` (`cargo xtask package` uses
/// [`out_dir`]).
pub fn package(out: &Path) -> anyhow::Result<Packages> {
    // A stale qs_abi.h would make an agent that refuses the image it ships with.
    crate::abi_header::check()?;
    let binaries = build_binaries(&out.join("bin"))?;
    assemble(&binaries, out)
}

/// Builds the hv image, `qsctl` and `qs-bridge` into `dir`.
pub fn build_binaries(dir: &Path) -> anyhow::Result<Binaries> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let binaries = Binaries {
        hv_image: dir.join("hv.img"),
        qsctl: dir.join("qsctl"),
        bridge: dir.join("qs-bridge"),
    };
    build_hv_image(&binaries.hv_image)?;
    build_guest_binary("qsctl", "qsctl", &binaries.qsctl)?;
    build_guest_binary("qs-bridge", "qs-bridge", &binaries.bridge)?;
    Ok(binaries)
}

/// Stages both packages from `binaries` and the repository's files in `out` and builds them
/// there with `dpkg-deb`.
pub fn assemble(binaries: &Binaries, out: &Path) -> anyhow::Result<Packages> {
    let version = version();
    let agent_dir = crate::repo_root().join("guest-agent/linux");
    let c_source = agent_source::agent_c_source();
    let c_text = std::fs::read_to_string(&c_source)
        .with_context(|| format!("reading {}", c_source.display()))?;
    let image_path = agent_source::image_default(&c_text).with_context(|| {
        format!(
            "{} has no `static char *image = \"...\";`: the package installs hv.img where the \
             agent's image= parameter looks by default, so it needs one",
            c_source.display()
        )
    })?;

    let mut agent = Stage::new(&out.join(AGENT_PACKAGE))?;
    agent.copy(&binaries.qsctl, "usr/sbin/qsctl", 0o755)?;
    agent.copy(
        &binaries.hv_image,
        image_path.trim_start_matches('/'),
        0o644,
    )?;
    let src = format!("usr/src/{AGENT_PACKAGE}-{version}");
    for name in AGENT_SOURCES {
        agent.copy(&agent_dir.join(name), &format!("{src}/{name}"), 0o644)?;
    }
    agent.write(
        &format!("{src}/dkms.conf"),
        fill(DKMS_CONF, &version),
        0o644,
    )?;
    agent.write(MODPROBE_CONF_PATH, MODPROBE_CONF, 0o644)?;
    agent.control("postinst", &fill(POSTINST, &version), 0o755)?;
    agent.control("prerm", &fill(PRERM, &version), 0o755)?;
    agent.control("postrm", POSTRM, 0o755)?;
    agent.control("conffiles", &format!("/{MODPROBE_CONF_PATH}\n"), 0o644)?;
    let control = Control {
        package: AGENT_PACKAGE,
        version: &version,
        section: "kernel",
        // DKMS brings the compiler and make; 6.12's kbuild runs pahole (dwarves) to give the
        // module its BTF and fails without it. The headers are the running kernel's, which
        // apt cannot name in advance: these are the usual ones (generic, cloud).
        depends: Some("dkms, dwarves"),
        recommends: Some("linux-headers-amd64 | linux-headers-cloud-amd64"),
        suggests: Some(BRIDGE_PACKAGE),
        description: "dormant hypervisor for the running kernel: agent, hv image, qsctl\n \
            Quicksilver loads into a running Linux kernel and stays dormant until asked;\n \
            then it slides under the live kernel on every CPU (AMD SVM), serves gdb\n \
            attached to it over a serial link, and steps out again.\n \
            .\n \
            This package is for the machine to debug: the agent module's source, which\n \
            DKMS builds for every kernel with headers, the hv image, and qsctl. The\n \
            installation makes the link key, /etc/quicksilver/link.key. The operator's\n \
            end of the link is the qs-bridge package.",
    };
    agent.control("control", &control.render(agent.installed_kib()?), 0o644)?;
    let agent_deb = agent.build(out, &format!("{AGENT_PACKAGE}_{version}_amd64.deb"))?;

    let mut bridge = Stage::new(&out.join(BRIDGE_PACKAGE))?;
    bridge.copy(&binaries.bridge, "usr/bin/qs-bridge", 0o755)?;
    let control = Control {
        package: BRIDGE_PACKAGE,
        version: &version,
        section: "devel",
        depends: None,
        recommends: None,
        suggests: Some("gdb"),
        description: "operator's end of Quicksilver's serial link: gdb, console, control\n \
            qs-bridge owns the serial link to a machine running Quicksilver, proves the\n \
            link key, and serves gdb on TCP, the machine's console and a JSON control\n \
            socket. Install it on the operator's machine; the machine to debug gets the\n \
            quicksilver package.",
    };
    bridge.control("control", &control.render(bridge.installed_kib()?), 0o644)?;
    let bridge_deb = bridge.build(out, &format!("{BRIDGE_PACKAGE}_{version}_amd64.deb"))?;

    Ok(Packages {
        agent: agent_deb,
        bridge: bridge_deb,
    })
}

/// `template` with `@VERSION@` replaced.
fn fill(template: &str, version: &str) -> String {
    template.replace("@VERSION@", version)
}

/// The fields of `DEBIAN/control` that differ between the packages.
struct Control<'a> {
    package: &'a str,
    version: &'a str,
    section: &'a str,
    depends: Option<&'a str>,
    recommends: Option<&'a str>,
    suggests: Option<&'a str>,
    /// The synopsis, then the extended description's lines, each starting with a space.
    description: &'a str,
}

impl Control<'_> {
    fn render(&self, installed_kib: u64) -> String {
        let mut text = format!(
            "Package: {}\nVersion: {}\nArchitecture: amd64\nMaintainer: {MAINTAINER}\n\
             Installed-Size: {installed_kib}\nSection: {}\nPriority: optional\n",
            self.package, self.version, self.section
        );
        for (field, value) in [
            ("Depends", self.depends),
            ("Recommends", self.recommends),
            ("Suggests", self.suggests),
        ] {
            if let Some(value) = value {
                let _ = writeln!(text, "{field}: {value}");
            }
        }
        let _ = writeln!(text, "Description: {}", self.description);
        text
    }
}

/// A package's tree being assembled: files with the modes they will have, and `DEBIAN/`.
struct Stage {
    root: PathBuf,
}

impl Stage {
    /// An empty tree at `root` (what was there is removed).
    fn new(root: &Path) -> anyhow::Result<Stage> {
        remove_if_exists(root)?;
        create_dirs(root, Path::new("DEBIAN"))?;
        Ok(Stage {
            root: root.to_path_buf(),
        })
    }

    fn copy(&mut self, from: &Path, to: &str, mode: u32) -> anyhow::Result<()> {
        let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        self.write(to, &bytes, mode)
    }

    /// Writes `to` (relative to the root) with `mode`, set explicitly so that the builder's
    /// umask does not end up in the package.
    fn write(&mut self, to: &str, bytes: impl AsRef<[u8]>, mode: u32) -> anyhow::Result<()> {
        let rel = Path::new(to);
        if let Some(parent) = rel.parent() {
            create_dirs(&self.root, parent)?;
        }
        let path = self.root.join(rel);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", path.display()))
    }

    fn control(&mut self, name: &str, text: &str, mode: u32) -> anyhow::Result<()> {
        self.write(&format!("DEBIAN/{name}"), text, mode)
    }

    /// `Installed-Size`: the files' sizes in KiB, each rounded up, as dpkg-gencontrol counts
    /// them, plus one per directory.
    fn installed_kib(&self) -> anyhow::Result<u64> {
        fn walk(dir: &Path, kib: &mut u64) -> std::io::Result<()> {
            for entry in std::fs::read_dir(dir)? {
                let entry = entry?;
                if entry.file_name() == "DEBIAN" {
                    continue;
                }
                let meta = entry.metadata()?;
                *kib += meta.len().div_ceil(1024).max(1);
                if meta.is_dir() {
                    walk(&entry.path(), kib)?;
                }
            }
            Ok(())
        }
        let mut kib = 0;
        walk(&self.root, &mut kib).with_context(|| format!("measuring {}", self.root.display()))?;
        Ok(kib)
    }

    /// `dpkg-deb --build` of the tree into `out/name`: files owned by root whoever builds.
    fn build(&self, out: &Path, name: &str) -> anyhow::Result<PathBuf> {
        let deb = out.join(name);
        run_captured(
            Command::new("dpkg-deb")
                .args(["--build", "--root-owner-group"])
                .arg(&self.root)
                .arg(&deb),
        )
        .context("building the package (dpkg-deb is in the dpkg package)")?;
        Ok(deb)
    }
}

/// Creates `rel`'s directories under `root`, each 0755 whatever the umask.
fn create_dirs(root: &Path, rel: &Path) -> anyhow::Result<()> {
    let mut dir = root.to_path_buf();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for part in rel.components() {
        dir.push(part);
        if !dir.is_dir() {
            std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pre_release_sorts_before_its_release_in_debian() {
        assert_eq!(debian_version("0.1.0"), "0.1.0");
        assert_eq!(debian_version("0.2.0-rc.1"), "0.2.0~rc.1");
        assert_eq!(debian_version("1.0.0-rc.1+g123"), "1.0.0~rc.1+g123");
    }

    #[test]
    fn the_templates_are_filled_completely() {
        let version = "1.2.3";
        for template in [POSTINST, PRERM, POSTRM, DKMS_CONF, MODPROBE_CONF] {
            assert!(!fill(template, version).contains('@'), "{template}");
        }
    }
}
