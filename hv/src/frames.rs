//! The hv's 4 KiB frame allocator: a bitmap over one or more physically contiguous regions
//! of hv memory, each mapped at a virtual address the hv chose (the work area of the block
//! the agent handed over; later the checkpoint store's chunks).
//!
//! One bit per frame, set when the frame is free, so finding a free frame is "the first
//! non-zero word, its lowest set bit". Each region's bits start on a word boundary; the bits
//! past a region's end stay clear and are never handed out. A next-free hint (the lowest word
//! that may hold a set bit) makes `alloc` O(1) amortized over a run of allocations; `free`
//! lowers it again. The bitmap's storage is lent by the caller (no heap in the hv).
//!
//! Vendor-neutral and free of privileged instructions: host tests run it over ordinary memory.

use crate::paging::{Frames, Hpa, SIZE_4K};

/// Most regions one pool manages: the block's work area and 64 store chunks.
pub const MAX_REGIONS: usize = 65;

/// Why the pool refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// No free frame (or no run of free frames long enough) in any region.
    OutOfFrames,
    /// The frame is already free: freeing it again would hand it out twice.
    DoubleFree(Hpa),
    /// The address is in none of the pool's regions.
    NotOurs(Hpa),
    /// An address or length that is not a multiple of 4 KiB.
    Unaligned(u64),
    /// A region would overlap one the pool already has.
    Overlap(Hpa),
    /// Already [`MAX_REGIONS`] regions.
    TooManyRegions,
    /// The bitmap lent to [`FramePool::new`] has no room for the region's bits; `needed` is
    /// the number of words the pool would need in all.
    BitmapTooSmall { needed: usize },
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutOfFrames => write!(f, "out of hv memory: no free frame left"),
            Self::DoubleFree(pa) => write!(f, "frame {:#x} freed twice", pa.0),
            Self::NotOurs(pa) => write!(f, "frame {:#x} is not in the hv's memory", pa.0),
            Self::Unaligned(a) => write!(f, "{a:#x} is not a multiple of 4 KiB"),
            Self::Overlap(pa) => write!(f, "region at {:#x} overlaps another", pa.0),
            Self::TooManyRegions => write!(f, "more than {MAX_REGIONS} memory regions"),
            Self::BitmapTooSmall { needed } => {
                write!(f, "frame bitmap too small: {needed} words needed")
            }
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Region {
    pa: u64,
    va: u64,
    frames: u64,
    /// Index of the region's first bit in the bitmap (a multiple of 64).
    first_bit: u64,
}

impl Region {
    fn contains(&self, pa: u64) -> bool {
        pa >= self.pa && pa - self.pa < self.frames * SIZE_4K
    }
}

/// A 4 KiB frame allocator that frees.
pub struct FramePool<'a> {
    /// Bit set = frame free.
    bitmap: &'a mut [u64],
    regions: [Region; MAX_REGIONS],
    count: usize,
    /// Bits given to regions so far (a multiple of 64).
    bits: u64,
    total: u64,
    free: u64,
    /// No word below this one has a set bit.
    hint: usize,
}

impl<'a> FramePool<'a> {
    /// Bitmap words a region of `bytes` bytes takes (each region starts on a word).
    pub const fn words_for(bytes: u64) -> usize {
        (bytes / SIZE_4K).div_ceil(64) as usize
    }

    /// An empty pool whose bitmap lives in `bitmap` (sized with [`Self::words_for`], summed
    /// over the regions to come).
    pub fn new(bitmap: &'a mut [u64]) -> Self {
        bitmap.fill(0);
        FramePool {
            bitmap,
            regions: [Region::default(); MAX_REGIONS],
            count: 0,
            bits: 0,
            total: 0,
            free: 0,
            hint: 0,
        }
    }

    /// A pool over `[pa, pa + len)` (mapped at `va`) that keeps its own bitmap in the first
    /// frames of that region, sized for `capacity` bytes of frames in all (this region and
    /// those added later). For the hv: its work area, with room for the store's chunks.
    ///
    /// # Safety
    /// As for [`Self::add_region`], for the whole of `[pa, pa + len)`, for `'a`.
    pub unsafe fn in_place(
        pa: Hpa,
        va: u64,
        len: u64,
        capacity: u64,
    ) -> Result<FramePool<'a>, FrameError> {
        for a in [pa.0, va, len] {
            if !a.is_multiple_of(SIZE_4K) {
                return Err(FrameError::Unaligned(a));
            }
        }
        // Each region may waste up to 63 bits to start on a word.
        let words = Self::words_for(capacity) + MAX_REGIONS;
        let bitmap_bytes = (words as u64 * 8).next_multiple_of(SIZE_4K);
        if bitmap_bytes >= len {
            return Err(FrameError::OutOfFrames);
        }
        // SAFETY: the first `bitmap_bytes` of the region are ours alone for 'a (the caller's
        // promise), mapped read-write at `va`, page aligned hence aligned for u64; the pool
        // hands out only frames after them.
        let bitmap = unsafe { core::slice::from_raw_parts_mut(va as *mut u64, words) };
        let mut pool = FramePool::new(bitmap);
        // SAFETY: the rest of the region, under the caller's promise.
        unsafe {
            pool.add_region(
                Hpa(pa.0 + bitmap_bytes),
                va + bitmap_bytes,
                len - bitmap_bytes,
            )?
        };
        Ok(pool)
    }

    /// Adds `[pa, pa + len)`, mapped at `va`, as free frames.
    ///
    /// # Safety
    /// The range must be memory the pool may use exclusively for as long as it lives (no one
    /// else reads or writes it except through frames the pool hands out), mapped read-write at
    /// `[va, va + len)`, with `va` 4 KiB aligned: the pool zeroes frames through `va`, and
    /// [`Frames::table`] hands out pointers into it.
    pub unsafe fn add_region(&mut self, pa: Hpa, va: u64, len: u64) -> Result<(), FrameError> {
        for a in [pa.0, va, len] {
            if !a.is_multiple_of(SIZE_4K) {
                return Err(FrameError::Unaligned(a));
            }
        }
        if len == 0 {
            return Ok(());
        }
        let end = pa.0.checked_add(len).ok_or(FrameError::Overlap(pa))?;
        if self.regions[..self.count]
            .iter()
            .any(|r| pa.0 < r.pa + r.frames * SIZE_4K && r.pa < end)
        {
            return Err(FrameError::Overlap(pa));
        }
        if self.count == MAX_REGIONS {
            return Err(FrameError::TooManyRegions);
        }
        let words = Self::words_for(len);
        let first_word = (self.bits / 64) as usize;
        if first_word + words > self.bitmap.len() {
            return Err(FrameError::BitmapTooSmall {
                needed: first_word + words,
            });
        }
        let frames = len / SIZE_4K;
        self.regions[self.count] = Region {
            pa: pa.0,
            va,
            frames,
            first_bit: self.bits,
        };
        self.count += 1;
        for f in 0..frames {
            let bit = self.bits + f;
            self.bitmap[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        self.bits += words as u64 * 64;
        self.total += frames;
        self.free += frames;
        self.hint = self.hint.min(first_word);
        Ok(())
    }

    /// Frames in all regions.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Frames free now.
    pub fn free_frames(&self) -> u64 {
        self.free
    }

    /// Frames free in the first region (the block's work area, which the kernel's tables
    /// map too: the only frames the hv can take while dormant; `alloc` hands them out first).
    pub fn free_in_first_region(&self) -> u64 {
        let Some(r) = self.regions[..self.count].first() else {
            return 0;
        };
        let (first, last) = (r.first_bit, r.first_bit + r.frames);
        (first / 64..last.div_ceil(64))
            .map(|w| {
                let word = self.bitmap[w as usize];
                let lo = first.saturating_sub(w * 64).min(64);
                let hi = (last - w * 64).min(64);
                let mask = if hi - lo == 64 {
                    u64::MAX
                } else {
                    ((1u64 << (hi - lo)) - 1) << lo
                };
                (word & mask).count_ones() as u64
            })
            .sum()
    }

    /// Is `pa` inside one of the pool's regions?
    pub fn contains(&self, pa: Hpa) -> bool {
        self.region_of(pa.0).is_some()
    }

    /// The virtual address at which the hv reaches `pa`, if it is in one of the regions.
    pub fn va(&self, pa: Hpa) -> Option<u64> {
        self.region_of(pa.0)
            .map(|r| pa.0 - self.regions[r].pa + self.regions[r].va)
    }

    fn region_of(&self, pa: u64) -> Option<usize> {
        self.regions[..self.count]
            .iter()
            .position(|r| r.contains(pa))
    }

    /// The region holding bitmap bit `bit` (regions are in bit order).
    fn region_of_bit(&self, bit: u64) -> Option<usize> {
        let r = self.regions[..self.count].partition_point(|r| r.first_bit <= bit);
        (r > 0 && bit - self.regions[r - 1].first_bit < self.regions[r - 1].frames).then(|| r - 1)
    }

    fn zero(&self, region: usize, pa: u64, frames: u64) {
        let r = &self.regions[region];
        let va = pa - r.pa + r.va;
        // SAFETY: [pa, pa + frames pages) lies in region `r`, which `add_region`'s caller
        // promised is ours alone and mapped read-write at `va`; the frames were just taken
        // out of the free set, so nobody else holds them.
        unsafe { core::ptr::write_bytes(va as *mut u8, 0, (frames * SIZE_4K) as usize) };
    }

    /// A zeroed frame.
    pub fn alloc(&mut self) -> Result<Hpa, FrameError> {
        while self.hint < self.bitmap.len() {
            let w = self.bitmap[self.hint];
            if w != 0 {
                let bit = self.hint as u64 * 64 + w.trailing_zeros() as u64;
                self.bitmap[self.hint] = w & (w - 1);
                // Set bits exist only inside regions (see `add_region`); a stray one would
                // simply be dropped.
                let Some(r) = self.region_of_bit(bit) else {
                    continue;
                };
                self.free -= 1;
                let pa = self.regions[r].pa + (bit - self.regions[r].first_bit) * SIZE_4K;
                self.zero(r, pa, 1);
                return Ok(Hpa(pa));
            }
            self.hint += 1;
        }
        Err(FrameError::OutOfFrames)
    }

    /// `n` physically contiguous zeroed frames (within one region), by the first one's
    /// address. A linear search: for setup (the MSR permission map's two pages), not hot paths.
    pub fn alloc_contiguous(&mut self, n: u64) -> Result<Hpa, FrameError> {
        if n == 0 {
            return Err(FrameError::Unaligned(0));
        }
        for r in 0..self.count {
            let reg = self.regions[r];
            let mut run = 0;
            for f in 0..reg.frames {
                if self.is_free(reg.first_bit + f) {
                    run += 1;
                    if run == n {
                        let first = f + 1 - n;
                        for k in first..=f {
                            self.clear(reg.first_bit + k);
                        }
                        self.free -= n;
                        let pa = reg.pa + first * SIZE_4K;
                        self.zero(r, pa, n);
                        return Ok(Hpa(pa));
                    }
                } else {
                    run = 0;
                }
            }
        }
        Err(FrameError::OutOfFrames)
    }

    fn is_free(&self, bit: u64) -> bool {
        self.bitmap[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    fn clear(&mut self, bit: u64) {
        self.bitmap[(bit / 64) as usize] &= !(1 << (bit % 64));
    }

    /// Gives a frame back. Refuses (and changes nothing) if it is not one of ours or is
    /// already free.
    pub fn free(&mut self, pa: Hpa) -> Result<(), FrameError> {
        if !pa.0.is_multiple_of(SIZE_4K) {
            return Err(FrameError::Unaligned(pa.0));
        }
        let r = self.region_of(pa.0).ok_or(FrameError::NotOurs(pa))?;
        let bit = self.regions[r].first_bit + (pa.0 - self.regions[r].pa) / SIZE_4K;
        if self.is_free(bit) {
            return Err(FrameError::DoubleFree(pa));
        }
        let word = (bit / 64) as usize;
        self.bitmap[word] |= 1 << (bit % 64);
        self.free += 1;
        self.hint = self.hint.min(word);
        Ok(())
    }

    /// Gives back `n` frames from `pa` on (as [`Self::alloc_contiguous`] returned them).
    /// Checks every frame before freeing any, so a refusal changes nothing.
    pub fn free_contiguous(&mut self, pa: Hpa, n: u64) -> Result<(), FrameError> {
        if !pa.0.is_multiple_of(SIZE_4K) {
            return Err(FrameError::Unaligned(pa.0));
        }
        let r = self.region_of(pa.0).ok_or(FrameError::NotOurs(pa))?;
        let reg = self.regions[r];
        let first = (pa.0 - reg.pa) / SIZE_4K;
        if first + n > reg.frames {
            return Err(FrameError::NotOurs(Hpa(reg.pa + reg.frames * SIZE_4K)));
        }
        if let Some(k) = (0..n).find(|k| self.is_free(reg.first_bit + first + k)) {
            return Err(FrameError::DoubleFree(Hpa(pa.0 + k * SIZE_4K)));
        }
        for k in 0..n {
            self.free(Hpa(pa.0 + k * SIZE_4K))?;
        }
        Ok(())
    }
}

// SAFETY: `alloc` hands out each frame once until it is freed, zeroed, from regions the
// caller of `add_region` gave the pool exclusively; `table` maps a PA inside a region to its
// VA there (4 KiB aligned, read-write, per `add_region`'s contract).
unsafe impl Frames for FramePool<'_> {
    fn alloc(&mut self) -> Option<u64> {
        FramePool::alloc(self).ok().map(|pa| pa.0)
    }

    fn table(&self, pa: u64) -> *mut [u64; 512] {
        match self.va(Hpa(pa)) {
            Some(va) => va as *mut [u64; 512],
            // The trait's contract: only frames this pool handed out are asked for. Anything
            // else is a bug in the caller, and a pointer anywhere else would be worse.
            None => panic!("frame {pa:#x} is not in the frame pool"),
        }
    }

    fn free(&mut self, pa: u64) -> bool {
        FramePool::free(self, Hpa(pa)).is_ok()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A page of host memory, aligned like a frame.
    #[repr(C, align(4096))]
    #[derive(Clone)]
    pub struct Page(pub [u64; 512]);

    /// Host memory standing in for hv memory: `pages` frames at the made-up physical
    /// address `pa`.
    pub struct Memory {
        pub pa: u64,
        pub pages: Vec<Page>,
    }

    impl Memory {
        pub fn new(pa: u64, frames: usize) -> Memory {
            // Non-zero, so the tests see the pool zero what it hands out.
            Memory {
                pa,
                pages: vec![Page([0xDEAD_BEEF; 512]); frames],
            }
        }

        /// Adds this memory to `pool` as one region.
        pub fn lend(&mut self, pool: &mut FramePool<'_>) -> Result<(), FrameError> {
            let va = self.pages.as_mut_ptr() as u64;
            let len = self.pages.len() as u64 * SIZE_4K;
            // SAFETY: the pages are ours, aligned, live as long as the test's pool (the tests
            // declare memory before the pool), and nothing else touches them meanwhile.
            unsafe { pool.add_region(Hpa(self.pa), va, len) }
        }
    }

    #[test]
    fn the_first_regions_free_frames_are_counted_apart() {
        let mut bits = [0u64; 4];
        let mut a = Memory::new(0x10_0000, 70);
        let mut b = Memory::new(0x8000_0000, 3);
        let mut pool = FramePool::new(&mut bits);
        a.lend(&mut pool).unwrap();
        b.lend(&mut pool).unwrap();
        assert_eq!(pool.free_in_first_region(), 70);
        for left in (0..70).rev() {
            pool.alloc().unwrap();
            assert_eq!(pool.free_in_first_region(), left);
        }
        pool.alloc().unwrap();
        assert_eq!((pool.free_in_first_region(), pool.free_frames()), (0, 2));
    }

    #[test]
    fn every_frame_is_handed_out_once_then_out_of_frames() {
        let mut bits = [0u64; 4];
        let mut a = Memory::new(0x10_0000, 70);
        let mut b = Memory::new(0x8000_0000, 3);
        let mut pool = FramePool::new(&mut bits);
        a.lend(&mut pool).unwrap();
        b.lend(&mut pool).unwrap();
        assert_eq!((pool.total(), pool.free_frames()), (73, 73));
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..73 {
            let pa = pool.alloc().unwrap();
            assert!(seen.insert(pa), "{pa:?} handed out twice");
            let va = pool.va(pa).unwrap() as *const [u64; 512];
            // SAFETY: the frame is in `a` or `b`, alive.
            assert!(unsafe { *va }.iter().all(|&w| w == 0), "not zeroed");
        }
        assert_eq!(pool.alloc(), Err(FrameError::OutOfFrames));
        assert_eq!(pool.free_frames(), 0);
        assert!(seen.contains(&Hpa(0x10_0000 + 69 * SIZE_4K)));
        assert!(seen.contains(&Hpa(0x8000_2000)));
    }

    #[test]
    fn a_freed_frame_comes_back_and_a_double_free_is_refused() {
        let mut bits = [0u64; 1];
        let mut m = Memory::new(0x20_0000, 8);
        let mut pool = FramePool::new(&mut bits);
        m.lend(&mut pool).unwrap();
        let all: Vec<_> = (0..8).map(|_| pool.alloc().unwrap()).collect();
        pool.free(all[5]).unwrap();
        assert_eq!(pool.free_frames(), 1);
        assert_eq!(pool.free(all[5]), Err(FrameError::DoubleFree(all[5])));
        assert_eq!(pool.free_frames(), 1);
        assert_eq!(pool.alloc(), Ok(all[5]));
        assert_eq!(
            pool.free(Hpa(0x1000)),
            Err(FrameError::NotOurs(Hpa(0x1000)))
        );
        assert_eq!(
            pool.free(Hpa(0x20_0008)),
            Err(FrameError::Unaligned(0x20_0008))
        );
        // A frame never handed out is free already.
        let mut bits2 = [0u64; 1];
        let mut m2 = Memory::new(0x40_0000, 2);
        let mut pool2 = FramePool::new(&mut bits2);
        m2.lend(&mut pool2).unwrap();
        assert_eq!(
            pool2.free(Hpa(0x40_1000)),
            Err(FrameError::DoubleFree(Hpa(0x40_1000)))
        );
    }

    #[test]
    fn contiguous_runs_skip_holes_and_stay_inside_one_region() {
        let mut bits = [0u64; 2];
        let mut a = Memory::new(0x10_0000, 4);
        let mut b = Memory::new(0x10_4000, 4); // adjacent, but a separate region
        let mut pool = FramePool::new(&mut bits);
        a.lend(&mut pool).unwrap();
        b.lend(&mut pool).unwrap();
        let f0 = pool.alloc().unwrap();
        let f1 = pool.alloc().unwrap();
        pool.free(f0).unwrap();
        // Region a has frames 0 and 2, 3 free: a run of 2 is at frame 2.
        assert_eq!(pool.alloc_contiguous(2), Ok(Hpa(0x10_2000)));
        // A run of 4 exists only in b.
        assert_eq!(pool.alloc_contiguous(4), Ok(Hpa(0x10_4000)));
        assert_eq!(pool.alloc_contiguous(2), Err(FrameError::OutOfFrames));
        assert_eq!(pool.free_frames(), 1);
        assert_eq!(
            pool.free_contiguous(Hpa(0x10_2000), 3),
            Err(FrameError::NotOurs(Hpa(0x10_4000)))
        );
        pool.free_contiguous(Hpa(0x10_4000), 4).unwrap();
        assert_eq!(
            pool.free_contiguous(Hpa(0x10_4000), 2),
            Err(FrameError::DoubleFree(Hpa(0x10_4000)))
        );
        assert_eq!(pool.free_frames(), 5);
        let _ = f1;
    }

    #[test]
    fn a_pool_in_place_keeps_its_bitmap_in_its_first_frames() {
        let mut work = Memory::new(0x100_0000, 32);
        let mut chunk = Memory::new(0x4000_0000, 16);
        let va = work.pages.as_mut_ptr() as u64;
        // Room for 65 regions of 4 MiB: 1040 words, and 65 for word alignment: 3 frames.
        // SAFETY: `work` is ours, aligned, and outlives the pool; nothing else touches it.
        let mut pool =
            unsafe { FramePool::in_place(Hpa(0x100_0000), va, 32 * SIZE_4K, (4 << 20) * 65) }
                .unwrap();
        assert_eq!((pool.total(), pool.free_frames()), (29, 29));
        chunk.lend(&mut pool).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        while let Ok(pa) = pool.alloc() {
            assert!(pa.0 >= 0x100_3000, "a bitmap frame was handed out");
            seen.insert(pa);
        }
        assert_eq!(seen.len(), 29 + 16);
        // A bitmap that would not leave a single frame is refused.
        // SAFETY: as above (nothing is written when it is refused).
        let refused = unsafe { FramePool::in_place(Hpa(0x100_0000), va, SIZE_4K, 1 << 30) };
        assert_eq!(refused.err(), Some(FrameError::OutOfFrames));
    }

    #[test]
    fn regions_are_checked() {
        let mut bits = [0u64; 1];
        let mut a = Memory::new(0x10_0000, 64);
        let mut b = Memory::new(0x10_0000, 1);
        let mut pool = FramePool::new(&mut bits);
        a.lend(&mut pool).unwrap();
        assert_eq!(b.lend(&mut pool), Err(FrameError::Overlap(Hpa(0x10_0000))));
        b.pa = 0x90_0000;
        assert_eq!(
            b.lend(&mut pool),
            Err(FrameError::BitmapTooSmall { needed: 2 })
        );
        assert_eq!(FramePool::words_for(4 << 20), 16);
    }
}
