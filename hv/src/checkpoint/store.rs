//! Checkpoint memory: the store chunks the agent gave for checkpoints (`ckpt_mem=`), as the
//! undo log's [`Memory`]: first the entry words (8 bytes per slot), then the slots.
//!
//! Chunks are 4 MiB each, wherever Linux's allocator found them; pages are numbered across
//! them in the agent's order. Reached only in host mode, through the hv's identity map, like
//! guest memory (both are physical addresses below `map_limit`).

use super::undo::{Memory, PAGE};
use crate::arch::instr;
use quicksilver_proto::abi::STORE_CHUNK_SIZE;

/// Most chunks of checkpoint memory (256 MiB).
pub const MAX_CHUNKS: usize = quicksilver_proto::abi::CKPT_MAX_CHUNKS as usize;
const PAGES_PER_CHUNK: u64 = STORE_CHUNK_SIZE / PAGE as u64;
const ENTRIES_PER_PAGE: u64 = PAGE as u64 / 8;

pub struct StoreMemory {
    chunks: [u64; MAX_CHUNKS],
    /// Pages of entry words at the start, and slots after them.
    entry_pages: u64,
    slots: u64,
}

impl StoreMemory {
    pub const fn empty() -> Self {
        StoreMemory {
            chunks: [0; MAX_CHUNKS],
            entry_pages: 0,
            slots: 0,
        }
    }

    /// Lays the log out over `chunks` (physical addresses, each `STORE_CHUNK_SIZE` bytes,
    /// hidden from the guest). Touches none of them.
    pub fn configure(&mut self, chunks: &[u64]) {
        let n = chunks.len().min(MAX_CHUNKS);
        self.chunks[..n].copy_from_slice(&chunks[..n]);
        let pages = n as u64 * PAGES_PER_CHUNK;
        // Each slot needs a page and an eighth of a KiB: slots * (1 + 1/512) <= pages.
        self.slots = pages * ENTRIES_PER_PAGE / (ENTRIES_PER_PAGE + 1);
        self.entry_pages = self.slots.div_ceil(ENTRIES_PER_PAGE);
        debug_assert!(self.entry_pages + self.slots <= pages);
    }

    /// Physical address of page `n` of checkpoint memory.
    fn page_pa(&self, n: u64) -> u64 {
        self.chunks[(n / PAGES_PER_CHUNK) as usize] + (n % PAGES_PER_CHUNK) * PAGE as u64
    }

    fn entry_ptr(&self, slot: u64) -> *mut u64 {
        let pa = self.page_pa(slot / ENTRIES_PER_PAGE) + (slot % ENTRIES_PER_PAGE) * 8;
        pa as *mut u64
    }

    /// Physical address of `slot`'s page.
    pub fn slot_pa(&self, slot: u64) -> u64 {
        self.page_pa(self.entry_pages + slot)
    }
}

impl Memory for StoreMemory {
    fn slots(&self) -> u64 {
        self.slots
    }

    fn entry(&self, slot: u64) -> u64 {
        // SAFETY: host mode (the log is used only there), where the identity map reaches
        // checkpoint memory; the word is inside it (slot < slots) and aligned.
        unsafe { self.entry_ptr(slot).read_volatile() }
    }

    fn set_entry(&mut self, slot: u64, entry: u64) {
        // SAFETY: as in `entry`; checkpoint memory is the hv's alone (hidden from the guest).
        unsafe { self.entry_ptr(slot).write_volatile(entry) }
    }

    fn save_page(&mut self, slot: u64, gpa: u64) {
        // SAFETY: host mode; `gpa` is a page of guest RAM (the log is fed only pages the
        // nested tables protected, never the hv's), the slot a page of checkpoint memory:
        // both aligned, both in the identity map, apart.
        unsafe { instr::copy_page(self.slot_pa(slot) as *mut u8, gpa as *const u8) }
    }

    fn restore_page(&mut self, slot: u64, gpa: u64) {
        // SAFETY: as in `save_page`, the other way; every CPU is stopped (a rollback).
        unsafe { instr::copy_page(gpa as *mut u8, self.slot_pa(slot) as *const u8) }
    }
}
