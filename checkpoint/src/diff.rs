//! What changed between two checkpoints: pages per RAM range, and each CPU's registers.

use crate::model::{CpuRecord, RamRange, PAGE};
use crate::qsc::read::{Archive, Source};
use std::io;

/// Pages that differ, per RAM range of the first checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryDiff {
    pub ranges: Vec<(RamRange, u64)>,
    /// The first few pages that differ (for a listing).
    pub first: Vec<u64>,
    pub total: u64,
}

/// Compares checkpoint `ia` of `a` with `ib` of `b` page by page over `a`'s RAM (a page
/// outside `b`'s RAM counts as changed). Reads both whole: for two checkpoints in one file
/// [`Archive::read_page`] makes unchanged pages of a delta cheap to tell apart, but a byte
/// comparison is the only answer that holds across files.
pub fn memory<A: Source + ?Sized, B: Source + ?Sized>(
    a: &Archive<A>,
    ia: usize,
    b: &Archive<B>,
    ib: usize,
    list: usize,
) -> io::Result<MemoryDiff> {
    let ram_b = &b.checkpoints()[ib].section.meta.ram;
    let mut d = MemoryDiff::default();
    let (mut pa, mut pb) = (Box::new([0u8; PAGE]), Box::new([0u8; PAGE]));
    for r in &a.checkpoints()[ia].section.meta.ram {
        let mut n = 0;
        for gpa in (r.start..r.end).step_by(PAGE) {
            a.read_page(ia, gpa, &mut pa)?;
            let differs = if ram_b.iter().any(|rb| rb.contains(gpa)) {
                b.read_page(ib, gpa, &mut pb)?;
                pa != pb
            } else {
                true
            };
            if differs {
                n += 1;
                if d.first.len() < list {
                    d.first.push(gpa);
                }
            }
        }
        d.total += n;
        d.ranges.push((*r, n));
    }
    Ok(d)
}

/// The registers of two records of one CPU that differ: (name, old, new).
pub fn cpu(a: &CpuRecord, b: &CpuRecord) -> Vec<(&'static str, u64, u64)> {
    const GPRS: [&str; 16] = [
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15",
    ];
    let mut out: Vec<(&'static str, u64, u64)> = GPRS
        .iter()
        .zip(a.gprs.iter().zip(b.gprs.iter()))
        .filter(|(_, (x, y))| x != y)
        .map(|(n, (x, y))| (*n, *x, *y))
        .collect();
    for (name, x, y) in [
        ("rip", a.rip, b.rip),
        ("rflags", a.rflags, b.rflags),
        ("cr0", a.cr0, b.cr0),
        ("cr2", a.cr2, b.cr2),
        ("cr3", a.cr3, b.cr3),
        ("cr4", a.cr4, b.cr4),
        ("cr8", a.cr8, b.cr8),
        ("efer", a.efer, b.efer),
        ("gs.base", a.segments[5].base, b.segments[5].base),
        ("kernel_gs_base", a.kernel_gs_base, b.kernel_gs_base),
    ] {
        if x != y {
            out.push((name, x, y));
        }
    }
    out
}
