//! The hv image: one flat, position-independent binary for every OS.
//!
//! ```text
//! offset 0            ImageHeader (this module), 256 bytes
//!        code_start   .text and .rodata: never written after load (checked by `code_crc`)
//!        ...          .data, .got, .bss (zero-filled in the file)
//!        reloc_offset reloc_count little-endian u64 offsets: at each, add the load address
//!        image_size   end of file
//! ```
//!
//! The image is linked at address 0 as a static PIE. `cargo xtask build` flattens its
//! loadable segments, turns every `R_X86_64_RELATIVE` relocation into an offset in the table
//! (the addend is already stored at that offset) and fills in the header. The loader copies
//! the file into memory it owns (followed by [`ImageHeader::required_memory`] bytes of working
//! memory), makes it executable, and calls `init`; `init` applies the relocations itself.
//!
//! Versioning rule: `abi_version` changes whenever the layout of this header, of
//! [`crate::abi::InitArgs`], the entry-point calling conventions or the hypercall numbers
//! change. A loader refuses any version but its own.

/// "QSHVIMG" and a NUL.
pub const IMAGE_MAGIC: [u8; 8] = *b"QSHVIMG\0";
/// The one ABI version this tree speaks.
pub const ABI_VERSION: u32 = 5;
/// Size of [`ImageHeader`] in bytes.
pub const HEADER_SIZE: usize = 256;
/// Largest image a loader accepts (the hv is small; anything bigger is not ours).
pub const MAX_IMAGE_SIZE: u64 = 4 << 20;
/// Page size the image and its working memory are laid out in.
pub const PAGE_SIZE: u64 = 4096;

/// The header at offset 0 of the image. All integers little-endian; offsets from the image's
/// first byte.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageHeader {
    /// [`IMAGE_MAGIC`].
    pub magic: [u8; 8],
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// `size_of::<ImageHeader>()`, so that a loader can tell a header it does not know.
    pub header_size: u32,
    /// Bytes in the image file.
    pub image_size: u64,
    /// CRC-32 of the whole file with this field taken as zero.
    pub checksum: u32,
    /// CRC-32 of `[code_start, code_end)` as built, before relocation: the hv checks its own
    /// code against it at run time.
    pub code_crc: u32,
    /// Start of the code and read-only data.
    pub code_start: u64,
    /// End of the code and read-only data.
    pub code_end: u64,
    /// Offset of the relocation table.
    pub reloc_offset: u64,
    /// Entries in the relocation table.
    pub reloc_count: u64,
    /// `extern "C" fn(&InitArgs) -> i64` ([`crate::abi::Status`]).
    pub entry_init: u64,
    /// `extern "C" fn(cpu: u32) -> i64`, called on every CPU (the agent sends each an IPI).
    pub entry_activate: u64,
    /// `extern "C" fn(op: u64, buf: *mut u8, len: u64) -> i64`, control while dormant.
    pub entry_control: u64,
    /// Working memory the hv needs regardless of CPUs and RAM.
    pub mem_fixed: u64,
    /// Working memory per possible CPU.
    pub mem_per_cpu: u64,
    /// Working memory per GiB of physical address space (page tables).
    pub mem_per_gib: u64,
    /// Most CPUs this image supports.
    pub max_cpus: u32,
    /// Reserved, zero.
    pub flags: u32,
    /// The hv's version, NUL-padded UTF-8 (`"0.1.0"`).
    pub version: [u8; 32],
    /// Reserved, zero.
    pub reserved: [u8; 104],
}

const _: () = assert!(core::mem::size_of::<ImageHeader>() == HEADER_SIZE);
const _: () = assert!(core::mem::offset_of!(ImageHeader, checksum) == 24);
const _: () = assert!(core::mem::offset_of!(ImageHeader, entry_init) == 64);
const _: () = assert!(core::mem::offset_of!(ImageHeader, mem_fixed) == 88);
const _: () = assert!(core::mem::offset_of!(ImageHeader, version) == 120);

/// Byte offset of [`ImageHeader::checksum`].
pub const CHECKSUM_OFFSET: usize = core::mem::offset_of!(ImageHeader, checksum);

/// Why an image was refused. Every variant says what is wrong; [`ImageError::fix`] says what
/// to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageError {
    /// Shorter than a header.
    TooShort { len: u64 },
    /// First eight bytes are not [`IMAGE_MAGIC`].
    BadMagic,
    /// Built for another ABI.
    VersionMismatch { found: u32, expected: u32 },
    /// Header size field differs from this tree's header.
    BadHeaderSize { found: u32 },
    /// `image_size` disagrees with the file, or is over [`MAX_IMAGE_SIZE`].
    BadSize { declared: u64, actual: u64 },
    /// A field points outside the image or is misaligned.
    BadLayout { field: &'static str },
    /// The checksum does not match: the file is corrupt.
    BadChecksum { declared: u32, computed: u32 },
}

impl ImageError {
    /// One line for a user: what to do about it.
    pub fn fix(&self) -> &'static str {
        match self {
            ImageError::VersionMismatch { .. } => {
                "rebuild the hv image and the agent from the same tree (cargo xtask build)"
            }
            _ => "the file is not an intact hv image: rebuild it with cargo xtask build",
        }
    }
}

impl core::fmt::Display for ImageError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ImageError::TooShort { len } => {
                write!(
                    f,
                    "image is {len} bytes, shorter than its {HEADER_SIZE}-byte header"
                )
            }
            ImageError::BadMagic => write!(f, "bad magic: not a Quicksilver hv image"),
            ImageError::VersionMismatch { found, expected } => {
                write!(f, "image ABI version {found}, this agent speaks {expected}")
            }
            ImageError::BadHeaderSize { found } => {
                write!(f, "header size {found}, expected {HEADER_SIZE}")
            }
            ImageError::BadSize { declared, actual } => write!(
                f,
                "image declares {declared} bytes but has {actual} (limit {MAX_IMAGE_SIZE})"
            ),
            ImageError::BadLayout { field } => write!(f, "header field {field} is out of bounds"),
            ImageError::BadChecksum { declared, computed } => write!(
                f,
                "checksum mismatch: header says {declared:#010x}, contents give {computed:#010x}"
            ),
        }
    }
}

impl ImageHeader {
    /// Reads the header from the first bytes of `bytes`, without checking it.
    pub fn read(bytes: &[u8]) -> Result<ImageHeader, ImageError> {
        if bytes.len() < HEADER_SIZE {
            return Err(ImageError::TooShort {
                len: bytes.len() as u64,
            });
        }
        // SAFETY: `bytes` holds at least HEADER_SIZE bytes, ImageHeader is repr(C) with only
        // integer and byte-array fields (every bit pattern is valid), and read_unaligned does
        // not require alignment.
        Ok(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<ImageHeader>()) })
    }

    /// The header as bytes, for writing an image.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        // SAFETY: ImageHeader is repr(C), exactly HEADER_SIZE bytes (checked above), and has
        // no padding: every field is naturally aligned and the sizes add up to HEADER_SIZE.
        unsafe { core::mem::transmute_copy(self) }
    }

    /// Checks everything a loader must check before running any of the image: magic, ABI
    /// version, header and file sizes, that every offset lies inside the image, and the
    /// checksum. Returns the header on success.
    pub fn validate(bytes: &[u8]) -> Result<ImageHeader, ImageError> {
        let h = ImageHeader::read(bytes)?;
        if h.magic != IMAGE_MAGIC {
            return Err(ImageError::BadMagic);
        }
        if h.abi_version != ABI_VERSION {
            return Err(ImageError::VersionMismatch {
                found: h.abi_version,
                expected: ABI_VERSION,
            });
        }
        if h.header_size as usize != HEADER_SIZE {
            return Err(ImageError::BadHeaderSize {
                found: h.header_size,
            });
        }
        let actual = bytes.len() as u64;
        if h.image_size != actual || actual > MAX_IMAGE_SIZE {
            return Err(ImageError::BadSize {
                declared: h.image_size,
                actual,
            });
        }
        let inside = |off: u64| off >= HEADER_SIZE as u64 && off < actual;
        for (field, off) in [
            ("entry_init", h.entry_init),
            ("entry_activate", h.entry_activate),
            ("entry_control", h.entry_control),
        ] {
            if !inside(off) || off < h.code_start || off >= h.code_end {
                return Err(ImageError::BadLayout { field });
            }
        }
        if h.code_start > h.code_end || h.code_end > actual {
            return Err(ImageError::BadLayout { field: "code_end" });
        }
        let table_bytes = h.reloc_count.checked_mul(8);
        match table_bytes.and_then(|n| h.reloc_offset.checked_add(n)) {
            Some(end) if h.reloc_offset % 8 == 0 && end <= actual => {}
            _ => {
                return Err(ImageError::BadLayout {
                    field: "reloc_offset",
                })
            }
        }
        let computed = checksum(bytes);
        if computed != h.checksum {
            return Err(ImageError::BadChecksum {
                declared: h.checksum,
                computed,
            });
        }
        // Every relocation must patch 8 bytes inside the image, outside the header.
        for i in 0..h.reloc_count as usize {
            let at = h.reloc_offset as usize + i * 8;
            let off = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
            if off < HEADER_SIZE as u64 || off.checked_add(8).is_none_or(|e| e > actual) {
                return Err(ImageError::BadLayout {
                    field: "relocation entry",
                });
            }
        }
        Ok(h)
    }

    /// Working memory needed after the image for `cpus` CPUs and physical addresses up to
    /// `phys_limit`, in bytes (page multiple). The agent allocates the image, rounded up to a
    /// page, plus this.
    pub fn required_memory(&self, cpus: u32, phys_limit: u64) -> u64 {
        let gib = phys_limit.div_ceil(1 << 30);
        self.mem_fixed + self.mem_per_cpu * cpus as u64 + self.mem_per_gib * gib
    }

    /// The version string.
    pub fn version_str(&self) -> &str {
        let end = self
            .version
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.version.len());
        core::str::from_utf8(&self.version[..end]).unwrap_or("?")
    }
}

/// CRC-32 of an image with its checksum field taken as zero.
pub fn checksum(bytes: &[u8]) -> u32 {
    let mut digest = crate::CRC32.digest();
    digest.update(&bytes[..CHECKSUM_OFFSET]);
    digest.update(&[0; 4]);
    digest.update(&bytes[CHECKSUM_OFFSET + 4..]);
    digest.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A small, valid image: header, 64 bytes of "code", one relocation.
    fn sample() -> Vec<u8> {
        let mut bytes = vec![0u8; HEADER_SIZE + 64 + 8];
        let mut h = ImageHeader {
            magic: IMAGE_MAGIC,
            abi_version: ABI_VERSION,
            header_size: HEADER_SIZE as u32,
            image_size: bytes.len() as u64,
            checksum: 0,
            code_crc: 0,
            code_start: HEADER_SIZE as u64,
            code_end: HEADER_SIZE as u64 + 64,
            reloc_offset: HEADER_SIZE as u64 + 64,
            reloc_count: 1,
            entry_init: HEADER_SIZE as u64,
            entry_activate: HEADER_SIZE as u64 + 16,
            entry_control: HEADER_SIZE as u64 + 32,
            mem_fixed: 4096,
            mem_per_cpu: 8192,
            mem_per_gib: 8192,
            max_cpus: 64,
            flags: 0,
            version: [0; 32],
            reserved: [0; 104],
        };
        h.version[..5].copy_from_slice(b"0.1.0");
        bytes[..HEADER_SIZE].copy_from_slice(&h.to_bytes());
        bytes[HEADER_SIZE + 64..].copy_from_slice(&(HEADER_SIZE as u64 + 8).to_le_bytes());
        h.checksum = checksum(&bytes);
        bytes[..HEADER_SIZE].copy_from_slice(&h.to_bytes());
        bytes
    }

    #[test]
    fn a_good_image_validates() {
        let h = ImageHeader::validate(&sample()).unwrap();
        assert_eq!(h.version_str(), "0.1.0");
        assert_eq!(h.required_memory(4, 4 << 30), 4096 + 4 * 8192 + 4 * 8192);
    }

    #[test]
    fn each_corruption_is_named() {
        let good = sample();
        assert_eq!(
            ImageHeader::validate(&good[..100]),
            Err(ImageError::TooShort { len: 100 })
        );

        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(ImageHeader::validate(&b), Err(ImageError::BadMagic));

        let mut b = good.clone();
        b[8] = 7;
        assert_eq!(
            ImageHeader::validate(&b),
            Err(ImageError::VersionMismatch {
                found: 7,
                expected: ABI_VERSION
            })
        );

        let mut b = good.clone();
        b.push(0);
        assert!(matches!(
            ImageHeader::validate(&b),
            Err(ImageError::BadSize { .. })
        ));

        let mut b = good.clone();
        b[HEADER_SIZE + 3] ^= 0x40;
        assert!(matches!(
            ImageHeader::validate(&b),
            Err(ImageError::BadChecksum { .. })
        ));
    }

    proptest! {
        /// Any single flipped bit anywhere is refused (CRC-32 detects every 1-bit error), and
        /// validation never panics.
        #[test]
        fn any_bit_flip_is_refused(pos in 0usize..(HEADER_SIZE + 72), bit in 0u8..8) {
            let mut b = sample();
            b[pos] ^= 1 << bit;
            prop_assert!(ImageHeader::validate(&b).is_err());
        }

        /// Arbitrary bytes never validate and never panic.
        #[test]
        fn garbage_is_refused(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            prop_assert!(ImageHeader::validate(&bytes).is_err());
        }
    }
}
