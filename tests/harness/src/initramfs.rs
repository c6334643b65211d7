//! Writing initramfs archives: the "newc" cpio format, the only one Linux unpacks into its
//! initramfs (`init/initramfs.c`; `Documentation/driver-api/early-userspace/buffer-format.rst`).
//! The `cpio` crate writes the headers and padding; this module adds what the kernel needs on
//! top: an inode number of its own for every entry (the kernel hard-links entries that share
//! one with nlink >= 2), directories before their contents, device nodes, and everything owned
//! by root and dated 0, so that the same inputs give the same bytes.
//!
//! The kernel accepts several archives one after the other (it skips NUL padding between
//! them). That is how a run adds its script and files to the prebuilt initramfs without
//! rewriting it ([`with_files`]); `xtask/src/initrd.rs` writes the base.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::path::Path;

use anyhow::Context as _;

/// File type bits of `st_mode` (`S_IFMT` and friends).
pub const S_IFDIR: u32 = 0o040_000;
pub const S_IFREG: u32 = 0o100_000;
pub const S_IFLNK: u32 = 0o120_000;
pub const S_IFCHR: u32 = 0o020_000;

/// Name of the entry that ends an archive.
const TRAILER: &str = "TRAILER!!!";

/// An archive being written to `W`. Entries are written as they are added; call
/// [`Archive::finish`] to write the trailer.
///
/// Names are paths relative to the root (`bin/busybox`); a leading `/` is stripped. Parents
/// must be added before their children, as the kernel creates entries in order.
pub struct Archive<W: Write> {
    out: W,
    next_ino: u32,
}

impl<W: Write> Archive<W> {
    /// Starts an archive. `first_ino` lets an archive appended to another one use inode
    /// numbers of its own.
    pub fn new(out: W, first_ino: u32) -> Self {
        Archive {
            out,
            next_ino: first_ino,
        }
    }

    /// Adds a directory with permission bits `perm` (e.g. `0o755`).
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// Adds a regular file holding `data`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// Adds a symbolic link `name -> target`; newc stores the target as the entry's data.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Adds a character device node (e.g. `dev/console`, 5:1). The kernel needs
    /// `/dev/console` in the initramfs itself: it opens it for init's stdin/stdout before
    /// init has had a chance to mount devtmpfs.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the writer. The archive's length is then a multiple of
    /// 4, so another archive may follow directly.
    pub fn finish(mut self) -> io::Result<W> {
        cpio::newc::trailer(&mut self.out)?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        (rdev_major, rdev_minor): (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        if name.is_empty() || name == TRAILER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cpio entry name {name:?} is reserved or empty"),
            ));
        }
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: over 4 GiB, too big for newc"),
            )
        })?;
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        // uid, gid and mtime stay the builder's 0.
        let mut writer = cpio::NewcBuilder::new(name)
            .ino(ino)
            .mode(mode)
            .nlink(nlink)
            .rdev_major(rdev_major)
            .rdev_minor(rdev_minor)
            .write(&mut self.out, size);
        writer.write_all(data)?;
        writer.finish()?;
        Ok(())
    }
}

/// A file added to an initramfs.
#[derive(Clone, Debug)]
pub struct ExtraFile {
    /// Path in the guest (`/qs/data.bin`).
    pub path: String,
    /// Permission bits.
    pub mode: u32,
    /// Contents.
    pub data: Vec<u8>,
}

/// Writes to `out` a copy of the initramfs `base` followed by a second archive holding
/// `files` (and their parent directories). Linux unpacks both, the later one winning, so this
/// also replaces files of the base.
pub fn with_files(base: &Path, files: &[ExtraFile], out: &Path) -> anyhow::Result<()> {
    let mut bytes = std::fs::read(base)
        .with_context(|| format!("reading the base initramfs {}", base.display()))?;
    // Inode numbers of their own, far above the base archive's.
    let mut a = Archive::new(Vec::new(), 1 << 20);
    let mut dirs = BTreeSet::new();
    for f in files {
        let mut parent = Path::new(f.path.trim_start_matches('/')).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(p.to_string_lossy().into_owned());
            parent = p.parent();
        }
    }
    // BTreeSet order puts "a" before "a/b": parents first, as the kernel needs.
    for dir in &dirs {
        a.dir(dir, 0o755)?;
    }
    for f in files {
        a.file(&f.path, f.mode, &f.data)?;
    }
    bytes.extend(a.finish()?);
    write_atomically(out, &bytes)
}

/// Writes `bytes` to `out` through a temporary file and a rename, so that a concurrent reader
/// (a test booting the base initramfs while it is rebuilt) never sees half of it.
pub fn write_atomically(out: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)?;
    drop(file);
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One entry read back: name, mode, nlink, rdev (major, minor), data.
    type Entry = (String, u32, u32, (u32, u32), Vec<u8>);

    /// Reads every archive in `bytes` back with the `cpio` crate's reader, the way the kernel
    /// walks them (skipping NUL padding between archives), checking owner and date.
    fn read_back(bytes: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            if rest[0] == 0 {
                rest = &rest[1..];
                continue;
            }
            assert_eq!((bytes.len() - rest.len()) % 4, 0, "entries are 4-aligned");
            let mut reader = cpio::NewcReader::new(rest).unwrap();
            let e = reader.entry();
            assert_eq!((e.uid(), e.gid(), e.mtime()), (0, 0, 0), "owner and date");
            let (name, mode, nlink) = (e.name().to_string(), e.mode(), e.nlink());
            let rdev = (e.rdev_major(), e.rdev_minor());
            let trailer = e.is_trailer();
            let mut data = Vec::new();
            io::Read::read_to_end(&mut reader, &mut data).unwrap();
            rest = reader.finish().unwrap();
            if !trailer {
                out.push((name, mode, nlink, rdev, data));
            }
        }
        out
    }

    #[test]
    fn entries_round_trip_and_archives_concatenate() {
        let mut a = Archive::new(Vec::new(), 1);
        a.dir("bin", 0o755).unwrap();
        a.file("/bin/busybox", 0o755, b"\x7fELF and so on").unwrap();
        a.symlink("bin/sh", "busybox").unwrap();
        a.char_dev("dev/console", 0o600, 5, 1).unwrap();
        let mut bytes = a.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);

        let mut b = Archive::new(Vec::new(), 1000);
        b.dir("qs", 0o755).unwrap();
        b.file("qs/script.sh", 0o644, b"echo hi\n").unwrap();
        bytes.extend(b.finish().unwrap());

        let entries = read_back(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "dev/console",
                "qs",
                "qs/script.sh"
            ]
        );
        assert_eq!((entries[0].1, entries[0].2), (S_IFDIR | 0o755, 2));
        assert_eq!(entries[1].1, S_IFREG | 0o755);
        assert_eq!(entries[1].4, b"\x7fELF and so on");
        assert_eq!(
            (entries[2].1, entries[2].4.as_slice()),
            (S_IFLNK | 0o777, &b"busybox"[..])
        );
        assert_eq!((entries[3].1, entries[3].3), (S_IFCHR | 0o600, (5, 1)));
        assert_eq!(entries[5].4, b"echo hi\n");
    }

    #[test]
    fn header_layout_matches_the_kernel_documentation() {
        let bytes = {
            let mut a = Archive::new(Vec::new(), 7);
            a.file("a", 0o644, b"xyz").unwrap();
            a.finish().unwrap()
        };
        // 110-byte header + "a\0" = 112 (aligned), then 3 data bytes + 1 pad.
        assert_eq!(
            &bytes[..110],
            b"070701\
              00000007000081a4000000000000000000000001000000000000000300000000\
              0000000000000000000000000000000200000000"
        );
        assert_eq!(&bytes[110..116], b"a\0xyz\0");
        assert_eq!(&bytes[116..122], b"070701");
        // The trailer: inode 0, nlink 1, its 11-byte name, padded to a multiple of 4.
        assert_eq!(
            &bytes[116..],
            b"070701\
              00000000000000000000000000000000000000010000000000000000000000000000000000000000\
              000000000000000b00000000TRAILER!!!\0\0\0\0"
        );
    }

    #[test]
    fn reserved_names_are_refused() {
        let mut a = Archive::new(Vec::new(), 1);
        assert!(a.file("TRAILER!!!", 0o644, b"").is_err());
        assert!(a.dir("/", 0o755).is_err());
    }

    #[test]
    fn extra_files_get_their_parents_and_follow_the_base() {
        let dir = std::env::temp_dir().join(format!("qs-initramfs-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base.cpio");
        let mut a = Archive::new(Vec::new(), 1);
        a.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        std::fs::write(&base, a.finish().unwrap()).unwrap();

        let out = dir.join("run.cpio");
        let script = ExtraFile {
            path: "/qs/script.sh".into(),
            mode: 0o755,
            data: b"echo hello\n".to_vec(),
        };
        with_files(&base, &[script], &out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let base_bytes = std::fs::read(&base).unwrap();
        assert_eq!(&bytes[..base_bytes.len()], &base_bytes[..]);
        let names: Vec<String> = read_back(&bytes).into_iter().map(|e| e.0).collect();
        assert_eq!(
            names,
            ["init", "qs", "qs/script.sh"],
            "the directory comes first"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
