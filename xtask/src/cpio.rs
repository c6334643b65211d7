//! A writer for the "newc" cpio format, the only archive format Linux unpacks into its
//! initramfs (`init/initramfs.c`, documented in `Documentation/driver-api/early-userspace/
//! buffer-format.rst`).
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex fields), the
//! NUL-terminated name padded to a multiple of 4 bytes (counting the header), then the data
//! padded the same way. An entry named `TRAILER!!!` ends an archive. The kernel accepts several
//! archives one after the other (it skips NUL padding between them), which is how a per-run
//! script is added to a prebuilt initramfs without rewriting it: see [`Archive::finish`].
//!
//! Everything is owned by root (uid = gid = 0) and dated 0, so that the same inputs give the
//! same bytes.

use std::io::{self, Write};

/// File type bits of `st_mode` (`S_IFMT` and friends).
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Magic of the "new ASCII" format without checksums.
const MAGIC: &[u8; 6] = b"070701";
/// Name of the entry that ends an archive.
const TRAILER: &str = "TRAILER!!!";

/// An archive being written to `W`. Entries are written as they are added; call
/// [`Archive::finish`] to write the trailer.
///
/// Names are paths relative to the root (`bin/busybox`); a leading `/` is stripped. Parents
/// must be added before their children, as the kernel creates entries in order.
pub struct Archive<W: Write> {
    out: W,
    /// Bytes written so far, to compute padding.
    written: u64,
    /// Next inode number. Every entry gets its own, so the kernel never mistakes two entries
    /// for hard links of one file (it links entries with the same inode and nlink >= 2).
    next_ino: u32,
}

impl<W: Write> Archive<W> {
    /// Starts an archive. `first_ino` lets an archive appended to another one use inode
    /// numbers of its own.
    pub fn new(out: W, first_ino: u32) -> Self {
        Archive {
            out,
            written: 0,
            next_ino: first_ino,
        }
    }

    /// Adds a directory with permission bits `perm` (e.g. `0o755`).
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, 0, &[])
    }

    /// Adds a regular file holding `data`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, 0, data)
    }

    /// Adds a symbolic link `name -> target`; newc stores the target as the entry's data.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, 1, 0, target.as_bytes())
    }

    /// Adds a character device node (e.g. `dev/console`, 5:1). The kernel needs
    /// `/dev/console` in the initramfs itself: it opens it for init's stdin/stdout before
    /// init has had a chance to mount devtmpfs.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(
            name,
            S_IFCHR | (perm & 0o7777),
            1,
            (major << 8) | (minor & 0xff),
            &[],
        )
    }

    /// Writes the trailer and returns the writer. The archive's length is then a multiple of
    /// 4, so another archive may follow directly.
    pub fn finish(mut self) -> io::Result<W> {
        // The trailer is an ordinary entry with inode 0 and nlink 1.
        self.next_ino = 0;
        self.write_entry(TRAILER, 0, 1, 0, &[])?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        if name.is_empty() || name == TRAILER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cpio entry name {name:?} is reserved or empty"),
            ));
        }
        self.write_entry(name, mode, nlink, rdev, data)
    }

    fn write_entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let filesize = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: over 4 GiB, too big for newc"),
            )
        })?;
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        // Fields in order: ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        // rdevmajor, rdevminor, namesize (with its NUL), check (always 0 for 070701).
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            filesize,
            0,
            0,
            rdev >> 8,
            rdev & 0xff,
            name.len() as u32 + 1,
            0,
        ];
        let mut header = Vec::with_capacity(110 + name.len() + 4);
        header.extend_from_slice(MAGIC);
        for field in fields {
            header.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        self.put(&header)?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Pads with NULs to the next multiple of 4.
    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0; 3][..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One parsed entry: name, mode, rdev (major, minor), data.
    type Parsed = (String, u32, (u32, u32), Vec<u8>);

    /// A minimal newc reader, independent of the writer's code, that walks every archive in
    /// `bytes` the way the kernel does (skipping NUL padding between archives).
    fn parse(bytes: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            if bytes[at] == 0 {
                at += 1;
                continue;
            }
            assert_eq!(at % 4, 0, "header at {at} is not 4-aligned");
            assert_eq!(&bytes[at..at + 6], MAGIC);
            let field = |i: usize| {
                let s = std::str::from_utf8(&bytes[at + 6 + i * 8..at + 14 + i * 8]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let (mode, size, namesize) = (field(1), field(6) as usize, field(11) as usize);
            assert_eq!((field(2), field(3), field(5)), (0, 0, 0), "uid, gid, mtime");
            let name_start = at + 110;
            let name = std::str::from_utf8(&bytes[name_start..name_start + namesize - 1]).unwrap();
            assert_eq!(
                bytes[name_start + namesize - 1],
                0,
                "name is NUL-terminated"
            );
            let data_start = (name_start + namesize).next_multiple_of(4);
            let data = bytes[data_start..data_start + size].to_vec();
            let rdev = (field(9), field(10));
            if name != TRAILER {
                out.push((name.to_string(), mode, rdev, data));
            }
            at = (data_start + size).next_multiple_of(4);
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

        let entries = parse(&bytes);
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
        assert_eq!(entries[0].1, S_IFDIR | 0o755);
        assert_eq!(entries[1].1, S_IFREG | 0o755);
        assert_eq!(entries[1].3, b"\x7fELF and so on");
        assert_eq!(
            (entries[2].1, entries[2].3.as_slice()),
            (S_IFLNK | 0o777, &b"busybox"[..])
        );
        assert_eq!((entries[3].1, entries[3].2), (S_IFCHR | 0o600, (5, 1)));
        assert_eq!(entries[5].3, b"echo hi\n");
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
    }

    #[test]
    fn reserved_names_are_refused() {
        let mut a = Archive::new(Vec::new(), 1);
        assert!(a.file("TRAILER!!!", 0o644, b"").is_err());
        assert!(a.dir("/", 0o755).is_err());
    }
}
