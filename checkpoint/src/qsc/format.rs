//! The byte layout of a `.qsc` file (see the module above): headers, section kinds, limits,
//! and the payloads that are not plain postcard.

use super::FormatError;
use crate::model::{Meta, PAGE};
use alloc::format;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

pub const MAGIC: [u8; 8] = *b"QSCKPT\r\n";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 32;
pub const SECTION_HEADER_LEN: usize = 24;

/// The file's checksum: CRC-32 (ISO-HDLC, as zip and PNG use).
pub const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// What is refused before it is read (so that a damaged length never allocates).
pub mod limits {
    /// Pages in one `MEMORY` section.
    pub const PAGES_PER_SECTION: usize = 1024;
    /// A `CHECKPOINT` section (its VMCOREINFO text is the large part: ~4 KiB in practice).
    pub const META_BYTES: u64 = 1 << 20;
    /// A `CPU` section (an XSAVE area is at most a few KiB, the local APIC's 4 KiB).
    pub const CPU_BYTES: u64 = 64 << 10;
    pub const DEVICE_BYTES: u64 = 64 << 10;
    pub const MEMORY_BYTES: u64 = (4 + PAGES_PER_SECTION * (8 + super::PAGE)) as u64;
    pub const CPUS: usize = 256;
    pub const DEVICES: usize = 64;
    pub const RAM_RANGES: usize = 128;
    pub const CHECKPOINTS: usize = 4096;
}

/// Section kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    Checkpoint = 1,
    Cpu = 2,
    Device = 3,
    Memory = 4,
    End = 0xFFFF_FFFF,
}

impl Kind {
    pub fn from_u32(v: u32) -> Option<Kind> {
        Some(match v {
            1 => Kind::Checkpoint,
            2 => Kind::Cpu,
            3 => Kind::Device,
            4 => Kind::Memory,
            0xFFFF_FFFF => Kind::End,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Kind::Checkpoint => "checkpoint",
            Kind::Cpu => "cpu",
            Kind::Device => "device",
            Kind::Memory => "memory",
            Kind::End => "end",
        }
    }
    pub fn limit(self) -> u64 {
        match self {
            Kind::Checkpoint => limits::META_BYTES,
            Kind::Cpu => limits::CPU_BYTES,
            Kind::Device => limits::DEVICE_BYTES,
            Kind::Memory => limits::MEMORY_BYTES,
            Kind::End => 12,
        }
    }
}

/// A `CHECKPOINT` section's payload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointSection {
    pub meta: Meta,
    /// How many `CPU` and `DEVICE` sections follow.
    pub cpus: u32,
    pub devices: u32,
    /// `None`: full memory (an unlisted page is zero). `Some(id)`: the pages that differ from
    /// checkpoint `id`, which is the one before it in the file.
    pub delta_of: Option<u32>,
}

pub fn header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    let crc = CRC.checksum(&h[..28]);
    h[28..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a file's first [`HEADER_LEN`] bytes.
pub fn check_header(h: &[u8; HEADER_LEN]) -> Result<(), FormatError> {
    let magic: [u8; 8] = h[..8].try_into().unwrap_or_default();
    if magic != MAGIC {
        return Err(FormatError::NotQsc { found: magic });
    }
    // The checksum first: a flipped bit in the version must not pass for a newer file.
    if CRC.checksum(&h[..28]) != u32_at(h, 28) {
        return Err(FormatError::HeaderChecksum);
    }
    let version = u32_at(h, 8);
    if version > VERSION {
        return Err(FormatError::NewerVersion {
            found: version,
            supported: VERSION,
        });
    }
    if version == 0 || h[12..28].iter().any(|&b| b != 0) {
        return Err(FormatError::Limit(format!(
            "header of version {version} with reserved fields set"
        )));
    }
    Ok(())
}

/// A section's header, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionHeader {
    pub kind: Kind,
    pub len: u64,
    pub crc: u32,
}

pub fn section_header(kind: Kind, payload: &[u8]) -> [u8; SECTION_HEADER_LEN] {
    let mut h = [0u8; SECTION_HEADER_LEN];
    h[..4].copy_from_slice(&(kind as u32).to_le_bytes());
    h[8..16].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h[16..20].copy_from_slice(&CRC.checksum(payload).to_le_bytes());
    let hcrc = CRC.checksum(&h[..20]);
    h[20..].copy_from_slice(&hcrc.to_le_bytes());
    h
}

/// Checks section `index`'s header, read at byte `offset`.
pub fn check_section_header(
    h: &[u8; SECTION_HEADER_LEN],
    index: u32,
    offset: u64,
) -> Result<SectionHeader, FormatError> {
    if CRC.checksum(&h[..20]) != u32_at(h, 20) {
        return Err(FormatError::SectionHeaderChecksum { index, offset });
    }
    let raw = u32_at(h, 0);
    let kind = Kind::from_u32(raw).ok_or(FormatError::UnknownSection {
        index,
        offset,
        kind: raw,
    })?;
    let len = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
    if len > kind.limit() || u32_at(h, 4) != 0 {
        return Err(FormatError::TooLarge {
            index,
            kind: kind.name(),
            offset,
            len,
            limit: kind.limit(),
        });
    }
    Ok(SectionHeader {
        kind,
        len,
        crc: u32_at(h, 16),
    })
}

/// The end section's payload: the file's length before it and the sections before it.
pub fn end_payload(len_before: u64, sections: u32) -> [u8; 12] {
    let mut p = [0u8; 12];
    p[..8].copy_from_slice(&len_before.to_le_bytes());
    p[8..].copy_from_slice(&sections.to_le_bytes());
    p
}

/// A `MEMORY` payload's page addresses (the contents follow them, a page each).
pub fn memory_addresses(payload: &[u8]) -> Result<Vec<u64>, alloc::string::String> {
    let n = payload
        .get(..4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()) as usize)
        .ok_or("shorter than its page count")?;
    if n == 0 || n > limits::PAGES_PER_SECTION {
        return Err(format!(
            "{n} pages (1 to {} allowed)",
            limits::PAGES_PER_SECTION
        ));
    }
    if payload.len() != 4 + n * (8 + PAGE) {
        return Err(format!("{} bytes for {n} pages", payload.len()));
    }
    let gpas: Vec<u64> = payload[4..4 + 8 * n]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    if gpas.iter().any(|g| g % PAGE as u64 != 0) {
        return Err("a page address that is not page-aligned".into());
    }
    if gpas.windows(2).any(|w| w[0] >= w[1]) {
        return Err("page addresses not in ascending order".into());
    }
    Ok(gpas)
}

pub fn memory_payload(pages: &[(u64, &[u8; PAGE])]) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + pages.len() * (8 + PAGE));
    p.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    for (gpa, _) in pages {
        p.extend_from_slice(&gpa.to_le_bytes());
    }
    for (_, data) in pages {
        p.extend_from_slice(&data[..]);
    }
    p
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}
