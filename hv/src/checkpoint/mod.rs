//! Checkpoints of the whole machine, and rollbacks to them: the rendezvous' third client.
//!
//! A checkpoint is a consistent cut: every CPU parked at once (the rendezvous), each one's
//! whole state captured (`CpuState`, written as records into checkpoint memory), and RAM kept
//! by copy-on-write from then on ([`undo`]: the nested tables write-protect every page of RAM;
//! the first write to a page after a checkpoint copies its old contents first). The pause is
//! the stop plus re-protecting the pages written since the previous checkpoint: it does not
//! grow with RAM (only the very first checkpoint walks all of RAM, to protect it).
//!
//! A rollback, with every CPU parked (the order is ARCHITECTURE.md's "A rollback, step by
//! step"): protect the pages written since the last checkpoint; put every page logged since
//! the checkpoint back, newest first; give each CPU the checkpoint's state (each writes it
//! back when released, ending any interrupt in service and arming its timer: `arch::parts::
//! ROLLBACK`); write the agent's [`RollbackNotice`]; release every CPU with an NMI injected,
//! which the agent's NMI handler turns into its after-rollback work (watchdogs, clocks, the
//! random generator, one line in the kernel's log).
//!
//! The hv's own state (this module, the link, the debugger) is not rolled back; the
//! kernel's, the agent's included, is.
//!
//! Everything the hv writes into guest memory while checkpoints are kept goes through
//! [`before_hv_write`] (hypercall buffers, gdb's writes, the notice), so that it is logged
//! like a write of the guest's own: a rollback puts those bytes back too.

pub mod export;
pub mod store;
pub mod undo;

use crate::arch::{parts, Vcpu};
use crate::cpu_state::CpuState;
use crate::debug::session as debug_session;
use crate::devices::DeviceState;
use crate::exit::Action;
use crate::npt::{DirtyLog, Flush};
use crate::paging::{Gpa, SIZE_4K};
use crate::rendezvous::Release;
use crate::vcpu::{Parked, Stopped};
use crate::vmm::{self, Hv, NPT_TLB};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use quicksilver_proto::abi::{
    CheckpointArgs, CheckpointDelete, CheckpointInfo, CheckpointList, CheckpointPeriodic,
    RollbackArgs, RollbackNotice, Status, BUSY_IN_NMI, CHECKPOINT_ALL, CHECKPOINT_CURRENT,
    CHECKPOINT_PERIODIC, MAX_CHECKPOINTS, MAX_RAM_RANGES, NOTICE_HOT_PAGES_OFFSET,
    NOTICE_WATCHDOG_RESET_OFFSET, PERIODIC_MIN_MS,
};
use store::StoreMemory;
use undo::{Checkpoint, UndoError, UndoLog, PAGE};

/// Slots of records per CPU: its `CpuState`.
const CPU_SLOTS: u32 = core::mem::size_of::<CpuState>().div_ceil(PAGE) as u32;
/// Slots of the platform devices' record (`devices::DeviceState`), after the CPUs'.
const DEVICE_SLOTS: u32 = DeviceState::SIZE.div_ceil(PAGE) as u32;

/// The undo log and what the hv knows of the machine's RAM.
struct Engine {
    log: UndoLog<StoreMemory>,
    ram: [(u64, u64); MAX_RAM_RANGES as usize],
    ram_n: usize,
    notice_pa: u64,
}

/// Lock order: `ENGINE`, then the nested tables (`Hv::npt`).
static ENGINE: spin::Mutex<Engine> = spin::Mutex::new(Engine {
    log: UndoLog::new(StoreMemory::empty()),
    ram: [(0, 0); MAX_RAM_RANGES as usize],
    ram_n: 0,
    notice_pa: 0,
});
/// A checkpoint is kept, so RAM is write-protected: read without the lock on every nested
/// page fault and hv write.
static LOGGING: AtomicBool = AtomicBool::new(false);
static ROLLBACKS: AtomicU64 = AtomicU64::new(0);
/// The guest's TSC offset (two's complement): the TSC the kernel reads is the CPU's plus this
/// (the VMCB's TSC_OFFSET, APM vol. 2, 15.30.5). A rollback moves it back by the checkpoint's
/// age, so that the kernel's clocks continue from the checkpoint's instant: no clock jumps,
/// no watchdog sees a gap, no timer fires late (the time policy, README "Time after a
/// rollback"). Every CPU loads it at each VMRUN.
pub static GUEST_TSC_OFFSET: AtomicU64 = AtomicU64::new(0);
static DROPPED_FOR_MEMORY: AtomicU64 = AtomicU64::new(0);

/// CPUs whose records in the checkpoints `SETTLE_FROM..=SETTLE_TO` (those of the last stop)
/// still lack the interrupts that reached their APIC after they parked (see [`settle`]).
static UNSETTLED: AtomicU64 = AtomicU64::new(0);
static SETTLE_FROM: AtomicU32 = AtomicU32::new(0);
static SETTLE_TO: AtomicU32 = AtomicU32::new(0);

/// Where a CPU record's IRR lies: in which of its slots, at which offset.
const IRR_OFFSET: usize =
    core::mem::offset_of!(CpuState, apic) + core::mem::offset_of!(crate::cpu_state::LocalApic, irr);
const _: () = assert!(
    IRR_OFFSET % PAGE + 32 <= PAGE,
    "the IRR straddles two record slots"
);

/// What a request asks.
#[derive(Clone, Copy)]
enum Kind {
    Take(CheckpointArgs),
    Rollback(RollbackArgs),
}

/// The request being served (one at a time).
struct Request {
    kind: Kind,
    /// Where the caller's arguments are (guest-physical).
    gpa: u64,
    /// When it arrived (TSC), and which CPU asked (it leads and answers).
    asked: u64,
    leader: u32,
    /// Set by the leader: the machine was rolled back (every CPU gets the notice NMI).
    rolled_back: bool,
}

static REQUEST: spin::Mutex<Option<Request>> = spin::Mutex::new(None);

/// The periodic ring: its interval (0: off) and size. The hv keeps it (the agent's thread,
/// which asks for each periodic checkpoint, is rolled back with the kernel and reads it again).
static EVERY_MS: AtomicU32 = AtomicU32::new(0);
static KEEP: AtomicU32 = AtomicU32::new(0);

/// Keeps what `init` learnt: the checkpoint chunks, the RAM ranges, the notice's address.
/// Runs once, in `init`, before any CPU is active; touches none of the chunks.
pub fn configure(chunks: &[u64], ram: &[(u64, u64)], notice_pa: u64) {
    let mut e = ENGINE.lock();
    e.log.memory().configure(chunks);
    let n = ram.len().min(e.ram.len());
    e.ram[..n].copy_from_slice(&ram[..n]);
    e.ram_n = n;
    e.notice_pa = notice_pa;
}

/// Is any checkpoint kept? (The hv must stay active while one is.)
pub fn kept() -> bool {
    LOGGING.load(Acquire)
}

fn ns(hv: &Hv, ticks: u64) -> u64 {
    (ticks as u128 * 1_000_000 / hv.tsc_khz.max(1) as u128) as u64
}

/// `Op::Checkpoint` or `Op::Rollback` from CPU `me`: checks and keeps the request (buffer
/// `buf` at `gpa`). Every CPU stops once the hypercall is complete.
pub fn request(hv: &Hv, me: u32, rollback: bool, gpa: u64, buf: &mut [u8]) -> Status {
    if (0..hv.cpus).any(|i| crate::vcpu::STOP.is_parked(i)) {
        // gdb holds CPUs (one steps, the others wait): a stop of ours would release them.
        return Status::Busy;
    }
    let mut r = REQUEST.lock();
    if r.is_some() {
        return Status::Busy;
    }
    let kind = if rollback {
        let Some(mut args) = read::<RollbackArgs>(buf) else {
            return Status::BufferTooSmall;
        };
        let e = ENGINE.lock();
        let Some(c) = e.log.get(args.id) else {
            return Status::NoSuchCheckpoint;
        };
        let age = ns(hv, crate::arch::instr::rdtsc().wrapping_sub(c.taken));
        if args.max_age_ns != 0 && age > args.max_age_ns {
            args.age_ns = age;
            write(buf, &args);
            return Status::CheckpointTooOld;
        }
        Kind::Rollback(args)
    } else {
        let Some(mut args) = read::<CheckpointArgs>(buf) else {
            return Status::BufferTooSmall;
        };
        if args.flags & !CHECKPOINT_PERIODIC != 0 {
            return Status::BadArgument;
        }
        let e = ENGINE.lock();
        if e.log.capacity() == 0 {
            return Status::NoCheckpointMemory;
        }
        // What the caller finds if the machine is ever rolled back to this checkpoint: the
        // buffer is captured in this state (the answer is written after the capture).
        args.status = Status::RolledBack as i64;
        args.id = e.log.next_id();
        write(buf, &args);
        Kind::Take(args)
    };
    *r = Some(Request {
        kind,
        gpa,
        asked: crate::arch::instr::rdtsc(),
        leader: me,
        rolled_back: false,
    });
    Status::Ok
}

/// The leader, with every CPU parked.
pub fn lead(hv: &Hv, mut p: Parked) {
    // What to announce on the link, once every CPU runs again (the link is slow).
    let mut taken = None;
    let mut rolled_back = None;
    let mut r = REQUEST.lock();
    if let Some(req) = r.as_mut() {
        let active = (0..hv.cpus)
            .filter(|&i| hv.cpu(i).is_some_and(|c| c.shared.is_active()))
            .fold(0u64, |m, i| m | 1 << i);
        let parked = p.parked().fold(0u64, |m, i| m | 1 << i);
        let gathered = crate::arch::instr::rdtsc();
        match &mut req.kind {
            _ if active & !parked != 0 => set_status(&mut req.kind, Status::CpusDidNotStop),
            Kind::Take(args) => {
                args.gather_us = ns(hv, gathered - req.asked) / 1000;
                // gdb attached and the kernel running: its INT3s stay out of the checkpoint.
                let cr3 = kernel_cr3(&p);
                let lifted = debug_session::with_attached(|d| d.lift_all(cr3)).is_some();
                let status = match take(hv, &mut p, parked, args, gathered) {
                    Ok(()) => Status::Ok,
                    Err(s) => s,
                };
                if lifted {
                    let _ = debug_session::with_attached(|d| d.reinsert_all(cr3));
                }
                args.status = status as i64;
                args.pause_us = ns(hv, crate::arch::instr::rdtsc() - req.asked) / 1000;
                if status == Status::Ok {
                    if let Some(c) = ENGINE.lock().log.get_mut(args.id) {
                        c.pause_us = args.pause_us;
                    }
                    taken = Some(*args);
                }
            }
            Kind::Rollback(args) => match rollback(hv, &mut p, parked, args.id, req.asked) {
                Ok(notice) => {
                    // The text is the checkpoint's, without gdb's INT3s: they go in again.
                    let cr3 = kernel_cr3(&p);
                    let _ = debug_session::with_attached(|d| d.reinsert_all(cr3));
                    req.rolled_back = true;
                    rolled_back = Some(notice);
                }
                Err(s) => args.status = s as i64,
            },
        }
    }
    drop(r);
    p.release_all(Release::Run);
    if let Some(a) = taken {
        crate::link::checkpoint::taken(&a);
    }
    if let Some(n) = rolled_back {
        crate::link::checkpoint::rolled_back(&n);
    }
}

/// Page tables that map the kernel's text: those of a parked CPU in the kernel if there is
/// one (a process's own may lack it, with page-table isolation), else of any parked CPU.
fn kernel_cr3(p: &Parked) -> Option<u64> {
    let states = || p.parked().filter_map(|i| p.peek(i)).map(|st| &st.state);
    states()
        .find(|s| s.cpl == 0)
        .or_else(|| states().next())
        .map(|s| s.cr3)
}

fn set_status(kind: &mut Kind, s: Status) {
    match kind {
        Kind::Take(a) => a.status = s as i64,
        Kind::Rollback(a) => a.status = s as i64,
    }
}

/// A checkpoint, every CPU in `parked` stopped.
fn take(
    hv: &Hv,
    p: &mut Parked,
    parked: u64,
    args: &mut CheckpointArgs,
    gathered: u64,
) -> Result<(), Status> {
    whole_machine_in_guest_mode()?;
    // A CPU inside an NMI handler is named first: only a debugger's stop puts one there (the
    // rendezvous waits for the IRET, `exit::nmi`), and it is the CPU the user is looking at.
    let busy_cpus = || {
        p.parked()
            .filter_map(|i| Some((i, busy(&p.peek(i)?.state)?)))
    };
    let named = busy_cpus()
        .find(|&(_, what)| what == BUSY_IN_NMI)
        .or_else(|| busy_cpus().next());
    if let Some((i, what)) = named {
        args.busy_cpu = i as i32;
        args.busy_what = what;
        return Err(Status::NotQuiescent);
    }
    let mut guard = ENGINE.lock();
    let e = &mut *guard;
    let records = hv.cpus * CPU_SLOTS + DEVICE_SLOTS;
    let periodic = args.flags & CHECKPOINT_PERIODIC != 0;
    // A checkpoint the user asks for keeps a reserve free for the pages the machine will
    // write next; the periodic ring makes room by dropping its oldest instead.
    let reserve = if periodic {
        0
    } else {
        (e.log.capacity() / 32).max(64)
    };
    if periodic {
        // The ring keeps `keep`: its oldest goes (merged into the epoch before it, or freed
        // when it is the oldest of all).
        let keep = KEEP.load(Relaxed).max(1) as usize;
        while e.log.kept().filter(|c| c.periodic).count() >= keep {
            let Some(oldest) = e.log.kept().find(|c| c.periodic).map(|c| c.id) else {
                break;
            };
            let _ = e.log.delete(oldest);
        }
        // Memory short: the ring's oldest goes while it is the oldest of all (only that frees
        // memory); behind a checkpoint the user took, this tick is skipped instead.
        while e.log.free() < records as u64 && e.log.kept().next().is_some_and(|c| c.periodic) {
            let _ = e.log.drop_oldest();
            DROPPED_FOR_MEMORY.fetch_add(1, Relaxed);
        }
    }
    if e.log.free() < records as u64 + reserve {
        return Err(Status::CheckpointMemoryFull);
    }
    if e.log.kept().count() == MAX_CHECKPOINTS as usize {
        return Err(Status::TooManyCheckpoints);
    }
    let mut npt = hv.npt.lock();
    let mut flush = Flush::None;
    let pages_before = e.log.current().map_or(0, |c| c.pages);
    if e.log.logging() {
        // Protect again what was written since the previous checkpoint.
        for gpa in e.log.writable() {
            flush |= npt
                .harvest(Gpa(gpa), SIZE_4K, DirtyLog::WriteFault, |_| {})
                .map_err(|_| Status::NotEnoughMemory)?;
        }
    } else {
        for &(start, end) in &e.ram[..e.ram_n] {
            let r = npt.dirty_log_start(Gpa(start), end - start, DirtyLog::WriteFault);
            flush |= Flush::EveryCpu;
            if r.is_err() {
                let _ = stop_logging(&e.ram[..e.ram_n], &mut npt);
                NPT_TLB.publish(Flush::EveryCpu);
                return Err(Status::NotEnoughMemory);
            }
        }
    }
    drop(npt);
    NPT_TLB.publish(flush);
    let meta = Checkpoint {
        id: 0,
        parent: 0,
        periodic,
        start: 0,
        records,
        pages: 0,
        dead: 0,
        taken: gathered,
        pause_us: 0,
        cpu_mask: parked,
        tsc_offset: GUEST_TSC_OFFSET.load(Relaxed),
    };
    let devices = crate::devices::capture();
    let store = |mem: &mut StoreMemory, r: u32, slot: u64| {
        let (cpu, part) = (r / CPU_SLOTS, (r % CPU_SLOTS) as usize);
        let dst = mem.slot_pa(slot) as *mut u8;
        if r >= hv.cpus * CPU_SLOTS {
            let bytes = plain_bytes(&devices);
            let part = (r - hv.cpus * CPU_SLOTS) as usize;
            let chunk = &bytes[part * PAGE..bytes.len().min((part + 1) * PAGE)];
            // SAFETY: as below.
            unsafe { core::ptr::copy_nonoverlapping(chunk.as_ptr(), dst, chunk.len()) };
            return;
        }
        match p.peek(cpu) {
            Some(st) => {
                let bytes = state_bytes(&st.state);
                let chunk = &bytes[part * PAGE..bytes.len().min((part + 1) * PAGE)];
                // SAFETY: host mode; the slot is a page of checkpoint memory (identity-
                // mapped, the hv's alone) and the chunk at most a page.
                unsafe { core::ptr::copy_nonoverlapping(chunk.as_ptr(), dst, chunk.len()) };
            }
            // SAFETY: as above; a CPU that is not in the checkpoint has a zero record.
            None => unsafe { core::ptr::write_bytes(dst, 0, PAGE) },
        }
    };
    let id = e.log.take(meta, 0, store).map_err(|err| match err {
        UndoError::TooMany => Status::TooManyCheckpoints,
        _ => Status::CheckpointMemoryFull,
    })?;
    LOGGING.store(true, Release);
    // A second checkpoint in the same stop (a debugger's) widens the range to settle.
    if UNSETTLED.load(Acquire) == 0 {
        SETTLE_FROM.store(id, Relaxed);
    }
    SETTLE_TO.store(id, Relaxed);
    UNSETTLED.store(parked, Release);
    args.id = id;
    args.cpus = parked.count_ones();
    args.bytes = records as u64 * PAGE as u64;
    args.pages_before = pages_before;
    Ok(())
}

/// A checkpoint holds the machine only if no CPU runs natively beside the others (its writes
/// would escape the log; a rollback would change memory under it).
fn whole_machine_in_guest_mode() -> Result<(), Status> {
    match crate::vcpu::LEFT_WHILE_ACTIVE.load(Acquire) {
        0 => Ok(()),
        _ => Err(Status::CpuLeftGuestMode),
    }
}

/// Why a parked CPU's state cannot be restored exactly ([`quicksilver_proto::abi::BusyWhat`]):
/// inside an NMI handler, the highest vector in service on its local APIC, or 256 + the vector
/// of an event being delivered. `None` if it can.
fn busy(s: &CpuState) -> Option<u32> {
    if s.interrupts.nmi_blocked == Some(true) {
        return Some(BUSY_IN_NMI);
    }
    if let Some((i, w)) = s.apic.isr.iter().enumerate().rev().find(|(_, w)| **w != 0) {
        return Some(i as u32 * 32 + 31 - w.leading_zeros());
    }
    let ev = &s.interrupts.pending;
    ev.valid.then_some(256 + ev.vector as u32)
}

/// The CPU owed the notice NMI after a rollback (`u32::MAX`: none): the leader of the stop
/// that rolled back, once it runs again (`take_owed_nmi`).
static NMI_OWED: AtomicU32 = AtomicU32::new(u32::MAX);

/// Is CPU `me` owed the notice NMI? (Consumes it.)
pub fn take_owed_nmi(me: u32) -> bool {
    NMI_OWED
        .compare_exchange(me, u32::MAX, AcqRel, Relaxed)
        .is_ok()
}

fn parked_mask(p: &Parked) -> u64 {
    p.parked().fold(0u64, |m, i| m | 1 << i)
}

/// A checkpoint from a client that holds every CPU already (the debugger's `monitor
/// checkpoint`): its answer, or why it was refused.
pub fn take_parked(hv: &Hv, p: &mut Parked) -> Result<CheckpointArgs, (Status, CheckpointArgs)> {
    let mut args = CheckpointArgs::default();
    let now = crate::arch::instr::rdtsc();
    let parked = parked_mask(p);
    match take(hv, p, parked, &mut args, now) {
        Ok(()) => {
            args.pause_us = ns(hv, crate::arch::instr::rdtsc() - now) / 1000;
            if let Some(c) = ENGINE.lock().log.get_mut(args.id) {
                c.pause_us = args.pause_us;
            }
            crate::link::checkpoint::taken(&args);
            Ok(args)
        }
        Err(s) => Err((s, args)),
    }
}

/// A rollback from a client that holds every CPU already (the debugger's `monitor rollback`).
pub fn rollback_parked(hv: &Hv, p: &mut Parked, id: u32) -> Result<RollbackNotice, Status> {
    let parked = parked_mask(p);
    let notice = rollback(hv, p, parked, id, crate::arch::instr::rdtsc())?;
    crate::link::checkpoint::rolled_back(&notice);
    Ok(notice)
}

/// A rollback to `id`, every CPU in `parked` stopped.
fn rollback(
    hv: &Hv,
    p: &mut Parked,
    parked: u64,
    id: u32,
    asked: u64,
) -> Result<RollbackNotice, Status> {
    whole_machine_in_guest_mode()?;
    let mut guard = ENGINE.lock();
    let e = &mut *guard;
    let c = *e.log.get(id).ok_or(Status::NoSuchCheckpoint)?;
    if c.cpu_mask != parked {
        // CPUs came or went since (hotplug is refused while the hv is active).
        return Err(Status::CpusDidNotStop);
    }
    let mut npt = hv.npt.lock();
    for gpa in e.log.writable() {
        let _ = npt.harvest(Gpa(gpa), SIZE_4K, DirtyLog::WriteFault, |_| {});
    }
    drop(npt);
    let done = e.log.rollback(id).map_err(|_| Status::NoSuchCheckpoint)?;
    NPT_TLB.publish(Flush::EveryCpu);
    for i in 0..hv.cpus {
        let Some(st) = p.get(i) else { continue };
        // A CPU's record holds a `CpuState` of this same hv: every byte pattern copied back
        // is one a `CpuState` held.
        record_bytes(e, id, i * CPU_SLOTS, state_bytes_mut(&mut st.state));
        st.dirty = parts::ALL | parts::ROLLBACK;
    }
    // The platform's devices, from their record (IOAPIC masked first, unmasked last: see
    // `devices`); every CPU is parked, so no interrupt they raise is taken half-restored.
    let mut devices = DeviceState::default();
    record_bytes(e, id, hv.cpus * CPU_SLOTS, plain_bytes_mut(&mut devices));
    // SAFETY: host mode, every other CPU parked; a state `devices::capture` made here.
    unsafe { crate::devices::restore(&devices) };
    let now = crate::arch::instr::rdtsc();
    // The kernel's TSC continues from where it was at the checkpoint.
    let age = now.wrapping_sub(c.taken);
    GUEST_TSC_OFFSET.store(c.tsc_offset.wrapping_sub(age), Relaxed);
    let notice = RollbackNotice {
        generation: ROLLBACKS.fetch_add(1, Relaxed) + 1,
        id,
        dropped: done.dropped,
        age_ns: ns(hv, age),
        pause_us: ns(hv, now - asked) / 1000,
        pages: done.pages,
        random: randomness(now),
    };
    let notice_pa = e.notice_pa;
    drop(guard);
    if notice_pa != 0 {
        // Logged like any write after the checkpoint (a second rollback puts it back too).
        vmm::write_guest_phys(hv, notice_pa, as_bytes(&notice));
    }
    // One NMI, on the leader: the agent's handler has one notice to take. The page it
    // names for that CPU is made writable first (see NOTICE_HOT_PAGES_OFFSET).
    let leader = p.leader();
    let mut hot = [0u8; 8];
    if notice_pa != 0
        && leader < 64
        && vmm::read_guest_phys(
            hv,
            notice_pa + NOTICE_HOT_PAGES_OFFSET + 8 * leader as u64,
            &mut hot,
        )
    {
        let page = u64::from_le_bytes(hot) & !(SIZE_4K - 1);
        if page != 0 && page < hv.map_limit && !hv.owns(page) {
            before_hv_write(hv, page, SIZE_4K);
        }
    }
    // The clocksource watchdog re-bases at its next round (NOTICE_WATCHDOG_RESET_OFFSET).
    let mut at = [0u8; 8];
    if notice_pa != 0 && vmm::read_guest_phys(hv, notice_pa + NOTICE_WATCHDOG_RESET_OFFSET, &mut at)
    {
        let pa = u64::from_le_bytes(at);
        let mut v = [0u8; 4];
        if pa != 0 && pa % 4 == 0 && !hv.owns(pa) && vmm::read_guest_phys(hv, pa, &mut v) {
            let n = u32::from_le_bytes(v).wrapping_add(1);
            vmm::write_guest_phys(hv, pa, &n.to_le_bytes());
        }
    }
    NMI_OWED.store(leader, Release);
    Ok(notice)
}

/// 32 bytes the restored kernel cannot predict: RDRAND where there is one, mixed with the
/// TSC (which differs at every rollback).
fn randomness(tsc: u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        let r = crate::arch::instr::rdrand64().unwrap_or(0);
        let mixed = r
            ^ tsc.rotate_left(i as u32 * 17)
            ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i as u64 + 1));
        w.copy_from_slice(&mixed.to_le_bytes());
    }
    out
}

/// On each CPU as it is released from any stop, before it runs the guest again: ORs the
/// interrupts now pending on its APIC into its record in the checkpoints the stop took.
///
/// A CPU captures its APIC when it parks, while the others may still run for a few
/// microseconds: an IPI one of them sends in that window (a TLB shootdown, a function call,
/// a wake-up of an idle CPU) lands in this CPU's IRR after the capture, yet the sender's
/// memory at the checkpoint already waits for it. A rollback that raised only the captured
/// IRR would lose it for good: the sender spins in `smp_call_function_many_cond`, or an
/// idle CPU sleeps in HLT past its timer (an RCU stall); seen in 3 of 8 runs of 100
/// rollbacks on 4 CPUs. Read now, the IRR holds every such interrupt (nothing is accepted in
/// host mode), plus what arrived during the pause, which a rollback then raises once more:
/// a spurious interrupt is harmless, a lost one is not.
pub fn settle(me: u32) {
    let bit = 1u64 << (me % 64);
    if me >= 64 || UNSETTLED.load(Acquire) & bit == 0 {
        return;
    }
    let irr = crate::arch::live::irr_now();
    let mut e = ENGINE.lock();
    UNSETTLED.fetch_and(!bit, AcqRel);
    let part = (IRR_OFFSET / PAGE) as u32;
    for id in SETTLE_FROM.load(Relaxed)..=SETTLE_TO.load(Relaxed) {
        let Some(slot) = e.log.record_slot(id, me * CPU_SLOTS + part) else {
            continue;
        };
        let at = (e.log.memory().slot_pa(slot) + (IRR_OFFSET % PAGE) as u64) as *mut u32;
        for (i, &w) in irr.iter().enumerate() {
            // SAFETY: host mode; the slot is a page of checkpoint memory (identity-mapped,
            // the hv's alone) holding this CPU's record, and the IRR's 32 bytes lie within it
            // (asserted at `IRR_OFFSET`); 4-aligned as in the `CpuState` it was copied from
            // (a page-aligned slot). The ENGINE lock keeps every other writer out.
            unsafe { at.add(i).write_volatile(at.add(i).read_volatile() | w) };
        }
    }
}

/// On each CPU once released: the leader answers a checkpoint (or a refused rollback).
pub fn resumed(hv: &Hv, me: u32, _vcpu: &mut Vcpu, _st: &mut Stopped, release: Release) -> Action {
    let leader = REQUEST.lock().as_ref().map_or(u32::MAX, |r| r.leader);
    if me == leader {
        answer(hv);
    }
    match release {
        Release::Leave => Action::Leave,
        _ => Action::Run,
    }
}

/// The leader's answer into the caller's buffer, once every CPU runs again. A successful
/// rollback has no caller any more (that CPU is back at the checkpoint).
fn answer(hv: &Hv) {
    let Some(req) = REQUEST.lock().take() else {
        return;
    };
    if req.rolled_back {
        return;
    }
    let bytes = match &req.kind {
        Kind::Take(a) => as_bytes(a),
        Kind::Rollback(a) => as_bytes(a),
    };
    vmm::write_guest_phys(hv, req.gpa, bytes);
}

/// The request this CPU made did not happen (it joined another client's stop that began
/// first): dropped, and the caller told the CPUs were busy.
pub fn abandon(hv: &Hv, vcpu: &mut Vcpu) {
    use crate::arch::{Gpr, VirtCpu};
    if let Some(mut req) = REQUEST.lock().take() {
        set_status(&mut req.kind, Status::Busy);
        let bytes = match &req.kind {
            Kind::Take(a) => as_bytes(a),
            Kind::Rollback(a) => as_bytes(a),
        };
        vmm::write_guest_phys(hv, req.gpa, bytes);
    }
    vcpu.set_gpr(Gpr::Rax, Status::Busy as i64 as u64);
}

/// What a write fault at a protected page came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cow {
    /// The page's old contents are kept; it is writable now.
    Copied,
    /// It was writable already (another CPU copied it, or this CPU's TLB was stale).
    Spurious,
    /// Not a page the checkpoints protect.
    NotLogged,
}

/// A guest write faulted at `gpa`: copy-on-write.
pub fn write_fault(hv: &Hv, gpa: u64) -> Cow {
    if hv.owns(gpa) {
        return Cow::NotLogged;
    }
    let page = gpa & !(SIZE_4K - 1);
    if LOGGING.load(Acquire) {
        let mut guard = ENGINE.lock();
        if hv.npt.lock().dirty_log_protected(Gpa(page)) {
            log_page(hv, &mut guard, page);
            return Cow::Copied;
        }
    }
    // Not protected (any more): this CPU's TLB held the read-only translation of a page that
    // another CPU copied first, or of one logging gave back when it ended (`stop_logging`
    // flushes no TLB). Taken for unexpected, that write would send this CPU native, beside
    // the others: seen after `--delete all` under a write-heavy workload.
    match hv.npt.lock().translate(Gpa(page)) {
        Some(m) if m.perms.write => Cow::Spurious,
        _ => Cow::NotLogged,
    }
}

/// Keeps the old contents of protected `page` and makes it writable; under memory pressure
/// the oldest checkpoints go first (the last one going ends logging).
fn log_page(hv: &Hv, e: &mut Engine, page: u64) {
    loop {
        match e.log.log(page) {
            Ok(()) => break,
            Err(UndoError::Full) => {
                if e.log.drop_oldest().is_some() {
                    DROPPED_FOR_MEMORY.fetch_add(1, Relaxed);
                }
                if !e.log.logging() {
                    end_logging(hv, e);
                    return;
                }
            }
            Err(_) => {
                end_logging(hv, e);
                return;
            }
        }
    }
    let _ = hv.npt.lock().dirty_log_write_fault(Gpa(page));
}

/// Logs every protected page of `r` (the hv is about to write there).
fn log_range(hv: &Hv, e: &mut Engine, r: core::ops::Range<u64>) {
    let mut page = r.start & !(SIZE_4K - 1);
    while page < r.end {
        if !hv.owns(page) && hv.npt.lock().dirty_log_protected(Gpa(page)) {
            log_page(hv, e, page);
        }
        page += SIZE_4K;
    }
}

/// The hv is about to write `[gpa, gpa + len)` of guest memory: while checkpoints are kept,
/// the pages' old contents are kept first, as for a write of the guest's.
pub fn before_hv_write(hv: &Hv, gpa: u64, len: u64) {
    if LOGGING.load(Acquire) && len != 0 {
        let mut e = ENGINE.lock();
        log_range(hv, &mut e, gpa..gpa.saturating_add(len));
    }
}

/// No checkpoint is kept any more: every page of RAM writable again.
fn end_logging(hv: &Hv, e: &mut Engine) {
    LOGGING.store(false, Release);
    let _ = stop_logging(&e.ram[..e.ram_n], &mut hv.npt.lock());
}

fn stop_logging(
    ram: &[(u64, u64)],
    npt: &mut crate::npt::Npt<crate::frames::FramePool<'static>>,
) -> Result<(), crate::npt::NptError> {
    for &(start, end) in ram {
        // Gives rights back only: no flush needed (a stale read-only entry faults once).
        let _ = npt.dirty_log_stop(Gpa(start), end - start, DirtyLog::WriteFault)?;
    }
    Ok(())
}

/// Each checkpoint kept, oldest first, as `Op::Checkpoints` lists it.
pub fn for_each_kept(hv: &Hv, mut f: impl FnMut(&CheckpointInfo)) {
    let e = ENGINE.lock();
    let now = crate::arch::instr::rdtsc();
    let current = e.log.current().map(|c| c.id);
    for c in e.log.kept() {
        f(&info(hv, c, now, current));
    }
}

fn info(hv: &Hv, c: &Checkpoint, now: u64, current: Option<u32>) -> CheckpointInfo {
    CheckpointInfo {
        id: c.id,
        parent: c.parent,
        flags: if c.periodic { CHECKPOINT_PERIODIC } else { 0 }
            | if Some(c.id) == current {
                CHECKPOINT_CURRENT
            } else {
                0
            },
        cpus: c.cpu_mask.count_ones(),
        age_ns: ns(hv, now.wrapping_sub(c.taken)),
        pause_us: c.pause_us,
        pages: c.pages,
        bytes: c.slots() * PAGE as u64,
    }
}

/// How many checkpoints are kept.
pub fn kept_count() -> usize {
    ENGINE.lock().log.kept().count()
}

/// The periodic ring's setting: (interval in milliseconds, 0 = off; how many it keeps).
pub fn periodic_setting() -> (u32, u32) {
    (EVERY_MS.load(Relaxed), KEEP.load(Relaxed))
}

/// Checkpoint memory: (its size, what is used), in bytes.
pub fn memory() -> (u64, u64) {
    let e = ENGINE.lock();
    (e.log.capacity() * PAGE as u64, e.log.used() * PAGE as u64)
}

/// The `n`th checkpoint kept (oldest first), as `Op::Checkpoints` lists it.
pub fn nth_kept(hv: &Hv, n: usize) -> Option<CheckpointInfo> {
    let e = ENGINE.lock();
    let now = crate::arch::instr::rdtsc();
    let current = e.log.current().map(|c| c.id);
    let found = e.log.kept().nth(n).map(|c| info(hv, c, now, current));
    found
}

/// `Op::Checkpoints`: the list into `buf`.
pub fn list(hv: &Hv, buf: &mut [u8]) -> Status {
    let head = core::mem::size_of::<CheckpointList>();
    let each = core::mem::size_of::<CheckpointInfo>();
    if buf.len() < head {
        return Status::BufferTooSmall;
    }
    let e = ENGINE.lock();
    let now = crate::arch::instr::rdtsc();
    let current = e.log.current().map(|c| c.id);
    for (n, c) in e.log.kept().enumerate() {
        let at = head + n * each;
        if at + each > buf.len() {
            break;
        }
        let info = info(hv, c, now, current);
        write(&mut buf[at..], &info);
    }
    let list = CheckpointList {
        status: Status::Ok as i64,
        count: e.log.kept().count() as u32,
        max: MAX_CHECKPOINTS,
        capacity_bytes: e.log.capacity() * PAGE as u64,
        used_bytes: e.log.used() * PAGE as u64,
        dropped_for_memory: DROPPED_FOR_MEMORY.load(Relaxed),
        rollbacks: ROLLBACKS.load(Relaxed),
        every_ms: EVERY_MS.load(Relaxed),
        keep: KEEP.load(Relaxed),
        clock_behind_ns: ns(hv, GUEST_TSC_OFFSET.load(Relaxed).wrapping_neg()),
    };
    write(buf, &list);
    Status::Ok
}

/// `Op::CheckpointPeriodic`: the ring's setting (checked).
pub fn periodic(buf: &mut [u8]) -> Status {
    let Some(mut args) = read::<CheckpointPeriodic>(buf) else {
        return Status::BufferTooSmall;
    };
    let status = if args.every_ms != 0
        && (args.every_ms < PERIODIC_MIN_MS || args.keep == 0 || args.keep > MAX_CHECKPOINTS)
    {
        Status::BadArgument
    } else if args.every_ms != 0 && ENGINE.lock().log.capacity() == 0 {
        Status::NoCheckpointMemory
    } else {
        EVERY_MS.store(args.every_ms, Relaxed);
        if args.every_ms != 0 {
            KEEP.store(args.keep, Relaxed);
        }
        Status::Ok
    };
    args.status = status as i64;
    write(buf, &args);
    status
}

/// `Op::CheckpointDelete`.
pub fn delete(hv: &Hv, buf: &mut [u8]) -> Status {
    let Some(mut args) = read::<CheckpointDelete>(buf) else {
        return Status::BufferTooSmall;
    };
    let mut guard = ENGINE.lock();
    let e = &mut *guard;
    let mut deleted = 0;
    let status = if args.id == CHECKPOINT_ALL {
        while e.log.drop_oldest().is_some() {
            deleted += 1;
        }
        Status::Ok
    } else {
        match e.log.delete(args.id) {
            Ok(_) => {
                deleted = 1;
                Status::Ok
            }
            Err(_) => Status::NoSuchCheckpoint,
        }
    };
    if !e.log.logging() && LOGGING.load(Acquire) {
        end_logging(hv, e);
    }
    drop(guard);
    args.deleted = deleted;
    args.status = status as i64;
    write(buf, &args);
    crate::link::checkpoint::deleted(args.id, deleted);
    status
}

/// A CPU left guest mode while checkpoints are kept (an unexpected exit's policy, or a
/// reset): from now on its writes escape the log, so no checkpoint can be restored exactly
/// any more. They are all dropped.
pub fn cpu_left(hv: &Hv) {
    if LOGGING.load(Acquire) {
        let mut guard = ENGINE.lock();
        let e = &mut *guard;
        while e.log.drop_oldest().is_some() {}
        end_logging(hv, e);
    }
}

fn plain_bytes(s: &DeviceState) -> &[u8] {
    // SAFETY: a DeviceState is plain integers with no padding (`devices` proves it).
    unsafe {
        core::slice::from_raw_parts((s as *const DeviceState).cast::<u8>(), DeviceState::SIZE)
    }
}

fn plain_bytes_mut(s: &mut DeviceState) -> &mut [u8] {
    // SAFETY: as in `plain_bytes`; any byte pattern is a DeviceState.
    unsafe {
        core::slice::from_raw_parts_mut((s as *mut DeviceState).cast::<u8>(), DeviceState::SIZE)
    }
}

/// Copies checkpoint `id`'s records from record `first` on into `bytes` (a record's bytes
/// span consecutive slots); false if no checkpoint has that id.
fn record_bytes(e: &mut Engine, id: u32, first: u32, bytes: &mut [u8]) -> bool {
    for (part, chunk) in bytes.chunks_mut(PAGE).enumerate() {
        let Some(slot) = e.log.record_slot(id, first + part as u32) else {
            return false;
        };
        let src = e.log.memory().slot_pa(slot) as *const u8;
        // SAFETY: host mode; the slot is a page of checkpoint memory (identity-mapped, the
        // hv's alone) holding this part of the record `take` wrote from the same type of
        // this same hv; `chunk` is at most a page.
        unsafe { core::ptr::copy_nonoverlapping(src, chunk.as_mut_ptr(), chunk.len()) };
    }
    true
}

fn state_bytes(s: &CpuState) -> &[u8] {
    // SAFETY: a CpuState is plain data (integers, bools, arrays of them, `repr(C)`); reading
    // its bytes, padding included, is what copying it does.
    unsafe {
        core::slice::from_raw_parts(
            (s as *const CpuState).cast::<u8>(),
            core::mem::size_of::<CpuState>(),
        )
    }
}

fn state_bytes_mut(s: &mut CpuState) -> &mut [u8] {
    // SAFETY: as in `state_bytes`; the caller writes back only bytes of a CpuState captured by
    // this same hv, so the bools and enums hold values they held.
    unsafe {
        core::slice::from_raw_parts_mut(
            (s as *mut CpuState).cast::<u8>(),
            core::mem::size_of::<CpuState>(),
        )
    }
}

/// An ABI struct's bytes.
fn as_bytes<T: quicksilver_proto::c_abi::CStruct>(v: &T) -> &[u8] {
    // SAFETY: ABI structs are plain integers with no padding (abi_struct! proves it).
    unsafe { core::slice::from_raw_parts((v as *const T).cast::<u8>(), core::mem::size_of::<T>()) }
}

pub(crate) fn read<T: quicksilver_proto::c_abi::CStruct>(buf: &[u8]) -> Option<T> {
    if buf.len() < core::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: the buffer holds a T (checked); ABI structs are plain integers, valid for any
    // bit pattern; read_unaligned needs no alignment.
    Some(unsafe { core::ptr::read_unaligned(buf.as_ptr().cast::<T>()) })
}

pub(crate) fn write<T: quicksilver_proto::c_abi::CStruct>(buf: &mut [u8], v: &T) {
    let b = as_bytes(v);
    let n = b.len().min(buf.len());
    buf[..n].copy_from_slice(&b[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_in_an_nmi_handler_an_interrupt_handler_or_an_event_delivery_is_busy() {
        let mut s = CpuState::default();
        assert_eq!(busy(&s), None);
        s.interrupts.nmi_blocked = Some(false);
        assert_eq!(busy(&s), None);
        s.apic.isr[7] = 1 << 12;
        assert_eq!(busy(&s), Some(0xEC));
        s.apic.isr[7] = 0;
        s.interrupts.pending.valid = true;
        s.interrupts.pending.vector = 14;
        assert_eq!(busy(&s), Some(256 + 14));
        s.interrupts.nmi_blocked = Some(true);
        assert_eq!(busy(&s), Some(BUSY_IN_NMI));
    }
}
