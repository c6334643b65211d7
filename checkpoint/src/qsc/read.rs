//! Opens a `.qsc` file: every byte is checked (checksums, lengths, limits, the order of
//! sections, page addresses inside RAM) before anything is handed out, and a file is refused
//! with the first thing wrong with it. Memory stays in the file: the archive keeps where each
//! page is and reads it on demand.

use super::format::{self, limits, CheckpointSection, Kind, SectionHeader};
use super::FormatError;
use crate::model::{CpuRecord, DeviceRecord, PAGE};
use std::collections::BTreeMap;
use std::io;

/// Where a file's bytes come from: a file, or memory (tests).
pub trait Source {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl Source for std::fs::File {
    fn size(&self) -> u64 {
        self.metadata().map_or(0, |m| m.len())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl Source for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self
            .get(offset as usize..offset as usize + buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(s);
        Ok(())
    }
}

/// Why a file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("cannot read it: {0}")]
    Io(#[from] io::Error),
}

/// One checkpoint in a file.
#[derive(Clone, Debug)]
pub struct Entry {
    pub section: CheckpointSection,
    pub cpus: Vec<CpuRecord>,
    pub devices: Vec<DeviceRecord>,
    /// The pages this checkpoint lists, and where each page's contents are in the file.
    pub pages: BTreeMap<u64, u64>,
}

/// An opened, checked file.
pub struct Archive<S: Source + ?Sized> {
    entries: Vec<Entry>,
    src: Box<S>,
}

impl<S: Source + ?Sized> Archive<S> {
    pub fn open(src: Box<S>) -> Result<Self, OpenError> {
        let entries = Checker::new(&*src).run()?;
        Ok(Archive { entries, src })
    }

    pub fn checkpoints(&self) -> &[Entry] {
        &self.entries
    }

    /// Checkpoint `index`'s page at `gpa` (in its RAM): from the checkpoint that last listed it
    /// at or before `index`, or zero.
    pub fn read_page(&self, index: usize, gpa: u64, buf: &mut [u8; PAGE]) -> io::Result<()> {
        for e in self.entries[..=index].iter().rev() {
            if let Some(&at) = e.pages.get(&gpa) {
                return self.src.read_at(buf, at);
            }
            if e.section.delta_of.is_none() {
                break;
            }
        }
        buf.fill(0);
        Ok(())
    }

    /// The index of the checkpoint with engine id `id`.
    pub fn find(&self, id: u32) -> Option<usize> {
        self.entries.iter().position(|e| e.section.meta.id == id)
    }
}

impl Archive<std::fs::File> {
    pub fn open_path(path: &std::path::Path) -> Result<Self, OpenError> {
        Archive::open(Box::new(std::fs::File::open(path)?))
    }
}

/// The walk over a file that checks it.
struct Checker<'a, S: Source + ?Sized> {
    src: &'a S,
    len: u64,
    offset: u64,
    index: u32,
    entries: Vec<Entry>,
}

impl<'a, S: Source + ?Sized> Checker<'a, S> {
    fn new(src: &'a S) -> Self {
        Checker {
            src,
            len: src.size(),
            offset: 0,
            index: 0,
            entries: Vec::new(),
        }
    }

    fn run(mut self) -> Result<Vec<Entry>, OpenError> {
        let mut h = [0u8; format::HEADER_LEN];
        self.read("the header", &mut h)?;
        format::check_header(&h)?;
        loop {
            if self.offset == self.len {
                return Err(FormatError::NoEnd {
                    sections: self.index,
                }
                .into());
            }
            let at = self.offset;
            let mut sh = [0u8; format::SECTION_HEADER_LEN];
            self.read("a section header", &mut sh)?;
            let s = format::check_section_header(&sh, self.index, at)?;
            let mut payload = vec![0u8; s.len as usize];
            self.read(s.kind.name(), &mut payload)?;
            if format::CRC.checksum(&payload) != s.crc {
                return Err(FormatError::SectionChecksum {
                    index: self.index,
                    kind: s.kind.name(),
                    offset: at,
                }
                .into());
            }
            if s.kind == Kind::End {
                self.end(&payload, at)?;
                return Ok(self.entries);
            }
            self.section(s, &payload, at)?;
            self.index += 1;
        }
    }

    fn read(&mut self, what: &'static str, buf: &mut [u8]) -> Result<(), OpenError> {
        let left = self.len - self.offset;
        if (buf.len() as u64) > left {
            return Err(FormatError::Truncated {
                what,
                offset: self.offset,
                needed: buf.len() as u64,
                left,
            }
            .into());
        }
        self.src.read_at(buf, self.offset)?;
        self.offset += buf.len() as u64;
        Ok(())
    }

    fn invalid(&self, kind: Kind, at: u64, why: impl Into<String>) -> FormatError {
        FormatError::Invalid {
            index: self.index,
            kind: kind.name(),
            offset: at,
            why: why.into(),
        }
    }

    fn section(&mut self, s: SectionHeader, payload: &[u8], at: u64) -> Result<(), FormatError> {
        let decode_err = |e: postcard::Error| self.invalid(s.kind, at, e.to_string());
        if s.kind == Kind::Checkpoint {
            self.complete(at)?;
            let c: CheckpointSection = postcard::from_bytes(payload).map_err(decode_err)?;
            self.check_checkpoint(&c, at)?;
            self.entries.push(Entry {
                section: c,
                cpus: Vec::new(),
                devices: Vec::new(),
                pages: BTreeMap::new(),
            });
            return Ok(());
        }
        let Some(e) = self.entries.last() else {
            return Err(self.invalid(s.kind, at, "before any checkpoint section"));
        };
        match s.kind {
            Kind::Cpu => {
                let c: CpuRecord = postcard::from_bytes(payload).map_err(decode_err)?;
                if e.cpus.len() as u32 >= e.section.cpus || !e.devices.is_empty() {
                    return Err(self.invalid(s.kind, at, "a CPU section out of place"));
                }
                self.entries
                    .last_mut()
                    .unwrap_or_else(|| unreachable!())
                    .cpus
                    .push(c);
            }
            Kind::Device => {
                let d: DeviceRecord = postcard::from_bytes(payload).map_err(decode_err)?;
                if e.cpus.len() as u32 != e.section.cpus
                    || e.devices.len() as u32 >= e.section.devices
                    || !e.pages.is_empty()
                {
                    return Err(self.invalid(s.kind, at, "a device section out of place"));
                }
                self.entries
                    .last_mut()
                    .unwrap_or_else(|| unreachable!())
                    .devices
                    .push(d);
            }
            Kind::Memory => {
                let gpas =
                    format::memory_addresses(payload).map_err(|w| self.invalid(s.kind, at, w))?;
                if e.cpus.len() as u32 != e.section.cpus
                    || e.devices.len() as u32 != e.section.devices
                {
                    return Err(self.invalid(s.kind, at, "memory before the CPUs and devices"));
                }
                if e.pages.last_key_value().is_some_and(|(&l, _)| gpas[0] <= l) {
                    return Err(self.invalid(s.kind, at, "pages not after the last section's"));
                }
                if let Some(g) = gpas
                    .iter()
                    .find(|&&g| !e.section.meta.ram.iter().any(|r| r.contains(g)))
                {
                    return Err(self.invalid(s.kind, at, format!("page {g:#x} is not in RAM")));
                }
                let data = at + (format::SECTION_HEADER_LEN + 4 + 8 * gpas.len()) as u64;
                let e = self.entries.last_mut().unwrap_or_else(|| unreachable!());
                for (i, g) in gpas.into_iter().enumerate() {
                    e.pages.insert(g, data + (i * PAGE) as u64);
                }
            }
            Kind::Checkpoint | Kind::End => unreachable!(),
        }
        Ok(())
    }

    fn check_checkpoint(&self, c: &CheckpointSection, at: u64) -> Result<(), FormatError> {
        let bad = |why: String| self.invalid(Kind::Checkpoint, at, why);
        if self.entries.len() >= limits::CHECKPOINTS {
            return Err(FormatError::Limit(format!(
                "more than {} checkpoints in one file",
                limits::CHECKPOINTS
            )));
        }
        if c.cpus as usize > limits::CPUS || c.devices as usize > limits::DEVICES {
            return Err(bad(format!("{} CPUs and {} devices", c.cpus, c.devices)));
        }
        let ram = &c.meta.ram;
        if ram.len() > limits::RAM_RANGES {
            return Err(bad(format!("{} RAM ranges", ram.len())));
        }
        let page = PAGE as u64;
        if ram
            .iter()
            .any(|r| r.start % page != 0 || r.end % page != 0 || r.start >= r.end)
            || ram.windows(2).any(|w| w[0].end > w[1].start)
        {
            return Err(bad(
                "RAM ranges not page-aligned, ascending and disjoint".into()
            ));
        }
        if self.entries.iter().any(|e| e.section.meta.id == c.meta.id) {
            return Err(bad(format!("checkpoint {} appears twice", c.meta.id)));
        }
        let before = self.entries.last().map(|e| e.section.meta.id);
        match (c.delta_of, before) {
            (None, None) => Ok(()),
            (Some(d), Some(b)) if d == b => {
                let prev = &self.entries[self.entries.len() - 1].section.meta.ram;
                if prev != ram {
                    return Err(bad("a delta over different RAM".into()));
                }
                Ok(())
            }
            (None, Some(_)) => Err(bad("full memory after the first checkpoint".into())),
            (Some(d), _) => Err(bad(format!(
                "a delta of checkpoint {d}, which is not the one before it"
            ))),
        }
    }

    /// The checkpoint before a new section is complete.
    fn complete(&self, at: u64) -> Result<(), FormatError> {
        match self.entries.last() {
            Some(e)
                if e.cpus.len() as u32 != e.section.cpus
                    || e.devices.len() as u32 != e.section.devices =>
            {
                Err(self.invalid(
                    Kind::Checkpoint,
                    at,
                    format!(
                        "checkpoint {} has {} of {} CPUs and {} of {} devices",
                        e.section.meta.id,
                        e.cpus.len(),
                        e.section.cpus,
                        e.devices.len(),
                        e.section.devices
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    fn end(&self, payload: &[u8], at: u64) -> Result<(), FormatError> {
        self.complete(at)?;
        if self.entries.is_empty() {
            return Err(self.invalid(Kind::End, at, "a file without a checkpoint"));
        }
        let (len, n) = match payload {
            [l @ .., a, b, c, d] if l.len() == 8 => (
                u64::from_le_bytes(l.try_into().unwrap_or_default()),
                u32::from_le_bytes([*a, *b, *c, *d]),
            ),
            _ => return Err(self.invalid(Kind::End, at, "an end section of the wrong size")),
        };
        if len != at || n != self.index {
            return Err(FormatError::EndMismatch {
                expected: len,
                found: at,
                sections_expected: n,
                sections_found: self.index,
            });
        }
        if self.offset != self.len {
            return Err(FormatError::TrailingBytes {
                offset: self.offset,
            });
        }
        Ok(())
    }
}
