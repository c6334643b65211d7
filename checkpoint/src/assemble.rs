//! A checkpoint's file from what the hv hands out, wherever it is read: in the guest
//! (`qsctl export`, through the agent's ioctls) or over the link (`qs-bridge`'s export, on the
//! bulk channel). The hv's CPU record (`abi::CheckpointCpu` and what follows it) becomes a
//! [`CpuRecord`], the kernel's VMCOREINFO note is read out of the checkpoint's own memory, and
//! a `.qsc` is written from any page source.

use crate::elf::Pages;
use crate::model::{
    Blob, CpuRecord, DeviceRecord, Meta, PendingEvent, RamRange, Segment, TablePointer, PAGE,
};
use crate::qsc::format::CheckpointSection;
use crate::qsc::write::Writer;
use quicksilver_proto::abi::{self, CheckpointCpu, CheckpointDevices};
use std::io::{self, Write};

/// The model's CPU record from the hv's: its header, XSAVE area and local APIC record.
pub fn cpu_record(index: u32, a: &CheckpointCpu, xsave: Vec<u8>, lapic: Vec<u8>) -> CpuRecord {
    let seg = |i: usize| Segment {
        selector: a.seg_selector[i],
        attrib: a.seg_attrib[i],
        limit: a.seg_limit[i],
        base: a.seg_base[i],
    };
    let pending = PendingEvent {
        valid: a.pending & (1 << 31) != 0,
        kind: ((a.pending >> 8) & 7) as u8,
        vector: a.pending as u8,
        error_code: (a.pending & (1 << 11) != 0).then_some((a.pending >> 32) as u32),
    };
    CpuRecord {
        index,
        apic_id: a.apic_id,
        gprs: a.gprs,
        rip: a.rip,
        rflags: a.rflags,
        segments: core::array::from_fn(seg),
        gdtr: TablePointer {
            base: a.gdtr_base,
            limit: a.gdtr_limit as u16,
        },
        idtr: TablePointer {
            base: a.idtr_base,
            limit: a.idtr_limit as u16,
        },
        cpl: a.cpl as u8,
        cr0: a.cr[0],
        cr2: a.cr[1],
        cr3: a.cr[2],
        cr4: a.cr[3],
        cr8: a.cr[4],
        xcr0: a.cr[5],
        efer: a.efer,
        dr: a.dr,
        star: a.msrs[0],
        lstar: a.msrs[1],
        cstar: a.msrs[2],
        sfmask: a.msrs[3],
        kernel_gs_base: a.msrs[4],
        sysenter_cs: a.msrs[5],
        sysenter_esp: a.msrs[6],
        sysenter_eip: a.msrs[7],
        pat: a.msrs[8],
        tsc_aux: a.msrs[9],
        pending,
        interrupt_shadow: a.flags & abi::CPU_INTERRUPT_SHADOW != 0,
        xsave: Blob {
            version: 1,
            bytes: xsave,
        },
        lapic: Blob {
            version: a.lapic_version,
            bytes: lapic,
        },
    }
}

/// [`cpu_record`] from the bytes the hv wrote (a `CheckpointCpu`, then its XSAVE area and
/// local APIC record); `None` if they are shorter than the header says.
pub fn cpu_record_from_bytes(index: u32, bytes: &[u8]) -> Option<CpuRecord> {
    let a = CheckpointCpu::from_bytes(bytes)?;
    let head = core::mem::size_of::<CheckpointCpu>();
    let (x, l) = (a.xsave_len as usize, a.lapic_len as usize);
    let xsave = bytes.get(head..head + x)?.to_vec();
    let lapic = bytes.get(head + x..head + x + l)?.to_vec();
    Some(cpu_record(index, &a, xsave, lapic))
}

/// What the record of the platform's devices is called in a file.
pub const PLATFORM_DEVICES: &str = "platform: IOAPIC, 8259s, 8254, HPET, RTC, COM1";

/// The model's device record from the hv's answer (an `abi::CheckpointDevices`, then the
/// record); `None` if shorter than its header says.
pub fn devices_record_from_bytes(bytes: &[u8]) -> Option<DeviceRecord> {
    let h = CheckpointDevices::from_bytes(bytes)?;
    let head = core::mem::size_of::<CheckpointDevices>();
    let body = bytes.get(head..head.checked_add(usize::try_from(h.len).ok()?)?)?;
    Some(DeviceRecord {
        name: PLATFORM_DEVICES.into(),
        state: Blob {
            version: h.version,
            bytes: body.to_vec(),
        },
    })
}

/// The kernel's VMCOREINFO text as the checkpoint holds it: the note at `pa` (`size` bytes,
/// as `/sys/kernel/vmcoreinfo` gives them) read from the checkpoint's own pages.
pub fn vmcoreinfo(pages: &mut dyn Pages, pa: u64, size: u64) -> Option<Vec<u8>> {
    let first = pa & !(PAGE as u64 - 1);
    let end = (pa + size).next_multiple_of(PAGE as u64);
    let mut bytes = Vec::new();
    let mut page = [0u8; PAGE];
    for gpa in (first..end).step_by(PAGE) {
        pages.read_page(gpa, &mut page).ok()?;
        bytes.extend_from_slice(&page);
    }
    let note = &bytes[(pa - first) as usize..];
    let word = |at: usize| Some(u32::from_le_bytes(note.get(at..at + 4)?.try_into().ok()?));
    let (namesz, descsz) = (word(0)? as usize, word(4)? as usize);
    let desc = 12 + namesz.next_multiple_of(4);
    (note.get(12..12 + namesz)? == b"VMCOREINFO\0")
        .then(|| note.get(desc..desc + descsz).map(<[u8]>::to_vec))?
}

/// `BUILD-ID=` in VMCOREINFO (hex), as bytes.
pub fn build_id(vmcoreinfo: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(vmcoreinfo);
    let Some(hex) = text.lines().find_map(|l| l.strip_prefix("BUILD-ID=")) else {
        return Vec::new();
    };
    (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

/// Pages of a `.qsc` written in one section each.
const BATCH: usize = 256;

/// A `.qsc` of one checkpoint: its CPUs and devices, then every page of its RAM that is not
/// all zero (a full image's unlisted pages are zero). Returns `out`, every byte written.
pub fn write_qsc<W: Write>(
    cpus: &[CpuRecord],
    devices: &[DeviceRecord],
    meta: &Meta,
    pages: &mut dyn Pages,
    out: W,
) -> io::Result<W> {
    let mut w = Writer::new(out)?;
    w.checkpoint(&CheckpointSection {
        meta: meta.clone(),
        cpus: cpus.len() as u32,
        devices: devices.len() as u32,
        delta_of: None,
    })?;
    for c in cpus {
        w.cpu(c)?;
    }
    for d in devices {
        w.device(d)?;
    }
    let mut batch: Vec<(u64, Box<[u8; PAGE]>)> = Vec::with_capacity(BATCH);
    for r in &meta.ram {
        for gpa in (r.start..r.end).step_by(PAGE) {
            let mut page = Box::new([0u8; PAGE]);
            pages.read_page(gpa, &mut page)?;
            if page.iter().any(|&b| b != 0) {
                batch.push((gpa, page));
            }
            if batch.len() == BATCH {
                flush(&mut w, &mut batch)?;
            }
        }
    }
    flush(&mut w, &mut batch)?;
    w.finish()
}

fn flush<W: Write>(w: &mut Writer<W>, batch: &mut Vec<(u64, Box<[u8; PAGE]>)>) -> io::Result<()> {
    let refs: Vec<(u64, &[u8; PAGE])> = batch.iter().map(|(g, p)| (*g, &**p)).collect();
    w.pages(&refs)?;
    batch.clear();
    Ok(())
}

/// Bytes of RAM in `ram`.
pub fn ram_bytes(ram: &[RamRange]) -> u64 {
    ram.iter().map(|r| r.end - r.start).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_record_reads_back_from_its_bytes() {
        let a = CheckpointCpu {
            rip: 0xffff_ffff_8100_0000,
            cr: [1, 2, 3, 4, 5, 6],
            xsave_len: 3,
            lapic_len: 2,
            lapic_version: abi::LAPIC_RECORD_V1,
            flags: abi::CPU_INTERRUPT_SHADOW,
            ..CheckpointCpu::default()
        };
        let mut bytes = vec![0u8; core::mem::size_of::<CheckpointCpu>()];
        // The header's bytes, field by field as the hv writes them (x86: little-endian).
        let rip_at = core::mem::offset_of!(CheckpointCpu, rip);
        bytes[rip_at..rip_at + 8].copy_from_slice(&a.rip.to_le_bytes());
        for (at, v) in [
            (core::mem::offset_of!(CheckpointCpu, xsave_len), 3u32),
            (core::mem::offset_of!(CheckpointCpu, lapic_len), 2),
            (
                core::mem::offset_of!(CheckpointCpu, lapic_version),
                abi::LAPIC_RECORD_V1,
            ),
            (
                core::mem::offset_of!(CheckpointCpu, flags),
                abi::CPU_INTERRUPT_SHADOW,
            ),
        ] {
            bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        for (i, v) in a.cr.iter().enumerate() {
            let at = core::mem::offset_of!(CheckpointCpu, cr) + 8 * i;
            bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        bytes.extend_from_slice(&[7, 8, 9, 10, 11]);
        let r = cpu_record_from_bytes(1, &bytes).unwrap();
        assert_eq!(r, cpu_record(1, &a, vec![7, 8, 9], vec![10, 11]));
        assert_eq!(r.rip, a.rip);
        assert_eq!(r.cr3, 3);
        assert!(r.interrupt_shadow);
        // Shorter than the header says: refused.
        assert_eq!(cpu_record_from_bytes(1, &bytes[..bytes.len() - 1]), None);
    }

    #[test]
    fn the_build_id_is_read_from_vmcoreinfo() {
        assert_eq!(
            build_id(b"OSRELEASE=6.1\nBUILD-ID=0aff10\n"),
            vec![0x0a, 0xff, 0x10]
        );
        assert_eq!(build_id(b"OSRELEASE=6.1\n"), Vec::<u8>::new());
    }
}
