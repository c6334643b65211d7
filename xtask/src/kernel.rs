//! The stock Debian kernels Quicksilver is tested on, one cache folder each,
//! `<repo>/.cache/kernel/<id>` ([`KernelId`]: `6.12-generic`, `6.12-cloud`, `6.1-generic`,
//! `6.1-cloud`). Debian 12's 6.1 kernels are fetched with this machine's `apt-get download`
//! and extracted with `dpkg -x` into `<id>/root`, never installed. Debian 13's 6.12 kernels
//! need Debian 13's compiler to build modules: their `root` is a Debian 13 system made with
//! debootstrap, which builds in a chroot (`crate::debian13`).
//!
//! Layout of `<repo>/.cache/kernel/<id>` (for 6.12, `root` links to the Debian 13 system, and
//! there is no `debs/`):
//!
//! ```text
//! abi       the chosen ABI ("6.1.0-56", "6.12.117+deb13"), so later runs need neither apt
//!           lists nor network
//! debs/     the downloaded packages (kept: re-extraction needs no download)
//! root/     every package extracted, headers fixed up to build modules in place
//! ready     written last, holding the ABI: root/ is complete for that ABI
//! vmlinux-<release>  the kernel's ELF with debug info, for GDB: the only file taken from
//!           linux-image-<release>-dbg (deleted after extraction); renamed
//!           into place when complete, so its presence is its own readiness marker; kept
//!           outside root/ so that re-extracting the rest does not download it again
//! vmlinux   a link to vmlinux-<release> (for typing: gdb .cache/kernel/6.12-cloud/vmlinux)
//! ```
//!
//! The flavour headers (`linux-headers-<abi>-<flavour>`) are a thin layer over the `-common`
//! tree and the kbuild tools, and refer to them by absolute `/usr/src/...` paths (their
//! `Makefile`), or by links meant for an installed system (`lib/modules/*/build`).
//! [`prepare`] rewrites those to point inside `root/`, so `make -C <headers_dir> M=...` works
//! without anything installed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

use qs_testkit::artifacts::{kernel_cache_dir as cache_dir, Series};
use qs_testkit::{Kernel, KernelId};

use crate::apt::{abi_of, dependency, Apt};
use crate::cmd::{ensure_symlink, remove_if_exists, run_captured, stdout_of};
use crate::note;

/// Environment variable that picks the ABI of Debian 12's 6.1 kernels (`6.1.0-56`) instead of
/// whatever the flavour's metapackage depends on. (Debian 13's are what its apt installs.)
pub const ABI_ENV: &str = "QS_KERNEL_ABI";

/// Makes kernel `id` ready in the cache with its debug info, downloading and extracting only
/// what is missing. Fast (no apt, no network) when a previous run completed.
pub fn prepare(id: KernelId) -> anyhow::Result<Kernel> {
    prepare_with(id, &mut Apt::default())
}

/// [`prepare`], sharing `apt`'s state with the rest of setup.
pub(crate) fn prepare_with(id: KernelId, apt: &mut Apt) -> anyhow::Result<Kernel> {
    let kernel = prepare_boot(id, apt)?;
    ensure_vmlinux(&kernel, apt)?;
    Ok(kernel)
}

/// The metapackage whose dependency names the current ABI of Debian 12's kernel `id`.
fn meta_package(id: KernelId) -> String {
    format!("linux-image-{}", id.flavour_suffix())
}

/// What booting and building modules need: the image, headers, modules and busybox.
fn prepare_boot(id: KernelId, apt: &mut Apt) -> anyhow::Result<Kernel> {
    let dir = cache_dir(id);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if id.series == Series::V6_12 {
        return crate::debian13::prepare(id, &dir);
    }
    let abi = choose_abi(id, &dir, apt)?;
    let kernel = Kernel::in_cache(&dir, id, &abi);
    let ready = dir.join("ready");
    if std::fs::read_to_string(&ready).is_ok_and(|s| s.trim() == abi) && kernel.is_complete() {
        record_abi(&dir, &abi)?;
        note(format!(
            "kernel {} ready in {}",
            kernel.release,
            kernel.root.display()
        ));
        return Ok(kernel);
    }
    let debs = dir.join("debs");
    // The unsigned image: the same kernel as the signed one.
    let image = format!("linux-image-{}-unsigned", kernel.release);
    let headers = format!("linux-headers-{}", kernel.release);
    let mut packages = vec![image.clone(), headers.clone()];
    let mut files = download(apt, &packages, &debs)?;
    // The flavour headers name the exact -common and kbuild packages they need (the kbuild
    // package is linux-kbuild-6.1 for 6.1, but carries the full version for 6.12).
    let depends = stdout_of(
        Command::new("dpkg-deb")
            .arg("-f")
            .arg(&files[1])
            .arg("Depends"),
    )?;
    let common = dependency(&depends, |p| {
        p.starts_with("linux-headers-") && p.ends_with("-common")
    })
    .with_context(|| format!("{headers} does not depend on a linux-headers-*-common package"))?;
    let kbuild = dependency(&depends, |p| p.starts_with("linux-kbuild-"))
        .with_context(|| format!("{headers} does not depend on a linux-kbuild-* package"))?;
    let rest = vec![common, kbuild, "busybox-static".to_string()];
    files.extend(download(apt, &rest, &debs)?);
    packages.extend(rest);

    // From here on root/ is being rebuilt: it is not ready until the end.
    remove_if_exists(&ready)?;
    let root = &kernel.root;
    if root.exists() {
        std::fs::remove_dir_all(root)
            .with_context(|| format!("removing the incomplete {}", root.display()))?;
    }
    std::fs::create_dir_all(root)?;
    for (package, deb) in packages.iter().zip(&files) {
        note(format!("extracting {package}"));
        if let Err(err) = run_captured(Command::new("dpkg").arg("-x").arg(deb).arg(root)) {
            // A truncated download is the likely cause: drop it so the next run fetches it.
            let _ = std::fs::remove_file(deb);
            return Err(err.context(format!(
                    "extracting {} failed; the file was deleted, run `cargo xtask setup` again to download it",
                    deb.display()
                )));
        }
    }
    fix_absolute_paths(root)?;
    check_headers(&kernel, apt)?;
    if !kernel.is_complete() {
        bail!(
                "the extracted packages lack an expected file (one of {}, {}, {}, {}): is {} still the flavour's name?",
                kernel.vmlinuz.display(),
                kernel.headers_dir.display(),
                kernel.modules_dir.display(),
                kernel.busybox.display(),
                id.flavour_suffix()
            );
    }
    std::fs::write(&ready, format!("{abi}\n"))?;
    record_abi(&dir, &abi)?;
    note(format!(
        "kernel {} ready in {}",
        kernel.release,
        root.display()
    ));
    Ok(kernel)
}

/// Picks the ABI: `$QS_KERNEL_ABI`, else the one recorded by an earlier successful run, else
/// what the series' metapackage depends on today.
fn choose_abi(id: KernelId, dir: &Path, apt: &mut Apt) -> anyhow::Result<String> {
    if let Ok(wanted) = std::env::var(ABI_ENV) {
        // Accept the full release too ("6.1.0-56-cloud-amd64").
        let wanted = wanted
            .trim()
            .trim_end_matches(&format!("-{}", id.flavour_suffix()))
            .to_string();
        if !wanted.starts_with("6.1.")
            || wanted.contains(|c: char| c.is_whitespace() || c == '/' || c == '_')
        {
            bail!(
                "{ABI_ENV}={wanted:?} is not an ABI of Debian 12's 6.1 kernels: use the form 6.1.0-56 (Debian 13's 6.12 is what its apt installs)"
            );
        }
        return Ok(wanted);
    }
    let recorded = std::fs::read_to_string(dir.join("abi")).unwrap_or_default();
    if !recorded.trim().is_empty() {
        return Ok(recorded.trim().to_string());
    }
    let abi = resolve_abi(id, apt)?;
    note(format!(
        "{} depends on kernel ABI {abi} (later runs keep it: set {ABI_ENV} to change)",
        meta_package(id)
    ));
    Ok(abi)
}

/// Records `abi` as the one later runs use, once it is ready: a failed attempt (a mistyped
/// `QS_KERNEL_ABI`) must not stick.
fn record_abi(dir: &Path, abi: &str) -> anyhow::Result<()> {
    let path = dir.join("abi");
    if std::fs::read_to_string(&path).is_ok_and(|s| s.trim() == abi) {
        return Ok(());
    }
    std::fs::write(&path, format!("{abi}\n")).with_context(|| format!("writing {}", path.display()))
}

/// The ABI the metapackage of `id` depends on.
fn resolve_abi(id: KernelId, apt: &mut Apt) -> anyhow::Result<String> {
    let meta = meta_package(id);
    loop {
        let found = stdout_of(Command::new("apt-cache").args(["depends", &meta]))
            .ok()
            .and_then(|out| parse_meta_depends(&out, id.flavour_suffix()));
        if let Some(abi) = found {
            return Ok(abi);
        }
        if !apt.update_once()? {
            bail!(
                "cannot tell which kernel {meta} depends on (apt-cache depends {meta}): is the \
                 Debian 12 archive in sources.list? Or set {ABI_ENV} to choose an ABI"
            );
        }
    }
}

/// Makes sure a `.deb` of each package is in `debs`, downloading the missing ones, and
/// returns their paths in the same order.
fn download(apt: &mut Apt, packages: &[String], debs: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(debs)?;
    let missing: Vec<&String> = packages
        .iter()
        .filter(|p| find_deb(debs, p).is_none())
        .collect();
    if !missing.is_empty() {
        // Download into a scratch folder and move complete files only, so that an
        // interrupted download never leaves a truncated .deb that looks like a good one.
        let partial = debs.join("partial");
        if partial.exists() {
            std::fs::remove_dir_all(&partial)?;
        }
        std::fs::create_dir_all(&partial)?;
        note(format!(
            "apt-get download {}",
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        ));
        let mut download = Command::new("apt-get");
        // As root, apt drops to the _apt user to download, which cannot write here; it then
        // warns and downloads as root anyway. Say so up front instead.
        download
            .args(["download", "-o", "APT::Sandbox::User=root"])
            .args(&missing)
            .current_dir(&partial);
        if let Err(first) = run_captured(&mut download) {
            // Package lists missing or stale (the archive dropped an old ABI): refresh once.
            if !apt.update_once()? {
                return Err(first.context("downloading the kernel packages failed"));
            }
            run_captured(&mut download).context(
                "downloading the kernel packages failed even after apt-get update: is this Debian \
                 bookworm with the security archive in sources.list? Or set QS_KERNEL_ABI to an ABI \
                 the archive still has",
            )?;
        }
        for entry in std::fs::read_dir(&partial)? {
            let entry = entry?;
            std::fs::rename(entry.path(), debs.join(entry.file_name()))?;
        }
        std::fs::remove_dir(&partial)?;
    }
    packages
        .iter()
        .map(|p| {
            find_deb(debs, p).with_context(|| {
                format!(
                    "apt-get download left no .deb for {p} in {}",
                    debs.display()
                )
            })
        })
        .collect()
}

/// `apt-cache depends linux-image-cloud-amd64` → `6.1.0-56`, for the flavour whose packages
/// end in `-<flavour>` (`cloud-amd64`, `amd64`).
fn parse_meta_depends(output: &str, flavour: &str) -> Option<String> {
    output.lines().find_map(|line| {
        let name = line.trim().strip_prefix("Depends:")?.trim();
        abi_of(name, "linux-image-", flavour)
    })
}

/// The newest `.deb` of `package` in `dir` (files are named `<package>_<version>_<arch>.deb`).
fn find_deb(dir: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{package}_");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(&prefix) && name.ends_with(".deb")
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

/// Absolute path prefixes of an installed kernel's build tree, which the extracted packages
/// use to find each other.
const INSTALLED_PREFIXES: [&str; 2] = ["/usr/src/linux-", "/usr/lib/linux-kbuild-"];

/// Repoints absolute references into `/usr/src` and `/usr/lib/linux-kbuild-*` at the copies
/// under `root`: in the text files of the header trees, and in symbolic links anywhere.
fn fix_absolute_paths(root: &Path) -> anyhow::Result<()> {
    let root_str = root.to_str().context("the cache path is not UTF-8")?;
    let mut fixed = Vec::new();
    walk(root, &mut |path, file_type| {
        if file_type.is_symlink() {
            let target = std::fs::read_link(path)?;
            let target_str = target.to_string_lossy();
            if INSTALLED_PREFIXES.iter().any(|p| target_str.starts_with(p)) {
                let new_target = root.join(target.strip_prefix("/").expect("absolute"));
                std::fs::remove_file(path)?;
                std::os::unix::fs::symlink(&new_target, path)?;
                fixed.push(path.to_path_buf());
            }
        } else if file_type.is_file() && path.starts_with(root.join("usr")) {
            let bytes = std::fs::read(path)?;
            // Binaries (modpost, objtool) embed no such paths; only rewrite text.
            if !bytes.contains(&0) {
                if let Some(new) = rewrite_absolute(&bytes, root_str.as_bytes()) {
                    std::fs::write(path, new)?;
                    fixed.push(path.to_path_buf());
                }
            }
        }
        Ok(())
    })
    .with_context(|| format!("fixing absolute paths under {}", root.display()))?;
    for path in fixed {
        note(format!(
            "  repointed into the cache: {}",
            path.strip_prefix(root).unwrap_or(&path).display()
        ));
    }
    Ok(())
}

/// Calls `visit` on every entry under `dir` (not following links).
fn walk(
    dir: &Path,
    visit: &mut dyn FnMut(&Path, std::fs::FileType) -> std::io::Result<()>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let file_type = entry.file_type()?;
        visit(&entry.path(), file_type)?;
        if file_type.is_dir() {
            walk(&entry.path(), visit)?;
        }
    }
    Ok(())
}

/// `text` with every absolute path that starts with one of [`INSTALLED_PREFIXES`] prefixed by
/// `root`, or `None` if there is none. A match counts only at the start of a path (not
/// preceded by a path character), so `/x/usr/src/linux-...` is left alone.
pub(crate) fn rewrite_absolute(text: &[u8], root: &[u8]) -> Option<Vec<u8>> {
    let is_path_char = |b: u8| b.is_ascii_alphanumeric() || b"._-/+~".contains(&b);
    let mut out = Vec::with_capacity(text.len());
    let mut changed = false;
    let mut i = 0;
    while i < text.len() {
        let at_path_start = i == 0 || !is_path_char(text[i - 1]);
        if at_path_start
            && INSTALLED_PREFIXES
                .iter()
                .any(|p| text[i..].starts_with(p.as_bytes()))
        {
            out.extend_from_slice(root);
            changed = true;
        }
        out.push(text[i]);
        i += 1;
    }
    changed.then_some(out)
}

/// Checks what building a module against the extracted headers needs: the kbuild tools
/// reachable through the headers' `scripts` link, and the compiler the kernel was built with
/// (`CC` in `.kernelvariables`), which is installed if missing.
fn check_headers(kernel: &Kernel, apt: &mut Apt) -> anyhow::Result<()> {
    let modpost = kernel.headers_dir.join("scripts/mod/modpost");
    if !modpost.exists() {
        bail!(
            "{} is missing: the headers' scripts link does not reach the extracted linux-kbuild package",
            modpost.display()
        );
    }
    let variables =
        std::fs::read_to_string(kernel.headers_dir.join(".kernelvariables")).unwrap_or_default();
    // "CC = $(if $(DEBIAN_KERNEL_USE_CCACHE),$(CCACHE)) $(CROSS_COMPILE)gcc-12"
    let compiler = variables
        .lines()
        .filter(|l| l.trim_start().starts_with("CC "))
        .flat_map(str::split_whitespace)
        .filter_map(|word| word.rsplit(')').next())
        .find(|word| word.starts_with("gcc"));
    if let Some(gcc) = compiler {
        if !crate::cmd::on_path(gcc) {
            note(format!(
                "the kernel was built with {gcc}, which is missing: installing it"
            ));
            apt.install(&[gcc])?;
        }
    }
    Ok(())
}

/// Makes sure [`Kernel::vmlinux`] is there: downloads `linux-image-<release>-dbg`, extracts
/// only the vmlinux from it, deletes the package. Holds a lock meanwhile, so that
/// concurrent setups download it once.
fn ensure_vmlinux(kernel: &Kernel, apt: &mut Apt) -> anyhow::Result<()> {
    let dir = kernel
        .vmlinux
        .parent()
        .context("the vmlinux path has no folder")?
        .to_path_buf();
    if !kernel.vmlinux.exists() {
        let _lock = lock(&dir.join("vmlinux.lock"))?;
        if !kernel.vmlinux.exists() {
            fetch_vmlinux(kernel, apt, &dir)?;
        }
    }
    // A convenience link for people typing the path.
    let link = dir.join("vmlinux");
    let target = PathBuf::from(kernel.vmlinux.file_name().context("vmlinux has no name")?);
    ensure_symlink(&target, &link)?;
    note(format!(
        "kernel debug info ready: {}",
        kernel.vmlinux.display()
    ));
    Ok(())
}

fn fetch_vmlinux(kernel: &Kernel, apt: &mut Apt, dir: &Path) -> anyhow::Result<()> {
    let package = format!("linux-image-{}-dbg", kernel.release);
    // Debian 13's comes through the Debian 13 system's apt, into a folder it can reach.
    let scratch = match &kernel.chroot {
        Some(_) => kernel
            .scratch_base()
            .join(format!("dbg-{}", kernel.release)),
        None => dir.join("dbg.partial"),
    };
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)
            .with_context(|| format!("removing the leftover {}", scratch.display()))?;
    }
    std::fs::create_dir_all(&scratch)?;
    note(format!(
        "apt-get download {package} (300 MB to 1 GB, once: only its vmlinux is kept)"
    ));
    let deb = match kernel.chroot {
        Some(_) => crate::debian13::download(kernel, &package, &scratch)?,
        None => download_dbg(apt, &package, &scratch)?,
    };
    let inside = format!("./usr/lib/debug/boot/vmlinux-{}", kernel.release);
    note(format!("extracting {inside} from {package}"));
    extract_one(&deb, &inside, &scratch)?;
    let extracted = scratch.join(&inside);
    if !extracted.is_file() {
        bail!(
            "{package} has no {inside}: has Debian moved the kernel's debug info? (dpkg -c {})",
            deb.display()
        );
    }
    std::fs::rename(&extracted, &kernel.vmlinux).with_context(|| {
        format!(
            "moving {} to {}",
            extracted.display(),
            kernel.vmlinux.display()
        )
    })?;
    std::fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    Ok(())
}

/// Downloads `package` with this machine's apt into `scratch`; returns the `.deb`.
fn download_dbg(apt: &mut Apt, package: &str, scratch: &Path) -> anyhow::Result<PathBuf> {
    let mut download = Command::new("apt-get");
    download
        .args(["download", "-o", "APT::Sandbox::User=root", package])
        .current_dir(scratch);
    if let Err(first) = run_captured(&mut download) {
        if !apt.update_once()? {
            return Err(first.context(format!("downloading {package} failed")));
        }
        run_captured(&mut download).with_context(|| {
            format!(
                "downloading {package} failed even after apt-get update: is the bookworm \
                     security archive in sources.list (apt-cache policy {package})?"
            )
        })?;
    }
    find_deb(scratch, package)
        .with_context(|| format!("apt-get download left no .deb for {package}"))
}

/// Extracts the one member `inside` (as `./path`) of the package `deb` under `into`, streaming
/// `dpkg-deb --fsys-tarfile` into `tar` so that nothing else of the package touches the disk.
fn extract_one(deb: &Path, inside: &str, into: &Path) -> anyhow::Result<()> {
    use std::process::Stdio;
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run dpkg-deb: is this a Debian system?")?;
    let tar_out = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(into)
        .arg(inside)
        .stdin(dpkg.stdout.take().expect("piped"))
        .output();
    let dpkg_status = dpkg.wait()?;
    let tar_out = tar_out.context("cannot run tar")?;
    if !tar_out.status.success() || !dpkg_status.success() {
        // A truncated download is the likely cause: drop it so that the next run fetches it.
        let _ = std::fs::remove_file(deb);
        bail!(
            "extracting {inside} from {} failed (dpkg-deb: {dpkg_status}, tar: {}: {}); the \
             package was deleted, run `cargo xtask setup` again to download it",
            deb.display(),
            tar_out.status,
            String::from_utf8_lossy(&tar_out.stderr).trim()
        );
    }
    Ok(())
}

/// An exclusive `flock` on `path` (created if needed), released when the file is dropped.
fn lock(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd as _;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening the lock {}", path.display()))?;
    // SAFETY: flock only acts on the descriptor, which `file` keeps open for the call.
    let busy = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0;
    if busy {
        note(format!(
            "waiting for another setup that holds {}",
            path.display()
        ));
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!(
                "cannot lock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_abi_comes_from_the_metapackage_dependency() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            parse_meta_depends(out, "cloud-amd64").as_deref(),
            Some("6.1.0-56")
        );
        assert_eq!(
            parse_meta_depends(out, "amd64"),
            None,
            "not the generic one"
        );
        assert_eq!(
            parse_meta_depends("linux-image-cloud-amd64\n", "cloud-amd64"),
            None
        );
        // Debian 13's headers, as its metapackage names them.
        let headers = "linux-headers-6.12.117+deb13-amd64";
        assert_eq!(
            abi_of(headers, "linux-headers-", "amd64").as_deref(),
            Some("6.12.117+deb13")
        );
        let cloud = "linux-headers-6.12.117+deb13-cloud-amd64";
        assert_eq!(abi_of(cloud, "linux-headers-", "amd64"), None);
        assert_eq!(
            abi_of(cloud, "linux-headers-", "cloud-amd64").as_deref(),
            Some("6.12.117+deb13")
        );
    }

    #[test]
    fn dependencies_are_picked_by_name() {
        let depends = "linux-headers-6.1.0-56-common (= 6.1.192-2), linux-kbuild-6.1 (>= 6.1.192-2), linux-compiler-gcc-12-x86";
        assert_eq!(
            dependency(depends, |p| p.ends_with("-common")).as_deref(),
            Some("linux-headers-6.1.0-56-common")
        );
        assert_eq!(
            dependency(depends, |p| p.starts_with("linux-kbuild-")).as_deref(),
            Some("linux-kbuild-6.1")
        );
    }

    #[test]
    fn absolute_paths_are_repointed_once() {
        let text = b"include /usr/src/linux-headers-6.1.0-56-common/Makefile\nX=/usr/lib/linux-kbuild-6.1/scripts\n";
        let out = rewrite_absolute(text, b"/c/root").unwrap();
        assert_eq!(
            out,
            b"include /c/root/usr/src/linux-headers-6.1.0-56-common/Makefile\nX=/c/root/usr/lib/linux-kbuild-6.1/scripts\n"
        );
        assert_eq!(
            rewrite_absolute(&out, b"/c/root"),
            None,
            "already rewritten paths stay"
        );
        assert_eq!(rewrite_absolute(b"nothing here", b"/c/root"), None);
    }
}
