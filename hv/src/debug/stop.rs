//! Stopping and resuming CPUs for the debugger.
//!
//! A CPU that has a reason to stop (a breakpoint, a finished step, gdb's Ctrl-C arriving in its
//! hypercall, an attach) calls [`enter`]. The first one becomes the *leader*: it sends an NMI to
//! every other CPU in guest mode (the hv intercepts NMIs, so each exits and enters as a
//! *follower*), waits until every CPU is parked in host mode, and then serves gdb until gdb
//! resumes some of them. Parked CPUs spin on their own `go` flag with GIF = 0; nothing of the
//! kernel runs meanwhile. CPUs gdb leaves stopped (scheduler locking) stay parked across the
//! next run and are counted in the next stop without another NMI.

use super::PerCpu;
use crate::arch::{instr, svm};
use crate::vcpu::Cpu;
use crate::vmm::{Hv, COUNTERS};
use core::sync::atomic::{AtomicU64, Ordering::*};

/// The stop's shared state, changed only under [`LOCK`].
struct StopState {
    /// A leader is stopping or serving.
    stopping: bool,
    /// CPUs parked (leader included).
    parked: u32,
}

static LOCK: spin::Mutex<StopState> = spin::Mutex::new(StopState {
    stopping: false,
    parked: 0,
});

/// TSC cycles the last stop took to gather every CPU (leader's entry to all parked).
pub static LAST_GATHER_CYCLES: AtomicU64 = AtomicU64::new(0);

/// What a parked CPU does when released.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Resume {
    /// Stay parked (gdb resumed other CPUs only).
    #[default]
    Stay,
    Continue,
    /// Execute one instruction, interrupts held, then stop again.
    Step,
    /// Leave guest mode: the debugger detached and the hv deactivates.
    Leave,
}

/// Parks this CPU; returns when it is released, with its resume action. If it became the
/// leader, `lead` runs with every CPU parked and must set every CPU's action.
///
/// # Safety
/// `me` is this CPU's own area, in host mode; the caller holds no reference into it.
pub unsafe fn enter(hv: &Hv, me: *mut Cpu, lead: impl FnOnce(&Hv, u32)) -> Resume {
    // SAFETY: our own area (caller); we only touch our debug state until we are parked.
    let (index, dbg) = unsafe { ((*me).state.index(), &mut (*me).state.dbg) };
    dbg.capture();
    dbg.go.store(false, Relaxed);
    let leader = {
        let mut s = LOCK.lock();
        let leader = !s.stopping;
        s.stopping = true;
        s.parked += 1;
        dbg.parked.store(true, Release);
        leader
    };
    if leader {
        let t0 = instr::rdtsc();
        stop_others(hv, index);
        wait_for_all(hv);
        LAST_GATHER_CYCLES.store(instr::rdtsc() - t0, Relaxed);
        lead(hv, index);
        release(hv);
    }
    // A leader whose own action is Stay waits like everyone else.
    wait_for_go(hv, dbg);
    dbg.restore();
    dbg.action
}

/// Waits, halted, until this CPU is released, then stops being parked. A parked CPU that
/// spun would take a host core from the leader serving gdb (under QEMU, an emulated CPU's
/// thread; on silicon, an SMT sibling's share).
///
/// - [`release`] sets `go` and sends an NMI to a CPU that said it is `asleep`. The SeqCst pair
///   (`asleep` then `go` here, `go` then `asleep` there) means that either this CPU sees `go`
///   before halting or the releaser sees `asleep` and wakes it; an NMI that comes just before
///   the HLT skips it (world_switch.S, step 6).
/// - The CPU counts as parked until it leaves, under the lock: a new stop that began before
///   it got going keeps it (no stop NMI goes to a parked CPU), and so the only NMI meant for
///   it here is the wake, which it takes before leaving (in the kernel it would be an
///   unknown NMI).
fn wait_for_go(hv: &Hv, dbg: &PerCpu) {
    loop {
        while !dbg.go.load(Acquire) {
            dbg.asleep.store(true, SeqCst);
            if dbg.go.load(SeqCst) {
                dbg.asleep.store(false, Relaxed);
                break;
            }
            // SAFETY: host mode with RFLAGS.IF = 0 (the hv runs with interrupts off): only an
            // NMI ends the HLT, and the hv's IDT sends it to its handler, which returns.
            if unsafe { svm::qs_sleep_until_nmi() } == 1 {
                dbg.wake_sent.store(false, Relaxed);
            }
            dbg.asleep.store(false, Relaxed);
        }
        let mut s = LOCK.lock();
        if s.stopping || dbg.action == Resume::Stay {
            // A new stop, or a release whose `go` this CPU saw late: stay parked for it.
            dbg.go.store(false, Relaxed);
            continue;
        }
        if dbg.wake_sent.load(Relaxed) {
            take_wake_nmi(hv);
            dbg.wake_sent.store(false, Relaxed);
        }
        s.parked -= 1;
        dbg.parked.store(false, Release);
        return;
    }
}

/// Takes the wake NMI of a CPU that saw `go` by itself: once the releaser let go of the lock,
/// the NMI is sent; it arrives within microseconds. Gives up after 1 ms.
fn take_wake_nmi(hv: &Hv) {
    let start = instr::rdtsc();
    // SAFETY: host mode with RFLAGS.IF = 0: only an NMI can arrive, into the hv's handler,
    // which returns.
    while unsafe { svm::qs_take_nmi() } == 0 && instr::rdtsc() - start < hv.tsc_khz as u64 {
        core::hint::spin_loop();
    }
}

/// NMIs every CPU in guest mode that is not parked.
fn stop_others(hv: &Hv, me: u32) {
    for i in 0..hv.cpus {
        if i == me {
            continue;
        }
        let d = dbg_of(hv, i);
        // SAFETY: `active` is written by its own CPU only; a stale read sends an NMI to a CPU
        // that left (it is intercepted by nobody and goes to the kernel's handler, which
        // ignores a lone unknown NMI on x86 with a warning: only on an unexpected-exit race).
        if !cpu_active(hv, i) || d.parked.load(Acquire) {
            continue;
        }
        d.nmi_expected.store(true, Release);
        // SAFETY: host mode; the target intercepts NMIs (build_vmcb) and expects this one.
        unsafe { instr::send_nmi(d.apic_id) };
    }
}

/// How many CPUs a stop must gather: those in guest mode.
fn target_cpus() -> u32 {
    COUNTERS.active_cpus.load(Acquire)
}

/// Waits until every CPU is parked; gives up after about two seconds (a CPU that never
/// answers its NMI is left running and is not listed to gdb). The NMI is not sent twice: a
/// second one could arrive after the first was consumed and reach the kernel as an unknown NMI.
fn wait_for_all(hv: &Hv) {
    let limit = hv.tsc_khz as u64 * 2000;
    let start = instr::rdtsc();
    while LOCK.lock().parked < target_cpus() && instr::rdtsc() - start < limit {
        core::hint::spin_loop();
    }
}

/// Lets go of every CPU whose action is not `Stay`.
fn release(hv: &Hv) {
    let mut s = LOCK.lock();
    for i in 0..hv.cpus {
        let d = dbg_of(hv, i);
        if d.parked.load(Acquire) && d.action != Resume::Stay && !d.go.load(Relaxed) {
            // It stops being parked when it leaves (wait_for_go), under this lock.
            d.go.store(true, SeqCst);
            if d.asleep.load(SeqCst) {
                // SeqCst: a fence before the ICR write (an x2APIC WRMSR does not order
                // stores), so that the woken CPU sees `wake_sent` and clears it.
                d.wake_sent.store(true, SeqCst);
                // SAFETY: host mode; the target is parked in the hv, where its NMI handler
                // only returns, and takes this NMI before it leaves.
                unsafe { instr::send_nmi(d.apic_id) };
            }
        }
    }
    s.stopping = false;
}

/// Is a stop in progress? (An NMI meant for a stop that is over just resumes.)
pub fn stopping() -> bool {
    LOCK.lock().stopping
}

fn cpu_active(hv: &Hv, i: u32) -> bool {
    // SAFETY: i < cpus; a read of another CPU's flag (see stop_others).
    unsafe { (*hv.cpu(i)).state.is_active() }
}

/// Another CPU's debug state. Fields other than the atomics are only touched by the leader
/// while that CPU is parked, or by that CPU itself.
pub fn dbg_of(hv: &Hv, i: u32) -> &'static mut PerCpu {
    // SAFETY: i < cpus (callers loop below hv.cpus); see above for who touches what when.
    unsafe { &mut (*hv.cpu(i)).state.dbg }
}

/// The leader's view of a parked CPU's whole area.
pub fn cpu_of(hv: &Hv, i: u32) -> &'static mut Cpu {
    // SAFETY: as dbg_of; the CPU is parked and does not touch its VMCB or registers.
    unsafe { &mut *hv.cpu(i) }
}
