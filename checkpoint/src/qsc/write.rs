//! Writes a `.qsc` file as a stream: nothing is held but the section being written, so an
//! export of a large machine needs no more memory than one section.

use super::format::{self, limits, CheckpointSection, Kind};
use crate::model::{CpuRecord, DeviceRecord, PAGE};
use std::io::{self, Write};

pub struct Writer<W: Write> {
    out: W,
    offset: u64,
    sections: u32,
    /// The last page written for the current checkpoint (pages go in ascending order).
    last_page: Option<u64>,
}

impl<W: Write> Writer<W> {
    /// Starts a file: writes its header.
    pub fn new(mut out: W) -> io::Result<Self> {
        out.write_all(&format::header())?;
        Ok(Writer {
            out,
            offset: format::HEADER_LEN as u64,
            sections: 0,
            last_page: None,
        })
    }

    /// Bytes written so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Starts a checkpoint; its CPUs, devices and pages follow.
    pub fn checkpoint(&mut self, c: &CheckpointSection) -> io::Result<()> {
        self.last_page = None;
        self.section(Kind::Checkpoint, &encode(c)?)
    }

    pub fn cpu(&mut self, c: &CpuRecord) -> io::Result<()> {
        self.section(Kind::Cpu, &encode(c)?)
    }

    pub fn device(&mut self, d: &DeviceRecord) -> io::Result<()> {
        self.section(Kind::Device, &encode(d)?)
    }

    /// Pages of the current checkpoint, in ascending order (across calls too).
    pub fn pages(&mut self, pages: &[(u64, &[u8; PAGE])]) -> io::Result<()> {
        for chunk in pages.chunks(limits::PAGES_PER_SECTION) {
            for &(gpa, _) in chunk {
                if gpa % PAGE as u64 != 0 || self.last_page.is_some_and(|l| gpa <= l) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("page {gpa:#x} is not aligned or not after the last one written"),
                    ));
                }
                self.last_page = Some(gpa);
            }
            self.section(Kind::Memory, &format::memory_payload(chunk))?;
        }
        Ok(())
    }

    /// Writes the end section; the file is complete.
    pub fn finish(mut self) -> io::Result<W> {
        let end = format::end_payload(self.offset, self.sections);
        self.section(Kind::End, &end)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn section(&mut self, kind: Kind, payload: &[u8]) -> io::Result<()> {
        if payload.len() as u64 > kind.limit() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a {} section of {} bytes is more than the format's {}",
                    kind.name(),
                    payload.len(),
                    kind.limit()
                ),
            ));
        }
        self.out.write_all(&format::section_header(kind, payload))?;
        self.out.write_all(payload)?;
        self.offset += (format::SECTION_HEADER_LEN + payload.len()) as u64;
        self.sections += 1;
        Ok(())
    }
}

fn encode<T: serde::Serialize>(v: &T) -> io::Result<Vec<u8>> {
    postcard::to_allocvec(v).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}
