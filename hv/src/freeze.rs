//! `qsctl freeze MS [--check]`: every CPU stopped for MS milliseconds, then resumed. The
//! rendezvous' second client after the debugger, and the consistent cut the checkpoint
//! engine will take: every CPU parked at once, its whole state captured (`CpuState`).
//!
//! With [`FREEZE_CHECK`], each CPU, once released, writes its whole captured state back
//! (registers, segments, MSRs, XSAVE, the local APIC), captures it again and compares: what a
//! rollback will do, tried in place on a running kernel. The leader does the same for the
//! platform's legacy devices while every CPU is parked (`crate::devices::check_in_place`:
//! IOAPIC, PICs, PIT, HPET, RTC, the console UART with its shadowed FIFO control register);
//! a device that came back different makes the leader's verdict "differing", with the
//! device's name ("ioapic", "pic", "pit", "hpet", "rtc", "uart", "uart-fcr") first in `what`.
//! The hypercalling CPU leads, waits for every CPU's verdict, and answers in the caller's
//! [`FreezeArgs`].

use crate::arch::{parts, Gpr, Vcpu, VirtCpu};
use crate::cpu_state::CpuState;
use crate::exit::Action;
use crate::rendezvous::Release;
use crate::vcpu::{Parked, Stopped};
use crate::vmm::{self, Hv};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use quicksilver_proto::abi::{FreezeArgs, Status, FREEZE_CHECK, FREEZE_MAX_MS};

/// The freeze being made (one at a time: the hypercall that asks is refused while another
/// is under way).
struct Request {
    /// Where the caller's `FreezeArgs` is (guest-physical).
    gpa: u64,
    args: FreezeArgs,
    /// When the request arrived (TSC).
    asked: u64,
    /// The CPU that asked, which leads and answers.
    leader: u32,
}

static REQUEST: spin::Mutex<Option<Request>> = spin::Mutex::new(None);
/// CPUs that finished their check since the release (bit n: CPU n).
static CHECKED: AtomicU64 = AtomicU64::new(0);
/// CPUs this freeze stopped (bit n: CPU n), whose verdicts the leader waits for.
static STOPPED: AtomicU64 = AtomicU64::new(0);
static IDENTICAL: AtomicU32 = AtomicU32::new(0);
static DIFFERING: AtomicU64 = AtomicU64::new(0);
/// How long the leader waits for the other CPUs' verdicts (a check takes microseconds; a
/// vCPU thread the host does not schedule can take far longer).
const VERDICT_WAIT_MS: u64 = 1000;
/// The first differing CPU's part names are recorded (under the request lock).
static FIRST_DIFFERENCE_TAKEN: AtomicBool = AtomicBool::new(false);
/// The devices' round trip (the leader's, while every CPU was parked) came back different.
static DEVICES_DIFFER: AtomicBool = AtomicBool::new(false);

/// `Op::Freeze` from CPU `me`: checks and keeps the request in the guest's buffer at `gpa`.
/// Every CPU stops once the hypercall is complete (`exit::hypercall`).
pub fn request(me: u32, gpa: u64, buf: &mut [u8]) -> Status {
    if buf.len() < core::mem::size_of::<FreezeArgs>() {
        return Status::BufferTooSmall;
    }
    // SAFETY: the buffer holds at least a FreezeArgs (checked); it is plain integers, any
    // bit pattern is valid, and read_unaligned needs no alignment.
    let args = unsafe { core::ptr::read_unaligned(buf.as_ptr().cast::<FreezeArgs>()) };
    if args.ms > FREEZE_MAX_MS || args.flags & !FREEZE_CHECK != 0 {
        return Status::BadArgument;
    }
    if crate::debug::session::attached() {
        return Status::Busy;
    }
    let mut r = REQUEST.lock();
    if r.is_some() {
        return Status::Busy;
    }
    *r = Some(Request {
        gpa,
        args,
        asked: crate::arch::instr::rdtsc(),
        leader: me,
    });
    Status::Ok
}

/// The leader, with every CPU parked: holds them for the requested time, then lets them all
/// run.
pub fn lead(hv: &Hv, p: Parked) {
    let khz = hv.tsc_khz as u64;
    let now = crate::arch::instr::rdtsc;
    let mut r = REQUEST.lock();
    let Some(req) = r.as_mut() else {
        p.release_all(Release::Run);
        return;
    };
    let held_from = now();
    // At most 64 CPUs (vmm::MAX_CPUS): one bit each.
    let stopped = p.parked().fold(0u64, |m, i| m | 1 << i);
    let active = (0..hv.cpus)
        .filter(|&i| hv.cpu(i).is_some_and(|c| c.shared.is_active()))
        .fold(0u64, |m, i| m | 1 << i);
    req.args.cpus = stopped.count_ones();
    req.args.missing_cpus = active & !stopped;
    req.args.gather_us = (held_from - req.asked) * 1000 / khz.max(1);
    STOPPED.store(stopped, Relaxed);
    CHECKED.store(0, Relaxed);
    IDENTICAL.store(0, Relaxed);
    DIFFERING.store(0, Relaxed);
    FIRST_DIFFERENCE_TAKEN.store(false, Relaxed);
    DEVICES_DIFFER.store(false, Relaxed);
    if req.args.flags & FREEZE_CHECK != 0 {
        // Every CPU is parked: nothing drives the devices while they are captured, restored
        // in place and captured again.
        let mut names = [""; 8];
        let n = crate::devices::check_in_place(&mut names);
        if n > 0 {
            DEVICES_DIFFER.store(true, Relaxed);
            FIRST_DIFFERENCE_TAKEN.store(true, Relaxed);
            write_names(&mut req.args.what, &names[..n.min(names.len())]);
        }
    }
    while now() - held_from < req.args.ms as u64 * khz {
        core::hint::spin_loop();
    }
    req.args.held_us = (now() - held_from) * 1000 / khz.max(1);
    p.release_all(Release::Run);
}

/// On each CPU once released: the check, then run on. The leader then waits for every CPU's
/// verdict and answers.
pub fn resumed(hv: &Hv, me: u32, vcpu: &mut Vcpu, st: &mut Stopped, release: Release) -> Action {
    let (check, leader) = match REQUEST.lock().as_ref() {
        Some(r) => (r.args.flags & FREEZE_CHECK != 0, r.leader),
        None => (false, u32::MAX),
    };
    if check {
        let devices_differ = me == leader && DEVICES_DIFFER.load(Relaxed);
        check_round_trip(me, vcpu, &st.state, devices_differ);
    }
    if me == leader {
        answer(hv, check);
    }
    match release {
        Release::Leave => Action::Leave,
        _ => Action::Run,
    }
}

/// The freeze this CPU asked for did not happen (it joined a debugger's stop that began
/// first): the request is dropped and the caller told the CPUs were busy.
pub fn abandon(hv: &Hv, vcpu: &mut Vcpu) {
    if let Some(mut req) = REQUEST.lock().take() {
        req.args.status = Status::Busy as i64;
        write_args(hv, &req);
    }
    vcpu.set_gpr(Gpr::Rax, Status::Busy as i64 as u64);
}

/// Writes `saved` back, captures again, compares. `devices_differ`: this CPU led, and the
/// devices' round trip differed (already named in the answer): the verdict is "differing".
fn check_round_trip(me: u32, vcpu: &mut Vcpu, saved: &CpuState, devices_differ: bool) {
    let mut again = CpuState::default();
    // SAFETY: host mode on this CPU, after its release; `saved` was captured here at this
    // stop and nothing changed it (the freeze's leader only counts).
    unsafe {
        vcpu.restore_state(saved, parts::ALL);
        vcpu.save_state(&mut again);
    }
    let mut names = [""; 8];
    let n = saved.differences(&again, &mut names);
    if n == 0 && !devices_differ {
        IDENTICAL.fetch_add(1, Relaxed);
    } else {
        DIFFERING.fetch_or(1 << (me & 63), Relaxed);
        if n > 0 && !FIRST_DIFFERENCE_TAKEN.swap(true, AcqRel) {
            if let Some(r) = REQUEST.lock().as_mut() {
                write_names(&mut r.args.what, &names[..n.min(names.len())]);
            }
        }
    }
    CHECKED.fetch_or(1 << (me & 63), Release);
}

/// `names`, comma-separated, into the answer's `what` (NUL-terminated, cut to fit).
fn write_names(what: &mut [u8; 32], names: &[&str]) {
    let mut at = 0;
    for name in names {
        for &b in name.as_bytes().iter().chain(b",") {
            if at < what.len() - 1 {
                what[at] = b;
                at += 1;
            }
        }
    }
}

/// The leader's answer, once every stopped CPU has checked (at most [`VERDICT_WAIT_MS`] more:
/// a CPU whose verdict has not come by then is counted as differing, named "no verdict").
fn answer(hv: &Hv, check: bool) {
    let stopped = STOPPED.load(Relaxed);
    let mut late = 0;
    if check {
        let start = crate::arch::instr::rdtsc();
        let limit = VERDICT_WAIT_MS * hv.tsc_khz as u64;
        while CHECKED.load(Acquire) & stopped != stopped
            && crate::arch::instr::rdtsc() - start < limit
        {
            core::hint::spin_loop();
        }
        late = stopped & !CHECKED.load(Acquire);
    }
    let Some(mut req) = REQUEST.lock().take() else {
        return;
    };
    req.args.identical = IDENTICAL.load(Relaxed);
    req.args.differing_cpus = DIFFERING.load(Relaxed) | late;
    if late != 0 && !FIRST_DIFFERENCE_TAKEN.load(Acquire) {
        let why = b"no verdict";
        req.args.what[..why.len()].copy_from_slice(why);
    }
    req.args.status = Status::Ok as i64;
    write_args(hv, &req);
}

/// The answer into the caller's buffer.
fn write_args(hv: &Hv, req: &Request) {
    let bytes = {
        let p = &req.args as *const FreezeArgs as *const u8;
        // SAFETY: FreezeArgs is plain integers with no padding (abi_struct! proves it); the
        // slice lives as long as the borrow of `req`.
        unsafe { core::slice::from_raw_parts(p, core::mem::size_of::<FreezeArgs>()) }
    };
    vmm::write_guest_phys(hv, req.gpa, bytes);
}
