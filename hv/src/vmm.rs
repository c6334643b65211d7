//! The hv's global state: built once by `init` while dormant, then read by every CPU.
//!
//! Memory (one physically contiguous block from the agent, mapped at `base_va` in the kernel
//! and, identically, in the hv's own page tables):
//!
//! ```text
//! base        the image (header, code, data, bss, relocation table), rounded up to a page
//! work        per-CPU: vCPU, run state, shared, stopped, stack  (vcpu::Cpu, 52 KiB each)
//!             the frame pool: its bitmap, the MSR intercept map, scratch page, IDT page,
//!             the hv's page tables and the nested page tables
//! store       the agent's chunks of 4 MiB (`store_mem=`), hidden from the guest
//! ```
//!
//! Nested paging (`crate::npt`) identity-maps guest-physical to host-physical addresses for all
//! of `[0, max(phys_limit, 512 GiB))` with the largest pages that fit, leaving the hv's block and
//! its store not present: the guest cannot reach the hv (APM vol. 2, 15.25).

use crate::arch::context::{HostContext, HOST_GDT as GDT};
use crate::arch::instr::DescriptorTablePointer;
use crate::frames::FramePool;
use crate::npt::{Flush, Npt, Perms, TlbGeneration};
use crate::paging::{self, Gpa, Hpa, P, RW, SIZE_4K, SIZE_512G};
use crate::vcpu::Cpu;
use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use quicksilver_proto::abi::{InitArgs, Op, Status, MAX_RAM_RANGES, STORE_CHUNK_SIZE};
use quicksilver_proto::image::{ImageHeader, PAGE_SIZE};
use quicksilver_proto::stats::{self, CpuStats, ExitRecord, StatsHeader};
use spin::Mutex;

/// Most CPUs this image supports.
pub const MAX_CPUS: u32 = 64;
/// Pages of working memory besides the per-CPU areas: MSRPM (2), scratch, IDT, the frame
/// pool's bitmap, the hv's page tables and the nested tables (holes for the block and, at
/// 2 MiB granularity, for each store chunk: one page directory per GiB that holds one).
pub const FIXED_PAGES: u64 = 48 + STORE_MAX_CHUNKS as u64;
/// Most store chunks the hv takes (512 MiB: `store_mem=` and `ckpt_mem=` together).
pub const STORE_MAX_CHUNKS: usize = 128;

/// The nested page tables' TLB generation: each CPU flushes its guest translations at its
/// next VMRUN after a change that took rights away.
pub static NPT_TLB: TlbGeneration = TlbGeneration::new();

/// Everything `init` builds.
pub struct Hv {
    pub base_va: u64,
    pub base_pa: u64,
    pub mem_size: u64,
    pub header: Option<ImageHeader>,
    /// Guest-physical addresses below this are identity-mapped (host and nested tables).
    pub map_limit: u64,
    pub cpus: u32,
    pub tsc_khz: u32,
    /// The kernel's `_text` at run time and at link time (0 if the agent could not tell).
    pub kernel_text: u64,
    pub kernel_text_link: u64,
    cpu_base: u64,
    pub msr_intercepts_pa: u64,
    pub npt_root_pa: u64,
    pub scratch_pa: u64,
    pub host: HostContext,
    /// The nested page tables and the frame pool they (and everything the hv allocates later)
    /// draw from: the block's free part, then the store.
    pub npt: Mutex<Npt<FramePool<'static>>>,
    /// The store: chunks of `STORE_CHUNK_SIZE` bytes (physical addresses), hidden from the
    /// guest, reached in host mode through the identity map.
    store: [u64; STORE_MAX_CHUNKS],
    store_chunks: usize,
}

struct Global(UnsafeCell<MaybeUninit<Hv>>);
// SAFETY: `Hv` is written only by `init`, which the agent calls once, on one CPU, before any
// `activate`; afterwards it is only read (what changes is in atomics, locks or per-CPU areas).
unsafe impl Sync for Global {}

/// Built in place by `init` (on the kernel's stack, 16 KiB, a few KiB of `Hv` built there and
/// moved would not fit beside the kernel's own frames).
static HV: Global = Global(UnsafeCell::new(MaybeUninit::uninit()));
static INITIALIZED: AtomicBool = AtomicBool::new(false);
/// Some guest page is mapped to scratch (see `map_to_scratch`) since the last reset.
static SCRATCH_IN_USE: AtomicBool = AtomicBool::new(false);

/// The hv's GDT, read by the CPU in host mode.
static HOST_GDT: [u64; 3] = GDT;

/// Counters shared by all CPUs.
pub struct Counters {
    pub active_cpus: AtomicU32,
    pub activations: AtomicU64,
    pub deactivations: AtomicU64,
    pub hv_refusals: AtomicU64,
    pub last_refused_gpa: AtomicU64,
    pub msr_refusals: AtomicU64,
    pub svm_insn_refusals: AtomicU64,
    pub unexpected: AtomicU64,
    /// gdb breakpoints that could not be taken out of the kernel's memory.
    pub breakpoints_left: AtomicU64,
    /// The last unexpected exit.
    record: Mutex<ExitRecord>,
}

pub static COUNTERS: Counters = Counters {
    active_cpus: AtomicU32::new(0),
    activations: AtomicU64::new(0),
    deactivations: AtomicU64::new(0),
    hv_refusals: AtomicU64::new(0),
    last_refused_gpa: AtomicU64::new(0),
    msr_refusals: AtomicU64::new(0),
    svm_insn_refusals: AtomicU64::new(0),
    unexpected: AtomicU64::new(0),
    breakpoints_left: AtomicU64::new(0),
    record: Mutex::new(ExitRecord {
        cpu: 0,
        valid: 0,
        exit_code: 0,
        exit_info1: 0,
        exit_info2: 0,
        exit_int_info: 0,
        rip: 0,
        rsp: 0,
        rflags: 0,
        cr0: 0,
        cr2: 0,
        cr3: 0,
        cr4: 0,
        efer: 0,
        cs: 0,
        cpl: 0,
    }),
};

impl Counters {
    /// Keeps `rec` as the last unexpected exit.
    pub fn unexpected_exit(&self, rec: ExitRecord) {
        self.unexpected.fetch_add(1, Relaxed);
        *self.record.lock() = rec;
    }
}

/// The global state, once `init` has succeeded.
pub fn get() -> Option<&'static Hv> {
    if INITIALIZED.load(Acquire) {
        // SAFETY: INITIALIZED is set only once `init` has written every field, after which
        // `Hv` is never written again (see `Global`).
        Some(unsafe { (*HV.0.get()).assume_init_ref() })
    } else {
        None
    }
}

impl Hv {
    /// The area of CPU `index` (its parts say who may change what: `vcpu::Cpu`).
    pub fn cpu(&self, index: u32) -> Option<&Cpu> {
        if index >= self.cpus {
            return None;
        }
        let p = (self.cpu_base + index as u64 * core::mem::size_of::<Cpu>() as u64) as *const Cpu;
        // SAFETY: `init` prepared `cpus` areas at `cpu_base`, which live as long as the image;
        // a shared reference is sound because every part of `Cpu` that changes is atomic or
        // in an `UnsafeCell`.
        Some(unsafe { &*p })
    }

    /// Physical address of a pointer into the hv's block.
    pub fn pa_of<T>(&self, p: *const T) -> u64 {
        p as u64 - self.base_va + self.base_pa
    }

    /// Is `gpa` inside the hv's own memory (its block or its store)?
    pub fn owns(&self, gpa: u64) -> bool {
        (self.base_pa..self.base_pa + self.mem_size).contains(&gpa)
            || self.store().any(|c| c.contains(&gpa))
            || crate::net::BARS.contains(gpa)
    }

    /// Does `r` touch the hv's own memory?
    pub fn overlaps_own(&self, r: core::ops::Range<u64>) -> bool {
        let block = self.base_pa..self.base_pa + self.mem_size;
        core::iter::once(block)
            .chain(self.store())
            .any(|o| r.start < o.end && o.start < r.end)
    }

    /// The store's chunks, as physical ranges.
    pub fn store(&self) -> impl Iterator<Item = core::ops::Range<u64>> + '_ {
        self.store[..self.store_chunks]
            .iter()
            .map(|&pa| pa..pa + STORE_CHUNK_SIZE)
    }

    /// Maps the guest page of `gpa` (inside the hv's memory) to the scratch page: the guest's
    /// access is refused without a fault it could not handle (reads see zeros, writes land in
    /// scratch). Adds rights only: no other CPU needs a flush.
    pub fn map_to_scratch(&self, gpa: u64) -> bool {
        if !self.owns(gpa) {
            return false;
        }
        let page = Gpa(gpa & !(SIZE_4K - 1));
        match self
            .npt
            .lock()
            .map(page, Hpa(self.scratch_pa), SIZE_4K, Perms::RWX)
        {
            Ok(flush) => {
                NPT_TLB.publish(flush);
                SCRATCH_IN_USE.store(true, Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    /// Takes every scratch mapping back out and clears the scratch page (last CPU out: no CPU
    /// runs the guest, so the tables the mappings used can be reclaimed at once).
    pub fn reset_guest_view(&self) {
        // Nothing to undo in the common case: keep the last CPU's way out short.
        if !SCRATCH_IN_USE.swap(false, Relaxed) {
            return;
        }
        let mut npt = self.npt.lock();
        let mut flush = npt
            .unmap(Gpa(self.base_pa), self.mem_size)
            .unwrap_or(Flush::EveryCpu);
        for c in self.store() {
            flush |= npt
                .unmap(Gpa(c.start), STORE_CHUNK_SIZE)
                .unwrap_or(Flush::EveryCpu);
        }
        for bar in crate::net::BARS.ranges() {
            flush |= npt
                .unmap(Gpa(bar.start), bar.end - bar.start)
                .unwrap_or(Flush::EveryCpu);
        }
        NPT_TLB.publish(flush);
        // SAFETY: no CPU is in guest mode (the last one is on its way out, in host mode), so
        // no walk can be using a retired table, and every CPU flushes at its next VMRUN.
        unsafe { npt.reclaim() };
        let scratch = npt.frames().va(Hpa(self.scratch_pa));
        drop(npt);
        if let Some(va) = scratch {
            // SAFETY: the scratch page is ours, mapped at its VA in the hv's tables.
            unsafe { core::ptr::write_bytes(va as *mut u8, 0, 4096) };
        }
    }

    /// Is the hv's code what was built? (CRC-32 of the code range against the header.)
    pub fn code_intact(&self) -> bool {
        let Some(h) = self.header else { return false };
        // SAFETY: [code_start, code_end) lies inside the image (validated by the loader and
        // by `init`), which is mapped at base_va in every address space the hv runs in.
        let code = unsafe {
            core::slice::from_raw_parts(
                (self.base_va + h.code_start) as *const u8,
                (h.code_end - h.code_start) as usize,
            )
        };
        quicksilver_proto::crc32(code) == h.code_crc
    }

    /// Writes the statistics block into `out`.
    pub fn write_stats(&self, out: &mut [u8]) -> Status {
        if out.len() < stats::stats_size(self.cpus) {
            return Status::BufferTooSmall;
        }
        let c = &COUNTERS;
        let mut h = StatsHeader {
            magic: stats::STATS_MAGIC,
            version: stats::STATS_VERSION,
            cpus: self.cpus,
            active_cpus: c.active_cpus.load(Relaxed),
            code_intact: self.code_intact() as u32,
            breakpoints_left: c.breakpoints_left.load(Relaxed) as u32,
            hv_version: [0; 32],
            mem_bytes: self.mem_size,
            mem_base_pa: self.base_pa,
            tsc_khz: self.tsc_khz as u64,
            activations: c.activations.load(Relaxed),
            deactivations: c.deactivations.load(Relaxed),
            hv_memory_refusals: c.hv_refusals.load(Relaxed),
            last_refused_gpa: c.last_refused_gpa.load(Relaxed),
            msr_refusals: c.msr_refusals.load(Relaxed),
            svm_insn_refusals: c.svm_insn_refusals.load(Relaxed),
            unexpected_exits: c.unexpected.load(Relaxed),
            last_unexpected: *c.record.lock(),
            link_state: 0,
            link_dropped: 0,
            link_wrong_keys: 0,
            link_unauthenticated: 0,
            link_unrouted: 0,
            link_stale_replies: 0,
            devices: crate::devices::stats_record(),
            net: crate::net::stats_record(),
        };
        crate::link::write_stats(&mut h);
        if let Some(hdr) = self.header {
            h.hv_version = hdr.version;
        }
        let hsize = core::mem::size_of::<StatsHeader>();
        // SAFETY: `out` has room for the header (checked above); an unaligned-safe copy of a
        // plain integer struct.
        unsafe { core::ptr::write_unaligned(out.as_mut_ptr().cast::<StatsHeader>(), h) };
        for i in 0..self.cpus {
            let s: CpuStats = self
                .cpu(i)
                .map(|c| CpuStats {
                    stack_used: c.stack_used(),
                    stack_size: crate::vcpu::STACK_SIZE as u32,
                    ..c.shared.stats()
                })
                .unwrap_or_default();
            let at = hsize + i as usize * core::mem::size_of::<CpuStats>();
            // SAFETY: `out` has room for every CPU (checked above); as for the header.
            unsafe { core::ptr::write_unaligned(out[at..].as_mut_ptr().cast::<CpuStats>(), s) };
        }
        Status::Ok
    }

    /// A control operation on a buffer given by guest-physical address (host mode: the hv's
    /// tables identity-map guest memory).
    pub fn control_phys(&self, op: Op, gpa: u64, len: u64) -> i64 {
        if op == Op::AgentStop {
            // The agent's stopping hypercall: a stop held for it is made here.
            crate::debug::session::agent_stop_hypercall();
            return COUNTERS.active_cpus.load(Acquire) as i64;
        }
        // The ops without a buffer (the agent passes none: no slice at address 0).
        if matches!(op, Op::ActiveCpus | Op::NetPoll | Op::NetRelease) {
            return self.control(op, &mut [], true);
        }
        // SAFETY: a hypercall's buffer, used for this call only.
        match unsafe { self.guest_buffer(gpa, len) } {
            Ok(buf) => self.control(op, buf, true),
            Err(s) => s as i64,
        }
    }

    /// `Op::Checkpoint` or `Op::Rollback` from CPU `me`, on a guest-physical buffer: checked
    /// and kept for the rendezvous that follows the hypercall (`crate::checkpoint`).
    pub fn checkpoint_request(&self, me: u32, rollback: bool, gpa: u64, len: u64) -> i64 {
        // SAFETY: a hypercall's buffer, used for this call only.
        match unsafe { self.guest_buffer(gpa, len) } {
            Ok(buf) => crate::checkpoint::request(self, me, rollback, gpa, buf) as i64,
            Err(s) => s as i64,
        }
    }

    /// `Op::Freeze` from CPU `me`, on a guest-physical buffer: checked and kept for the
    /// rendezvous that follows the hypercall (`crate::freeze`).
    pub fn freeze_request(&self, me: u32, gpa: u64, len: u64) -> i64 {
        // SAFETY: a hypercall's buffer, used for this call only.
        match unsafe { self.guest_buffer(gpa, len) } {
            Ok(buf) => crate::freeze::request(me, gpa, buf) as i64,
            Err(s) => s as i64,
        }
    }

    /// A buffer the guest handed over for a hypercall, by guest-physical address: in the
    /// identity map, outside the hv's memory, at most 1 MiB.
    ///
    /// # Safety
    /// Host mode; the guest handed `[gpa, gpa + len)` over for the current hypercall, and the
    /// slice must not be kept beyond it (it is the guest's memory, not the hv's).
    unsafe fn guest_buffer<'g>(&self, gpa: u64, len: u64) -> Result<&'g mut [u8], Status> {
        let end = match gpa.checked_add(len) {
            Some(e) if e <= self.map_limit && len <= (1 << 20) => e,
            _ => return Err(Status::BadArgument),
        };
        if self.overlaps_own(gpa..end) {
            return Err(Status::BadArgument);
        }
        // The caller may write the buffer: while checkpoints are kept, its pages' old
        // contents are kept first.
        crate::checkpoint::before_hv_write(self, gpa, len);
        // SAFETY: [gpa, end) is identity-mapped in the hv's tables, outside the hv's memory,
        // and the guest handed it over for this call (the agent's kmalloc'd buffer); host
        // mode only, where the identity map is the address space.
        Ok(unsafe { core::slice::from_raw_parts_mut(gpa as *mut u8, len as usize) })
    }

    /// A control operation on a buffer the caller can address, from a hypercall (`in_guest`)
    /// or a direct call: a [`Status`], or for `LinkRx` 1 when attention was asked for.
    pub fn control(&self, op: Op, buf: &mut [u8], in_guest: bool) -> i64 {
        let status = match op {
            Op::Stats => self.write_stats(buf),
            Op::LinkConfig => crate::link::configure(buf),
            Op::LinkRx => return crate::link::receive(buf, in_guest),
            // (A direct call: the CPU is native and no stop can be made on it.)
            Op::ActiveCpus | Op::AgentStop => return COUNTERS.active_cpus.load(Acquire) as i64,
            Op::Checkpoints => crate::checkpoint::list(self, buf),
            // Deleting the last checkpoint gives RAM back to the guest through the nested
            // tables, which only host mode reaches: a CPU that is not in guest mode (the
            // direct call) cannot do it.
            Op::CheckpointDelete if !in_guest && crate::checkpoint::kept() => Status::NotActive,
            Op::CheckpointDelete => crate::checkpoint::delete(self, buf),
            Op::CheckpointPeriodic => crate::checkpoint::periodic(buf),
            Op::LinkRequest => crate::link::checkpoint::hand_out(buf),
            Op::LinkReply => crate::link::checkpoint::reply(buf),
            Op::LinkBulk => crate::link::checkpoint::bulk(buf),
            // Checkpoint memory and slots are reached through the identity map: host mode.
            Op::CheckpointRead
            | Op::CheckpointCpu
            | Op::CheckpointChanged
            | Op::CheckpointDevices
                if !in_guest =>
            {
                Status::NotActive
            }
            Op::CheckpointRead => crate::checkpoint::export::read_pages(self, buf),
            Op::CheckpointCpu => crate::checkpoint::export::read_cpu(self, buf),
            Op::CheckpointChanged => crate::checkpoint::export::changed(buf),
            Op::CheckpointDevices => crate::checkpoint::export::read_devices(self, buf),
            // The NIC's registers and the tables are set up and taken down while dormant.
            Op::NetConfig | Op::NetRelease if in_guest => Status::Busy,
            Op::NetConfig => crate::net::configure(self, buf),
            Op::NetRelease => crate::net::release(self),
            Op::NetPoll => return crate::net::poll(in_guest),
            // Hypercalls only (`freeze_request`, `checkpoint_request`, the run loop).
            Op::Deactivate | Op::Freeze | Op::Checkpoint | Op::Rollback => Status::BadOp,
        };
        status as i64
    }
}

/// `ImageHeader::flags` bit the image sets once its relocations are applied.
pub const FLAG_RELOCATED: u32 = 1;

/// Applies the image's relocations: at each listed offset, add the load address.
///
/// Touches no static: before relocation, a static reached through the GOT would yield an
/// unrelocated address. Everything is reached from `base` instead, including the guard bit.
///
/// # Safety
/// `base` is where the image was loaded and its header validated; must run before any code
/// that uses a relocated pointer (formatting, panics, trait objects), on one CPU.
pub unsafe fn relocate(base: *mut u8) {
    // SAFETY: the loader validated the header at `base`, the table, and that every entry
    // lies inside the image; the flags word is the header's own.
    unsafe {
        let header = base.cast::<ImageHeader>().read_unaligned();
        let flags = base
            .add(core::mem::offset_of!(ImageHeader, flags))
            .cast::<u32>();
        if flags.read_volatile() & FLAG_RELOCATED != 0 {
            return;
        }
        for i in 0..header.reloc_count {
            let entry = base
                .add((header.reloc_offset + i * 8) as usize)
                .cast::<u64>();
            let site = base.add(entry.read_unaligned() as usize).cast::<u64>();
            site.write_unaligned(site.read_unaligned().wrapping_add(base as u64));
        }
        flags.write_volatile(flags.read_volatile() | FLAG_RELOCATED);
    }
}

/// Builds everything the switch needs. Runs once, on one CPU, while dormant, from the agent's
/// `init` call on the kernel's address space.
pub fn init(header: &ImageHeader, args: &InitArgs) -> Status {
    if INITIALIZED.load(Acquire) {
        return Status::Ok;
    }
    if let Err(s) = crate::arch::check_support() {
        return s;
    }
    if !crate::arch::live::xsave_fits() {
        return Status::XsaveTooLarge;
    }
    if args.cpus == 0 || args.cpus > MAX_CPUS {
        return Status::TooManyCpus;
    }
    if !args.base_va.is_multiple_of(PAGE_SIZE)
        || !args.base_pa.is_multiple_of(PAGE_SIZE)
        || args.tsc_khz == 0
    {
        return Status::BadArgument;
    }
    let map_limit = args.phys_limit.max(SIZE_512G).div_ceil(SIZE_512G) * SIZE_512G;
    if args.base_va < map_limit {
        // The block must sit in the upper half: the lower half is the hv's identity map.
        return Status::BadArgument;
    }
    let image_pages = header.image_size.div_ceil(PAGE_SIZE);
    let cpu_bytes = args.cpus as u64 * core::mem::size_of::<Cpu>() as u64;
    let work_pa = args.base_pa + image_pages * PAGE_SIZE;
    let pool_pa = work_pa + cpu_bytes;
    if pool_pa >= args.base_pa + args.mem_size {
        return Status::NotEnoughMemory;
    }
    let store = match store_chunks(args, map_limit) {
        Ok(s) => s,
        Err(s) => return s,
    };
    // SAFETY: INITIALIZED is false, so no reader exists yet; the agent calls init once, on
    // one CPU (see `Global`).
    let slot = unsafe { (*HV.0.get()).as_mut_ptr() };
    match build(slot, header, args, map_limit, work_pa, pool_pa, &store) {
        Ok(()) => {
            INITIALIZED.store(true, Release);
            Status::Ok
        }
        Err(s) => s,
    }
}

/// The store's chunks, copied from the agent's list (valid only during `init`) and checked:
/// each aligned to its size, in the identity map, apart from the block and from each other.
fn store_chunks(
    args: &InitArgs,
    map_limit: u64,
) -> Result<([u64; STORE_MAX_CHUNKS], usize), Status> {
    let n = args.store_chunks as usize;
    let mut store = [0u64; STORE_MAX_CHUNKS];
    if args.ckpt_chunks > args.store_chunks {
        return Err(Status::BadArgument);
    }
    if n == 0 {
        return Ok((store, 0));
    }
    if n > STORE_MAX_CHUNKS
        || args.store_chunks_va == 0
        || args.ckpt_chunks as usize > crate::checkpoint::store::MAX_CHUNKS
    {
        return Err(Status::StoreTooLarge);
    }

    // SAFETY: the agent passes a kernel VA of `store_chunks` u64s, valid for this call (init
    // runs on the kernel's address space); read_unaligned needs no alignment.
    let list = args.store_chunks_va as *const u64;
    let block = args.base_pa..args.base_pa + args.mem_size;
    for i in 0..n {
        // SAFETY: as above, i < store_chunks.
        let pa = unsafe { list.add(i).read_unaligned() };
        let end = pa.checked_add(STORE_CHUNK_SIZE);
        let overlaps = |r: &core::ops::Range<u64>| pa < r.end && r.start < pa + STORE_CHUNK_SIZE;
        if !pa.is_multiple_of(STORE_CHUNK_SIZE)
            || end.is_none_or(|e| e > map_limit)
            || overlaps(&block)
            || store[..i]
                .iter()
                .any(|&o| overlaps(&(o..o + STORE_CHUNK_SIZE)))
        {
            return Err(Status::BadArgument);
        }
        store[i] = pa;
    }
    Ok((store, n))
}

/// The machine's RAM, copied from the agent's list (valid only during `init`): at most
/// `MAX_RAM_RANGES` page-aligned ranges inside the identity map.
fn ram_ranges(args: &InitArgs) -> Result<RamRanges, Status> {
    let mut out = RamRanges::new();
    if args.ram_ranges == 0 {
        return Ok(out);
    }
    if args.ram_ranges > MAX_RAM_RANGES || args.ram_ranges_va == 0 {
        return Err(Status::BadArgument);
    }
    let list = args.ram_ranges_va as *const u64;
    for i in 0..args.ram_ranges as usize {
        // SAFETY: the agent passes a kernel VA of `ram_ranges` pairs of u64, valid for this
        // call (init runs on the kernel's address space); read_unaligned needs no alignment.
        let (start, end) = unsafe {
            (
                list.add(2 * i).read_unaligned(),
                list.add(2 * i + 1).read_unaligned(),
            )
        };
        if start >= end || !start.is_multiple_of(SIZE_4K) || !end.is_multiple_of(SIZE_4K) {
            return Err(Status::BadArgument);
        }
        out.push((start, end));
    }
    Ok(out)
}

/// RAM ranges, on the stack of `init` (a few hundred bytes).
struct RamRanges {
    r: [(u64, u64); MAX_RAM_RANGES as usize],
    n: usize,
}

impl RamRanges {
    fn new() -> Self {
        RamRanges {
            r: [(0, 0); MAX_RAM_RANGES as usize],
            n: 0,
        }
    }
    fn push(&mut self, v: (u64, u64)) {
        self.r[self.n] = v;
        self.n += 1;
    }
}

impl core::ops::Deref for RamRanges {
    type Target = [(u64, u64)];
    fn deref(&self) -> &[(u64, u64)] {
        &self.r[..self.n]
    }
}

/// Builds everything into `hv`, which is fully written when this returns `Ok`.
fn build(
    hv: *mut Hv,
    header: &ImageHeader,
    args: &InitArgs,
    map_limit: u64,
    cpu_pa: u64,
    pool_pa: u64,
    (store, store_n): &([u64; STORE_MAX_CHUNKS], usize),
) -> Result<(), Status> {
    let store_n = *store_n;
    fn oom<E>(_: E) -> Status {
        Status::NotEnoughMemory
    }
    let va = |pa: u64| pa - args.base_pa + args.base_va;
    let block_end = args.base_pa + args.mem_size;
    let capacity = args.mem_size + store_n as u64 * STORE_CHUNK_SIZE;
    // SAFETY: [pool_pa, block_end) is the free part of the block the agent gave us, mapped at
    // its VA (in the kernel's tables now, in the hv's later), used by nothing else.
    let mut pool =
        unsafe { FramePool::in_place(Hpa(pool_pa), va(pool_pa), block_end - pool_pa, capacity) }
            .map_err(|_| Status::NotEnoughMemory)?;
    let msr_intercepts_pa = pool.alloc_contiguous(2).map_err(oom)?.0;
    // SAFETY: two fresh, zeroed, contiguous pages of ours.
    let map =
        unsafe { &mut *(va(msr_intercepts_pa) as *mut [u8; crate::arch::MSR_INTERCEPTS_SIZE]) };
    crate::arch::intercept_msr_writes(map);
    let scratch_pa = pool.alloc().map_err(oom)?.0;
    let idt_pa = pool.alloc().map_err(oom)?.0;
    // SAFETY: a fresh page of ours.
    unsafe { crate::arch::build_host_idt(va(idt_pa) as *mut u64) };

    let host_root = pool.alloc().map_err(oom)?.0;
    // The hv reads guest memory through this identity map; never executes from it.
    paging::identity_map_with_hole(
        &mut pool,
        host_root,
        map_limit,
        0..0,
        P | RW | paging::NX,
        P | RW,
    )
    .map_err(oom)?;
    paging::map_4k(
        &mut pool,
        host_root,
        args.base_va,
        args.base_pa,
        args.mem_size,
        P | RW,
        P | RW,
    )
    .map_err(oom)?;

    // The guest sees all of physical memory but the hv's: the block and the store. Written in
    // place (see `HV`).
    // SAFETY: `hv` is the static's storage, written by nobody else (see `init`).
    let npt_slot = unsafe { core::ptr::addr_of_mut!((*hv).npt) };
    // SAFETY: as above; `npt_slot` is valid for writes and not yet initialized.
    unsafe { npt_slot.write(Mutex::new(Npt::new(pool).map_err(oom)?)) };
    // SAFETY: just written.
    let npt = unsafe { (*npt_slot).get_mut() };
    let _ = npt
        .identity(
            map_limit,
            core::slice::from_ref(&(args.base_pa..block_end)),
            Perms::RWX,
        )
        .map_err(oom)?;
    for &c in &store[..store_n] {
        let _ = npt.unmap(Gpa(c), STORE_CHUNK_SIZE).map_err(oom)?;
    }
    // The last `ckpt_chunks` chunks hold checkpoints; the others feed the frame pool.
    let pool_chunks = store_n - args.ckpt_chunks as usize;
    crate::checkpoint::configure(
        &store[pool_chunks..store_n],
        &ram_ranges(args)?,
        args.notice_pa,
    );
    for &c in &store[..pool_chunks] {
        // SAFETY: the chunk is the agent's gift for as long as the hv lives, hidden from the
        // guest above; its frames are handed out only in host mode, where the identity map
        // reaches it at VA = PA (nothing in `init` allocates after this).
        unsafe { npt.frames_mut().add_region(Hpa(c), c, STORE_CHUNK_SIZE) }
            .map_err(|_| Status::NotEnoughMemory)?;
    }

    let gdtr = DescriptorTablePointer {
        limit: (core::mem::size_of_val(&HOST_GDT) - 1) as u16,
        base: HOST_GDT.as_ptr() as u64,
    };
    let idtr = DescriptorTablePointer {
        limit: 256 * 16 - 1,
        base: va(idt_pa),
    };
    let cpu_base = va(cpu_pa);
    for i in 0..args.cpus {
        let pa = cpu_pa + i as u64 * core::mem::size_of::<Cpu>() as u64;
        // SAFETY: the per-CPU areas lie in our block (checked by the caller), are page
        // aligned and not yet used by anyone.
        unsafe { Cpu::init_in_place(va(pa) as *mut Cpu, i, pa) };
    }
    let npt_root_pa = npt.root().0;
    // SAFETY: `hv` is the static's storage (see above); every field but `npt`, which is
    // written already, is written here, field by field so that nothing large is built on the
    // stack.
    unsafe {
        use core::ptr::addr_of_mut as at;
        at!((*hv).base_va).write(args.base_va);
        at!((*hv).base_pa).write(args.base_pa);
        at!((*hv).mem_size).write(args.mem_size);
        at!((*hv).header).write(Some(*header));
        at!((*hv).map_limit).write(map_limit);
        at!((*hv).cpus).write(args.cpus);
        at!((*hv).tsc_khz).write(args.tsc_khz);
        at!((*hv).kernel_text).write(args.kernel_text);
        at!((*hv).kernel_text_link).write(args.kernel_text_link);
        at!((*hv).cpu_base).write(cpu_base);
        at!((*hv).msr_intercepts_pa).write(msr_intercepts_pa);
        at!((*hv).npt_root_pa).write(npt_root_pa);
        at!((*hv).scratch_pa).write(scratch_pa);
        at!((*hv).host).write(HostContext::new(host_root, gdtr, idtr));
        at!((*hv).store).write(*store);
        at!((*hv).store_chunks).write(store_n);
    }
    Ok(())
}

/// Reads guest-physical memory through the identity map (host mode only).
pub fn read_guest_phys(hv: &Hv, gpa: u64, out: &mut [u8]) -> bool {
    match gpa.checked_add(out.len() as u64) {
        Some(end) if end <= hv.map_limit => {
            // SAFETY: identity-mapped in the hv's tables (host mode), in bounds.
            unsafe {
                core::ptr::copy_nonoverlapping(gpa as *const u8, out.as_mut_ptr(), out.len())
            };
            true
        }
        _ => false,
    }
}

/// Writes guest-physical memory through the identity map (host mode only), never the hv's.
pub fn write_guest_phys(hv: &Hv, gpa: u64, data: &[u8]) -> bool {
    match gpa.checked_add(data.len() as u64) {
        Some(end) if end <= hv.map_limit && !hv.overlaps_own(gpa..end) => {
            crate::checkpoint::before_hv_write(hv, gpa, data.len() as u64);
            // SAFETY: identity-mapped in the hv's tables (host mode), in bounds, outside the
            // hv's memory; the guest is stopped or the caller owns the bytes (gdb's write).
            unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), gpa as *mut u8, data.len()) };
            true
        }
        _ => false,
    }
}

/// Copies the bytes of the guest's instruction at `rip` (through its page tables at `cr3`).
pub fn read_guest_insn(hv: &Hv, cr3: u64, rip: u64, out: &mut [u8; 15]) -> bool {
    let read_u64 = |pa: u64| {
        let mut b = [0u8; 8];
        read_guest_phys(hv, pa, &mut b).then(|| u64::from_le_bytes(b))
    };
    let first = (SIZE_4K - (rip & (SIZE_4K - 1))).min(15) as usize;
    let Ok(pa) = paging::translate(cr3, rip, read_u64) else {
        return false;
    };
    if !read_guest_phys(hv, pa, &mut out[..first]) {
        return false;
    }
    if first < 15 {
        let Ok(pa2) = paging::translate(cr3, rip + first as u64, read_u64) else {
            // The instruction may well end on the first page: leave the rest zero.
            return true;
        };
        return read_guest_phys(hv, pa2, &mut out[first..]);
    }
    true
}
