//! A checkpoint as an ELF core that kdump's tools read, laid out as the kernel's own
//! `/proc/vmcore` is (Documentation/admin-guide/kdump, fs/proc/vmcore.c) and QEMU's
//! `dump-guest-memory` writes (dump/dump.c):
//!
//! - one `PT_NOTE`, first (crash takes the first program header for it, and every other for
//!   a `PT_LOAD`): an `NT_PRSTATUS` note per CPU (`CORE`, `struct elf_prstatus` with the 27
//!   registers of x86-64's `user_regs_struct`), then the kernel's own `VMCOREINFO` note, which
//!   tells `crash` the kernel's release, its KASLR offset and `phys_base`;
//! - one `PT_LOAD` per RAM range, at the physical address and at the virtual address the
//!   kernel maps it at (`page_offset_base`);
//! - two more `PT_LOAD`s over the kernel image's pages, sharing those file bytes: at its
//!   link-time addresses (run-time minus KASLR's offset), so that `gdb vmlinux CORE` reads
//!   `jiffies` at the address vmlinux gives it (gdb reads by virtual address), and at its
//!   run-time addresses, which pointers in memory hold. crash reads by physical address only.
//!
//! crash (8.0) finds KASLR's offset from `SYMBOL(_stext)` when told `--kaslr=auto`, and
//! `phys_base` from VMCOREINFO; a live checkpoint has no panic task (`--no_panic`).
//!
//! Every page's bytes are written once, streamed from the checkpoint.

use crate::model::{gpr, seg, CpuRecord, Meta, PAGE};
use crate::qsc::read::{Archive, Source};
use std::io::{self, Write};

/// Where a core's pages come from: a file's checkpoint, or a live machine's (`qsctl export`).
/// Pages are asked for in ascending order, each once.
pub trait Pages {
    fn read_page(&mut self, gpa: u64, buf: &mut [u8; PAGE]) -> io::Result<()>;
}

/// Checkpoint `index` of an archive.
pub struct FromArchive<'a, S: Source + ?Sized> {
    pub archive: &'a Archive<S>,
    pub index: usize,
}

impl<S: Source + ?Sized> Pages for FromArchive<'_, S> {
    fn read_page(&mut self, gpa: u64, buf: &mut [u8; PAGE]) -> io::Result<()> {
        self.archive.read_page(self.index, gpa, buf)
    }
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const NT_PRSTATUS: u32 = 1;
const EHDR: usize = 64;
const PHDR: usize = 56;
/// `struct elf_prstatus` on x86-64 (include/uapi/linux/elfcore.h): 112 bytes before `pr_reg`,
/// 27 registers, `pr_fpvalid` and padding.
const PRSTATUS: usize = 336;
const PR_REG: usize = 112;
/// Where the kernel's image is mapped before KASLR moves it (arch/x86/include/asm/page_64_types.h).
const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

/// What VMCOREINFO says about where the kernel is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelPlace {
    /// KASLR's offset: run-time addresses minus vmlinux's.
    pub kaslr: u64,
    /// The physical address `START_KERNEL_MAP` maps.
    pub phys_base: u64,
    /// `_stext`, at its run-time address.
    pub stext: Option<u64>,
}

/// Reads `KERNELOFFSET=`, `NUMBER(phys_base)=` and `SYMBOL(_stext)=` (hex, as the kernel
/// writes them; `NUMBER` values are decimal) from VMCOREINFO text.
pub fn kernel_place(vmcoreinfo: &[u8]) -> Option<KernelPlace> {
    let text = core::str::from_utf8(vmcoreinfo).ok()?;
    let mut p = KernelPlace::default();
    let (mut kaslr, mut phys) = (false, false);
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("KERNELOFFSET=") {
            p.kaslr = u64::from_str_radix(v.trim(), 16).ok()?;
            kaslr = true;
        } else if let Some(v) = line.strip_prefix("NUMBER(phys_base)=") {
            p.phys_base = v.trim().parse::<i64>().ok()? as u64;
            phys = true;
        } else if let Some(v) = line.strip_prefix("SYMBOL(_stext)=") {
            p.stext = u64::from_str_radix(v.trim(), 16).ok();
        }
    }
    (kaslr && phys).then_some(p)
}

/// One program header.
struct Load {
    vaddr: u64,
    paddr: u64,
    offset: u64,
    len: u64,
}

/// Writes a checkpoint (its CPUs, its identity, its pages) as an ELF core to `out`; returns
/// the bytes written.
pub fn write(
    cpus: &[CpuRecord],
    meta: &Meta,
    pages: &mut impl Pages,
    out: impl Write,
) -> io::Result<u64> {
    let notes = notes(cpus, meta);
    let mut loads: Vec<Load> = Vec::new();
    // File layout: ELF header, program headers, notes, then RAM in address order.
    let image = image_loads(meta);
    let phnum = 1 + meta.ram.len() + image.len();
    let data_start = align((EHDR + PHDR * phnum + notes.len()) as u64, PAGE as u64);
    let mut offset = data_start;
    for r in &meta.ram {
        let vaddr = if meta.page_offset != 0 {
            meta.page_offset + r.start
        } else {
            0
        };
        loads.push(Load {
            vaddr,
            paddr: r.start,
            offset,
            len: r.end - r.start,
        });
        offset += r.end - r.start;
    }
    for (vaddr, paddr, len) in image {
        // The same file bytes as the RAM range that holds them (`image_loads` keeps to one).
        if let Some(l) = loads
            .iter()
            .find(|l| (l.paddr..l.paddr + l.len).contains(&paddr))
        {
            let offset = l.offset + (paddr - l.paddr);
            loads.push(Load {
                vaddr,
                paddr,
                offset,
                len,
            });
        }
    }
    let mut w = Counted { out, n: 0 };
    w.write_all(&elf_header(loads.len() + 1))?;
    w.write_all(&phdr(
        PT_NOTE,
        0,
        (EHDR + PHDR * (loads.len() + 1)) as u64,
        0,
        0,
        notes.len() as u64,
    ))?;
    for l in &loads {
        w.write_all(&phdr(PT_LOAD, 7, l.offset, l.vaddr, l.paddr, l.len))?;
    }
    w.write_all(&notes)?;
    let pad = data_start - w.n;
    w.write_all(&vec![0u8; pad as usize])?;
    let mut page = Box::new([0u8; PAGE]);
    for r in &meta.ram {
        for gpa in (r.start..r.end).step_by(PAGE) {
            pages.read_page(gpa, &mut page)?;
            w.write_all(&page[..])?;
        }
    }
    w.out.flush()?;
    Ok(w.n)
}

/// The kernel image's extra mappings: (virtual, physical, length) at its run-time and its
/// link-time addresses, from `_stext`'s 2 MiB-aligned page to the end of its RAM range (the
/// image's end is not in VMCOREINFO; the loads are cut at the range's end).
fn image_loads(meta: &Meta) -> Vec<(u64, u64, u64)> {
    let Some(p) = kernel_place(&meta.vmcoreinfo) else {
        return Vec::new();
    };
    let Some(stext) = p.stext else {
        return Vec::new();
    };
    let start = stext & !((2 << 20) - 1);
    let phys = start
        .wrapping_sub(START_KERNEL_MAP)
        .wrapping_add(p.phys_base);
    let Some(r) = meta.ram.iter().find(|r| r.contains(phys)) else {
        return Vec::new();
    };
    let len = r.end - phys;
    // Link-time first: where KASLR's offset is smaller than the image the two overlap, and
    // gdb reads from the first load that covers an address.
    let mut v = Vec::new();
    if p.kaslr != 0 {
        v.push((start.wrapping_sub(p.kaslr), phys, len));
    }
    v.push((start, phys, len));
    v
}

fn align(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

fn elf_header(phnum: usize) -> [u8; EHDR] {
    let mut h = [0u8; EHDR];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 2; // ELFCLASS64
    h[5] = 1; // ELFDATA2LSB
    h[6] = 1; // EV_CURRENT
    h[16..18].copy_from_slice(&4u16.to_le_bytes()); // ET_CORE
    h[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    h[20..24].copy_from_slice(&1u32.to_le_bytes());
    h[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    h[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes());
    h[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes());
    h[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
    h
}

fn phdr(kind: u32, flags: u32, offset: u64, vaddr: u64, paddr: u64, len: u64) -> [u8; PHDR] {
    let mut p = [0u8; PHDR];
    p[..4].copy_from_slice(&kind.to_le_bytes());
    p[4..8].copy_from_slice(&flags.to_le_bytes());
    p[8..16].copy_from_slice(&offset.to_le_bytes());
    p[16..24].copy_from_slice(&vaddr.to_le_bytes());
    p[24..32].copy_from_slice(&paddr.to_le_bytes());
    p[32..40].copy_from_slice(&len.to_le_bytes());
    p[40..48].copy_from_slice(&len.to_le_bytes());
    // p_align 0, as /proc/vmcore has it: crash takes a first PT_LOAD so aligned for a kdump
    // core, the kind it reads KASLR and registers from (netdump.c).
    p
}

/// The notes: one `NT_PRSTATUS` per CPU, then VMCOREINFO.
fn notes(cpus: &[CpuRecord], meta: &Meta) -> Vec<u8> {
    let mut n = Vec::new();
    for c in cpus {
        note(&mut n, b"CORE", NT_PRSTATUS, &prstatus(c));
    }
    if !meta.vmcoreinfo.is_empty() {
        note(&mut n, b"VMCOREINFO", 0, &meta.vmcoreinfo);
    }
    n
}

fn note(out: &mut Vec<u8>, name: &[u8], kind: u32, desc: &[u8]) {
    out.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
    out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(name);
    out.push(0);
    out.resize(align(out.len() as u64, 4) as usize, 0);
    out.extend_from_slice(desc);
    out.resize(align(out.len() as u64, 4) as usize, 0);
}

/// `struct elf_prstatus` for CPU `c`: `pr_pid` is the CPU's number plus one (kdump puts the
/// task that was running there; a checkpoint does not know it, and gdb needs them distinct).
fn prstatus(c: &CpuRecord) -> [u8; PRSTATUS] {
    let mut p = [0u8; PRSTATUS];
    p[32..36].copy_from_slice(&(c.index + 1).to_le_bytes());
    let g = &c.gprs;
    let s = &c.segments;
    // user_regs_struct's order (arch/x86/include/asm/user_64.h).
    let regs: [u64; 27] = [
        g[gpr::R15],
        g[14],
        g[13],
        g[12],
        g[gpr::RBP],
        g[gpr::RBX],
        g[11],
        g[10],
        g[9],
        g[gpr::R8],
        g[gpr::RAX],
        g[gpr::RCX],
        g[gpr::RDX],
        g[gpr::RSI],
        g[gpr::RDI],
        u64::MAX, // orig_rax: not in a system call
        c.rip,
        s[seg::CS].selector as u64,
        c.rflags,
        g[gpr::RSP],
        s[seg::SS].selector as u64,
        s[seg::FS].base,
        s[seg::GS].base,
        s[seg::DS].selector as u64,
        s[seg::ES].selector as u64,
        s[seg::FS].selector as u64,
        s[seg::GS].selector as u64,
    ];
    for (i, r) in regs.iter().enumerate() {
        p[PR_REG + 8 * i..PR_REG + 8 * i + 8].copy_from_slice(&r.to_le_bytes());
    }
    p
}

/// Counts what goes through.
struct Counted<W: Write> {
    out: W,
    n: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let k = self.out.write(b)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmcoreinfo_gives_kaslr_phys_base_and_stext() {
        let t = b"OSRELEASE=6.12.117+deb13-amd64\nSYMBOL(_stext)=ffffffffa4e00000\nNUMBER(phys_base)=-1040187392\nKERNELOFFSET=23c00000\n";
        let p = kernel_place(t).unwrap();
        assert_eq!(p.kaslr, 0x23c0_0000);
        assert_eq!(p.phys_base, (-1040187392i64) as u64);
        assert_eq!(p.stext, Some(0xffff_ffff_a4e0_0000));
        assert_eq!(kernel_place(b"OSRELEASE=6.1\n"), None);
    }

    #[test]
    fn a_prstatus_note_has_the_registers_where_the_kernel_puts_them() {
        let mut c = CpuRecord {
            index: 2,
            rip: 0xffff_ffff_8100_0000,
            ..Default::default()
        };
        c.gprs[gpr::R15] = 15;
        c.gprs[gpr::RSP] = 0x1234;
        let p = prstatus(&c);
        assert_eq!(u32::from_le_bytes(p[32..36].try_into().unwrap()), 3);
        let reg = |i: usize| {
            u64::from_le_bytes(p[PR_REG + 8 * i..PR_REG + 8 * i + 8].try_into().unwrap())
        };
        assert_eq!(reg(0), 15);
        assert_eq!(reg(16), 0xffff_ffff_8100_0000);
        assert_eq!(reg(19), 0x1234);
        let mut n = Vec::new();
        note(&mut n, b"CORE", NT_PRSTATUS, &p);
        assert_eq!(n.len(), 12 + 8 + PRSTATUS);
    }
}
