//! Four-level page tables: building the hv's own tables and the nested page tables, and
//! walking the guest's tables (AMD APM vol. 2, 5.3 "Long-mode page translation" and 15.25
//! "Nested paging"). Nested page tables have the same format as ordinary ones, with the
//! guest-physical address as the input and the U bit required at every level (FACTS.md).
//!
//! Vendor-neutral and free of privileged instructions: the tables live in frames reached
//! through [`Frames`], so host unit tests build and walk them in ordinary memory.

/// Present.
pub const P: u64 = 1 << 0;
/// Writable.
pub const RW: u64 = 1 << 1;
/// Write-through (with PCD: uncached, PAT entry 3 in every PAT the kernel sets up).
pub const PWT: u64 = 1 << 3;
/// Cache disable.
pub const PCD: u64 = 1 << 4;
/// User (required at every level of a nested table).
pub const US: u64 = 1 << 2;
/// Page size: a leaf at level 3 (1 GiB) or 2 (2 MiB).
pub const PS: u64 = 1 << 7;
/// Accessed: set by the processor's walk when it uses an entry.
pub const A: u64 = 1 << 5;
/// Dirty: set by the processor on the first write through a leaf entry.
pub const D: u64 = 1 << 6;
/// No-execute.
pub const NX: u64 = 1 << 63;
/// Physical-address bits of an entry (51:12).
pub const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

pub const SIZE_4K: u64 = 1 << 12;
pub const SIZE_2M: u64 = 1 << 21;
pub const SIZE_1G: u64 = 1 << 30;
pub const SIZE_512G: u64 = 1 << 39;

/// A guest-physical address: the input of the nested page tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct Gpa(pub u64);

/// A host-physical address: what the nested page tables translate to, and where the hv's
/// own frames are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct Hpa(pub u64);

/// Where page-table frames come from and how the builder reaches them.
///
/// # Safety
/// `alloc` must return distinct, zeroed, 4 KiB frames owned by the caller, and `table` must
/// return a pointer valid for reads and writes of that frame, 8-byte aligned, for every
/// address `alloc` returned and not yet freed (and the root passed to the functions below).
/// The builders rely on it for every entry they read and write.
pub unsafe trait Frames {
    /// A new zeroed frame, by physical address, or `None` when out of memory.
    fn alloc(&mut self) -> Option<u64>;
    /// Pointer to the table in the frame at `pa` (a frame this source handed out).
    fn table(&self, pa: u64) -> *mut [u64; 512];
    /// Gives back a frame `alloc` returned, which nothing references any more. `false` when
    /// the source cannot take it (a source that never frees, like a bump allocator, or a frame
    /// it does not know): the frame is then simply not reused.
    fn free(&mut self, pa: u64) -> bool {
        let _ = pa;
        false
    }
}

// SAFETY: forwards to `F`, which upholds the contract.
unsafe impl<F: Frames + ?Sized> Frames for &mut F {
    fn alloc(&mut self) -> Option<u64> {
        (**self).alloc()
    }
    fn table(&self, pa: u64) -> *mut [u64; 512] {
        (**self).table(pa)
    }
    fn free(&mut self, pa: u64) -> bool {
        (**self).free(pa)
    }
}

/// Why a builder stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildError {
    /// The frame source had no frame left for a table.
    OutOfFrames,
    /// A large page maps the address where a smaller mapping was asked for: these builders
    /// do not split (the nested tables' [`crate::npt::Npt`] does).
    LargePageInTheWay { va: u64 },
}

/// Index of `va` in the table at `level` (4 = PML4 ... 1 = PT).
const fn index(va: u64, level: u32) -> usize {
    ((va >> (12 + 9 * (level - 1))) & 0x1FF) as usize
}

/// The entry for `va` at `level`, creating the tables above it with `table_flags`.
/// Fails if a large page is in the way (these builders make the hv's own tables, which are
/// built once; [`crate::npt::Npt`] splits on demand).
fn entry<F: Frames>(
    frames: &mut F,
    root: u64,
    va: u64,
    level: u32,
    table_flags: u64,
) -> Result<*mut u64, BuildError> {
    let mut table = root;
    let mut l = 4;
    loop {
        let slot = frames.table(table).cast::<u64>().wrapping_add(index(va, l));
        if l == level {
            return Ok(slot);
        }
        // SAFETY: `table` is a frame from `frames` (the root, or an address written below by
        // this builder), so `slot` points into a live 512-entry table.
        let e = unsafe { slot.read() };
        if e & P != 0 {
            if e & PS != 0 {
                return Err(BuildError::LargePageInTheWay { va });
            }
            table = e & ADDR_MASK;
        } else {
            let new = frames.alloc().ok_or(BuildError::OutOfFrames)?;
            // SAFETY: as above; the slot is ours to write while building.
            unsafe { slot.write(new | table_flags) };
            table = new;
        }
        l -= 1;
    }
}

/// Identity-maps `[0, limit)` with the largest pages possible, except that every 4 KiB page
/// in `hole` is left not present. `leaf` are the flags of leaf entries (PS is added for large
/// pages), `table_flags` those of the tables above them.
pub fn identity_map_with_hole<F: Frames>(
    frames: &mut F,
    root: u64,
    limit: u64,
    hole: core::ops::Range<u64>,
    leaf: u64,
    table_flags: u64,
) -> Result<(), BuildError> {
    let overlaps = |start: u64, size: u64| start < hole.end && hole.start < start + size;
    let mut gib = 0;
    while gib < limit {
        if !overlaps(gib, SIZE_1G) {
            let e = entry(frames, root, gib, 3, table_flags)?;
            // SAFETY: `entry` returned a slot in a live table of ours.
            unsafe { e.write(gib | leaf | PS) };
        } else {
            let mut mib = gib;
            while mib < gib + SIZE_1G {
                if !overlaps(mib, SIZE_2M) {
                    let e = entry(frames, root, mib, 2, table_flags)?;
                    // SAFETY: as above.
                    unsafe { e.write(mib | leaf | PS) };
                } else {
                    let mut page = mib;
                    while page < mib + SIZE_2M {
                        let e = entry(frames, root, page, 1, table_flags)?;
                        let v = if hole.contains(&page) { 0 } else { page | leaf };
                        // SAFETY: as above.
                        unsafe { e.write(v) };
                        page += SIZE_4K;
                    }
                }
                mib += SIZE_2M;
            }
        }
        gib += SIZE_1G;
    }
    Ok(())
}

/// Maps `[va, va + len)` to `[pa, pa + len)` with 4 KiB pages.
pub fn map_4k<F: Frames>(
    frames: &mut F,
    root: u64,
    va: u64,
    pa: u64,
    len: u64,
    leaf: u64,
    table_flags: u64,
) -> Result<(), BuildError> {
    let mut off = 0;
    while off < len {
        let e = entry(frames, root, va + off, 1, table_flags)?;
        // SAFETY: `entry` returned a slot in a live table of ours.
        unsafe { e.write((pa + off) | leaf) };
        off += SIZE_4K;
    }
    Ok(())
}

/// The 4 KiB leaf entry for `va`, if the walk reaches one (no large page on the way).
pub fn leaf_4k<F: Frames>(frames: &F, root: u64, va: u64) -> Option<*mut u64> {
    let mut table = root;
    for level in (1..=4).rev() {
        let slot = frames
            .table(table)
            .cast::<u64>()
            .wrapping_add(index(va, level));
        if level == 1 {
            return Some(slot);
        }
        // SAFETY: `table` is the root or an address read from a present entry of a table
        // this module built, so it is a live frame of `frames`.
        let e = unsafe { slot.read() };
        if e & P == 0 || e & PS != 0 {
            return None;
        }
        table = e & ADDR_MASK;
    }
    None
}

/// Why a guest-virtual address did not translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotMapped {
    /// The address.
    pub gva: u64,
}

/// Translates `gva` through the guest's 4-level tables at `cr3`, reading guest-physical
/// memory with `read`. Large pages (1 GiB, 2 MiB) are followed. Permissions are not checked:
/// the hv reads as the kernel would.
pub fn translate(cr3: u64, gva: u64, read: impl Fn(u64) -> Option<u64>) -> Result<u64, NotMapped> {
    let mut table = cr3 & ADDR_MASK;
    for level in (1..=4u32).rev() {
        let e = read(table + 8 * index(gva, level) as u64).ok_or(NotMapped { gva })?;
        if e & P == 0 {
            return Err(NotMapped { gva });
        }
        let page_size = 1u64 << (12 + 9 * (level - 1));
        if level == 1 || (level <= 3 && e & PS != 0) {
            // Large-page entries carry PAT in bit 12; the frame is aligned to the page size.
            let frame = e & ADDR_MASK & !(page_size - 1);
            return Ok(frame | (gva & (page_size - 1)));
        }
        table = e & ADDR_MASK;
    }
    Err(NotMapped { gva })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Frames in a Vec, with made-up physical addresses starting at `base`.
    struct Arena {
        base: u64,
        pages: RefCell<Vec<Box<[u64; 512]>>>,
    }

    impl Arena {
        fn new(base: u64) -> Arena {
            Arena {
                base,
                pages: RefCell::new(Vec::new()),
            }
        }
        fn read(&self, pa: u64) -> Option<u64> {
            let i = ((pa - self.base) / SIZE_4K) as usize;
            self.pages
                .borrow()
                .get(i)
                .map(|p| p[((pa % SIZE_4K) / 8) as usize])
        }
        fn count(&self) -> usize {
            self.pages.borrow().len()
        }
    }

    // SAFETY: every frame is a distinct boxed, zeroed table that lives as long as the arena.
    unsafe impl Frames for Arena {
        fn alloc(&mut self) -> Option<u64> {
            let mut pages = self.pages.borrow_mut();
            pages.push(Box::new([0; 512]));
            Some(self.base + (pages.len() as u64 - 1) * SIZE_4K)
        }
        fn table(&self, pa: u64) -> *mut [u64; 512] {
            let i = ((pa - self.base) / SIZE_4K) as usize;
            &mut *self.pages.borrow_mut()[i] as *mut _
        }
    }

    #[test]
    fn identity_map_leaves_exactly_the_hole_out() {
        let mut a = Arena::new(0x7000_0000_0000);
        let root = a.alloc().unwrap();
        let hole = 0x4030_0000..0x4050_2000; // crosses a 2 MiB boundary, inside GiB 1
        identity_map_with_hole(
            &mut a,
            root,
            8 * SIZE_1G,
            hole.clone(),
            P | RW | US,
            P | RW | US,
        )
        .unwrap();
        // PML4 + PDPT + one PD + two PTs (the hole touches two 2 MiB regions).
        assert_eq!(a.count(), 1 + 1 + 1 + 2);
        let read = |pa| a.read(pa);
        for gpa in [
            0u64,
            0x1234_5678,
            0x4000_0000,
            0x402F_F000,
            0x4050_2000,
            7 * SIZE_1G + 5,
        ] {
            assert_eq!(translate(root, gpa, read), Ok(gpa), "gpa {gpa:#x}");
        }
        for gpa in [hole.start, hole.start + 0x1000, 0x4040_0000, hole.end - 1] {
            assert_eq!(
                translate(root, gpa, read),
                Err(NotMapped { gva: gpa }),
                "gpa {gpa:#x}"
            );
        }
        assert!(translate(root, 8 * SIZE_1G, read).is_err());
        // Every entry above a leaf has U set (nested paging needs it).
        let pml4e = a.read(root).unwrap();
        assert_eq!(pml4e & (P | RW | US), P | RW | US);
    }

    #[test]
    fn map_4k_and_find_the_leaf() {
        let mut a = Arena::new(0x10_0000);
        let root = a.alloc().unwrap();
        let va = 0xFFFF_C900_0123_4000;
        map_4k(&mut a, root, va, 0x8000_0000, 5 * SIZE_4K, P | RW, P | RW).unwrap();
        let read = |pa| a.read(pa);
        assert_eq!(translate(root, va + 0x4321, read), Ok(0x8000_4321));
        assert_eq!(
            translate(root, va + 5 * SIZE_4K, read),
            Err(NotMapped { gva: va + 0x5000 })
        );
        let leaf = leaf_4k(&a, root, va + SIZE_4K).unwrap();
        // SAFETY: the leaf points into the arena's live table.
        assert_eq!(unsafe { leaf.read() }, 0x8000_1000 | P | RW);
        assert!(leaf_4k(&a, root, 0).is_none());
    }

    #[test]
    fn a_large_page_in_the_way_is_not_called_out_of_frames() {
        let mut a = Arena::new(0x10_0000);
        let root = a.alloc().unwrap();
        identity_map_with_hole(&mut a, root, SIZE_1G, 0..0, P | RW, P | RW).unwrap();
        assert_eq!(
            map_4k(&mut a, root, 0x20_0000, 0, SIZE_4K, P | RW, P | RW),
            Err(BuildError::LargePageInTheWay { va: 0x20_0000 })
        );
    }

    #[test]
    fn guest_large_pages_translate() {
        // A hand-built guest table: PML4[0] -> PDPT; PDPT[1] = 1 GiB page at 5 GiB;
        // PDPT[0] -> PD; PD[3] = 2 MiB page at 0x1_2340_0000 with PAT bit 12 set.
        let mem = std::collections::HashMap::from([
            (0x1000u64, 0x2000 | P),
            (0x2000 + 8, (5 * SIZE_1G) | P | PS),
            (0x2000, 0x3000 | P),
            (0x3000 + 3 * 8, 0x1_2340_0000 | P | PS | (1 << 12)),
        ]);
        let read = |pa| Some(*mem.get(&pa).unwrap_or(&0));
        assert_eq!(
            translate(0x1000, SIZE_1G + 0x42, read),
            Ok(5 * SIZE_1G + 0x42)
        );
        assert_eq!(
            translate(0x1000, 3 * SIZE_2M + 0x1_0042, read),
            Ok(0x1_2341_0042)
        );
        assert!(translate(0x1000, 4 * SIZE_2M, read).is_err());
    }
}
