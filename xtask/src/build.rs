//! `cargo xtask build`: everything the guest needs, in `<target>/qs`:
//!
//! ```text
//! hv.img           the hv image (from the quicksilver-hv ELF, see crate::image)
//! qsctl            static guest binaries
//! qs-workload
//! qs-bridge        the operator's bridge (host binary, for the demo and the tests)
//! qs-tui           the operator's terminal (host binary, for the demo and the tests)
//! kernels/<id>/    what differs per kernel (6.12-cloud, ...):
//!   quicksilver.ko   the agent, built against that kernel's cached headers in module/
//!   initrd.cpio      the base initramfs (crate::initrd); runs add a script archive to a copy
//! logs/            console logs of test runs
//! run/             per-run initramfs copies (removed when the run ends)
//! ```
//!
//! A part that fails to build is reported and left out; the rest is still built, so that
//! work on one component does not block testing the others, and `build` returns an error
//! naming the failed parts.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};
use object::read::elf::{FileHeader as _, ProgramHeader as _};

use crate::cmd::{describe, run_inherit, tail};
use crate::initrd::{self, InitrdInputs};
use crate::note;
use crate::Kernel;
use qs_testkit::Artifacts;

/// The Rust target of the guest binaries (built static, so the initramfs needs no libc).
pub const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
/// Modules shipped for the "KVM and Quicksilver exclude each other" checks.
pub const KVM_MODULES: &[&str] = &["kvm_amd"];
/// The guest's disk driver, for tests that hand it a disk to write into (`qsctl export`):
/// the PCI transport (a module in Debian 12's kernels, built in in 13's), then the driver.
pub const DISK_MODULES: &[&str] = &["virtio_pci", "virtio_blk"];
/// Linux's own drivers for the fast link's NICs, which the agent takes the NIC from and gives
/// it back to: virtio-net-pci's transport and driver (which needs `net_failover` and
/// `failover`, modules in every supported kernel), and the 82574L's `e1000e` (which needs
/// `ptp` and `pps_core`). Each binds only its own NIC. The cloud flavours have no `e1000e`:
/// their initramfs goes without it (the 82574L's tests run on the generic kernels).
pub const NET_MODULES: &[&str] = &["virtio_pci", "virtio_net", "e1000e"];

/// Builds every part for `kernel`; see the module documentation.
pub fn build(kernel: &Kernel) -> anyhow::Result<Artifacts> {
    let mut all = build_all(std::slice::from_ref(kernel))?;
    Ok(all.remove(0))
}

/// Builds the parts every kernel shares once, then the agent and the initramfs for each of
/// `kernels`; returns their artifacts in the same order.
pub fn build_all(kernels: &[Kernel]) -> anyhow::Result<Vec<Artifacts>> {
    let all: Vec<Artifacts> = kernels.iter().cloned().map(Artifacts::at).collect();
    let shared = all.first().context("no kernel to build for")?;
    std::fs::create_dir_all(shared.logs_dir())
        .with_context(|| format!("creating {}", shared.logs_dir().display()))?;
    let mut failed: Vec<String> = Vec::new();
    // Each part replaces its file atomically (tests may be reading it meanwhile); a part that
    // fails loses its file, so that a stale copy does not end up in the initramfs.
    let mut step =
        |what: String, out: &Path, result: &dyn Fn() -> anyhow::Result<()>| match result() {
            Ok(()) => note(format!("built {what}: {}", out.display())),
            Err(err) => {
                let _ = std::fs::remove_file(out);
                eprintln!("xtask: FAILED to build {what}: {err:#}\n");
                failed.push(what);
            }
        };
    step("the hv image".into(), &shared.hv_image, &|| {
        build_hv_image(&shared.hv_image)
    });
    step("qsctl".into(), &shared.qsctl, &|| {
        build_guest_binary("qsctl", "qsctl", &shared.qsctl)
    });
    step("qs-workload".into(), &shared.workload, &|| {
        build_guest_binary("qs-workload", "qs-workload", &shared.workload)
    });
    step("qs-bridge".into(), &shared.bridge, &|| {
        build_host_binary("qs-bridge", "qs-bridge", &shared.bridge)
    });
    step("qs-tui".into(), &shared.tui, &|| {
        build_host_binary("qs-tui", "qs-tui", &shared.tui)
    });
    for artifacts in &all {
        let kernel = &artifacts.kernel;
        let dir = artifacts
            .agent
            .parent()
            .context("the agent's path has no folder")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        step(
            format!("the agent module for {}", kernel.id),
            &artifacts.agent,
            &|| {
                let ko = build_module(
                    kernel,
                    &crate::repo_root().join("guest-agent/linux"),
                    &dir.join("module"),
                )?;
                let built = ko.iter().find(|p| p.file_name().is_some_and(|n| n == "quicksilver.ko")).with_context(|| {
                format!("the agent's kbuild made {ko:?} but no quicksilver.ko: its Kbuild needs `obj-m := quicksilver.o`")
            })?;
                install(built, &artifacts.agent)
            },
        );
        write_initrd(artifacts)?;
    }

    if !failed.is_empty() {
        bail!(
            "{} failed to build (see above); the initramfs was built without {}",
            failed.join(", "),
            if failed.len() == 1 { "it" } else { "them" }
        );
    }
    Ok(all)
}

/// The base initramfs for `artifacts.kernel`, with whatever of the parts was built.
fn write_initrd(artifacts: &Artifacts) -> anyhow::Result<()> {
    let kernel = &artifacts.kernel;
    let present = |p: &PathBuf| p.exists().then(|| p.clone());
    let inputs = InitrdInputs {
        busybox: kernel.busybox.clone(),
        hv_image: present(&artifacts.hv_image),
        agent: present(&artifacts.agent),
        qsctl: present(&artifacts.qsctl),
        workload: present(&artifacts.workload),
        kvm_modules: initrd::module_load_order(&kernel.modules_dir, KVM_MODULES)?,
        disk_modules: initrd::module_load_order(&kernel.modules_dir, DISK_MODULES)?,
        net_modules: initrd::module_load_order_available(&kernel.modules_dir, NET_MODULES)?,
    };
    note(format!(
        "{}: KVM modules in load order: {}",
        kernel.id,
        inputs
            .kvm_modules
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    initrd::write_base(&inputs, &artifacts.initrd)?;
    note(format!(
        "built the initramfs for {}: {}",
        kernel.id,
        artifacts.initrd.display()
    ));
    Ok(())
}

/// The `cargo` that runs us (`$CARGO`), so the same toolchain builds the parts.
fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// What selects the hv image for cargo (build, clippy): the release build of the `qs-hv`
/// binary with the `image` feature, for the hv's own target.
pub const HV_IMAGE_ARGS: &[&str] = &[
    "--release",
    "-p",
    "quicksilver-hv",
    "--bin",
    "qs-hv",
    "--features",
    "image",
    "--target",
    crate::setup::HV_TARGET,
];

/// Builds the hv ELF for `x86_64-unknown-none` and converts it to the image at `out`.
pub fn build_hv_image(out: &Path) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.current_dir(crate::repo_root())
        .arg("build")
        .args(HV_IMAGE_ARGS);
    run_inherit(&mut cmd).context("the hv (crate quicksilver-hv, bin qs-hv) does not build")?;
    let elf = crate::target_dir()
        .join(crate::setup::HV_TARGET)
        .join("release/qs-hv");
    refuse_vector_registers(&elf)?;
    let header = crate::image::build_image_file(&elf, out)?;
    note(format!(
        "hv image {} v{}: {} bytes, code [{:#x}, {:#x}), {} relocations",
        out.display(),
        header.version_str(),
        header.image_size,
        header.code_start,
        header.code_end,
        header.reloc_count
    ));
    Ok(())
}

/// The hv runs with the guest's vector registers live and saves none of them: an instruction
/// that names one would corrupt the kernel it carries. The usual cause is a crate choosing
/// SSE2 or AVX2 code at run time from CPUID (the target's soft-float only governs what the
/// compiler itself emits). objdump names them `%xmm`, `%ymm`, `%zmm`.
fn refuse_vector_registers(elf: &Path) -> anyhow::Result<()> {
    let out = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(elf)
        .output()
        .context("objdump checks the hv image for vector instructions: apt-get install binutils")?;
    if !out.status.success() {
        bail!(
            "objdump -d {} failed: {}",
            elf.display(),
            tail(&String::from_utf8_lossy(&out.stderr))
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let hits: Vec<&str> = text
        .lines()
        .filter(|l| ["%xmm", "%ymm", "%zmm"].iter().any(|r| l.contains(r)))
        .collect();
    if let Some(first) = hits.first() {
        bail!(
            "the hv image uses vector registers ({} instructions, the first: {}), which it does \
             not save for the guest: force the crate's portable backend for {} in \
             .cargo/config.toml",
            hits.len(),
            first.trim(),
            crate::setup::HV_TARGET
        );
    }
    Ok(())
}

/// Builds the out-of-tree module whose sources (a `Kbuild` or `Makefile` and its C files)
/// are in `src`, in the build folder `work` against the cached headers; returns the `.ko`
/// files made.
///
/// Sources are copied only when changed, so kbuild's own dependency tracking keeps rebuilds
/// quick.
pub fn build_module(kernel: &Kernel, src: &Path, work: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !src.join("Kbuild").exists() && !src.join("Makefile").exists() {
        bail!(
            "{} has no Kbuild or Makefile: the module's sources are not there yet",
            src.display()
        );
    }
    std::fs::create_dir_all(work)?;
    let work = &work.canonicalize()?;
    // A kernel built in a chroot (Debian 13's) builds in a folder the chroot reaches, named
    // after `work`; the modules and the log are copied back to `work`.
    if kernel.chroot.is_some() {
        let name = work.to_string_lossy().replace('/', "_");
        let inner = kernel.scratch_base().join("build").join(name);
        std::fs::create_dir_all(&inner)?;
        let built = build_module_in(kernel, src, &inner);
        let _ = std::fs::copy(inner.join("build.log"), work.join("build.log"));
        let mut kos = Vec::new();
        for ko in built? {
            let to = work.join(ko.file_name().context("a module without a name")?);
            std::fs::copy(&ko, &to)
                .with_context(|| format!("copying {} to {}", ko.display(), to.display()))?;
            kos.push(to);
        }
        return Ok(kos);
    }
    build_module_in(kernel, src, work)
}

/// [`build_module`] in `work`, which [`Kernel::command`] reaches.
fn build_module_in(kernel: &Kernel, src: &Path, work: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut sources = Vec::new();
    for entry in std::fs::read_dir(src).with_context(|| format!("listing {}", src.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let name = entry.file_name();
            let bytes = std::fs::read(entry.path())?;
            let dest = work.join(&name);
            if std::fs::read(&dest).ok().as_deref() != Some(&bytes[..]) {
                std::fs::write(&dest, &bytes)?;
            }
            sources.push(name);
        }
    }
    // Sources deleted upstream must not linger and be compiled.
    for entry in std::fs::read_dir(work)? {
        let entry = entry?;
        let name = entry.file_name();
        let n = name.to_string_lossy();
        let is_source = n.ends_with(".c") || n.ends_with(".h") || n == "Kbuild" || n == "Makefile";
        if is_source && !sources.contains(&name) {
            std::fs::remove_file(entry.path())?;
        }
    }
    let work = work.canonicalize()?;
    // One file for both streams keeps the compiler's errors next to the step that failed.
    let log_path = work.join("build.log");
    let log = std::fs::File::create(&log_path)?;
    let mut make = kernel.command("make");
    make.arg("-C")
        .arg(kernel.inside(&kernel.headers_dir))
        .arg(format!("M={}", kernel.inside(&work).display()))
        .arg("modules")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let status = make
        .status()
        .with_context(|| format!("cannot run `{}`: run `cargo xtask setup`", describe(&make)))?;
    if !status.success() {
        let mut text = std::fs::read_to_string(&log_path).unwrap_or_default();
        // Point at the sources the user edits, not at the copies kbuild compiled.
        let src = src.canonicalize().unwrap_or_else(|_| src.to_path_buf());
        for name in &sources {
            let name = name.to_string_lossy();
            text = text.replace(
                &format!("{}/{name}", kernel.inside(&work).display()),
                &format!("{}/{name}", src.display()),
            );
        }
        bail!(
            "`{}` failed ({status}); its output ends with:\n{}",
            describe(&make),
            tail(&text)
        );
    }
    let mut kos: Vec<PathBuf> = std::fs::read_dir(&work)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "ko"))
        .collect();
    kos.sort();
    Ok(kos)
}

/// Builds package `package`'s binary `bin` statically for the guest and copies it to `out`.
pub fn build_guest_binary(package: &str, bin: &str, out: &Path) -> anyhow::Result<()> {
    let mut cmd = cargo();
    let mut rustflags = std::env::var("RUSTFLAGS").unwrap_or_default();
    // Static: the initramfs has no C library. Without debug info: the release profile keeps
    // it (for the hv), but here it would triple the initramfs the kernel unpacks at every boot.
    rustflags.push_str(" -C target-feature=+crt-static -C strip=debuginfo");
    // The explicit --target keeps these flags off the host build (build scripts, xtask).
    cmd.current_dir(crate::repo_root())
        .args([
            "build",
            "--release",
            "-p",
            package,
            "--bin",
            bin,
            "--target",
            GUEST_TARGET,
        ])
        .env("RUSTFLAGS", rustflags.trim())
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    run_inherit(&mut cmd).with_context(|| format!("the guest tool {package} does not build"))?;
    let built = crate::target_dir()
        .join(GUEST_TARGET)
        .join("release")
        .join(bin);
    ensure_static(&built)?;
    install(&built, out)
}

/// Builds a host binary of the operator's (`qs-bridge`, `qs-tui`; the dev profile, which
/// `cargo test` builds anyway) and copies it to `out`.
pub fn build_host_binary(package: &str, bin: &str, out: &Path) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.current_dir(crate::repo_root())
        .args(["build", "-p", package, "--bin", bin]);
    run_inherit(&mut cmd).with_context(|| format!("{bin} does not build"))?;
    install(&crate::target_dir().join("debug").join(bin), out)
}

/// Builds `qs-bridge` as it ships (the release profile, as the Debian package has it) into
/// `<target>/qs/qs-bridge-release`, for the benchmarks whose figures include the bridge's own
/// time per packet (the dev build is several times slower per datagram); returns the path.
pub fn build_release_bridge(artifacts_dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let mut cmd = cargo();
    cmd.current_dir(crate::repo_root()).args([
        "build",
        "--release",
        "-p",
        "qs-bridge",
        "--bin",
        "qs-bridge",
    ]);
    run_inherit(&mut cmd).context("qs-bridge (release) does not build")?;
    let out = artifacts_dir.join("qs-bridge-release");
    install(&crate::target_dir().join("release").join("qs-bridge"), &out)?;
    Ok(out)
}

/// Fails if `path` has an ELF interpreter: the initramfs has no C library, and a packaged
/// binary depends on none.
pub fn ensure_static(path: &Path) -> anyhow::Result<()> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let header = object::elf::FileHeader64::<object::LittleEndian>::parse(&*data)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("{} is not an ELF file", path.display()))?;
    let endian = header.endian().map_err(anyhow::Error::msg)?;
    let dynamic = header
        .program_headers(endian, &*data)
        .map_err(anyhow::Error::msg)?
        .iter()
        .any(|ph| ph.p_type(endian) == object::elf::PT_INTERP);
    if dynamic {
        bail!(
            "{} is dynamically linked although built with +crt-static: is RUSTFLAGS overridden by a \
             .cargo/config.toml [target] rustflags entry?",
            path.display()
        );
    }
    Ok(())
}

/// Copies `from` to `to` through a temporary file and a rename, so that a reader of `to` sees
/// the old file or the new one, never half of one.
pub fn install(from: &Path, to: &Path) -> anyhow::Result<()> {
    let tmp = to.with_extension(format!("tmp{}", std::process::id()));
    std::fs::copy(from, &tmp)
        .and_then(|_| std::fs::rename(&tmp, to))
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))
}
