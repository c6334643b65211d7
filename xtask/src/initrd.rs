//! The guest's initramfs: busybox, `/init` ([`INIT_SCRIPT`]), Quicksilver's agent, hv image
//! and tools, and the stock KVM modules (to check that Quicksilver and KVM exclude each other).
//!
//! Guest layout:
//!
//! ```text
//! /init                             busybox sh script, see xtask/src/init.sh
//! /bin/busybox, /bin/<applet>       links for the applets scripts use
//! /etc/shrc                        the interactive shell's $ENV (see SHELL_RC)
//! /bin/qsctl, /bin/qs-workload      the static guest tools
//! /lib/quicksilver/hv.img           the hv image
//! /lib/quicksilver/quicksilver.ko   the agent
//! /lib/quicksilver/kvm-modules      paths of the KVM modules, one a line, in insmod order
//! /lib/quicksilver/disk-modules     the same for the disk driver (virtio_blk), for tests
//! /lib/quicksilver/net-modules      the same for Linux's own NIC drivers (virtio_net, e1000e),
//!                                   for the fast link's hand-over tests
//! /lib/modules-extra/*.ko           those modules (kvm-amd, virtio_blk, virtio_net, e1000e,
//!                                   and what they need)
//! /qs/script.sh                     per run: appended by the runner (qs_testkit::qemu)
//! ```
//!
//! The archive is written with `qs_testkit::initramfs` (newc, through the `cpio` crate), which
//! also appends each run's files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use object::read::elf::{FileHeader as _, SectionHeader as _};

use qs_testkit::initramfs::{write_atomically, Archive};

/// The guest's `/init`.
pub const INIT_SCRIPT: &str = include_str!("init.sh");

/// Busybox applets linked in `/bin`: everything `/init` and the tests' scripts use. (`/init`
/// links the rest at boot for interactive use.)
pub const APPLETS: &[&str] = &[
    "sh",
    "ash",
    "[",
    "test",
    "mount",
    "umount",
    "insmod",
    "rmmod",
    "lsmod",
    "modinfo",
    "dmesg",
    "cat",
    "echo",
    "printf",
    "sleep",
    "usleep",
    "grep",
    "sed",
    "awk",
    "cut",
    "tr",
    "sort",
    "uniq",
    "head",
    "tail",
    "wc",
    "setsid",
    "cttyhack",
    "ls",
    "ps",
    "kill",
    "killall",
    "pidof",
    "taskset",
    "mkdir",
    "rm",
    "cp",
    "mv",
    "ln",
    "chmod",
    "touch",
    "true",
    "false",
    "seq",
    "date",
    "uname",
    "mknod",
    "hostname",
    "nproc",
    "free",
    "uptime",
    "timeout",
    "time",
    "xargs",
    "env",
    "expr",
    "tee",
    "find",
    "stat",
    "readlink",
    "basename",
    "dirname",
    "hexdump",
    "od",
    "dd",
    "sync",
    "stty",
    "id",
    "top",
    "watch",
    "yes",
    "md5sum",
    "sha256sum",
    "vi",
    "less",
    "clear",
];

/// `$ENV` of the interactive shell. busybox's `poweroff` and `reboot` (run as built-in
/// applets, whatever is in `/bin`) only signal init, and `/init` is a shell script that cannot
/// act on a signal while it waits for this shell: shell functions, which win over applets,
/// force them instead (there is no disk to sync).
pub const SHELL_RC: &str = "\
poweroff() { /bin/busybox poweroff -f; }
halt() { /bin/busybox poweroff -f; }
reboot() { /bin/busybox reboot -f; }
";

/// Where the KVM modules go in the guest, and the list that orders them.
pub const KVM_MODULES_DIR: &str = "lib/modules-extra";
/// The file listing them in load order.
pub const KVM_MODULES_LIST: &str = "lib/quicksilver/kvm-modules";
/// Paths of the disk driver's modules, one a line, in insmod order.
pub const DISK_MODULES_LIST: &str = "lib/quicksilver/disk-modules";
/// The same for the NIC drivers the fast link takes its NIC from and gives it back to.
pub const NET_MODULES_LIST: &str = "lib/quicksilver/net-modules";

/// A loadable kernel module found in the kernel package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelModule {
    /// Its name as the kernel knows it (`kvm_amd`).
    pub name: String,
    /// The `.ko` file.
    pub path: PathBuf,
}

/// What goes into the base initramfs. Missing optional parts (a component that failed to
/// build) are left out; `/init` then says so on the console.
#[derive(Clone, Debug, Default)]
pub struct InitrdInputs {
    /// The static busybox.
    pub busybox: PathBuf,
    /// `hv.img`.
    pub hv_image: Option<PathBuf>,
    /// `quicksilver.ko`.
    pub agent: Option<PathBuf>,
    /// The `qsctl` binary.
    pub qsctl: Option<PathBuf>,
    /// The `qs-workload` binary.
    pub workload: Option<PathBuf>,
    /// Kernel modules to ship, in load order.
    pub kvm_modules: Vec<KernelModule>,
    /// The disk driver's modules, in load order (listed in [`DISK_MODULES_LIST`]).
    pub disk_modules: Vec<KernelModule>,
    /// Linux's own NIC driver's modules, in load order (listed in [`NET_MODULES_LIST`]).
    pub net_modules: Vec<KernelModule>,
}

/// Writes the base initramfs to `out` (atomically: a concurrent reader never sees half of it).
pub fn write_base(inputs: &InitrdInputs, out: &Path) -> anyhow::Result<()> {
    let read = |p: &Path| {
        std::fs::read(p).with_context(|| format!("reading {} for the initramfs", p.display()))
    };
    let mut a = Archive::new(Vec::new(), 1);
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "root",
        "etc",
        "lib",
        "lib/quicksilver",
        KVM_MODULES_DIR,
    ] {
        a.dir(dir, 0o755)?;
    }
    a.char_dev("dev/console", 0o600, 5, 1)?;
    a.file("init", 0o755, INIT_SCRIPT.as_bytes())?;
    a.file("bin/busybox", 0o755, &read(&inputs.busybox)?)?;
    for applet in APPLETS {
        a.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    a.file("etc/shrc", 0o644, SHELL_RC.as_bytes())?;
    for (dest, src) in [
        ("bin/qsctl", &inputs.qsctl),
        ("bin/qs-workload", &inputs.workload),
        ("lib/quicksilver/hv.img", &inputs.hv_image),
        ("lib/quicksilver/quicksilver.ko", &inputs.agent),
    ] {
        if let Some(src) = src {
            a.file(dest, 0o755, &read(src)?)?;
        }
    }
    let mut shipped = std::collections::BTreeSet::new();
    for (modules, list_path) in [
        (&inputs.kvm_modules, KVM_MODULES_LIST),
        (&inputs.disk_modules, DISK_MODULES_LIST),
        (&inputs.net_modules, NET_MODULES_LIST),
    ] {
        let mut list = String::new();
        for m in modules {
            let file = m
                .path
                .file_name()
                .context("module path has no file name")?
                .to_string_lossy();
            // busybox's insmod hands the kernel the bytes as they are: ship them uncompressed.
            let file = file.strip_suffix(".xz").unwrap_or(&file);
            // Once, if two lists share it (the disk's and the NIC's virtio_pci).
            if shipped.insert(file.to_string()) {
                a.file(
                    &format!("{KVM_MODULES_DIR}/{file}"),
                    0o644,
                    &read_module(&m.path)?,
                )?;
            }
            list.push_str(&format!("/{KVM_MODULES_DIR}/{file}\n"));
        }
        a.file(list_path, 0o644, list.as_bytes())?;
    }
    write_atomically(out, &a.finish()?)
}

/// The modules `wanted` need, in an order `insmod` accepts (dependencies first), read from
/// each module's `.modinfo` `depends=` (the package ships no `modules.dep`: depmod writes it
/// at install).
/// A wanted module the kernel has built in (`modules.builtin`) needs nothing.
pub fn module_load_order(modules_dir: &Path, wanted: &[&str]) -> anyhow::Result<Vec<KernelModule>> {
    let index = module_index(modules_dir)?;
    let builtin = std::fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    let builtin: Vec<String> = builtin
        .lines()
        .filter_map(|l| Path::new(l).file_stem())
        .map(|s| s.to_string_lossy().replace('-', "_"))
        .collect();
    let mut order = Vec::new();
    let mut state = BTreeMap::new();
    for name in wanted {
        let name = name.replace('-', "_");
        if !index.contains_key(&name) && builtin.contains(&name) {
            continue;
        }
        visit(&index, &name, &mut state, &mut order)?;
    }
    Ok(order)
}

/// [`module_load_order`] of those of `wanted` this kernel has at all, as a module or built in:
/// for drivers a test uses only where they exist (Debian's cloud flavours have no `e1000e`).
pub fn module_load_order_available(
    modules_dir: &Path,
    wanted: &[&str],
) -> anyhow::Result<Vec<KernelModule>> {
    let index = module_index(modules_dir)?;
    let builtin = std::fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    let present: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|name| {
            let name = name.replace('-', "_");
            index.contains_key(&name)
                || builtin.lines().any(|l| {
                    Path::new(l)
                        .file_stem()
                        .is_some_and(|s| s.to_string_lossy().replace('-', "_") == name)
                })
        })
        .collect();
    module_load_order(modules_dir, &present)
}

/// Depth-first, dependencies before dependents; `state` marks modules in progress (false)
/// and done (true) to catch cycles.
fn visit(
    index: &BTreeMap<String, PathBuf>,
    name: &str,
    state: &mut BTreeMap<String, bool>,
    order: &mut Vec<KernelModule>,
) -> anyhow::Result<()> {
    match state.get(name) {
        Some(true) => return Ok(()),
        Some(false) => bail!("kernel modules depend on each other in a cycle through {name}"),
        None => {}
    }
    let path = index
        .get(name)
        .with_context(|| format!("kernel module {name} is not in the kernel package"))?;
    state.insert(name.to_string(), false);
    for dep in module_depends(path)? {
        visit(index, &dep, state, order)?;
    }
    state.insert(name.to_string(), true);
    order.push(KernelModule {
        name: name.to_string(),
        path: path.clone(),
    });
    Ok(())
}

/// Every module under `modules_dir/kernel`, by kernel name (`-` read as `_`, as the kernel
/// does): `.ko` files, or `.ko.xz` ones (Debian compresses 6.12's modules).
fn module_index(modules_dir: &Path) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut index = BTreeMap::new();
    let mut unsupported = None;
    let mut stack = vec![modules_dir.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else if let Some(stem) = name
                .strip_suffix(".ko")
                .or_else(|| name.strip_suffix(".ko.xz"))
            {
                index.insert(stem.replace('-', "_"), path);
            } else if [".ko.zst", ".ko.gz"].iter().any(|s| name.ends_with(s)) {
                unsupported = Some(path);
            }
        }
    }
    if index.is_empty() {
        if let Some(path) = unsupported {
            bail!(
                "this kernel's modules are compressed in a way the initramfs builder does not read ({}): \
                 it reads .ko and .ko.xz; teach read_module in xtask/src/initrd.rs the other",
                path.display()
            );
        }
        bail!(
            "no kernel modules under {}: is the kernel package extracted (cargo xtask setup)?",
            modules_dir.display()
        );
    }
    Ok(index)
}

/// A module's ELF bytes: the file, or for `.ko.xz` its decompressed contents (`xz -dc`).
pub fn read_module(ko: &Path) -> anyhow::Result<Vec<u8>> {
    if ko.extension().is_some_and(|e| e == "xz") {
        let out = std::process::Command::new("xz")
            .arg("-dc")
            .arg(ko)
            .output()
            .context("cannot run xz to decompress a kernel module: apt-get install xz-utils")?;
        if !out.status.success() {
            bail!(
                "xz -dc {} failed ({}): {}; is the kernel package extracted completely? (cargo xtask setup)",
                ko.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        return Ok(out.stdout);
    }
    std::fs::read(ko).with_context(|| format!("reading {}", ko.display()))
}

/// The `key=value` entries of a `.ko`'s `.modinfo` section (what `modinfo` prints), in order.
pub fn modinfo(ko: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let data = read_module(ko)?;
    let parse = || -> Result<Vec<(String, String)>, object::read::Error> {
        let header = object::elf::FileHeader64::<object::LittleEndian>::parse(&*data)?;
        let endian = header.endian()?;
        let sections = header.sections(endian, &*data)?;
        let Some((_, section)) = sections.section_by_name(endian, b".modinfo") else {
            return Ok(Vec::new());
        };
        // NUL-separated strings, with NUL padding between some of them.
        Ok(section
            .data(endian, &*data)?
            .split(|&b| b == 0)
            .filter_map(|entry| {
                let entry = String::from_utf8_lossy(entry);
                let (key, value) = entry.split_once('=')?;
                Some((key.to_string(), value.to_string()))
            })
            .collect())
    };
    parse().with_context(|| format!("reading the .modinfo of {}", ko.display()))
}

/// The modules a `.ko` needs loaded first (its `depends=`), with kernel names (`_`, not `-`).
pub fn module_depends(ko: &Path) -> anyhow::Result<Vec<String>> {
    Ok(modinfo(ko)?
        .into_iter()
        .filter(|(key, _)| key == "depends")
        .flat_map(|(_, list)| {
            list.split(',')
                .filter(|name| !name.is_empty())
                .map(|name| name.replace('-', "_"))
                .collect::<Vec<_>>()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_init_script_prints_the_markers_the_runner_parses() {
        for marker in [
            "QS-BOOTED",
            "QS-SCRIPT-EXIT $?",
            "/qs/script.sh",
            "qs.noload",
            "poweroff -f",
        ] {
            assert!(INIT_SCRIPT.contains(marker), "{marker}");
        }
    }
}
