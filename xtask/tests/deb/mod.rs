//! What the package tests share: a scratch folder, the packages built as `cargo xtask package`
//! builds them, and a `.deb` read with dpkg-deb as a user would read it.

// Each test binary includes this module and uses a part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use xtask::package::Packages;

/// A fresh folder under the system's temporary one, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        Scratch::under(&std::env::temp_dir(), name)
    }

    /// A fresh folder under `base` (a chroot's, for a kernel built there).
    pub fn under(base: &Path, name: &str) -> Scratch {
        let dir = base.join(format!("qs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Both packages, built into `scratch/out` exactly as `cargo xtask package` builds them (the
/// binaries by cargo, quick when they are up to date).
pub fn build_packages(scratch: &Scratch) -> Packages {
    xtask::package::package(&scratch.path("out")).unwrap_or_else(|e| panic!("{e:#}"))
}

/// `program`'s stdout; panics with its stderr if it fails.
pub fn output(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A program from /usr/sbin (dkms, modinfo), which a user's PATH may lack.
pub fn sbin(program: &str) -> Command {
    if xtask::cmd::on_path(program) {
        Command::new(program)
    } else {
        Command::new(Path::new("/usr/sbin").join(program))
    }
}

/// One line of `dpkg-deb --contents`.
#[derive(Debug)]
pub struct Entry {
    /// `-rw-r--r--`, `drwxr-xr-x`.
    pub mode: String,
    /// `root/root`.
    pub owner: String,
    pub size: u64,
}

/// A built `.deb`, read through dpkg-deb.
pub struct Deb<'a>(pub &'a Path);

impl Deb<'_> {
    /// A control field (`dpkg-deb --field`).
    pub fn field(&self, name: &str) -> String {
        output(
            Command::new("dpkg-deb")
                .arg("--field")
                .arg(self.0)
                .arg(name),
        )
        .trim()
        .to_string()
    }

    /// Every entry of the data archive by path (`/usr/sbin/qsctl`, directories end in `/`).
    pub fn contents(&self) -> BTreeMap<String, Entry> {
        output(Command::new("dpkg-deb").arg("--contents").arg(self.0))
            .lines()
            .map(|line| {
                // drwxr-xr-x root/root         0 2026-12-06 23:01 ./usr/
                let fields: Vec<&str> = line.split_whitespace().collect();
                assert!(fields.len() >= 6, "unexpected dpkg-deb line: {line}");
                let path = fields[5..].join(" ");
                let path = path.strip_prefix('.').unwrap_or(&path).to_string();
                let entry = Entry {
                    mode: fields[0].to_string(),
                    owner: fields[1].to_string(),
                    size: fields[2].parse().unwrap(),
                };
                (path, entry)
            })
            .collect()
    }

    /// The regular files of the data archive, by path.
    pub fn files(&self) -> BTreeMap<String, Entry> {
        self.contents()
            .into_iter()
            .filter(|(_, e)| e.mode.starts_with('-'))
            .collect()
    }

    /// The files as installed, under `root` (`dpkg-deb --extract`).
    pub fn extract(&self, root: &Path) {
        output(
            Command::new("dpkg-deb")
                .arg("--extract")
                .arg(self.0)
                .arg(root),
        );
    }

    /// `DEBIAN/` (control, maintainer scripts, conffiles) into `dir` (`dpkg-deb --control`).
    pub fn control(&self, dir: &Path) {
        output(
            Command::new("dpkg-deb")
                .arg("--control")
                .arg(self.0)
                .arg(dir),
        );
    }
}
