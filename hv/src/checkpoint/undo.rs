//! The undo log: what a checkpoint keeps of memory, and how a rollback puts it back.
//!
//! Copy-on-write at 4 KiB: once a checkpoint is taken, every page of RAM is write-protected
//! (nested paging); the first write to a page after a checkpoint copies the page's old contents
//! (its *pre-image*) into checkpoint memory, logs `(page, slot)`, and lets the write through.
//! Why undo rather than redo (copy the dirty pages at each checkpoint): a redo log restores
//! only on top of a full copy of RAM, and checkpoint memory is smaller than RAM; an undo log
//! holds only what changed, and a checkpoint's pause does not grow with RAM (research notes,
//! section 3).
//!
//! # One sequence, cut into epochs
//!
//! Entries go into one append-only sequence (a ring over the slots of checkpoint memory: entry
//! `n` lives in slot `n % slots`). Checkpoint `C` starts its *epoch* at position `C.start`:
//! first its records (its CPUs' state), then the pre-image of every page first written after
//! `C` and before the next checkpoint. So the entries from `C.start` to the end, applied
//! newest first, turn memory as it is now back into memory as it was at `C` (a page written
//! in several epochs is restored several times; the oldest copy, applied last, wins). From
//! that one rule:
//! - **rollback to `C`**: apply the entries after `C`'s records, newest first; drop them and
//!   every checkpoint after `C` (their epochs are gone: returning to them would need the
//!   pages' newer contents, which the rollback overwrote); `C` stays, and the machine runs on
//!   in a fresh epoch of `C`, so the same checkpoint can be restored again;
//! - **delete the oldest**: nothing needs its entries any more (no older checkpoint exists):
//!   they are freed from the front of the ring;
//! - **delete any other**: its boundary goes away and its entries join the previous
//!   checkpoint's epoch, which is exactly the concatenation the rule needs (a page in both is
//!   restored twice, the older copy last); its records stay as dead entries until that epoch
//!   is freed.
//!
//! Memory is freed only from the front: when it runs out the oldest checkpoint goes (the
//! periodic ring's policy), and a checkpoint the user asks for is refused while less than a
//! reserve is free. Nothing kept is ever overwritten: an entry is written only into a slot
//! outside the kept part of the ring.
//!
//! Which pages are write-protected is the caller's (the nested tables'): this log says which
//! pages became writable since the last checkpoint or rollback ([`UndoLog::writable`]), which
//! the caller protects again at the next one.

use core::ops::Range;

/// Bytes in one slot of checkpoint memory: one page.
pub const PAGE: usize = 4096;
/// Most checkpoints kept at once (`MAX_CHECKPOINTS` of the ABI).
pub const MAX_KEPT: usize = quicksilver_proto::abi::MAX_CHECKPOINTS as usize;

/// An entry: a page-aligned guest-physical address, and in the low bits what the slot holds.
const KIND_MASK: u64 = 0xFFF;
/// The slot holds the pre-image of the page at the entry's address.
const KIND_PAGE: u64 = 0;
/// The slot holds one of a checkpoint's records (CPU state); the address bits are zero.
const KIND_RECORD: u64 = 1;

/// Checkpoint memory: slots of one page, each with one entry word.
pub trait Memory {
    /// Slots there are.
    fn slots(&self) -> u64;
    fn entry(&self, slot: u64) -> u64;
    fn set_entry(&mut self, slot: u64, entry: u64);
    /// Copies guest page `gpa` into `slot`.
    fn save_page(&mut self, slot: u64, gpa: u64);
    /// Copies `slot` back into guest page `gpa`.
    fn restore_page(&mut self, slot: u64, gpa: u64);
}

/// [`UndoLog::preimages`]: the page was not written since.
pub const NOT_LOGGED: u64 = u64::MAX;

/// One checkpoint kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub id: u32,
    /// The checkpoint whose epoch ran when this one was taken (0: none).
    pub parent: u32,
    pub periodic: bool,
    /// Where its epoch starts in the sequence: its records, then its pre-images.
    pub start: u64,
    /// Slots of records it holds at `start`.
    pub records: u32,
    /// Pre-images in its epoch (its own and those of deleted checkpoints merged into it).
    pub pages: u64,
    /// Dead records in its epoch (of deleted checkpoints merged into it).
    pub dead: u64,
    /// When it was taken (the caller's clock) and how long every CPU was stopped.
    pub taken: u64,
    pub pause_us: u64,
    /// The CPUs it holds (bit n: CPU n).
    pub cpu_mask: u64,
    /// The guest's TSC offset when it was taken.
    pub tsc_offset: u64,
}

impl Checkpoint {
    /// Slots its epoch holds.
    pub fn slots(&self) -> u64 {
        self.records as u64 + self.pages + self.dead
    }
}

/// Why the log refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UndoError {
    /// Not enough free slots.
    Full,
    /// [`MAX_KEPT`] checkpoints are kept.
    TooMany,
    /// No checkpoint has that id.
    NoSuch,
    /// No checkpoint is kept, so nothing is logged.
    NotLogging,
}

/// What [`UndoLog::rollback`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RolledBack {
    /// Page copies written back (a page written in several epochs counts each time).
    pub pages: u64,
    /// Newer checkpoints dropped.
    pub dropped: u32,
}

/// The log over checkpoint memory `M`.
pub struct UndoLog<M: Memory> {
    mem: M,
    /// The kept part of the sequence: `[head, tail)`.
    head: u64,
    tail: u64,
    /// Pages logged from here on were made writable since the last checkpoint or rollback.
    writable_from: u64,
    /// Kept checkpoints, oldest first (their starts grow).
    kept: [Option<Checkpoint>; MAX_KEPT],
    count: usize,
    next_id: u32,
}

impl<M: Memory> UndoLog<M> {
    pub const fn new(mem: M) -> Self {
        UndoLog {
            mem,
            head: 0,
            tail: 0,
            writable_from: 0,
            kept: [None; MAX_KEPT],
            count: 0,
            next_id: 1,
        }
    }

    pub fn memory(&mut self) -> &mut M {
        &mut self.mem
    }

    /// Slots of checkpoint memory there are, and in use.
    pub fn capacity(&self) -> u64 {
        self.mem.slots()
    }
    pub fn used(&self) -> u64 {
        self.tail - self.head
    }
    pub fn free(&self) -> u64 {
        self.capacity() - self.used()
    }

    /// The checkpoints kept, oldest first.
    pub fn kept(&self) -> impl Iterator<Item = &Checkpoint> + '_ {
        self.kept[..self.count].iter().flatten()
    }

    pub fn get(&self, id: u32) -> Option<&Checkpoint> {
        self.kept().find(|c| c.id == id)
    }

    /// Checkpoint `id`, to fill in what is known only after it was taken (its pause).
    pub fn get_mut(&mut self, id: u32) -> Option<&mut Checkpoint> {
        self.kept[..self.count]
            .iter_mut()
            .flatten()
            .find(|c| c.id == id)
    }

    /// Is memory being logged (is any checkpoint kept)?
    pub fn logging(&self) -> bool {
        self.count > 0
    }

    /// The checkpoint the machine runs on from (the newest kept), whose epoch is current.
    pub fn current(&self) -> Option<&Checkpoint> {
        self.kept[..self.count].last().and_then(|c| c.as_ref())
    }

    /// The id the next checkpoint will get.
    pub fn next_id(&self) -> u32 {
        self.next_id
    }

    /// Pages made writable since the last checkpoint or rollback, each once per time it was
    /// logged (the caller write-protects them again).
    pub fn writable(&self) -> impl Iterator<Item = u64> + '_ {
        self.pages_in(self.writable_from..self.tail)
    }

    fn pages_in(&self, r: Range<u64>) -> impl Iterator<Item = u64> + '_ {
        r.map(|pos| self.mem.entry(pos % self.mem.slots()))
            .filter(|e| e & KIND_MASK == KIND_PAGE)
            .map(|e| e & !KIND_MASK)
    }

    /// The slot of record `r` of checkpoint `id`.
    pub fn record_slot(&self, id: u32, r: u32) -> Option<u64> {
        let c = self.get(id)?;
        (r < c.records).then(|| (c.start + r as u64) % self.mem.slots())
    }

    /// Takes a checkpoint with `records` slots of records, which `fill` writes (it gets the
    /// slot of each record in turn). Needs `records + reserve` free slots. The pages that
    /// were writable are the caller's to protect again first ([`UndoLog::writable`]); after
    /// this, none is.
    pub fn take(
        &mut self,
        meta: Checkpoint,
        reserve: u64,
        mut fill: impl FnMut(&mut M, u32, u64),
    ) -> Result<u32, UndoError> {
        if self.count == MAX_KEPT {
            return Err(UndoError::TooMany);
        }
        if self.free() < meta.records as u64 + reserve {
            return Err(UndoError::Full);
        }
        let id = self.next_id;
        let slots = self.mem.slots();
        for r in 0..meta.records {
            let slot = (self.tail + r as u64) % slots;
            self.mem.set_entry(slot, KIND_RECORD);
            fill(&mut self.mem, r, slot);
        }
        let c = Checkpoint {
            id,
            parent: self.current().map_or(0, |c| c.id),
            start: self.tail,
            pages: 0,
            dead: 0,
            ..meta
        };
        self.tail += meta.records as u64;
        self.writable_from = self.tail;
        self.kept[self.count] = Some(c);
        self.count += 1;
        self.next_id += 1;
        Ok(id)
    }

    /// The first write to protected page `gpa` in the current epoch: keeps its pre-image.
    /// `Full` if no slot is free (the caller drops the oldest checkpoint and tries again).
    pub fn log(&mut self, gpa: u64) -> Result<(), UndoError> {
        if self.count == 0 {
            return Err(UndoError::NotLogging);
        }
        if self.free() == 0 {
            return Err(UndoError::Full);
        }
        let slot = self.tail % self.mem.slots();
        let page = gpa & !KIND_MASK;
        self.mem.save_page(slot, page);
        self.mem.set_entry(slot, page | KIND_PAGE);
        self.tail += 1;
        if let Some(c) = self.kept[self.count - 1].as_mut() {
            c.pages += 1;
        }
        Ok(())
    }

    /// Where checkpoint `id` keeps the pages `[first, first + out.len() pages)` as they were
    /// when it was taken: per page, the slot of the oldest pre-image logged since (a page's
    /// first write after `id` kept exactly that), or [`NOT_LOGGED`] for a page not written
    /// since, which is as it was (and still write-protected: it cannot change before the
    /// caller, holding what serializes the log, has read it).
    pub fn preimages(&self, id: u32, first: u64, out: &mut [u64]) -> Result<(), UndoError> {
        let c = self.get(id).ok_or(UndoError::NoSuch)?;
        out.fill(NOT_LOGGED);
        let slots = self.mem.slots();
        let end = first + (out.len() * PAGE) as u64;
        for pos in c.start + c.records as u64..self.tail {
            let slot = pos % slots;
            let e = self.mem.entry(slot);
            let gpa = e & !KIND_MASK;
            if e & KIND_MASK == KIND_PAGE && (first..end).contains(&gpa) {
                let at = &mut out[((gpa - first) / PAGE as u64) as usize];
                if *at == NOT_LOGGED {
                    *at = slot;
                }
            }
        }
        Ok(())
    }

    /// The pages written between checkpoints `a` and `b` (either older), or since `a` when `b`
    /// is `None`: every page logged after the older one's records and before the newer one's
    /// (a page is logged at its first write after each checkpoint, so this is every page
    /// written between them). Each to `page`, unsorted, a page once per epoch it was logged
    /// in; returns how many there were.
    pub fn written_between(
        &self,
        a: u32,
        b: Option<u32>,
        mut page: impl FnMut(usize, u64),
    ) -> Result<usize, UndoError> {
        let ca = self.get(a).ok_or(UndoError::NoSuch)?;
        let (from, to) = match b {
            None => (ca.start + ca.records as u64, self.tail),
            Some(b) => {
                let cb = self.get(b).ok_or(UndoError::NoSuch)?;
                let (old, new) = if ca.start <= cb.start {
                    (ca, cb)
                } else {
                    (cb, ca)
                };
                (old.start + old.records as u64, new.start)
            }
        };
        let slots = self.mem.slots();
        let mut n = 0;
        for pos in from..to {
            let e = self.mem.entry(pos % slots);
            if e & KIND_MASK == KIND_PAGE {
                page(n, e & !KIND_MASK);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Puts memory back as it was at checkpoint `id`, newest entry first, and drops the
    /// checkpoints after it. The pages that were writable are the caller's to protect again
    /// first ([`UndoLog::writable`]); the restored ones were protected already.
    pub fn rollback(&mut self, id: u32) -> Result<RolledBack, UndoError> {
        let at = self.index_of(id).ok_or(UndoError::NoSuch)?;
        let c = self.kept[at].ok_or(UndoError::NoSuch)?;
        let from = c.start + c.records as u64;
        let slots = self.mem.slots();
        let mut pages = 0;
        for pos in (from..self.tail).rev() {
            let slot = pos % slots;
            let e = self.mem.entry(slot);
            if e & KIND_MASK == KIND_PAGE {
                self.mem.restore_page(slot, e & !KIND_MASK);
                pages += 1;
            }
        }
        let dropped = (self.count - at - 1) as u32;
        for k in &mut self.kept[at + 1..self.count] {
            *k = None;
        }
        self.count = at + 1;
        if let Some(k) = self.kept[at].as_mut() {
            k.pages = 0;
            k.dead = 0;
        }
        self.tail = from;
        self.writable_from = from;
        Ok(RolledBack { pages, dropped })
    }

    /// Deletes checkpoint `id`. Returns true if none is kept any more (the caller stops
    /// logging: every page writable again).
    pub fn delete(&mut self, id: u32) -> Result<bool, UndoError> {
        let at = self.index_of(id).ok_or(UndoError::NoSuch)?;
        let c = self.kept[at].ok_or(UndoError::NoSuch)?;
        if at == 0 {
            // Nothing older needs its entries.
            self.head = match self.kept[1..self.count].iter().flatten().next() {
                Some(next) => next.start,
                None => self.tail,
            };
        } else if let Some(prev) = self.kept[at - 1].as_mut() {
            // Its entries join the previous epoch.
            prev.pages += c.pages;
            prev.dead += c.dead + c.records as u64;
        }
        self.kept.copy_within(at + 1..self.count, at);
        self.count -= 1;
        self.kept[self.count] = None;
        if self.count == 0 {
            self.head = 0;
            self.tail = 0;
            self.writable_from = 0;
        }
        Ok(self.count == 0)
    }

    /// Deletes the oldest checkpoint (what memory pressure and the periodic ring do).
    pub fn drop_oldest(&mut self) -> Option<u32> {
        let id = self.kept().next()?.id;
        self.delete(id).ok()?;
        Some(id)
    }

    fn index_of(&self, id: u32) -> Option<usize> {
        self.kept[..self.count]
            .iter()
            .position(|c| c.is_some_and(|c| c.id == id))
    }
}

#[cfg(test)]
mod tests {
    //! A guest of a few pages and a small checkpoint memory; every operation is checked
    //! against a model that keeps a full copy of memory at each checkpoint.
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    const GUEST_PAGES: u64 = 6;

    struct Fake {
        guest: Vec<u8>,
        slots: Vec<[u8; PAGE]>,
        entries: Vec<u64>,
    }

    impl Fake {
        fn new(slots: usize) -> Self {
            Fake {
                guest: vec![0; GUEST_PAGES as usize * PAGE],
                slots: vec![[0; PAGE]; slots],
                entries: vec![0xDEAD; slots],
            }
        }
        fn page(&mut self, gpa: u64) -> &mut [u8] {
            &mut self.guest[gpa as usize..gpa as usize + PAGE]
        }
    }

    impl Memory for Fake {
        fn slots(&self) -> u64 {
            self.slots.len() as u64
        }
        fn entry(&self, slot: u64) -> u64 {
            self.entries[slot as usize]
        }
        fn set_entry(&mut self, slot: u64, entry: u64) {
            self.entries[slot as usize] = entry;
        }
        fn save_page(&mut self, slot: u64, gpa: u64) {
            let p = self.page(gpa).to_vec();
            self.slots[slot as usize].copy_from_slice(&p);
        }
        fn restore_page(&mut self, slot: u64, gpa: u64) {
            let s = self.slots[slot as usize];
            self.page(gpa).copy_from_slice(&s);
        }
    }

    /// The log, the write protection the nested tables would hold, and the model: memory as
    /// it was at each kept checkpoint, and each checkpoint's CPU record.
    struct Machine {
        log: UndoLog<Fake>,
        protected: BTreeSet<u64>,
        at: BTreeMap<u32, (Vec<u8>, u8)>,
        dropped_for_memory: u32,
    }

    impl Machine {
        fn new(slots: usize) -> Self {
            Machine {
                log: UndoLog::new(Fake::new(slots)),
                protected: BTreeSet::new(),
                at: BTreeMap::new(),
                dropped_for_memory: 0,
            }
        }

        fn protect_writable(&mut self) {
            let pages: Vec<u64> = self.log.writable().collect();
            self.protected.extend(pages);
        }

        /// A guest write, as the nested page fault handler serves it.
        fn write(&mut self, page: u64, offset: usize, byte: u8) {
            let gpa = page * PAGE as u64;
            if self.protected.contains(&gpa) {
                loop {
                    match self.log.log(gpa) {
                        Ok(()) => break,
                        Err(UndoError::Full) => {
                            let id = self.log.drop_oldest().unwrap();
                            self.at.remove(&id);
                            self.dropped_for_memory += 1;
                            if !self.log.logging() {
                                self.protected.clear();
                                break;
                            }
                        }
                        Err(e) => panic!("{e:?}"),
                    }
                }
                self.protected.remove(&gpa);
            }
            self.log.memory().page(gpa)[offset] = byte;
        }

        fn take(&mut self, record: u8, reserve: u64) -> Result<u32, UndoError> {
            let meta = Checkpoint {
                id: 0,
                parent: 0,
                periodic: false,
                start: 0,
                records: 2,
                pages: 0,
                dead: 0,
                taken: 0,
                pause_us: 0,
                cpu_mask: 1,
                tsc_offset: 0,
            };
            let first = !self.log.logging();
            let writable: Vec<u64> = self.log.writable().collect();
            let id = self.log.take(meta, reserve, |m, r, slot| {
                m.slots[slot as usize] = [record.wrapping_add(r as u8); PAGE];
            })?;
            if first {
                self.protected = (0..GUEST_PAGES).map(|p| p * PAGE as u64).collect();
            } else {
                self.protected.extend(writable);
            }
            self.at
                .insert(id, (self.log.memory().guest.clone(), record));
            Ok(id)
        }

        fn rollback(&mut self, id: u32) -> Result<RolledBack, UndoError> {
            self.protect_writable();
            let r = self.log.rollback(id)?;
            self.at.retain(|&k, _| k <= id);
            Ok(r)
        }

        fn delete(&mut self, id: u32) {
            let none_left = self.log.delete(id).unwrap();
            self.at.remove(&id);
            if none_left {
                self.protected.clear();
            }
        }

        /// What a user checks: memory is exactly what it was at the checkpoint, and so is
        /// its record.
        fn check_restored(&mut self, id: u32) {
            let (mem, record) = self.at[&id].clone();
            assert!(
                self.log.memory().guest == mem,
                "memory after rollback to {id}"
            );
            for r in 0..2 {
                let slot = self.log.record_slot(id, r).unwrap();
                assert_eq!(
                    self.log.memory().slots[slot as usize][0],
                    record.wrapping_add(r as u8)
                );
            }
        }

        /// What an export reads: every kept checkpoint's memory, from its pre-images and the
        /// pages not written since, is exactly what it was.
        fn check_readable(&self) {
            for (&id, (mem, _)) in &self.at {
                let mut slots = [0u64; GUEST_PAGES as usize];
                self.log.preimages(id, 0, &mut slots).unwrap();
                for (p, &slot) in slots.iter().enumerate() {
                    let fake = &self.log.mem;
                    let now = &fake.guest[p * PAGE..(p + 1) * PAGE];
                    let read = if slot == NOT_LOGGED {
                        now
                    } else {
                        &fake.slots[slot as usize][..]
                    };
                    assert!(
                        read == &mem[p * PAGE..(p + 1) * PAGE],
                        "checkpoint {id} page {p}"
                    );
                }
            }
        }

        fn check_invariants(&self) {
            let kept: Vec<u32> = self.log.kept().map(|c| c.id).collect();
            let model: Vec<u32> = self.at.keys().copied().collect();
            assert_eq!(kept, model);
            let counted: u64 = self.log.kept().map(|c| c.slots()).sum();
            assert_eq!(
                counted,
                self.log.used(),
                "every used slot belongs to an epoch"
            );
            assert!(self.log.used() <= self.log.capacity());
        }
    }

    #[derive(Clone, Debug)]
    enum Step {
        Write(u64, usize, u8),
        Take(u8),
        Rollback(usize),
        Delete(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0..GUEST_PAGES, 0..PAGE, any::<u8>()).prop_map(|(p, o, b)| Step::Write(p, o, b)),
            2 => any::<u8>().prop_map(Step::Take),
            1 => any::<usize>().prop_map(Step::Rollback),
            1 => any::<usize>().prop_map(Step::Delete),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn any_sequence_of_writes_checkpoints_deletes_and_rollbacks_restores_exact_bytes(
            slots in 3usize..40,
            steps in proptest::collection::vec(step(), 1..120),
        ) {
            let mut m = Machine::new(slots);
            for s in steps {
                match s {
                    Step::Write(p, o, b) => m.write(p, o, b),
                    Step::Take(r) => {
                        let _ = m.take(r, 0);
                    }
                    Step::Rollback(i) => {
                        let ids: Vec<u32> = m.at.keys().copied().collect();
                        if !ids.is_empty() {
                            let id = ids[i % ids.len()];
                            m.rollback(id).unwrap();
                            m.check_restored(id);
                        }
                    }
                    Step::Delete(i) => {
                        let ids: Vec<u32> = m.at.keys().copied().collect();
                        if !ids.is_empty() {
                            m.delete(ids[i % ids.len()]);
                        }
                    }
                }
                m.check_invariants();
                m.check_readable();
            }
            // Every checkpoint still kept restores exactly, newest to oldest.
            let ids: Vec<u32> = m.at.keys().rev().copied().collect();
            for id in ids {
                m.rollback(id).unwrap();
                m.check_restored(id);
                m.check_invariants();
            }
        }
    }

    #[test]
    fn the_pages_written_between_two_checkpoints_or_since_one_are_told() {
        let mut m = Machine::new(32);
        let a = m.take(1, 0).unwrap();
        m.write(1, 0, 1);
        m.write(2, 0, 1);
        let b = m.take(2, 0).unwrap();
        m.write(2, 0, 2);
        m.write(3, 0, 2);
        let pages = |a, b| {
            let mut v = Vec::new();
            let n = m
                .log
                .written_between(a, b, |_, g| v.push(g / PAGE as u64))
                .unwrap();
            assert_eq!(n, v.len());
            v.sort_unstable();
            v.dedup();
            v
        };
        assert_eq!(pages(a, Some(b)), [1, 2]);
        assert_eq!(pages(b, Some(a)), [1, 2], "either order");
        assert_eq!(pages(a, None), [1, 2, 3]);
        assert_eq!(pages(b, None), [2, 3]);
        assert_eq!(
            m.log.written_between(9, None, |_, _| {}),
            Err(UndoError::NoSuch)
        );
        assert_eq!(m.log.written_between(a, None, |_, _| {}), Ok(4), "2 twice");
    }

    #[test]
    fn the_same_checkpoint_restores_again_after_the_machine_ran_on_from_it() {
        let mut m = Machine::new(32);
        m.write(0, 0, 1);
        let c = m.take(7, 0).unwrap();
        for round in 0..3u8 {
            m.write(0, 0, 10 + round);
            m.write(3, 5, round);
            let r = m.rollback(c).unwrap();
            assert_eq!((r.pages, r.dropped), (2, 0));
            m.check_restored(c);
        }
        assert_eq!(
            m.log.get(c).unwrap().pages,
            0,
            "the restored epoch starts empty"
        );
    }

    #[test]
    fn a_rollback_drops_the_newer_checkpoints_and_the_next_one_is_its_child() {
        let mut m = Machine::new(32);
        let a = m.take(1, 0).unwrap();
        m.write(1, 0, 1);
        let b = m.take(2, 0).unwrap();
        m.write(1, 0, 2);
        let c = m.take(3, 0).unwrap();
        m.write(2, 0, 3);
        assert_eq!(m.log.get(c).unwrap().parent, b);
        assert_eq!(m.rollback(a).unwrap().dropped, 2);
        m.check_restored(a);
        assert_eq!(m.log.get(b), None);
        let d = m.take(4, 0).unwrap();
        assert!(d > c, "ids are never reused");
        assert_eq!(m.log.get(d).unwrap().parent, a);
    }

    #[test]
    fn deleting_a_middle_checkpoint_keeps_the_older_one_exact() {
        let mut m = Machine::new(32);
        let a = m.take(1, 0).unwrap();
        m.write(1, 0, 1);
        let b = m.take(2, 0).unwrap();
        m.write(1, 0, 2);
        m.write(2, 0, 2);
        let c = m.take(3, 0).unwrap();
        m.write(2, 0, 3);
        m.delete(b);
        let kept = m.log.get(a).unwrap();
        assert_eq!(
            (kept.pages, kept.dead),
            (3, 2),
            "b's pages and records joined a's epoch"
        );
        m.rollback(c).unwrap();
        m.check_restored(c);
        m.rollback(a).unwrap();
        m.check_restored(a);
    }

    #[test]
    fn when_memory_runs_out_the_oldest_goes_and_an_explicit_checkpoint_is_refused() {
        let mut m = Machine::new(8);
        let a = m.take(1, 0).unwrap();
        for p in 0..GUEST_PAGES {
            m.write(p, 0, 1);
        }
        // 2 records + 6 pages: full.
        assert_eq!(m.log.free(), 0);
        assert_eq!(m.take(2, 1), Err(UndoError::Full));
        assert_eq!(
            m.log.get(a).map(|c| c.id),
            Some(a),
            "a refusal loses nothing"
        );
        m.rollback(a).unwrap();
        m.check_restored(a);
        for p in 0..3 {
            m.write(p, 0, 2);
        }
        let b = m.take(3, 0).unwrap();
        for p in 0..GUEST_PAGES {
            m.write(p, 1, 3);
        }
        assert_eq!(m.dropped_for_memory, 1, "the oldest made room");
        assert_eq!(m.log.kept().map(|c| c.id).collect::<Vec<_>>(), [b]);
        m.rollback(b).unwrap();
        m.check_restored(b);
    }

    #[test]
    fn deleting_the_last_checkpoint_stops_logging() {
        let mut m = Machine::new(8);
        let a = m.take(1, 0).unwrap();
        m.write(0, 0, 1);
        m.delete(a);
        assert!(!m.log.logging());
        assert_eq!(m.log.used(), 0);
        assert_eq!(m.log.log(0), Err(UndoError::NotLogging));
        assert_eq!(m.log.rollback(a), Err(UndoError::NoSuch));
    }
}
