//! The QEMU that the tests, the demo and the benchmarks boot: Debian's own source of the
//! installed `qemu-system-x86` (7.2 on bookworm), with two fixes of ours to its TCG's SVM, built
//! once into `<repo>/.cache/qemu/bin`. Both bugs are in QEMU 10 and upstream too.
//!
//! `xtask/qemu/cpu0-hflags2-race.patch`: every vCPU that loads an FPU status word (FLDENV,
//! FRSTOR, FXRSTOR, XRSTOR: Linux does on every switch to a task that used the FPU) clears the
//! IGNNE flag in the *first* vCPU's `hflags2` with a plain read-modify-write
//! (`cpu_clear_ignne`). CPU 0's own thread writes that word at every VMRUN and #VMEXIT (nested
//! paging on or off, GIF), so now and then another vCPU stores back CPU 0's flags as they were
//! a moment before. After a #VMEXIT that leaves nested paging on in host mode: the hv's next
//! instruction fetch walks its own page tables through the guest's nested tables, faults, and
//! QEMU makes that a second #VMEXIT which writes the hv's own state over the kernel's in the
//! VMCB (issue 3 found it: about once in 900 round trips on 2 CPUs, always on CPU 0). After a
//! VMRUN it can leave GIF clear in the guest, so that CPU 0 never wakes from its next HLT. The
//! patch leaves the word alone unless IGNNE is set and clears it atomically when it is.
//!
//! `xtask/qemu/svm-injected-interrupt-twice.patch`: VMRUN delivers an injected external
//! interrupt (EVENTINJ type 0) at once but leaves the vCPU's `exception_index` at its vector.
//! The next kick of that vCPU (a device's interrupt, another vCPU's TLB flush) then delivers
//! the vector a second time through QEMU's exception path, whatever the guest's IF. The hv
//! injects such an interrupt whenever a nested page fault cut its delivery short, which
//! copy-on-write makes common (a checkpoint protects the stacks the delivery pushes onto).
//! Landing on the first instruction of a handler entered from user mode, before its SWAPGS, the
//! second delivery runs the kernel's handler on the user's GS: it faults until its stack runs
//! out, and the kernel panics ("Fatal exception in interrupt", `irqentry_enter`; seen once in
//! CI in the 100-rollback test). With a kick forced after every injection, 9 injections gave 9
//! second deliveries and that panic within 6 s; with the patch, 791 gave none and the test
//! passed. The patch clears `exception_index` once the interrupt is delivered.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

use crate::apt::Apt;
use crate::cmd::{
    ensure_symlink, ninja_progress, remove_if_exists, run_captured, run_with_progress, stdout_of,
};
use crate::{note, repo_root};
use qs_testkit::paths::{patched_qemu, qemu_dir, SYSTEM_QEMU};
/// Our fixes, applied to Debian's source in this order.
const PATCHES: &[&str] = &[
    "xtask/qemu/cpu0-hflags2-race.patch",
    "xtask/qemu/svm-injected-interrupt-twice.patch",
];
/// What building QEMU for x86_64/TCG needs beyond `gcc` and `make`; `dpkg-dev` unpacks the
/// source package (with Debian's patches) and brings `patch`.
const BUILD_PACKAGES: &[&str] = &[
    "dpkg-dev",
    "ninja-build",
    "meson",
    "pkg-config",
    "libglib2.0-dev",
    "libpixman-1-dev",
    "zlib1g-dev",
    "libfdt-dev",
];
/// Only the x86_64 system emulator with TCG, none of the optional devices, UIs or tools the
/// tests do not use. Firmware comes from Debian's packages, where Debian's own build looks.
const CONFIGURE: &[&str] = &[
    "--prefix=/usr",
    "--firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu",
    "--target-list=x86_64-softmmu",
    "--without-default-features",
    "--enable-tcg",
    "--disable-docs",
    "--disable-install-blobs",
    "--disable-debug-info",
    "--disable-werror",
];

/// Builds the patched QEMU unless the build for this source version, patch and configuration
/// is there.
pub(crate) fn ensure(apt: &mut Apt) -> anyhow::Result<PathBuf> {
    let dir = qemu_dir();
    let binary = patched_qemu(&dir);
    let version = stdout_of(Command::new("dpkg-query").args([
        "-W",
        "-f=${source:Version}",
        "qemu-system-x86",
    ]))
    .context("cannot tell which QEMU source to build: is qemu-system-x86 installed?")?;
    // A new source version, patch or configuration means a new build.
    let mut recipe = Vec::new();
    for patch in PATCHES {
        let path = repo_root().join(patch);
        recipe.extend(std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
    }
    recipe.extend(CONFIGURE.join(" ").as_bytes());
    let stamp = format!(
        "qemu {version} recipe {:08x}",
        quicksilver_proto::crc32(&recipe)
    );
    let ready = dir.join("ready");
    if binary.exists() && std::fs::read_to_string(&ready).is_ok_and(|s| s.trim() == stamp) {
        link_firmware(&dir)?;
        check_firmware(&binary)?;
        note(format!(
            "patched QEMU {version} ready: {}",
            binary.display()
        ));
        return Ok(binary);
    }
    note(format!(
        "building QEMU {version} with {} into {} (once; a few minutes)",
        PATCHES.join(" and "),
        dir.display()
    ));
    apt.install_missing(BUILD_PACKAGES)?;
    remove_if_exists(&ready)?;
    note("QEMU step 1 of 4: fetching Debian's source (apt-get source)");
    let src = dir.join("src");
    remove_if_exists(&src)?;
    std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    fetch_source(apt, &version, &src)?;
    let tree = source_tree(&src)?;
    for patch in PATCHES {
        note(format!("QEMU step 2 of 4: applying {patch}"));
        run_captured(
            Command::new("patch")
                .args(["-p1", "--forward", "-i"])
                .arg(repo_root().join(patch))
                .current_dir(&tree),
        )
        .with_context(|| format!("{patch} does not apply to Debian's QEMU {version}"))?;
    }
    let build = tree.join("build");
    std::fs::create_dir_all(&build)?;
    note("QEMU step 3 of 4: configuring (about 30 s)");
    run_captured(
        Command::new(tree.join("configure"))
            .args(CONFIGURE)
            .current_dir(&build),
    )
    .context("configuring QEMU failed")?;
    note("QEMU step 4 of 4: compiling (a few minutes; a line at every tenth)");
    run_with_progress(
        Command::new("ninja").arg("-C").arg(&build).arg(SYSTEM_QEMU),
        "compiling QEMU",
        ninja_progress,
    )
    .context("building QEMU failed")?;
    let bin_dir = dir.join("bin");
    std::fs::create_dir_all(&bin_dir)?;
    std::fs::copy(build.join(SYSTEM_QEMU), &binary)
        .with_context(|| format!("copying QEMU to {}", binary.display()))?;
    link_firmware(&dir)?;
    check_firmware(&binary)?;
    // The source and objects are ~1 GB; only the binary is needed.
    remove_if_exists(&src)?;
    std::fs::write(&ready, format!("{stamp}\n"))?;
    note(format!("built {}", binary.display()));
    Ok(binary)
}

/// QEMU looks for firmware relative to its binary (`bin/../share/qemu` for the prefix /usr,
/// and so on): `share` and `lib` beside `bin` lead to the system's, which Debian's packages
/// fill.
fn link_firmware(dir: &Path) -> anyhow::Result<()> {
    for (name, system) in [("share", "/usr/share"), ("lib", "/usr/lib")] {
        ensure_symlink(Path::new(system), &dir.join(name))?;
    }
    Ok(())
}

/// Fails unless `binary` finds the PC BIOS in its firmware path (`-L help`).
fn check_firmware(binary: &Path) -> anyhow::Result<()> {
    let dirs = stdout_of(Command::new(binary).args(["-L", "help"]))?;
    if dirs
        .lines()
        .any(|d| Path::new(d.trim()).join("bios-256k.bin").exists())
    {
        return Ok(());
    }
    bail!(
        "{} finds no bios-256k.bin in its firmware path ({}): is the seabios package installed?",
        binary.display(),
        dirs.lines().collect::<Vec<_>>().join(", ")
    )
}

/// `apt-get source qemu=VERSION` into `src`. Debian's images often list binary packages only:
/// then a `deb-src` twin of each `deb` source is added (quicksilver-deb-src.*) and the lists
/// updated once.
fn fetch_source(apt: &mut Apt, version: &str, src: &Path) -> anyhow::Result<()> {
    let mut source = Command::new("apt-get");
    source
        .args(["source", "-o", "APT::Sandbox::User=root", "--only-source"])
        .arg(format!("qemu={version}"))
        .current_dir(src);
    let Err(first) = run_captured(&mut source) else {
        return Ok(());
    };
    if !enable_deb_src()? {
        return Err(first.context(format!(
            "apt-get source qemu={version} failed and no deb-src source could be added: add \
             deb-src lines for Debian's archive to /etc/apt/sources.list"
        )));
    }
    apt.update()?;
    run_captured(&mut source).with_context(|| {
        format!("apt-get source qemu={version} failed even with deb-src sources added")
    })?;
    Ok(())
}

/// Adds `deb-src` twins of the system's `deb` sources; false if there was nothing to mirror.
fn enable_deb_src() -> anyhow::Result<bool> {
    let apt_dir = Path::new("/etc/apt");
    let deb822 = apt_dir.join("sources.list.d/debian.sources");
    let one_line = apt_dir.join("sources.list");
    let (from, to, text) = if let Ok(text) = std::fs::read_to_string(&deb822) {
        let twin: String = text
            .lines()
            .map(|l| match l.trim() {
                "Types: deb" => "Types: deb-src".to_string(),
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        (deb822, "sources.list.d/quicksilver-deb-src.sources", twin)
    } else if let Ok(text) = std::fs::read_to_string(&one_line) {
        let twin: String = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("deb "))
            .map(|rest| format!("deb-src {rest}\n"))
            .collect();
        (one_line, "sources.list.d/quicksilver-deb-src.list", twin)
    } else {
        return Ok(false);
    };
    if !text.contains("deb-src") {
        return Ok(false);
    }
    let target = apt_dir.join(to);
    note(format!(
        "adding deb-src sources like {} in {}",
        from.display(),
        target.display()
    ));
    std::fs::write(&target, format!("{}\n", text.trim_end()))
        .with_context(|| format!("writing {} (run setup as root)", target.display()))?;
    Ok(true)
}

/// The one `qemu-*` directory `apt-get source` unpacked.
fn source_tree(src: &Path) -> anyhow::Result<PathBuf> {
    for entry in std::fs::read_dir(src)? {
        let path = entry?.path();
        let unpacked = path.is_dir()
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("qemu-"));
        if unpacked {
            return Ok(path);
        }
    }
    bail!(
        "apt-get source left no unpacked qemu-* tree in {} (is dpkg-dev installed?)",
        src.display()
    )
}
