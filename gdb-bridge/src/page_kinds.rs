//! What a page of RAM outside the kernel's image holds, as the kernel itself records it: its
//! `struct page` (in the `vmemmap` array, found through the kernel's own page tables) and the
//! page tables of the module area. Read from a checkpoint's memory, so it is the kernel's view
//! at that checkpoint.
//!
//! The layout comes from the checkpoint's VMCOREINFO (the kernel states its own `struct page`
//! size, field offsets and page-type values there for kdump's tools) and from the `vmlinux`
//! (where `vmemmap_base` lives). The page types are encoded two ways: up to 6.11 a cleared bit
//! under `0xf0000000` in `page_type` (VMCOREINFO gives `~PG_buddy`), from 6.12 a type byte in
//! its top 8 bits (VMCOREINFO gives `PGTY_buddy << 24`); page tables are the type after buddy
//! and offline in both (`PG_table`, `PGTY_table`), which VMCOREINFO does not name.

use quicksilver_checkpoint::elf::Pages;
use quicksilver_checkpoint::model::PAGE;
use std::collections::HashMap;

/// Where x86-64 maps the kernel's image (`__START_KERNEL_map`).
const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// The module area (`MODULES_VADDR`, `MODULES_END`): above the 1 GiB a randomized kernel's
/// image may use, up to the fixmap.
const MODULES: std::ops::Range<u64> = 0xffff_ffff_c000_0000..0xffff_ffff_ff00_0000;
/// A page-table entry's physical address bits (12 to 51).
const ADDR: u64 = 0x000f_ffff_ffff_f000;
const PRESENT: u64 = 1;
/// PS: a 1 GiB or 2 MiB page at this level.
const LARGE: u64 = 1 << 7;
/// `PAGE_MAPPING_ANON`: an anonymous page's `mapping` points at its `anon_vma`, tagged.
const MAPPING_ANON: u64 = 1;
const MAPPING_FLAGS: u64 = 3;

/// What a page is used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Use {
    Module,
    PageTable,
    Slab,
    Anonymous,
    PageCache,
    Free,
    Kernel,
    Unknown,
}

impl Use {
    pub fn name(self) -> &'static str {
        match self {
            Use::Module => "modules",
            Use::PageTable => "page tables",
            Use::Slab => "slab (kernel objects)",
            Use::Anonymous => "process memory (anonymous)",
            Use::PageCache => "page cache and tmpfs (files)",
            Use::Free => "free pages",
            Use::Kernel => "other kernel allocations",
            Use::Unknown => "other RAM",
        }
    }
}

/// `struct page` as this kernel's VMCOREINFO describes it.
#[derive(Debug, Default, PartialEq)]
pub struct Layout {
    size: u64,
    flags: u64,
    refcount: u64,
    mapping: u64,
    mapcount: u64,
    compound_head: u64,
    /// `PG_slab`'s bit in `flags` (up to 6.9).
    pg_slab: Option<u32>,
    buddy: u32,
    slab: Option<u32>,
    /// The kernel's page tables (`init_top_pgt`), a virtual address.
    init_top_pgt: u64,
    l5: bool,
}

fn field(text: &str, key: &str) -> Option<i64> {
    let v = text.lines().find_map(|l| l.strip_prefix(key))?.trim();
    match v.strip_prefix("0x") {
        Some(hex) => i64::from_str_radix(hex, 16).ok(),
        None if key.starts_with("SYMBOL(") => u64::from_str_radix(v, 16).ok().map(|v| v as i64),
        None => v.parse().ok(),
    }
}

impl Layout {
    /// From VMCOREINFO's text; `None` if it lacks what is needed.
    pub fn parse(vmcoreinfo: &[u8]) -> Option<Layout> {
        let t = String::from_utf8_lossy(vmcoreinfo);
        let u = |k: &str| field(&t, k).map(|v| v as u64);
        Some(Layout {
            size: u("SIZE(page)=")?,
            flags: u("OFFSET(page.flags)=")?,
            refcount: u("OFFSET(page._refcount)=")?,
            mapping: u("OFFSET(page.mapping)=")?,
            mapcount: u("OFFSET(page._mapcount)=")?,
            compound_head: u("OFFSET(page.compound_head)=")?,
            pg_slab: field(&t, "NUMBER(PG_slab)=").map(|v| v as u32),
            buddy: field(&t, "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=")? as u32,
            slab: field(&t, "NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)=").map(|v| v as u32),
            init_top_pgt: u("SYMBOL(init_top_pgt)=")?,
            l5: field(&t, "NUMBER(pgtable_l5_enabled)=") == Some(1),
        })
    }

    /// Is `page_type` the type VMCOREINFO gives as `value`?
    fn is_type(&self, page_type: u32, value: u32) -> bool {
        if value >> 24 == 0xff {
            // `~PG_x`: PG_x's bit cleared under the base.
            let bit = !value;
            page_type & (0xf000_0000 | bit) == 0xf000_0000
        } else {
            page_type >> 24 == value >> 24
        }
    }

    /// Page tables' type: the one after buddy and offline.
    fn table(&self) -> u32 {
        if self.buddy >> 24 == 0xff {
            !((!self.buddy) << 2)
        } else {
            self.buddy + (2 << 24)
        }
    }

    /// What one `struct page` (its bytes) says the page holds.
    fn classify(&self, sp: &[u8]) -> Use {
        let rd = |at: u64, n: usize| -> u64 {
            let mut v = [0u8; 8];
            if let Some(b) = sp.get(at as usize..at as usize + n) {
                v[..n].copy_from_slice(b);
            }
            u64::from_le_bytes(v)
        };
        let page_type = rd(self.mapcount, 4) as u32;
        if self.is_type(page_type, self.buddy) {
            return Use::Free;
        }
        if self.is_type(page_type, self.table()) {
            return Use::PageTable;
        }
        let slab_flag = self
            .pg_slab
            .is_some_and(|b| rd(self.flags, 8) & (1 << b) != 0);
        if slab_flag || self.slab.is_some_and(|v| self.is_type(page_type, v)) {
            return Use::Slab;
        }
        let mapping = rd(self.mapping, 8);
        match mapping & MAPPING_FLAGS {
            MAPPING_ANON => return Use::Anonymous,
            0 if mapping != 0 => return Use::PageCache,
            _ => {}
        }
        if rd(self.refcount, 4) as u32 == 0 {
            // On a CPU's free list (not the buddy allocator's): free all the same.
            return Use::Free;
        }
        Use::Kernel
    }
}

/// Where a page-table walk ended.
enum Walk {
    /// The table (or, at the last level, the page frame) the last entry points at.
    To(u64),
    /// A 1 GiB or 2 MiB page: the physical address of the walked address in it.
    Large(u64),
}

/// Reads a checkpoint's pages as its kernel saw its memory.
pub struct MemMap<'p> {
    pages: &'p mut dyn Pages,
    layout: Layout,
    /// `__pa_symbol`'s difference (the image's physical place and KASLR slide).
    phys_base: u64,
    vmemmap: u64,
    cache: HashMap<u64, Box<[u8; PAGE]>>,
}

impl<'p> MemMap<'p> {
    /// `vmemmap_base` is the variable's runtime address (its value is read from memory).
    pub fn new(
        pages: &'p mut dyn Pages,
        layout: Layout,
        phys_base: u64,
        vmemmap_base: u64,
    ) -> Option<MemMap<'p>> {
        let mut m = MemMap {
            pages,
            layout,
            phys_base,
            vmemmap: 0,
            cache: HashMap::new(),
        };
        m.vmemmap = m.u64_at(m.image_pa(vmemmap_base))?;
        Some(m)
    }

    /// A kernel image address's physical one (`__pa_symbol`).
    fn image_pa(&self, va: u64) -> u64 {
        va.wrapping_sub(START_KERNEL_MAP)
            .wrapping_add(self.phys_base)
    }

    fn page(&mut self, pa: u64) -> Option<&[u8; PAGE]> {
        let at = pa & !(PAGE as u64 - 1);
        if !self.cache.contains_key(&at) {
            let mut p = Box::new([0u8; PAGE]);
            self.pages.read_page(at, &mut p).ok()?;
            self.cache.insert(at, p);
        }
        self.cache.get(&at).map(|p| &**p)
    }

    fn u64_at(&mut self, pa: u64) -> Option<u64> {
        let at = (pa % PAGE as u64) as usize;
        let p = self.page(pa)?;
        Some(u64::from_le_bytes(p.get(at..at + 8)?.try_into().ok()?))
    }

    /// The kernel's page tables walked for `va`, through the level whose entries map
    /// `1 << last` bytes: the table or page that entry points at, or the large page that
    /// ended the walk early (with `va`'s offset in it), or `None` at a hole.
    fn walk(&mut self, va: u64, last: u32) -> Option<Walk> {
        let mut table = self.image_pa(self.layout.init_top_pgt);
        let mut shift = if self.layout.l5 { 48 } else { 39 };
        while shift >= last {
            let e = self.u64_at(table + ((va >> shift) & 511) * 8)?;
            if e & PRESENT == 0 {
                return None;
            }
            let size = 1u64 << shift;
            if (shift == 30 || shift == 21) && e & LARGE != 0 {
                return Some(Walk::Large((e & ADDR & !(size - 1)) + (va & (size - 1))));
            }
            table = e & ADDR;
            shift -= 9;
        }
        Some(Walk::To(table))
    }

    /// `va`'s physical address.
    fn translate(&mut self, va: u64) -> Option<u64> {
        match self.walk(va, 12)? {
            Walk::To(frame) => Some(frame + (va & (PAGE as u64 - 1))),
            Walk::Large(pa) => Some(pa),
        }
    }

    /// The physical pages mapped in the module area.
    pub fn module_pages(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        let mut va = MODULES.start;
        while va < MODULES.end {
            // One 2 MiB stretch at a time: its page-table page, if any, read once.
            let Some(pt) = self.pt_of(va) else {
                va += 1 << 21;
                continue;
            };
            for i in 0..512u64 {
                if let Some(e) = self.u64_at(pt + i * 8).filter(|e| e & PRESENT != 0) {
                    out.push(e & ADDR);
                }
            }
            va += 1 << 21;
        }
        out.sort_unstable();
        out
    }

    /// The page-table page that maps the 2 MiB at `va` (none for a large page or a hole).
    fn pt_of(&mut self, va: u64) -> Option<u64> {
        match self.walk(va, 21)? {
            Walk::To(pt) => Some(pt),
            Walk::Large(_) => None,
        }
    }

    /// What the page at physical address `pa` holds. A compound page's tail pages are what
    /// its head is.
    pub fn classify(&mut self, pa: u64) -> Use {
        let Some(sp) = self.struct_page(pa / PAGE as u64) else {
            return Use::Unknown;
        };
        let head = u64::from_le_bytes(
            sp[self.layout.compound_head as usize..][..8]
                .try_into()
                .unwrap_or_default(),
        );
        let sp = if head & 1 != 0 {
            let Some(pa) = self.translate(head - 1) else {
                return Use::Unknown;
            };
            match self.struct_page_at(pa) {
                Some(sp) => sp,
                None => return Use::Unknown,
            }
        } else {
            sp
        };
        self.layout.classify(&sp)
    }

    fn struct_page(&mut self, pfn: u64) -> Option<Vec<u8>> {
        let va = self
            .vmemmap
            .checked_add(pfn.checked_mul(self.layout.size)?)?;
        let pa = self.translate(va)?;
        self.struct_page_at(pa)
    }

    fn struct_page_at(&mut self, pa: u64) -> Option<Vec<u8>> {
        let (at, size) = ((pa % PAGE as u64) as usize, self.layout.size as usize);
        Some(self.page(pa)?.get(at..at + size)?.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO_612: &str = "OSRELEASE=6.12.0\nSIZE(page)=64\nOFFSET(page.flags)=0\n\
        OFFSET(page._refcount)=52\nOFFSET(page.mapping)=24\nOFFSET(page.lru)=8\n\
        OFFSET(page._mapcount)=48\nOFFSET(page.compound_head)=8\n\
        NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)=4110417920\nNUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=4026531840\n\
        SYMBOL(init_top_pgt)=ffffffff82a3a000\nNUMBER(pgtable_l5_enabled)=0\n";

    fn page(l: &Layout, flags: u64, mapping: u64, page_type: u32, refs: u32) -> Vec<u8> {
        let mut p = vec![0u8; 64];
        p[l.flags as usize..][..8].copy_from_slice(&flags.to_le_bytes());
        p[l.mapping as usize..][..8].copy_from_slice(&mapping.to_le_bytes());
        p[l.mapcount as usize..][..4].copy_from_slice(&page_type.to_le_bytes());
        p[l.refcount as usize..][..4].copy_from_slice(&refs.to_le_bytes());
        p
    }

    #[test]
    fn a_6_12_struct_page_says_what_the_page_holds() {
        let l = Layout::parse(INFO_612.as_bytes()).unwrap();
        assert_eq!(
            (l.size, l.mapcount, l.init_top_pgt),
            (64, 48, 0xffff_ffff_82a3_a000)
        );
        let none = u32::MAX; // _mapcount -1: no type, unmapped
        assert_eq!(l.classify(&page(&l, 0, 0, 0xf000_0000, 0)), Use::Free);
        assert_eq!(l.classify(&page(&l, 0, 0, 0xf200_0000, 1)), Use::PageTable);
        assert_eq!(l.classify(&page(&l, 0, 0, 0xf500_0000, 1)), Use::Slab);
        assert_eq!(
            l.classify(&page(&l, 0, 0xffff_8880_0123_4561, 0, 1)),
            Use::Anonymous
        );
        assert_eq!(
            l.classify(&page(&l, 0, 0xffff_8880_0123_4560, 0, 2)),
            Use::PageCache
        );
        assert_eq!(l.classify(&page(&l, 0, 0, none, 1)), Use::Kernel);
        assert_eq!(
            l.classify(&page(&l, 0, 0, none, 0)),
            Use::Free,
            "a per-CPU list's"
        );
    }

    #[test]
    fn a_6_1_struct_page_says_it_the_older_way() {
        let info = INFO_612
            .replace(
                "NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)=4110417920\n",
                "NUMBER(PG_slab)=9\n",
            )
            .replace("4026531840", "-129"); // ~PG_buddy (0x80)
        let l = Layout::parse(info.as_bytes()).unwrap();
        assert_eq!(l.buddy, !0x80);
        assert_eq!(l.classify(&page(&l, 0, 0, !0x80, 0)), Use::Free);
        assert_eq!(
            l.classify(&page(&l, 0, 0, !0x200, 1)),
            Use::PageTable,
            "PG_table"
        );
        assert_eq!(
            l.classify(&page(&l, 1 << 9, 0, u32::MAX, 1)),
            Use::Slab,
            "PG_slab"
        );
        assert_eq!(l.classify(&page(&l, 0, 0, u32::MAX, 1)), Use::Kernel);
        assert!(
            Layout::parse(b"SIZE(page)=64\n").is_none(),
            "too little to go on"
        );
    }

    /// Pages by physical address; any other reads as zeros.
    struct Fake(HashMap<u64, [u8; PAGE]>);
    impl Pages for Fake {
        fn read_page(&mut self, gpa: u64, buf: &mut [u8; PAGE]) -> std::io::Result<()> {
            *buf = self.0.get(&gpa).copied().unwrap_or([0; PAGE]);
            Ok(())
        }
    }

    fn put(f: &mut Fake, pa: u64, v: u64) {
        let p = f.0.entry(pa & !0xfff).or_insert([0; PAGE]);
        p[(pa & 0xfff) as usize..][..8].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn struct_pages_and_modules_are_found_through_the_kernels_page_tables() {
        let l = Layout::parse(INFO_612.as_bytes()).unwrap();
        let phys_base = 0x100_0000u64; // the image 16 MiB up
        let pgd = l.init_top_pgt - START_KERNEL_MAP + phys_base;
        let vmemmap_base_var = 0xffff_ffff_8300_0000u64;
        let vmemmap = 0xffff_ea00_0000_0000u64;
        let mut f = Fake(HashMap::new());
        put(
            &mut f,
            vmemmap_base_var - START_KERNEL_MAP + phys_base,
            vmemmap,
        );
        // vmemmap: PML4 -> PDPT at 0x20_0000 -> PD at 0x20_1000 -> a 2 MiB page at 0x40_0000.
        put(&mut f, pgd + ((vmemmap >> 39) & 511) * 8, 0x20_0000 | 3);
        put(
            &mut f,
            0x20_0000 + ((vmemmap >> 30) & 511) * 8,
            0x20_1000 | 3,
        );
        put(
            &mut f,
            0x20_1000 + ((vmemmap >> 21) & 511) * 8,
            0x40_0000 | 3 | LARGE,
        );
        // pfn 5's struct page: slab.
        put(&mut f, 0x40_0000 + 5 * 64 + 48, 0xf500_0000);
        put(&mut f, 0x40_0000 + 5 * 64 + 52, 1);
        // pfn 6 is a tail of pfn 5's compound page.
        put(&mut f, 0x40_0000 + 6 * 64 + 8, (vmemmap + 5 * 64) | 1);
        // One module page, 0x50_0000, at the start of the module area.
        let m = MODULES.start;
        put(&mut f, pgd + ((m >> 39) & 511) * 8, 0x30_0000 | 3);
        put(&mut f, 0x30_0000 + ((m >> 30) & 511) * 8, 0x30_1000 | 3);
        put(&mut f, 0x30_1000 + ((m >> 21) & 511) * 8, 0x30_2000 | 3);
        put(&mut f, 0x30_2000 + 3 * 8, 0x50_0000 | 3);
        let mut map = MemMap::new(&mut f, l, phys_base, vmemmap_base_var).unwrap();
        assert_eq!(map.classify(5 * 4096), Use::Slab);
        assert_eq!(
            map.classify(6 * 4096),
            Use::Slab,
            "a tail is what its head is"
        );
        assert_eq!(map.classify(7 * 4096), Use::Free, "all zeros: refcount 0");
        assert_eq!(map.module_pages(), vec![0x50_0000]);
        assert_eq!(map.translate(0xffff_c900_0000_0000), None, "a hole");
    }
}
