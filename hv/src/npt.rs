//! Nested page tables as a type: map, unmap, split, protect, remap and log dirty pages
//! (AMD APM vol. 2, 15.25 "Nested Paging"; the tables have the long-mode format of 5.3/5.4,
//! with a guest-physical address as input and a host-physical address as output).
//!
//! Entries are named from the manual: a PML4E (level 4) points to a PDP table, a PDPE (level
//! 3) to a page directory or maps a 1 GiB page, a PDE (level 2) to a page table or maps a
//! 2 MiB page, a PTE (level 1) maps a 4 KiB page. Every entry the walk crosses carries U (a
//! nested walk is a user access, 15.25.5), so table entries here are always `P | RW | US`, and
//! rights are decided by the leaf alone. NX in a nested leaf is honoured because the host's
//! EFER.NXE is set (the hv runs on the kernel's EFER).
//!
//! # Other CPUs walk these tables while they change
//!
//! [`Npt`]'s methods take `&mut self`: one writer at a time (the caller holds a lock, or every
//! CPU is stopped). The processors of the other CPUs keep walking the tables and set the A
//! and D bits in them meanwhile, so:
//! - every entry is read and written as one aligned 8-byte atomic access, which a walk sees
//!   whole, old or new; entries whose A/D bits matter are changed by read-modify-write
//!   (`fetch_and`, `swap`, compare-exchange), never by a store that could erase a D bit the
//!   processor set an instant before;
//! - a split fills the new table completely before the compare-exchange that publishes it
//!   in place of the large page; if the processor set A or D on the large page meanwhile, the
//!   new table is filled again from the new value;
//! - a table taken out of the tree (unmap, or a large page mapped over it) is not reused at
//!   once: a CPU may still hold it in its paging-structure cache. It goes on a retired list
//!   (linked through its first entry, written with P clear, so a stale walk sees "not
//!   present" there) until [`Npt::reclaim`] is called after every CPU has flushed.
//!
//! # TLB invalidation: the rule
//!
//! The processor caches nested translations, tagged by the guest's ASID. Every mutating
//! operation returns a [`Flush`]:
//! - [`Flush::EveryCpu`] when it removed rights: unmap, write-protect, remap, a map that
//!   changed a present page, clearing D bits (a cached translation that is already dirty does
//!   not set D again, so the next write would go unlogged) and splitting a page (a cached
//!   large translation keeps its A/D state, and some AMD parts machine-check when a page's
//!   size changes under a live TLB entry: erratum 383, which KVM works around). Such a change
//!   binds a CPU only after that CPU flushed the guest's ASID (TLB_CONTROL at its next VMRUN,
//!   APM 15.16.1). Callers either hold every CPU stopped (a rendezvous), change the tables,
//!   and resume each CPU with a flush, so the change binds everywhere before the guest runs
//!   again; or they accept the window in which a running CPU still uses the old translation.
//!   [`TlbGeneration`] carries the "flush at your next VMRUN" to every CPU.
//! - [`Flush::None`] when it only added rights (mapping a page that was not present, allowing
//!   writes): a stale translation with fewer rights costs at most one spurious nested page
//!   fault, whose handler finds the entry allows the access ([`Npt::translate`]), flushes
//!   that CPU's ASID and resumes without changing anything.
//!
//! After an error (only [`NptError::OutOfFrames`] can happen midway: ranges are checked
//! first), the part of the range before the failure has changed: flush as for
//! [`Flush::EveryCpu`].
//!
//! # Dirty log
//!
//! Two ways, same interface ([`DirtyLog`]):
//! - [`DirtyLog::DirtyBits`] (the default): [`Npt::dirty_log_start`] splits the range to
//!   4 KiB pages and clears their D bits; the processor sets D on the first write through each
//!   PTE, at no cost to the guest; [`Npt::harvest`] reports and clears each D bit set
//!   (`fetch_and`, so a D set concurrently is either reported now or kept for next time). A
//!   harvest must be followed by a flush of every CPU before the log is complete again:
//!   the consistent way is to harvest and copy with every CPU stopped, and resume with a flush.
//!   QEMU's TCG sets A/D bits in nested tables (FACTS.md).
//! - [`DirtyLog::WriteFault`]: start clears RW on every writable page and marks it with an
//!   AVL bit; the first write faults and [`Npt::dirty_log_write_fault`] gives RW back; harvest
//!   reports the marked pages that are writable again and takes RW away. Each first write costs
//!   a #VMEXIT (about 23 us under TCG, FACTS.md), which is why D bits are the default.

use crate::paging::{Frames, Gpa, Hpa, A, ADDR_MASK, D, NX, P, PS, RW, SIZE_4K, US};
use core::ops::Range;
use core::sync::atomic::{AtomicU64, Ordering::*};

/// Guest-physical addresses four levels translate: 48 bits.
pub const GPA_LIMIT: u64 = 1 << 48;
/// Host-physical addresses an entry holds: bits 51:12.
pub const HPA_LIMIT: u64 = 1 << 52;

/// Page-level write-through.
const PWT: u64 = 1 << 3;
/// Page-level cache disable.
const PCD: u64 = 1 << 4;
/// PAT in a PTE.
const PAT_4K: u64 = 1 << 7;
/// Global.
const G: u64 = 1 << 8;
/// PAT in a large-page PDPE or PDE.
const PAT_LARGE: u64 = 1 << 12;
/// AVL bit 9 (ignored by the processor): the page is in a write-fault dirty log.
const LOGGED: u64 = 1 << 9;
/// AVL bit 10: write-protected by [`Npt::write_protect`], which the write-fault log must not
/// undo.
const PROTECTED: u64 = 1 << 10;
/// Flags a split copies from a large page into its smaller ones (PS and PAT are re-placed).
const INHERITED: u64 = P | RW | US | PWT | PCD | A | D | G | LOGGED | PROTECTED | NX;
/// Every table (non-leaf) entry: rights are decided by the leaves.
const TABLE: u64 = P | RW | US;

/// Bytes mapped by one entry at `level` (1 = PTE ... 4 = PML4E).
const fn level_size(level: u32) -> u64 {
    SIZE_4K << (9 * (level - 1))
}

/// Index of `gpa` in a table at `level`.
const fn index(gpa: u64, level: u32) -> usize {
    ((gpa >> (12 + 9 * (level - 1))) & 0x1FF) as usize
}

/// A page size, i.e. the level of a leaf entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PageSize {
    /// Mapped by a PTE.
    Size4K,
    /// Mapped by a PDE with PS set.
    Size2M,
    /// Mapped by a PDPE with PS set.
    Size1G,
}

impl PageSize {
    /// Bytes in such a page.
    pub const fn bytes(self) -> u64 {
        level_size(self.level())
    }

    const fn level(self) -> u32 {
        match self {
            Self::Size4K => 1,
            Self::Size2M => 2,
            Self::Size1G => 3,
        }
    }

    const fn of_level(level: u32) -> PageSize {
        match level {
            1 => Self::Size4K,
            2 => Self::Size2M,
            _ => Self::Size1G,
        }
    }
}

/// What the guest may do with a mapped page (reading is implied by present).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms {
    pub write: bool,
    pub execute: bool,
}

impl Perms {
    pub const RWX: Perms = Perms {
        write: true,
        execute: true,
    };
    pub const RX: Perms = Perms {
        write: false,
        execute: true,
    };
    pub const RW: Perms = Perms {
        write: true,
        execute: false,
    };
    pub const R: Perms = Perms {
        write: false,
        execute: false,
    };

    /// The leaf flags for these rights.
    const fn bits(self) -> u64 {
        P | US | if self.write { RW } else { 0 } | if self.execute { 0 } else { NX }
    }

    const fn of(entry: u64) -> Perms {
        Perms {
            write: entry & RW != 0,
            execute: entry & NX == 0,
        }
    }
}

/// The TLB invalidation a change needs before it binds every CPU (see the module doc).
#[must_use = "a change that removed rights binds a CPU only after it flushes"]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Flush {
    /// Only rights were added: nothing to do.
    #[default]
    None,
    /// Every CPU must flush the guest's ASID before the change binds it.
    EveryCpu,
}

impl Flush {
    /// Does any CPU have to flush?
    pub fn needed(self) -> bool {
        self == Flush::EveryCpu
    }
}

impl core::ops::BitOr for Flush {
    type Output = Flush;
    fn bitor(self, other: Flush) -> Flush {
        self.max(other)
    }
}

impl core::ops::BitOrAssign for Flush {
    fn bitor_assign(&mut self, other: Flush) {
        *self = *self | other;
    }
}

/// A counter that tells each CPU, at its next VMRUN, that the nested tables lost rights
/// since it last flushed. One per set of nested tables, shared by all CPUs.
#[derive(Debug, Default)]
pub struct TlbGeneration(AtomicU64);

impl TlbGeneration {
    pub const fn new() -> Self {
        TlbGeneration(AtomicU64::new(0))
    }

    /// Records a change's [`Flush`], after the change was written.
    pub fn publish(&self, flush: Flush) {
        if flush.needed() {
            // Release: a CPU that sees the new generation also sees the entries written
            // before it (x86 keeps stores in order anyway; this is for the compiler).
            self.0.fetch_add(1, Release);
        }
    }

    /// Called by each CPU before VMRUN with the generation it last flushed for: true (and
    /// `seen` updated) when it must flush the guest's ASID now.
    pub fn must_flush(&self, seen: &mut u64) -> bool {
        let now = self.0.load(Acquire);
        let stale = *seen != now;
        *seen = now;
        stale
    }

    /// The current generation.
    pub fn current(&self) -> u64 {
        self.0.load(Acquire)
    }
}

/// Why an operation on the nested tables was refused or stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NptError {
    /// No frame left for a page table (the change may be partial: see the module doc).
    OutOfFrames,
    /// An address or length that is not a multiple of 4 KiB.
    Unaligned(u64),
    /// A range that ends past [`GPA_LIMIT`] (or, for the host side, [`HPA_LIMIT`]).
    OutOfRange(u64),
    /// No present page at this guest-physical address.
    NotMapped(Gpa),
}

impl core::fmt::Display for NptError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutOfFrames => write!(f, "out of hv memory for nested page tables"),
            Self::Unaligned(a) => write!(f, "{a:#x} is not a multiple of 4 KiB"),
            Self::OutOfRange(a) => write!(f, "range from {a:#x} ends past 48-bit addresses"),
            Self::NotMapped(gpa) => write!(f, "guest-physical {:#x} is not mapped", gpa.0),
        }
    }
}

/// How a guest-physical address translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// The host-physical address of the byte asked for.
    pub hpa: Hpa,
    pub size: PageSize,
    pub perms: Perms,
    pub accessed: bool,
    pub dirty: bool,
}

/// How dirty pages are found (see the module doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirtyLog {
    /// The processor's D bits, harvested with `fetch_and`.
    #[default]
    DirtyBits,
    /// Write-protect, and give write back at the first write's fault.
    WriteFault,
}

/// What [`Npt::dirty_log_write_fault`] made of a write fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteFault {
    /// The page was write-protected by the log: it is writable now and counts as dirty.
    /// Resume the guest (no flush: rights were added).
    Logged,
    /// The page is writable already (a stale translation, or another CPU faulted first):
    /// flush this CPU's ASID and resume.
    Spurious,
    /// Not the log's: some other owner of the page decides.
    NotLogged,
}

/// One entry of a live table.
///
/// Invariant: points into a table frame of the [`Npt`] that made it, which stays allocated
/// (in the tree or on the retired list) for as long as the `Slot` is used: slots live only
/// inside one method call, and frames go back to the source only in [`Npt::reclaim`].
#[derive(Clone, Copy)]
struct Slot(*mut u64);

impl Slot {
    /// Runs `f` on the entry as an atomic; the reference cannot escape `f`.
    fn with<R>(self, f: impl FnOnce(&AtomicU64) -> R) -> R {
        // SAFETY: the pointer is 8-byte aligned and valid for reads and writes (the `Frames`
        // contract) for as long as the slot is used (the invariant above), and every access
        // to table memory, ours and the processor's walks, is an atomic 8-byte access.
        f(unsafe { AtomicU64::from_ptr(self.0) })
    }
    fn load(self) -> u64 {
        self.with(|a| a.load(Acquire))
    }
    fn store(self, v: u64) {
        self.with(|a| a.store(v, Release))
    }
    fn swap(self, v: u64) -> u64 {
        self.with(|a| a.swap(v, AcqRel))
    }
    /// Replaces `current` by `new` if the entry still holds it; else returns what it holds.
    fn compare_exchange(self, current: u64, new: u64) -> Result<u64, u64> {
        self.with(|a| a.compare_exchange(current, new, AcqRel, Acquire))
    }
    /// Clears the bits not in `mask`; returns the old entry.
    fn fetch_and(self, mask: u64) -> u64 {
        self.with(|a| a.fetch_and(mask, AcqRel))
    }
    /// Applies `f` atomically; returns the old entry.
    fn update(self, f: impl Fn(u64) -> u64) -> u64 {
        self.with(|a| match a.fetch_update(AcqRel, Acquire, |e| Some(f(e))) {
            Ok(old) | Err(old) => old,
        })
    }
}

/// What one pass over a range does at each entry.
enum Op<'f> {
    /// Map `gpa` to `gpa + delta` (wrapping) with these leaf flags.
    Map {
        delta: u64,
        leaf: u64,
    },
    Unmap,
    /// Set and clear leaf bits (write-protect, allow write).
    Rights {
        set: u64,
        clear: u64,
    },
    /// Split every leaf larger than this level.
    Split {
        level: u32,
    },
    LogStart(DirtyLog),
    LogStop(DirtyLog),
    Harvest(DirtyLog, &'f mut dyn FnMut(Gpa)),
}

/// A set of nested page tables, with the frames they are built from.
pub struct Npt<F: Frames> {
    frames: F,
    root: Hpa,
    /// Tables taken out of the tree, not yet given back (see [`Npt::reclaim`]).
    retired: Option<Hpa>,
    retired_count: u64,
    /// Frames the source refused to take back.
    leaked: u64,
}

impl<F: Frames> Npt<F> {
    /// Empty tables (nothing mapped): one PML4 frame from `frames`.
    pub fn new(mut frames: F) -> Result<Self, NptError> {
        let root = Hpa(frames.alloc().ok_or(NptError::OutOfFrames)?);
        Ok(Npt {
            frames,
            root,
            retired: None,
            retired_count: 0,
            leaked: 0,
        })
    }

    /// The PML4's address: the VMCB's N_CR3.
    pub fn root(&self) -> Hpa {
        self.root
    }

    /// The frame source, e.g. for the hv's other allocations from the same pool.
    pub fn frames(&self) -> &F {
        &self.frames
    }

    pub fn frames_mut(&mut self) -> &mut F {
        &mut self.frames
    }

    /// Tables retired and not yet reclaimed.
    pub fn retired_frames(&self) -> u64 {
        self.retired_count
    }

    /// Frames the source refused to take back (0 unless a source that cannot free is used).
    pub fn leaked_frames(&self) -> u64 {
        self.leaked
    }

    fn slot(&self, table: Hpa, i: usize) -> Slot {
        Slot(self.frames.table(table.0).cast::<u64>().wrapping_add(i))
    }

    /// Identity-maps `[0, limit)` with `perms` and the largest pages that fit, leaving every
    /// 4 KiB page of `holes` not present (the hv's own memory, the store's chunks).
    pub fn identity(
        &mut self,
        limit: u64,
        holes: &[Range<u64>],
        perms: Perms,
    ) -> Result<Flush, NptError> {
        check_range(Gpa(0), limit)?;
        for h in holes {
            check_range(Gpa(h.start), h.end.saturating_sub(h.start))?;
        }
        let mut flush = Flush::None;
        let mut at = 0;
        while at < limit {
            // Inside a hole: skip to the furthest end of the holes that contain `at`.
            if let Some(end) = holes
                .iter()
                .filter(|h| h.contains(&at))
                .map(|h| h.end)
                .max()
            {
                at = end;
                continue;
            }
            let next = holes
                .iter()
                .map(|h| h.start)
                .filter(|&s| s > at)
                .fold(limit, u64::min);
            flush |= self.map(Gpa(at), Hpa(at), next - at, perms)?;
            at = next;
        }
        Ok(flush)
    }

    /// Maps `[gpa, gpa + len)` to `[hpa, hpa + len)` with the largest pages the alignment of
    /// both allows, splitting a larger page in the way and replacing (and retiring) tables
    /// that a new large page covers.
    pub fn map(&mut self, gpa: Gpa, hpa: Hpa, len: u64, perms: Perms) -> Result<Flush, NptError> {
        let end = check_range(gpa, len)?;
        if !hpa.0.is_multiple_of(SIZE_4K) {
            return Err(NptError::Unaligned(hpa.0));
        }
        if hpa.0.checked_add(len).is_none_or(|e| e > HPA_LIMIT) {
            return Err(NptError::OutOfRange(hpa.0));
        }
        let delta = hpa.0.wrapping_sub(gpa.0);
        self.run(
            gpa.0,
            end,
            Op::Map {
                delta,
                leaf: perms.bits(),
            },
        )
    }

    /// Makes `[gpa, gpa + len)` not present, splitting large pages that stick out of it and
    /// retiring tables left empty.
    pub fn unmap(&mut self, gpa: Gpa, len: u64) -> Result<Flush, NptError> {
        let end = check_range(gpa, len)?;
        self.run(gpa.0, end, Op::Unmap)
    }

    /// Splits the page that maps `gpa` until it is no larger than `to`.
    pub fn split(&mut self, gpa: Gpa, to: PageSize) -> Result<Flush, NptError> {
        let page = Gpa(gpa.0 & !(SIZE_4K - 1));
        check_range(page, SIZE_4K)?;
        if self.translate(page).is_none() {
            return Err(NptError::NotMapped(gpa));
        }
        self.run(page.0, page.0 + SIZE_4K, Op::Split { level: to.level() })
    }

    /// Takes write access away from the present pages of `[gpa, gpa + len)`.
    pub fn write_protect(&mut self, gpa: Gpa, len: u64) -> Result<Flush, NptError> {
        let end = check_range(gpa, len)?;
        self.run(
            gpa.0,
            end,
            Op::Rights {
                set: PROTECTED,
                clear: RW,
            },
        )
    }

    /// Gives write access to the present pages of `[gpa, gpa + len)`.
    pub fn allow_write(&mut self, gpa: Gpa, len: u64) -> Result<Flush, NptError> {
        let end = check_range(gpa, len)?;
        self.run(
            gpa.0,
            end,
            Op::Rights {
                set: RW,
                clear: PROTECTED,
            },
        )
    }

    /// Points the 4 KiB guest page at `gpa` to the host frame `hpa`, keeping its rights,
    /// splitting a large page around it. Returns the host frame it had.
    pub fn remap(&mut self, gpa: Gpa, hpa: Hpa) -> Result<(Hpa, Flush), NptError> {
        check_range(gpa, SIZE_4K)?;
        if !hpa.0.is_multiple_of(SIZE_4K) {
            return Err(NptError::Unaligned(hpa.0));
        }
        if hpa.0 >= HPA_LIMIT {
            return Err(NptError::OutOfRange(hpa.0));
        }
        if self.translate(gpa).is_none() {
            return Err(NptError::NotMapped(gpa));
        }
        let flush = self.run(gpa.0, gpa.0 + SIZE_4K, Op::Split { level: 1 })?;
        let pte = self.pte(gpa).ok_or(NptError::NotMapped(gpa))?;
        // The new frame's A and D start clear: nothing has used it yet.
        let old = pte.update(|e| (e & !(ADDR_MASK | A | D)) | hpa.0);
        Ok((Hpa(old & ADDR_MASK), flush | Flush::EveryCpu))
    }

    /// How `gpa` translates, if it does.
    pub fn translate(&self, gpa: Gpa) -> Option<Mapping> {
        if gpa.0 >= GPA_LIMIT {
            return None;
        }
        let mut table = self.root;
        for level in (1..=4).rev() {
            let e = self.slot(table, index(gpa.0, level)).load();
            if e & P == 0 {
                return None;
            }
            if level == 1 || (level <= 3 && e & PS != 0) {
                let size = level_size(level);
                let frame = e & ADDR_MASK & !(size - 1);
                return Some(Mapping {
                    hpa: Hpa(frame | (gpa.0 & (size - 1))),
                    size: PageSize::of_level(level),
                    perms: Perms::of(e),
                    accessed: e & A != 0,
                    dirty: e & D != 0,
                });
            }
            table = Hpa(e & ADDR_MASK);
        }
        None
    }

    /// The PTE of a present 4 KiB page (no large page on the way).
    fn pte(&self, gpa: Gpa) -> Option<Slot> {
        let mut table = self.root;
        for level in (2..=4).rev() {
            let e = self.slot(table, index(gpa.0, level)).load();
            if e & P == 0 || e & PS != 0 {
                return None;
            }
            table = Hpa(e & ADDR_MASK);
        }
        let pte = self.slot(table, index(gpa.0, 1));
        (pte.load() & P != 0).then_some(pte)
    }

    /// Starts logging writes to the present pages of `[gpa, gpa + len)`: splits them to
    /// 4 KiB and clears their D bits (or, for [`DirtyLog::WriteFault`], their RW).
    pub fn dirty_log_start(
        &mut self,
        gpa: Gpa,
        len: u64,
        mode: DirtyLog,
    ) -> Result<Flush, NptError> {
        let end = check_range(gpa, len)?;
        self.run(gpa.0, end, Op::LogStart(mode))
    }

    /// Reports each page of `[gpa, gpa + len)` written since the last harvest (or the
    /// start) to `dirty`, and re-arms it. A dirty large page (a range never started) is
    /// reported page by page; one that sticks out of the range is reported but not re-armed.
    pub fn harvest(
        &mut self,
        gpa: Gpa,
        len: u64,
        mode: DirtyLog,
        mut dirty: impl FnMut(Gpa),
    ) -> Result<Flush, NptError> {
        let end = check_range(gpa, len)?;
        self.run(gpa.0, end, Op::Harvest(mode, &mut dirty))
    }

    /// Stops a write-fault log: gives write back to the pages it protected. (A D-bit log has
    /// nothing to undo; map the range again to merge its pages back into large ones.)
    pub fn dirty_log_stop(
        &mut self,
        gpa: Gpa,
        len: u64,
        mode: DirtyLog,
    ) -> Result<Flush, NptError> {
        let end = check_range(gpa, len)?;
        self.run(gpa.0, end, Op::LogStop(mode))
    }

    /// Is the page of `gpa` held read-only by a write-fault log (its next write faults and
    /// [`Npt::dirty_log_write_fault`] would give write back)? For a caller that must act
    /// before the page becomes writable (copy-on-write keeps the old contents first).
    pub fn dirty_log_protected(&self, gpa: Gpa) -> bool {
        self.pte(Gpa(gpa.0 & !(SIZE_4K - 1)))
            .is_some_and(|pte| pte.load() & (LOGGED | PROTECTED | RW) == LOGGED)
    }

    /// The nested page fault handler's question for a write fault at `gpa`: was it the
    /// write-fault log's protection? If so, the page is made writable again.
    pub fn dirty_log_write_fault(&mut self, gpa: Gpa) -> WriteFault {
        let Some(pte) = self.pte(Gpa(gpa.0 & !(SIZE_4K - 1))) else {
            return WriteFault::NotLogged;
        };
        let old = pte.update(|e| {
            if e & (LOGGED | PROTECTED | RW) == LOGGED {
                e | RW
            } else {
                e
            }
        });
        if old & RW != 0 {
            WriteFault::Spurious
        } else if old & (LOGGED | PROTECTED) == LOGGED {
            WriteFault::Logged
        } else {
            WriteFault::NotLogged
        }
    }

    /// Gives the retired tables back to the frame source; returns how many.
    ///
    /// # Safety
    /// Since the operations that retired them, every CPU that runs the guest on these tables
    /// has flushed the guest's ASID (e.g. every CPU resumed from a rendezvous with a flush,
    /// or has seen the [`TlbGeneration`] those operations published), or no CPU runs the
    /// guest. Otherwise a CPU's cached walk could still go through a frame that is reused for
    /// something else, and the guest would reach memory it must not.
    pub unsafe fn reclaim(&mut self) -> u64 {
        let n = self.retired_count;
        while let Some(table) = self.retired.take() {
            self.retired_count -= 1;
            if self.retired_count > 0 {
                self.retired = Some(Hpa(self.slot(table, 0).load() & ADDR_MASK));
            }
            if !self.frames.free(table.0) {
                self.leaked += 1;
            }
        }
        n
    }

    /// Table frames in the tree now, the root included.
    pub fn table_frames(&self) -> u64 {
        self.count_tables(self.root, 4)
    }

    fn count_tables(&self, table: Hpa, level: u32) -> u64 {
        let mut n = 1;
        if level > 1 {
            for i in 0..512 {
                let e = self.slot(table, i).load();
                if e & P != 0 && (level == 4 || e & PS == 0) {
                    n += self.count_tables(Hpa(e & ADDR_MASK), level - 1);
                }
            }
        }
        n
    }

    fn run(&mut self, start: u64, end: u64, mut op: Op<'_>) -> Result<Flush, NptError> {
        let mut flush = Flush::None;
        if start < end {
            self.walk(self.root, 4, 0, start, end, &mut op, &mut flush)?;
        }
        Ok(flush)
    }

    /// Applies `op` to `[start, end)` in the table at `level` that maps from `base`.
    #[allow(clippy::too_many_arguments)]
    fn walk(
        &mut self,
        table: Hpa,
        level: u32,
        base: u64,
        start: u64,
        end: u64,
        op: &mut Op<'_>,
        flush: &mut Flush,
    ) -> Result<(), NptError> {
        let size = level_size(level);
        // Looked up once per table, not per entry: a pool's PA-to-VA lookup is a search.
        let entries = self.frames.table(table.0).cast::<u64>();
        for i in index(start, level)..=index(end - 1, level) {
            let e_base = base + i as u64 * size;
            let lo = start.max(e_base);
            let hi = end.min(e_base + size);
            let covered = lo == e_base && hi == e_base + size;
            let slot = Slot(entries.wrapping_add(i));
            let e = slot.load();
            let present = e & P != 0;
            let leaf = present && (level == 1 || (level <= 3 && e & PS != 0));
            let child = match op {
                Op::Map { delta, leaf: bits } => {
                    let hpa = e_base.wrapping_add(*delta);
                    if level <= 3 && covered && hpa % size == 0 {
                        let new = hpa | *bits | if level > 1 { PS } else { 0 };
                        let old = slot.swap(new);
                        if old & P != 0 {
                            if level > 1 && old & PS == 0 {
                                // Only a table with something in it took rights away.
                                if !self.is_empty(Hpa(old & ADDR_MASK)) {
                                    *flush = Flush::EveryCpu;
                                }
                                self.retire(Hpa(old & ADDR_MASK), level - 1);
                            } else if !only_adds_rights(old, new) {
                                *flush = Flush::EveryCpu;
                            }
                        }
                        continue;
                    }
                    if !present {
                        let t = Hpa(self.frames.alloc().ok_or(NptError::OutOfFrames)?);
                        // Not present, so no walk reads or writes this entry: a store will do.
                        slot.store(t.0 | TABLE);
                        t
                    } else {
                        self.table_below(slot, e, leaf, level, flush)?
                    }
                }
                Op::Unmap => {
                    if !present {
                        continue;
                    }
                    if covered {
                        let old = slot.swap(0);
                        if !leaf {
                            self.retire(Hpa(old & ADDR_MASK), level - 1);
                        }
                        *flush = Flush::EveryCpu;
                        continue;
                    }
                    self.table_below(slot, e, leaf, level, flush)?
                }
                Op::Rights { set, clear } => {
                    if !present {
                        continue;
                    }
                    if leaf && covered {
                        let old = slot.update(|e| (e | *set) & !*clear);
                        if old & *clear & RW != 0 {
                            *flush = Flush::EveryCpu;
                        }
                        continue;
                    }
                    self.table_below(slot, e, leaf, level, flush)?
                }
                Op::Split { level: to } => {
                    if !present || (leaf && level <= *to) {
                        continue;
                    }
                    self.table_below(slot, e, leaf, level, flush)?
                }
                Op::LogStart(mode) => {
                    if !present {
                        continue;
                    }
                    if level == 1 {
                        match mode {
                            DirtyLog::DirtyBits => {
                                if e & D != 0 {
                                    slot.fetch_and(!D);
                                }
                            }
                            DirtyLog::WriteFault => {
                                slot.update(|e| (e | LOGGED) & !RW);
                            }
                        }
                        *flush = Flush::EveryCpu;
                        continue;
                    }
                    self.table_below(slot, e, leaf, level, flush)?
                }
                Op::LogStop(mode) => {
                    if !present {
                        continue;
                    }
                    if leaf {
                        if *mode == DirtyLog::WriteFault && e & LOGGED != 0 {
                            slot.update(|e| {
                                let rw = if e & PROTECTED == 0 { RW } else { 0 };
                                (e | rw) & !LOGGED
                            });
                        }
                        continue;
                    }
                    Hpa(e & ADDR_MASK)
                }
                Op::Harvest(mode, report) => {
                    if !present {
                        continue;
                    }
                    if leaf {
                        let dirty = match mode {
                            // A clean entry is only read: a D the processor sets after this
                            // load stays for the next harvest. A dirty one is cleared with
                            // fetch_and, which keeps whatever else the processor changed.
                            DirtyLog::DirtyBits if covered && e & D != 0 => {
                                slot.fetch_and(!D);
                                *flush = Flush::EveryCpu;
                                true
                            }
                            // Clearing D would lose the part outside the range.
                            DirtyLog::DirtyBits => e & D != 0,
                            DirtyLog::WriteFault if e & (LOGGED | RW) == LOGGED | RW => {
                                slot.fetch_and(!RW);
                                *flush = Flush::EveryCpu;
                                true
                            }
                            DirtyLog::WriteFault => false,
                        };
                        if dirty {
                            let mut page = lo;
                            while page < hi {
                                report(Gpa(page));
                                page += SIZE_4K;
                            }
                        }
                        continue;
                    }
                    Hpa(e & ADDR_MASK)
                }
            };
            self.walk(child, level - 1, e_base, lo, hi, op, flush)?;
            // Structural clean-up: a table left with nothing present goes.
            if matches!(op, Op::Unmap) && self.is_empty(child) {
                slot.swap(0);
                self.retire(child, level - 1);
            }
        }
        Ok(())
    }

    fn is_empty(&self, table: Hpa) -> bool {
        (0..512).all(|i| self.slot(table, i).load() & P == 0)
    }

    /// Replaces the large page in `slot` (at `level`, 3 or 2) by a table of 512 pages of the
    /// next size that translate the same way, and returns that table.
    /// The table an entry at `level` points to; a large page (`leaf`) is split into one first.
    fn table_below(
        &mut self,
        slot: Slot,
        e: u64,
        leaf: bool,
        level: u32,
        flush: &mut Flush,
    ) -> Result<Hpa, NptError> {
        if leaf {
            self.split_entry(slot, level, flush)
        } else {
            Ok(Hpa(e & ADDR_MASK))
        }
    }

    fn split_entry(&mut self, slot: Slot, level: u32, flush: &mut Flush) -> Result<Hpa, NptError> {
        let table = Hpa(self.frames.alloc().ok_or(NptError::OutOfFrames)?);
        let mut large = slot.load();
        loop {
            for k in 0..512 {
                self.slot(table, k).store(smaller(large, level, k as u64));
            }
            // Publish the table only once it is complete. The processor may have set A or D
            // on the large page meanwhile: then copy them down again.
            match slot.compare_exchange(large, table.0 | TABLE) {
                Ok(_) => break,
                Err(now) => large = now,
            }
        }
        *flush = Flush::EveryCpu;
        Ok(table)
    }

    /// Puts `table` (at `level`) and the tables below it on the retired list.
    fn retire(&mut self, table: Hpa, level: u32) {
        if level > 1 {
            for i in 0..512 {
                let e = self.slot(table, i).load();
                if e & P != 0 && (level == 4 || e & PS == 0) {
                    self.retire(Hpa(e & ADDR_MASK), level - 1);
                }
            }
        }
        // The link has P clear (a frame address): a stale walk through this table sees
        // "not present" in entry 0, and the other entries as they were.
        self.slot(table, 0).store(self.retired.map_or(0, |h| h.0));
        self.retired = Some(table);
        self.retired_count += 1;
    }
}

/// Entry `k` of the table that replaces the large page `large` at `level`.
fn smaller(large: u64, level: u32, k: u64) -> u64 {
    let size = level_size(level);
    let frame = (large & ADDR_MASK & !(size - 1)) + k * level_size(level - 1);
    let pat = large & PAT_LARGE != 0;
    let mut e = frame | (large & INHERITED);
    if level - 1 > 1 {
        e |= PS | if pat { PAT_LARGE } else { 0 };
    } else if pat {
        e |= PAT_4K;
    }
    e
}

/// Is `new` the same page as `old` with at least the same rights?
fn only_adds_rights(old: u64, new: u64) -> bool {
    let same = ADDR_MASK | PS | PWT | PCD | PAT_4K | G;
    (old & same) == (new & same)
        && (old & RW == 0 || new & RW != 0)
        && (old & NX != 0 || new & NX == 0)
}

/// The end of `[gpa, gpa + len)`, checked.
fn check_range(gpa: Gpa, len: u64) -> Result<u64, NptError> {
    if !gpa.0.is_multiple_of(SIZE_4K) {
        return Err(NptError::Unaligned(gpa.0));
    }
    if !len.is_multiple_of(SIZE_4K) {
        return Err(NptError::Unaligned(len));
    }
    match gpa.0.checked_add(len) {
        Some(end) if end <= GPA_LIMIT => Ok(end),
        _ => Err(NptError::OutOfRange(gpa.0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::tests::Memory;
    use crate::frames::FramePool;
    use crate::paging::{self, SIZE_1G, SIZE_2M, SIZE_512G};
    use std::collections::BTreeSet;

    /// Made-up host-physical address of the memory the tables are built in.
    const TABLES_PA: u64 = 0x7F_0000_0000;

    /// Frames for a test: memory first, so it outlives the pool that borrows it.
    struct Host {
        mem: Memory,
        bits: Vec<u64>,
    }

    impl Host {
        fn new(frames: usize) -> Host {
            Host {
                mem: Memory::new(TABLES_PA, frames),
                bits: vec![0; FramePool::words_for(frames as u64 * SIZE_4K)],
            }
        }

        fn npt(&mut self) -> Npt<FramePool<'_>> {
            let mut pool = FramePool::new(&mut self.bits);
            self.mem.lend(&mut pool).unwrap();
            Npt::new(pool).unwrap()
        }
    }

    /// Reads the entry at `pa` from the pool's frames, for `paging::translate`.
    fn reader<'p>(pool: &'p FramePool<'_>) -> impl Fn(u64) -> Option<u64> + 'p {
        move |pa| {
            let va = pool.va(Hpa(pa & !(SIZE_4K - 1)))?;
            // SAFETY: an 8-byte-aligned entry inside a live frame of the pool.
            Some(unsafe { ((va + pa % SIZE_4K) as *const u64).read() })
        }
    }

    /// Translations of `gpas` as (hpa, perms), for comparing before and after.
    fn snapshot<F: Frames>(npt: &Npt<F>, gpas: &[u64]) -> Vec<Option<(Hpa, Perms)>> {
        gpas.iter()
            .map(|&g| npt.translate(Gpa(g)).map(|m| (m.hpa, m.perms)))
            .collect()
    }

    /// Spread-out sample addresses in `[0, limit)`: every 2 MiB boundary's neighbours and
    /// pseudo-random bytes (a fixed LCG, so a failure reproduces).
    fn samples(limit: u64) -> Vec<u64> {
        let mut v = Vec::new();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..4000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            v.push((x >> 16) % limit);
        }
        let mut b = 0;
        while b < limit {
            v.extend(
                [b, b + 8, b + SIZE_4K, b + SIZE_2M - 1]
                    .iter()
                    .filter(|&&a| a < limit),
            );
            b += SIZE_2M;
        }
        v
    }

    #[test]
    fn splitting_1g_and_2m_pages_keeps_every_translation() {
        let mut host = Host::new(16);
        let mut npt = host.npt();
        let hpa = 0x40_0000_0000;
        assert_eq!(
            npt.map(Gpa(0), Hpa(hpa), 4 * SIZE_1G, Perms::RWX),
            Ok(Flush::None)
        );
        // PML4 and one PDPT: four 1 GiB pages.
        assert_eq!(npt.table_frames(), 2);
        let gpas = samples(5 * SIZE_1G);
        let before = snapshot(&npt, &gpas);
        let g = Gpa(SIZE_1G + 3 * SIZE_2M + 0x5123);
        assert_eq!(npt.translate(g).unwrap().size, PageSize::Size1G);

        assert_eq!(npt.split(g, PageSize::Size2M), Ok(Flush::EveryCpu));
        assert_eq!(npt.translate(g).unwrap().size, PageSize::Size2M);
        assert_eq!(npt.table_frames(), 3);
        assert_eq!(snapshot(&npt, &gpas), before);

        assert_eq!(npt.split(g, PageSize::Size4K), Ok(Flush::EveryCpu));
        let m = npt.translate(g).unwrap();
        assert_eq!((m.size, m.hpa), (PageSize::Size4K, Hpa(hpa + g.0)));
        assert_eq!(npt.table_frames(), 4);
        assert_eq!(snapshot(&npt, &gpas), before);
        // Straight from a 1 GiB page to 4 KiB pages in another GiB.
        assert_eq!(
            npt.split(Gpa(3 * SIZE_1G), PageSize::Size4K),
            Ok(Flush::EveryCpu)
        );
        assert_eq!(npt.table_frames(), 6);
        assert_eq!(snapshot(&npt, &gpas), before);
        // Nothing left to split, and nothing to split outside the map.
        assert_eq!(npt.split(g, PageSize::Size4K), Ok(Flush::None));
        assert_eq!(
            npt.split(Gpa(4 * SIZE_1G), PageSize::Size4K),
            Err(NptError::NotMapped(Gpa(4 * SIZE_1G)))
        );
    }

    #[test]
    fn a_split_keeps_caching_bits_pat_and_dirty_state() {
        // A 2 MiB page with PAT (bit 12), PCD, A and D: the 4 KiB pages carry PAT in bit 7.
        let large = 0x1234_0000_0000 | P | RW | US | PCD | A | D | PS | PAT_LARGE;
        let e = smaller(large, 2, 3);
        assert_eq!(
            e,
            (0x1234_0000_0000 + 3 * SIZE_4K) | P | RW | US | PCD | A | D | PAT_4K
        );
        // A 1 GiB page splits into 2 MiB pages that keep PS and PAT in bit 12.
        let huge = 0x40_0000_0000 | P | US | NX | PS | PAT_LARGE;
        assert_eq!(
            smaller(huge, 3, 511),
            (0x40_0000_0000 + 511 * SIZE_2M) | P | US | NX | PS | PAT_LARGE
        );
    }

    #[test]
    fn write_protect_then_translate_shows_read_only() {
        let mut host = Host::new(16);
        let mut npt = host.npt();
        let _ = npt.map(Gpa(0), Hpa(0), SIZE_1G, Perms::RWX).unwrap();
        let at = Gpa(5 * SIZE_2M + 7 * SIZE_4K);
        assert_eq!(npt.write_protect(at, 3 * SIZE_4K), Ok(Flush::EveryCpu));
        let w = |npt: &Npt<_>, g: u64| npt.translate(Gpa(g)).unwrap().perms.write;
        for p in 0..3 {
            assert!(
                !w(&npt, at.0 + p * SIZE_4K + 0x10),
                "page {p} still writable"
            );
        }
        assert!(w(&npt, at.0 - 1));
        assert!(w(&npt, at.0 + 3 * SIZE_4K));
        assert!(w(&npt, 0));
        assert!(npt.translate(at).unwrap().perms.execute);
        // Protecting again takes nothing away; giving write back needs no flush.
        assert_eq!(npt.write_protect(at, SIZE_4K), Ok(Flush::None));
        assert_eq!(npt.allow_write(at, 3 * SIZE_4K), Ok(Flush::None));
        assert!(w(&npt, at.0 + 2 * SIZE_4K));
        // A whole 1 GiB page is protected in place, without splitting.
        let mut host2 = Host::new(4);
        let mut npt2 = host2.npt();
        let _ = npt2.map(Gpa(0), Hpa(0), SIZE_1G, Perms::RW).unwrap();
        assert_eq!(npt2.write_protect(Gpa(0), SIZE_1G), Ok(Flush::EveryCpu));
        assert_eq!(npt2.table_frames(), 2);
        assert_eq!(npt2.translate(Gpa(SIZE_1G - 1)).unwrap().perms, Perms::R);
    }

    #[test]
    fn remap_points_one_page_elsewhere_and_returns_the_old_frame() {
        let mut host = Host::new(16);
        let mut npt = host.npt();
        let _ = npt.map(Gpa(0), Hpa(0), 2 * SIZE_1G, Perms::RW).unwrap();
        let g = Gpa(SIZE_1G + 77 * SIZE_4K);
        let (old, flush) = npt.remap(g, Hpa(0x99_0000_0000)).unwrap();
        assert_eq!((old, flush), (Hpa(g.0), Flush::EveryCpu));
        let m = npt.translate(Gpa(g.0 + 0x123)).unwrap();
        assert_eq!(
            (m.hpa, m.size, m.perms),
            (Hpa(0x99_0000_0123), PageSize::Size4K, Perms::RW)
        );
        // Its neighbours still translate to themselves.
        for n in [g.0 - SIZE_4K, g.0 + SIZE_4K, SIZE_1G, 2 * SIZE_1G - 1] {
            assert_eq!(npt.translate(Gpa(n)).unwrap().hpa, Hpa(n));
        }
        assert_eq!(
            npt.remap(g, Hpa(g.0)),
            Ok((Hpa(0x99_0000_0000), Flush::EveryCpu))
        );
        assert_eq!(npt.translate(g).unwrap().hpa, Hpa(g.0));
        assert_eq!(
            npt.remap(Gpa(3 * SIZE_1G), Hpa(0)),
            Err(NptError::NotMapped(Gpa(3 * SIZE_1G)))
        );
        assert_eq!(npt.remap(g, Hpa(0x10)), Err(NptError::Unaligned(0x10)));
    }

    #[test]
    fn unmap_retires_the_tables_and_reclaim_returns_them_to_the_pool() {
        let mut host = Host::new(64);
        let mut npt = host.npt();
        let free_at_start = npt.frames().free_frames();
        // Scattered 4 KiB pages: each needs its own PDPT, PD and PT.
        let pages = [0x1000u64, 0x80_0000_1000, 0x100_0020_0000, 0x7FFF_FFFF_F000];
        for &p in &pages {
            assert_eq!(
                npt.map(Gpa(p), Hpa(p), SIZE_4K, Perms::RWX),
                Ok(Flush::None)
            );
        }
        let tables = npt.table_frames();
        assert_eq!(free_at_start - npt.frames().free_frames(), tables - 1);
        // A partial unmap retires nothing the other pages need.
        assert_eq!(npt.unmap(Gpa(pages[1]), SIZE_4K), Ok(Flush::EveryCpu));
        assert!(npt.translate(Gpa(pages[1])).is_none());
        assert!(npt.translate(Gpa(pages[0])).is_some());
        // Its PT, PD and PDPT went empty: all three retired, none reused yet.
        assert_eq!(npt.retired_frames(), 3);
        assert_eq!(npt.table_frames(), tables - 3);
        assert_eq!(npt.unmap(Gpa(0), GPA_LIMIT), Ok(Flush::EveryCpu));
        assert_eq!(npt.table_frames(), 1);
        assert_eq!(npt.retired_frames(), tables - 1);
        assert_eq!(npt.frames().free_frames(), free_at_start - (tables - 1));
        // SAFETY: no CPU runs a guest on these tables (a host test).
        assert_eq!(unsafe { npt.reclaim() }, tables - 1);
        assert_eq!(npt.frames().free_frames(), free_at_start);
        assert_eq!((npt.retired_frames(), npt.leaked_frames()), (0, 0));
        // Unmapping nothing changes nothing.
        assert_eq!(npt.unmap(Gpa(0), SIZE_1G), Ok(Flush::None));
    }

    #[test]
    fn a_large_page_mapped_over_tables_merges_them_away() {
        let mut host = Host::new(16);
        let mut npt = host.npt();
        let _ = npt.map(Gpa(0), Hpa(0), SIZE_1G, Perms::RWX).unwrap();
        let _ = npt
            .dirty_log_start(Gpa(0), 2 * SIZE_2M, DirtyLog::DirtyBits)
            .unwrap();
        // The 1 GiB page became a PD with two PTs.
        assert_eq!(npt.table_frames(), 5);
        assert_eq!(
            npt.map(Gpa(0), Hpa(0), SIZE_1G, Perms::RWX),
            Ok(Flush::EveryCpu)
        );
        assert_eq!(npt.table_frames(), 2);
        assert_eq!(npt.retired_frames(), 3);
        assert_eq!(npt.translate(Gpa(SIZE_2M)).unwrap().size, PageSize::Size1G);
    }

    #[test]
    fn dirty_bits_harvest_reports_exactly_the_pages_written() {
        let mut host = Host::new(16);
        let mut npt = host.npt();
        let _ = npt
            .map(Gpa(0), Hpa(0x10_0000_0000), SIZE_1G, Perms::RWX)
            .unwrap();
        let range = (Gpa(2 * SIZE_2M), 2 * SIZE_2M);
        // A fresh map carries no D bits; pretend the guest wrote the 1 GiB page once.
        assert_eq!(
            npt.dirty_log_start(range.0, range.1, DirtyLog::DirtyBits),
            Ok(Flush::EveryCpu)
        );
        assert_eq!(
            npt.translate(Gpa(2 * SIZE_2M)).unwrap().size,
            PageSize::Size4K
        );
        assert_eq!(npt.translate(Gpa(0)).unwrap().size, PageSize::Size2M);
        let harvest = |npt: &mut Npt<_>| {
            let mut got = BTreeSet::new();
            let flush = npt
                .harvest(range.0, range.1, DirtyLog::DirtyBits, |g| {
                    assert!(got.insert(g.0), "{g:?} twice")
                })
                .unwrap();
            (got, flush)
        };
        assert_eq!(harvest(&mut npt), (BTreeSet::new(), Flush::None));
        // The processor sets D on the first write through a PTE.
        let written = [
            2 * SIZE_2M,
            2 * SIZE_2M + 5 * SIZE_4K,
            4 * SIZE_2M - SIZE_4K,
        ];
        for &w in &written {
            npt.pte(Gpa(w)).unwrap().update(|e| e | A | D);
        }
        // A write outside the range is not reported.
        npt.pte(Gpa(SIZE_1G - SIZE_4K)).map(|p| p.update(|e| e | D));
        assert_eq!(
            harvest(&mut npt),
            (written.into_iter().collect(), Flush::EveryCpu)
        );
        assert!(!npt.translate(Gpa(written[1])).unwrap().dirty);
        assert!(npt.translate(Gpa(written[1])).unwrap().accessed);
        assert_eq!(harvest(&mut npt), (BTreeSet::new(), Flush::None));
    }

    #[test]
    fn a_dirty_large_page_is_reported_whole_and_rearmed_only_when_covered() {
        let mut host = Host::new(16);
        let mut npt = host.npt();
        let _ = npt.map(Gpa(0), Hpa(0), SIZE_1G, Perms::RWX).unwrap();
        let _ = npt.split(Gpa(0), PageSize::Size2M).unwrap();
        let pde = |npt: &Npt<FramePool<'_>>| {
            let pdpt = Hpa(npt.slot(npt.root, 0).load() & ADDR_MASK);
            let pd = Hpa(npt.slot(pdpt, 0).load() & ADDR_MASK);
            npt.slot(pd, 1)
        };
        pde(&npt).update(|e| e | D);
        let mut n = 0;
        // Half of the 2 MiB page: reported, D kept for the other half.
        let f = npt
            .harvest(Gpa(SIZE_2M), SIZE_1G / 1024, DirtyLog::DirtyBits, |_| {
                n += 1
            })
            .unwrap();
        assert_eq!((n, f), (256, Flush::None));
        assert!(pde(&npt).load() & D != 0);
        n = 0;
        let f = npt
            .harvest(Gpa(0), SIZE_1G, DirtyLog::DirtyBits, |_| n += 1)
            .unwrap();
        assert_eq!((n, f), (512, Flush::EveryCpu));
        assert!(pde(&npt).load() & D == 0);
    }

    #[test]
    fn write_fault_log_gives_write_back_once_and_harvest_rearms() {
        let mut host = Host::new(16);
        let mut npt = host.npt();
        let _ = npt.map(Gpa(0), Hpa(0), SIZE_2M, Perms::RW).unwrap();
        let owned = Gpa(9 * SIZE_4K);
        let _ = npt.write_protect(owned, SIZE_4K).unwrap();
        assert_eq!(
            npt.dirty_log_start(Gpa(0), SIZE_2M, DirtyLog::WriteFault),
            Ok(Flush::EveryCpu)
        );
        let g = Gpa(3 * SIZE_4K + 8);
        assert!(!npt.translate(g).unwrap().perms.write);
        assert_eq!(npt.dirty_log_write_fault(g), WriteFault::Logged);
        assert!(npt.translate(g).unwrap().perms.write);
        assert_eq!(npt.dirty_log_write_fault(g), WriteFault::Spurious);
        // A page write-protected by an owner stays that owner's.
        assert_eq!(npt.dirty_log_write_fault(owned), WriteFault::NotLogged);
        assert_eq!(
            npt.dirty_log_write_fault(Gpa(SIZE_1G)),
            WriteFault::NotLogged
        );
        let mut got = Vec::new();
        let f = npt
            .harvest(Gpa(0), SIZE_2M, DirtyLog::WriteFault, |p| got.push(p))
            .unwrap();
        assert_eq!((got, f), (vec![Gpa(3 * SIZE_4K)], Flush::EveryCpu));
        assert!(!npt.translate(g).unwrap().perms.write);
        assert_eq!(
            npt.dirty_log_stop(Gpa(0), SIZE_2M, DirtyLog::WriteFault),
            Ok(Flush::None)
        );
        assert!(npt.translate(g).unwrap().perms.write);
        assert!(!npt.translate(owned).unwrap().perms.write);
        assert_eq!(npt.dirty_log_write_fault(g), WriteFault::Spurious);
    }

    #[test]
    fn d_bits_set_concurrently_are_never_lost() {
        // Another thread plays the processors of other CPUs: it sets D bits with atomic ORs
        // (as a page walk does) while this one harvests. Every page written is reported.
        let mut host = Host::new(16);
        let mut npt = host.npt();
        let _ = npt.map(Gpa(0), Hpa(0), SIZE_2M, Perms::RW).unwrap();
        let _ = npt
            .dirty_log_start(Gpa(0), SIZE_2M, DirtyLog::DirtyBits)
            .unwrap();
        let ptes: Vec<usize> = (0..512)
            .map(|p| npt.pte(Gpa(p * SIZE_4K)).unwrap().0 as usize)
            .collect();
        let done = std::sync::atomic::AtomicBool::new(false);
        let mut reported = BTreeSet::new();
        let written = std::thread::scope(|s| {
            let writer = s.spawn(|| {
                let mut written = BTreeSet::new();
                let mut x = 7u64;
                for _ in 0..20_000 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    let p = (x >> 33) as usize % 512;
                    // SAFETY: a live PTE of the tables above, accessed atomically only.
                    unsafe { AtomicU64::from_ptr(ptes[p] as *mut u64) }.fetch_or(D, SeqCst);
                    written.insert(p as u64 * SIZE_4K);
                }
                done.store(true, SeqCst);
                written
            });
            while !done.load(SeqCst) {
                let _ = npt.harvest(Gpa(0), SIZE_2M, DirtyLog::DirtyBits, |g| {
                    reported.insert(g.0);
                });
            }
            writer.join().unwrap()
        });
        let _ = npt.harvest(Gpa(0), SIZE_2M, DirtyLog::DirtyBits, |g| {
            reported.insert(g.0);
        });
        assert_eq!(reported, written);
    }

    #[test]
    fn out_of_frames_is_reported() {
        let mut host = Host::new(3);
        let mut npt = host.npt();
        // PML4 taken; a 4 KiB page needs a PDPT, a PD and a PT: one too many.
        assert_eq!(
            npt.map(Gpa(0x5000), Hpa(0x5000), SIZE_4K, Perms::RW),
            Err(NptError::OutOfFrames)
        );
        // 1 GiB pages need only the PDPT, which the failed map left in place; the empty PD
        // it left too goes on the retired list, and back to the pool after a reclaim.
        assert_eq!(npt.map(Gpa(0), Hpa(0), SIZE_1G, Perms::RW), Ok(Flush::None));
        assert_eq!(
            npt.split(Gpa(0), PageSize::Size2M),
            Err(NptError::OutOfFrames)
        );
        // SAFETY: no CPU runs a guest on these tables (a host test).
        assert_eq!(unsafe { npt.reclaim() }, 1);
        assert_eq!(npt.split(Gpa(0), PageSize::Size2M), Ok(Flush::EveryCpu));
        assert_eq!(
            npt.split(Gpa(0), PageSize::Size4K),
            Err(NptError::OutOfFrames)
        );
        // The failed split left the 2 MiB page whole.
        assert_eq!(npt.translate(Gpa(0x5000)).unwrap().size, PageSize::Size2M);
    }

    #[test]
    fn bad_ranges_are_refused_before_anything_changes() {
        let mut host = Host::new(4);
        let mut npt = host.npt();
        assert_eq!(
            npt.map(Gpa(0x1001), Hpa(0), SIZE_4K, Perms::RW),
            Err(NptError::Unaligned(0x1001))
        );
        assert_eq!(
            npt.map(Gpa(0), Hpa(0), 0x1800, Perms::RW),
            Err(NptError::Unaligned(0x1800))
        );
        assert_eq!(
            npt.unmap(Gpa(GPA_LIMIT - SIZE_4K), 2 * SIZE_4K),
            Err(NptError::OutOfRange(GPA_LIMIT - SIZE_4K))
        );
        assert_eq!(
            npt.map(Gpa(0), Hpa(HPA_LIMIT - SIZE_4K), 2 * SIZE_4K, Perms::RW),
            Err(NptError::OutOfRange(HPA_LIMIT - SIZE_4K))
        );
        assert_eq!(npt.table_frames(), 1);
        assert_eq!(npt.translate(Gpa(GPA_LIMIT)), None);
    }

    #[test]
    fn identity_with_holes_equals_identity_map_with_hole() {
        for (limit, hole) in [
            (8 * SIZE_1G, 0x4030_0000..0x4050_2000), // crosses 2 MiB boundaries in GiB 1
            (SIZE_512G, 0x1_2340_0000..0x1_2380_0000), // 2 MiB aligned: no PTs at all
            (2 * SIZE_1G, 0x1000..0x3000),
        ] {
            // Today's builder, on its own frames.
            let mut old_mem = Memory::new(0x60_0000_0000, 16);
            let mut old_bits = [0u64; 1];
            let mut old = FramePool::new(&mut old_bits);
            old_mem.lend(&mut old).unwrap();
            let old_root = old.alloc().unwrap().0;
            let flags = P | RW | US;
            paging::identity_map_with_hole(&mut old, old_root, limit, hole.clone(), flags, flags)
                .unwrap();

            let mut host = Host::new(16);
            let mut npt = host.npt();
            assert_eq!(
                npt.identity(limit, std::slice::from_ref(&hole), Perms::RWX),
                Ok(Flush::None)
            );
            let mut gpas = samples(limit + SIZE_1G);
            let mut p = hole.start.saturating_sub(4 * SIZE_2M);
            while p < hole.end + 4 * SIZE_2M {
                gpas.push(p);
                p += SIZE_4K;
            }
            let (old_read, new_read) = (reader(&old), reader(npt.frames()));
            for g in gpas {
                let want = paging::translate(old_root, g, &old_read);
                assert_eq!(
                    paging::translate(npt.root().0, g, &new_read),
                    want,
                    "{g:#x}"
                );
                let m = npt.translate(Gpa(g));
                assert_eq!(m.map(|m| m.hpa.0).ok_or(()), want.map_err(|_| ()));
                if let Some(m) = m {
                    assert_eq!(m.perms, Perms::RWX);
                }
            }
            // Never more tables than today (fewer: a 2 MiB region wholly inside a hole
            // needs no PT of zeros).
            assert!(npt.table_frames() <= old.total() - old.free_frames());
        }
    }

    #[test]
    fn identity_with_several_holes_skips_each() {
        let mut host = Host::new(16);
        let mut npt = host.npt();
        let holes = [
            0x10_0000..0x20_0000,
            0x4000_0000..0x4040_0000,
            0x4020_0000..0x4060_0000, // overlaps the previous one
            0x1_0000_0000..0x1_0000_1000,
        ];
        assert_eq!(
            npt.identity(8 * SIZE_1G, &holes, Perms::RWX),
            Ok(Flush::None)
        );
        for g in samples(9 * SIZE_1G) {
            let in_hole = holes.iter().any(|h| h.contains(&g));
            let want = (g < 8 * SIZE_1G && !in_hole).then_some(Hpa(g));
            assert_eq!(npt.translate(Gpa(g)).map(|m| m.hpa), want, "{g:#x}");
        }
    }

    #[test]
    fn tables_over_a_pool_can_live_in_a_lock_shared_by_cpus() {
        fn shareable<T: Send>() {}
        shareable::<Npt<FramePool<'static>>>();
        shareable::<spin::Mutex<Npt<FramePool<'static>>>>();
    }

    #[test]
    fn the_tlb_generation_moves_only_when_rights_were_removed() {
        let gen = TlbGeneration::new();
        let mut seen = gen.current();
        gen.publish(Flush::None);
        assert!(!gen.must_flush(&mut seen));
        gen.publish(Flush::None | Flush::EveryCpu);
        assert!(gen.must_flush(&mut seen));
        assert!(!gen.must_flush(&mut seen));
    }

    /// Measures the D-bit dirty log over 1 GiB of 4 KiB pages (run with
    /// `cargo test --release -p quicksilver-hv --lib dirty_log_cost -- --ignored --nocapture`).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn dirty_log_cost() {
        let mut host = Host::new(520);
        let mut npt = host.npt();
        let _ = npt.map(Gpa(0), Hpa(0), SIZE_1G, Perms::RW).unwrap();
        let t = std::time::Instant::now();
        let _ = npt
            .dirty_log_start(Gpa(0), SIZE_1G, DirtyLog::DirtyBits)
            .unwrap();
        let start = t.elapsed();
        let pages = SIZE_1G / SIZE_4K;
        for p in (0..pages).step_by(64) {
            npt.pte(Gpa(p * SIZE_4K)).unwrap().update(|e| e | D);
        }
        let mut n = 0;
        let t = std::time::Instant::now();
        let _ = npt.harvest(Gpa(0), SIZE_1G, DirtyLog::DirtyBits, |_| n += 1);
        let harvest = t.elapsed();
        let t = std::time::Instant::now();
        let _ = npt.harvest(Gpa(0), SIZE_1G, DirtyLog::DirtyBits, |_| n += 1);
        let clean = t.elapsed();
        println!(
            "1 GiB: start (split to 4 KiB, clear D) {start:?}; harvest of {} dirty pages {harvest:?} \
             ({:.1} ns/page walked); harvest with none dirty {clean:?}",
            pages / 64,
            harvest.as_nanos() as f64 / pages as f64
        );
        assert_eq!(n, pages / 64);
    }

    mod property {
        use super::*;
        use proptest::prelude::*;

        /// Operations on the first 4 GiB, in units that make 4 KiB, 2 MiB and 1 GiB pages.
        #[derive(Clone, Debug)]
        enum Change {
            Map {
                gpa: u64,
                hpa: u64,
                len: u64,
                write: bool,
            },
            Unmap {
                gpa: u64,
                len: u64,
            },
            Protect {
                gpa: u64,
                len: u64,
            },
            Allow {
                gpa: u64,
                len: u64,
            },
            Remap {
                gpa: u64,
                hpa: u64,
            },
            Split {
                gpa: u64,
            },
        }

        const SPAN: u64 = 4 * SIZE_1G;

        fn range() -> impl Strategy<Value = (u64, u64)> {
            prop_oneof![Just(SIZE_4K), Just(SIZE_2M), Just(SIZE_1G)].prop_flat_map(|unit| {
                let units = SPAN / unit;
                (0..units).prop_flat_map(move |first| {
                    let most = (units - first).min(if unit == SIZE_4K { 64 } else { 3 });
                    (1..=most).prop_map(move |n| (first * unit, n * unit))
                })
            })
        }

        fn change() -> impl Strategy<Value = Change> {
            prop_oneof![
                (range(), 0..4u64, any::<bool>(), any::<bool>()).prop_map(
                    |((gpa, len), gib, skew, write)| Change::Map {
                        gpa,
                        // Same alignment as gpa (large pages possible) or, for short
                        // ranges, 4 KiB off (4 KiB pages only).
                        hpa: 0x100_0000_0000
                            + gib * SIZE_1G
                            + gpa
                            + if skew && len <= SIZE_2M { SIZE_4K } else { 0 },
                        len,
                        write,
                    }
                ),
                range().prop_map(|(gpa, len)| Change::Unmap { gpa, len }),
                range().prop_map(|(gpa, len)| Change::Protect { gpa, len }),
                range().prop_map(|(gpa, len)| Change::Allow { gpa, len }),
                (0..SPAN / SIZE_4K, 0..1u64 << 20).prop_map(|(p, f)| Change::Remap {
                    gpa: p * SIZE_4K,
                    hpa: 0x200_0000_0000 + f * SIZE_4K,
                }),
                (0..SPAN / SIZE_4K).prop_map(|p| Change::Split { gpa: p * SIZE_4K }),
            ]
        }

        /// What the model says `g` translates to after `changes`.
        fn model(changes: &[Change], g: u64) -> Option<(u64, bool)> {
            let mut state: Option<(u64, bool)> = None;
            let inside = |gpa: u64, len: u64| (gpa..gpa + len).contains(&g);
            for c in changes {
                match *c {
                    Change::Map {
                        gpa,
                        hpa,
                        len,
                        write,
                    } if inside(gpa, len) => state = Some((hpa + (g - gpa), write)),
                    Change::Unmap { gpa, len } if inside(gpa, len) => state = None,
                    Change::Protect { gpa, len } if inside(gpa, len) => {
                        state = state.map(|(h, _)| (h, false))
                    }
                    Change::Allow { gpa, len } if inside(gpa, len) => {
                        state = state.map(|(h, _)| (h, true))
                    }
                    Change::Remap { gpa, hpa } if inside(gpa, SIZE_4K) => {
                        state = state.map(|(_, w)| (hpa + (g - gpa), w))
                    }
                    _ => {}
                }
            }
            state
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]

            /// Any sequence of changes translates like the model at every boundary they
            /// touch and at sampled addresses; a change that said it needs no flush took no
            /// rights away anywhere; and unmapping everything gives every table frame back.
            #[test]
            fn changes_translate_like_the_model_and_free_everything(
                changes in proptest::collection::vec(change(), 1..12),
                extra in proptest::collection::vec(0..SPAN, 64),
            ) {
                let mut host = Host::new(160);
                let mut npt = host.npt();
                let free_at_start = npt.frames().free_frames();
                let mut points = extra;
                for c in &changes {
                    let (gpa, len) = match *c {
                        Change::Map { gpa, len, .. }
                        | Change::Unmap { gpa, len }
                        | Change::Protect { gpa, len }
                        | Change::Allow { gpa, len } => (gpa, len),
                        Change::Remap { gpa, .. } | Change::Split { gpa } => (gpa, SIZE_4K),
                    };
                    points.extend([gpa, gpa + 0x808, gpa + len - 1, gpa + len, gpa.wrapping_sub(1)]);
                }
                points.retain(|&g| g < SPAN);
                let view = |npt: &Npt<_>| -> Vec<Option<(u64, bool)>> {
                    points
                        .iter()
                        .map(|&g| npt.translate(Gpa(g)).map(|m| (m.hpa.0, m.perms.write)))
                        .collect()
                };
                for c in &changes {
                    let before = view(&npt);
                    let flush = match *c {
                        Change::Map { gpa, hpa, len, write } => {
                            let perms = if write { Perms::RWX } else { Perms::RX };
                            npt.map(Gpa(gpa), Hpa(hpa), len, perms).unwrap()
                        }
                        Change::Unmap { gpa, len } => npt.unmap(Gpa(gpa), len).unwrap(),
                        Change::Protect { gpa, len } => npt.write_protect(Gpa(gpa), len).unwrap(),
                        Change::Allow { gpa, len } => npt.allow_write(Gpa(gpa), len).unwrap(),
                        Change::Remap { gpa, hpa } => match npt.remap(Gpa(gpa), Hpa(hpa)) {
                            Ok((_, f)) => f,
                            Err(e) => {
                                prop_assert_eq!(e, NptError::NotMapped(Gpa(gpa)));
                                Flush::None
                            }
                        },
                        Change::Split { gpa } => match npt.split(Gpa(gpa), PageSize::Size4K) {
                            Ok(f) => f,
                            Err(e) => {
                                prop_assert_eq!(e, NptError::NotMapped(Gpa(gpa)));
                                Flush::None
                            }
                        },
                    };
                    if flush == Flush::None {
                        for ((was, now), g) in before.iter().zip(view(&npt)).zip(&points) {
                            if let Some((hpa, write)) = *was {
                                let kept = now.is_some_and(|(h, w)| h == hpa && (w || !write));
                                prop_assert!(kept, "{:?} at {:#x} took rights away", c, g);
                            }
                        }
                    }
                }
                for &g in &points {
                    let got = npt.translate(Gpa(g)).map(|m| (m.hpa.0, m.perms.write));
                    prop_assert_eq!(got, model(&changes, g), "at {:#x}", g);
                }
                prop_assert_eq!(npt.unmap(Gpa(0), SPAN).is_ok(), true);
                prop_assert_eq!(npt.table_frames(), 1);
                // SAFETY: no CPU runs a guest on these tables (a host test).
                unsafe { npt.reclaim() };
                prop_assert_eq!(npt.frames().free_frames(), free_at_start);
            }
        }
    }
}
