//! The hv's global state: built once by `init` while dormant, then read by every CPU.
//!
//! Memory (one physically contiguous block from the agent, mapped at `base_va` in the kernel
//! and, identically, in the hv's own page tables):
//!
//! ```text
//! base        the image (header, code, data, bss, relocation table), rounded up to a page
//! work        per-CPU: VMCB, host save area, state, stack  (vcpu::Cpu, 48 KiB each)
//!             MSR permission map (8 KiB), scratch page, IDT page
//!             nested page tables, the hv's page tables    (bump-allocated frames)
//! ```
//!
//! Nested paging identity-maps guest-physical to host-physical addresses for all of
//! `[0, max(phys_limit, 512 GiB))` with 1 GiB pages, split down to 4 KiB around the hv's block,
//! whose pages are not present: the guest cannot reach the hv (APM vol. 2, 15.25).

use crate::arch::instr::{self, DescriptorTablePointer};
use crate::arch::svm::{self, msrpm, HostContext};
use crate::paging::{self, Frames, P, RW, SIZE_4K, SIZE_512G, US};
use crate::vcpu::Cpu;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use quicksilver_proto::abi::{InitArgs, Op, Status};
use quicksilver_proto::image::{ImageHeader, PAGE_SIZE};
use quicksilver_proto::stats::{self, CpuStats, ExitRecord, StatsHeader};

/// Most CPUs this image supports.
pub const MAX_CPUS: u32 = 64;
/// Pages of working memory besides the per-CPU areas: MSRPM (2), scratch, IDT, and the page
/// tables (see `init`); generous, and checked exactly by the bump allocator.
pub const FIXED_PAGES: u64 = 40;

/// Bump allocator over the working memory.
#[derive(Clone, Default)]
struct Bump {
    base_va: u64,
    base_pa: u64,
    next_pa: u64,
    end_pa: u64,
}

// SAFETY: frames come from [next_pa, end_pa) of the block the agent gave us, each once, zeroed
// before being handed out, and `table` maps a frame's PA to its VA in that block.
unsafe impl Frames for Bump {
    fn alloc(&mut self) -> Option<u64> {
        if self.next_pa + SIZE_4K > self.end_pa {
            return None;
        }
        let pa = self.next_pa;
        self.next_pa += SIZE_4K;
        // SAFETY: the frame is inside the block the agent gave us, mapped at base_va, and
        // handed out once.
        unsafe { core::ptr::write_bytes(self.table(pa), 0, 1) };
        Some(pa)
    }
    fn table(&self, pa: u64) -> *mut [u64; 512] {
        (pa - self.base_pa + self.base_va) as *mut [u64; 512]
    }
}

impl Bump {
    fn alloc_pages(&mut self, n: u64) -> Option<u64> {
        let first = self.alloc()?;
        for _ in 1..n {
            self.alloc()?;
        }
        Some(first)
    }
    fn va(&self, pa: u64) -> u64 {
        pa - self.base_pa + self.base_va
    }
}

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
    pub msrpm_pa: u64,
    pub npt_root_pa: u64,
    pub scratch_pa: u64,
    pub host: HostContext,
    frames: Bump,
}

struct Global(UnsafeCell<Option<Hv>>);
// SAFETY: `Hv` is written only by `init`, which the agent calls once, on one CPU, before any
// `activate`; afterwards it is only read. Mutable statistics live in atomics or per-CPU areas.
unsafe impl Sync for Global {}

static HV: Global = Global(UnsafeCell::new(None));
static INITIALIZED: AtomicBool = AtomicBool::new(false);
/// Some guest page is mapped to scratch (see `map_to_scratch`) since the last reset.
static SCRATCH_IN_USE: AtomicBool = AtomicBool::new(false);

/// The hv's GDT, read by the CPU in host mode.
static HOST_GDT: [u64; 3] = svm::HOST_GDT;

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
    record_lock: AtomicBool,
    record: UnsafeCell<ExitRecord>,
}

// SAFETY: `record` is only accessed under `record_lock`.
unsafe impl Sync for Counters {}

pub static COUNTERS: Counters = Counters {
    active_cpus: AtomicU32::new(0),
    activations: AtomicU64::new(0),
    deactivations: AtomicU64::new(0),
    hv_refusals: AtomicU64::new(0),
    last_refused_gpa: AtomicU64::new(0),
    msr_refusals: AtomicU64::new(0),
    svm_insn_refusals: AtomicU64::new(0),
    unexpected: AtomicU64::new(0),
    record_lock: AtomicBool::new(false),
    record: UnsafeCell::new(ExitRecord {
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
    fn with_record<R>(&self, f: impl FnOnce(&mut ExitRecord) -> R) -> R {
        while self
            .record_lock
            .compare_exchange(false, true, Acquire, Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        // SAFETY: the lock above gives exclusive access.
        let r = f(unsafe { &mut *self.record.get() });
        self.record_lock.store(false, Release);
        r
    }

    /// Keeps `rec` as the last unexpected exit.
    pub fn unexpected_exit(&self, rec: ExitRecord) {
        self.unexpected.fetch_add(1, Relaxed);
        self.with_record(|r| *r = rec);
    }
}

impl crate::exit::Refusals for Counters {
    fn msr_refused(&self) {
        self.msr_refusals.fetch_add(1, Relaxed);
    }
    fn svm_instruction_refused(&self) {
        self.svm_insn_refusals.fetch_add(1, Relaxed);
    }
    fn hv_access_refused(&self, gpa: u64) {
        self.hv_refusals.fetch_add(1, Relaxed);
        self.last_refused_gpa.store(gpa, Relaxed);
    }
}

/// The global state, once `init` has succeeded.
pub fn get() -> Option<&'static Hv> {
    if INITIALIZED.load(Acquire) {
        // SAFETY: after INITIALIZED is set, `Hv` is never written again (see `Global`).
        unsafe { (*HV.0.get()).as_ref() }
    } else {
        None
    }
}

impl Hv {
    /// The per-CPU area of CPU `index`.
    ///
    /// # Safety
    /// Only CPU `index` itself may use the result mutably, and `index < self.cpus`.
    pub unsafe fn cpu(&self, index: u32) -> *mut Cpu {
        (self.cpu_base + index as u64 * core::mem::size_of::<Cpu>() as u64) as *mut Cpu
    }

    /// Physical address of a pointer into the hv's block.
    pub fn pa_of<T>(&self, p: *const T) -> u64 {
        p as u64 - self.base_va + self.base_pa
    }

    /// Is `gpa` inside the hv's own memory?
    pub fn owns(&self, gpa: u64) -> bool {
        (self.base_pa..self.base_pa + self.mem_size).contains(&gpa)
    }

    /// Remaps the guest page of `gpa` (inside the hv's memory) to the scratch page.
    pub fn map_to_scratch(&self, gpa: u64) -> bool {
        if !self.owns(gpa) {
            return false;
        }
        match paging::leaf_4k(&self.frames, self.npt_root_pa, gpa & !(SIZE_4K - 1)) {
            Some(pte) => {
                // SAFETY: `pte` is a leaf of the nested tables `init` built; an aligned 8-byte
                // store is atomic, so another CPU's walk sees the old or the new entry.
                unsafe { pte.write_volatile(self.scratch_pa | P | RW | US) };
                SCRATCH_IN_USE.store(true, Relaxed);
                true
            }
            None => false,
        }
    }

    /// Takes every scratch mapping back out and clears the scratch page (last CPU out).
    pub fn reset_guest_view(&self) {
        // Nothing to undo in the common case: keep the last CPU's way out short.
        if !SCRATCH_IN_USE.swap(false, Relaxed) {
            return;
        }
        let mut gpa = self.base_pa;
        while gpa < self.base_pa + self.mem_size {
            if let Some(pte) = paging::leaf_4k(&self.frames, self.npt_root_pa, gpa) {
                // SAFETY: a leaf of our nested tables; no CPU runs the guest now.
                unsafe { pte.write_volatile(0) };
            }
            gpa += SIZE_4K;
        }
        // SAFETY: the scratch page is ours, mapped at its VA.
        unsafe { core::ptr::write_bytes(self.frames.va(self.scratch_pa) as *mut u8, 0, 4096) };
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
            reserved: 0,
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
            last_unexpected: c.with_record(|r| *r),
            link_state: 0,
            link_dropped: 0,
            link_wrong_keys: 0,
            link_unauthenticated: 0,
        };
        [
            h.link_state,
            h.link_dropped,
            h.link_wrong_keys,
            h.link_unauthenticated,
        ] = crate::link::counters();
        if let Some(hdr) = self.header {
            h.hv_version = hdr.version;
        }
        let hsize = core::mem::size_of::<StatsHeader>();
        // SAFETY: `out` has room for the header and every CPU (checked above); the writes are
        // unaligned-safe copies of plain integer structs.
        unsafe {
            core::ptr::write_unaligned(out.as_mut_ptr().cast::<StatsHeader>(), h);
            for i in 0..self.cpus {
                let s: CpuStats = (*self.cpu(i)).state.stats_snapshot();
                let at = hsize + i as usize * core::mem::size_of::<CpuStats>();
                core::ptr::write_unaligned(out[at..].as_mut_ptr().cast::<CpuStats>(), s);
            }
        }
        Status::Ok
    }

    /// A control operation on a buffer given by guest-physical address (host mode: the hv's
    /// tables identity-map guest memory).
    pub fn control_phys(&self, op: Op, gpa: u64, len: u64) -> i64 {
        if op == Op::ActiveCpus {
            return COUNTERS.active_cpus.load(Acquire) as i64;
        }
        let end = match gpa.checked_add(len) {
            Some(e) if e <= self.map_limit && len <= (1 << 20) => e,
            _ => return Status::BadArgument as i64,
        };
        if gpa < self.base_pa + self.mem_size && self.base_pa < end {
            return Status::BadArgument as i64;
        }
        // SAFETY: [gpa, end) is identity-mapped in the hv's tables, outside the hv's memory,
        // and the guest handed it over for this call (the agent's kmalloc'd buffer).
        let buf = unsafe { core::slice::from_raw_parts_mut(gpa as *mut u8, len as usize) };
        self.control(op, buf, true)
    }

    /// A control operation on a buffer the caller can address, from a hypercall (`in_guest`)
    /// or a direct call: a [`Status`], or for `LinkRx` 1 when attention was asked for.
    pub fn control(&self, op: Op, buf: &mut [u8], in_guest: bool) -> i64 {
        let status = match op {
            Op::Stats => self.write_stats(buf),
            Op::LinkConfig => crate::link::configure(buf),
            Op::LinkRx => return crate::link::receive(buf, in_guest),
            Op::ActiveCpus => return COUNTERS.active_cpus.load(Acquire) as i64,
            Op::Deactivate => Status::BadOp,
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
    if let Err(s) = svm::check_support() {
        return s;
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
    if work_pa + cpu_bytes > args.base_pa + args.mem_size {
        return Status::NotEnoughMemory;
    }
    let mut frames = Bump {
        base_va: args.base_va,
        base_pa: args.base_pa,
        next_pa: work_pa + cpu_bytes,
        end_pa: args.base_pa + args.mem_size,
    };
    match build(&mut frames, header, args, map_limit, work_pa) {
        Ok(hv) => {
            // SAFETY: INITIALIZED is false, so no other reader exists yet; the agent calls
            // init once, on one CPU (see `Global`).
            unsafe { *HV.0.get() = Some(hv) };
            INITIALIZED.store(true, Release);
            Status::Ok
        }
        Err(s) => s,
    }
}

fn build(
    frames: &mut Bump,
    header: &ImageHeader,
    args: &InitArgs,
    map_limit: u64,
    cpu_pa: u64,
) -> Result<Hv, Status> {
    let oom = |_| Status::NotEnoughMemory;
    let msrpm_pa = frames.alloc_pages(2).ok_or(Status::NotEnoughMemory)?;
    // SAFETY: two fresh, zeroed, contiguous pages of ours.
    let map = unsafe { &mut *(frames.va(msrpm_pa) as *mut [u8; msrpm::MSRPM_SIZE]) };
    for msr in [instr::msr::EFER, instr::msr::VM_CR, instr::msr::VM_HSAVE_PA] {
        msrpm::intercept_write(map, msr);
    }
    let scratch_pa = frames.alloc().ok_or(Status::NotEnoughMemory)?;
    let idt_pa = frames.alloc().ok_or(Status::NotEnoughMemory)?;
    build_idt(frames.va(idt_pa) as *mut u64);

    let hole = args.base_pa..args.base_pa + args.mem_size;
    let npt_root_pa = frames.alloc().ok_or(Status::NotEnoughMemory)?;
    paging::identity_map_with_hole(
        frames,
        npt_root_pa,
        map_limit,
        hole,
        P | RW | US,
        P | RW | US,
    )
    .map_err(oom)?;

    let host_root = frames.alloc().ok_or(Status::NotEnoughMemory)?;
    // The hv reads guest memory through this identity map; never executes from it.
    paging::identity_map_with_hole(
        frames,
        host_root,
        map_limit,
        0..0,
        P | RW | paging::NX,
        P | RW,
    )
    .map_err(oom)?;
    paging::map_4k(
        frames,
        host_root,
        args.base_va,
        args.base_pa,
        args.mem_size,
        P | RW,
        P | RW,
    )
    .map_err(oom)?;

    let gdtr = DescriptorTablePointer {
        limit: (core::mem::size_of_val(&HOST_GDT) - 1) as u16,
        base: HOST_GDT.as_ptr() as u64,
    };
    let idtr = DescriptorTablePointer {
        limit: 256 * 16 - 1,
        base: frames.va(idt_pa),
    };
    let cpu_base = frames.va(cpu_pa);
    for i in 0..args.cpus {
        let cpu = (cpu_base + i as u64 * core::mem::size_of::<Cpu>() as u64) as *mut Cpu;
        // SAFETY: the per-CPU areas lie in our block (checked by the caller), are page
        // aligned and not yet used by anyone.
        unsafe { Cpu::init_in_place(cpu, i, frames.base_pa + (cpu as u64 - frames.base_va)) };
    }
    Ok(Hv {
        base_va: args.base_va,
        base_pa: args.base_pa,
        mem_size: args.mem_size,
        header: Some(*header),
        map_limit,
        cpus: args.cpus,
        tsc_khz: args.tsc_khz,
        kernel_text: args.kernel_text,
        kernel_text_link: args.kernel_text_link,
        cpu_base,
        msrpm_pa,
        npt_root_pa,
        scratch_pa,
        host: HostContext::new(host_root, gdtr, idtr),
        frames: frames.clone(),
    })
}

/// Fills the hv's IDT: the 32 exception vectors go to the stubs in world_switch.S.
fn build_idt(idt: *mut u64) {
    let stubs = core::ptr::addr_of!(svm::qs_host_exc_stubs) as u64;
    let nmi = core::ptr::addr_of!(svm::qs_host_nmi) as u64;
    for v in 0..32u64 {
        // NMIs the hv intercepted are taken on purpose (debug::handle_exit): they only return.
        let handler = if v == 2 { nmi } else { stubs + v * 16 };
        // 64-bit interrupt gate (type 0xE), present, DPL 0, IST 0 (APM vol. 2, 4.8.4).
        let low = (handler & 0xFFFF)
            | ((svm::HOST_CODE_SELECTOR as u64) << 16)
            | (0x8E << 40)
            | (((handler >> 16) & 0xFFFF) << 48);
        let high = handler >> 32;
        // SAFETY: `idt` is a fresh page of ours with room for 256 16-byte gates.
        unsafe {
            idt.add(2 * v as usize).write(low);
            idt.add(2 * v as usize + 1).write(high);
        }
    }
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
        Some(end)
            if end <= hv.map_limit && !(gpa < hv.base_pa + hv.mem_size && hv.base_pa < end) =>
        {
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

/// Memory the image asks for, as written into its header.
pub const fn mem_per_cpu() -> u64 {
    core::mem::size_of::<Cpu>() as u64
}
