//! One CPU's life under the hv: its area in the hv's memory, activation, the run loop, stopping
//! with the others, and stepping out.
//!
//! `activate` runs on the kernel's stack and address space in the agent's IPI on that CPU; it
//! captures the CPU's live state so that the guest continues as if `qs_entry_activate` had
//! just returned 0, then enters host mode (`qs_enter_host`) where `host_main` runs the guest
//! until a hypercall or an unexpected exit sends this CPU back to native execution.
//!
//! A CPU's area has three parts, by who may touch them:
//! - `vcpu` and `run` (the vendor's vCPU, the run loop's bookkeeping): this CPU only;
//! - `shared` (in guest mode, APIC ID, counters): every CPU, through atomics;
//! - `stopped` (the CPU's whole state as captured when it parked, its clients' per-CPU data):
//!   this CPU while it runs, the rendezvous leader (through [`Parked`]) while it is parked.

use crate::arch::context::{EntryFrame, NativeState};
use crate::arch::{self, instr, Vcpu, VcpuSetup, VirtCpu, VmExit};
use crate::cpu_state::CpuState;
use crate::decode::{self, Insn};
use crate::exit::{self, npf, Action, Stop, Then};
use crate::net::config_space::Ports as _;
use crate::rendezvous::{ClientId, Gathered, Platform, Release, Rendezvous};
use crate::vmm::{self, Hv, COUNTERS};
use crate::{checkpoint, debug, devices, freeze};
use core::cell::UnsafeCell;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use quicksilver_proto::abi::{Op, Status};
use quicksilver_proto::stats::{CpuStats, ExitKind, EXIT_KINDS};

// The world switch, wired to the entry points this module owns.
core::arch::global_asm!(
    include_str!("arch/svm/world_switch.S"),
    activate = sym activate,
    host_main = sym host_main,
    host_exception = sym host_exception,
);

/// Bytes of host stack per CPU.
pub const STACK_SIZE: usize = 32 * 1024;

/// What every CPU may read of a CPU: atomics only.
pub struct Shared {
    index: u32,
    /// In guest mode now (written by this CPU).
    active: AtomicBool,
    /// Activated at least once.
    seen: AtomicBool,
    /// Its local APIC ID, for the rendezvous' NMIs (written at activation).
    apic_id: AtomicU32,
    exits: [AtomicU64; EXIT_KINDS],
    cycles_in_hv: AtomicU64,
    last_activate_cycles: AtomicU64,
    last_deactivate_cycles: AtomicU64,
}

impl Shared {
    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Acquire)
    }

    pub fn apic_id(&self) -> u32 {
        self.apic_id.load(Relaxed)
    }

    /// A copy of this CPU's counters (each written by its CPU only; relaxed loads suffice
    /// for statistics).
    pub fn stats(&self) -> CpuStats {
        CpuStats {
            exits: core::array::from_fn(|k| self.exits[k].load(Relaxed)),
            cycles_in_hv: self.cycles_in_hv.load(Relaxed),
            last_activate_cycles: self.last_activate_cycles.load(Relaxed),
            last_deactivate_cycles: self.last_deactivate_cycles.load(Relaxed),
            active: self.is_active() as u32,
            seen: self.seen.load(Relaxed) as u32,
            stack_used: 0,
            stack_size: 0,
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        // Only this CPU writes its counters: a load and a store, no locked RMW on the hot path.
        counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
    }
}

/// What only this CPU's run loop touches: its vendor vCPU and its bookkeeping (two cells of
/// the area, so that the vCPU's page alignment does not pad the bookkeeping to a page).
struct Private<'a> {
    vcpu: &'a mut Vcpu,
    run: &'a mut RunState,
}

/// The run loop's bookkeeping.
struct RunState {
    /// The next exit is the first of this activation.
    first_run: bool,
    /// TSC when `activate` was entered and when the last exit arrived.
    tsc_entry: u64,
    tsc_exit: u64,
    /// Native state at activation, returned to if the first VMRUN fails.
    entry_state: NativeState,
    /// The nested tables' TLB generation this CPU's guest translations are from.
    npt_seen: u64,
}

/// A CPU's state as captured when it parked, and its clients' per-CPU data.
#[repr(C)]
pub struct Stopped {
    pub state: CpuState,
    /// Parts of `state` a client changed (`arch::parts`): written back before the CPU runs.
    pub dirty: u8,
    pub dbg: debug::PerCpu,
}

/// A CPU's area in the hv's memory.
#[repr(C, align(4096))]
pub struct Cpu {
    vcpu: UnsafeCell<Vcpu>,
    run: UnsafeCell<RunState>,
    pub shared: Shared,
    stopped: UnsafeCell<Stopped>,
    stack: [u8; STACK_SIZE],
}

// SAFETY: `vcpu` and `run` are touched by their own CPU only, `stopped` by its own CPU or the leader of
// a stop while the CPU is parked (see `Parked`), `shared` is atomics.
unsafe impl Sync for Cpu {}

const _: () = assert!(core::mem::size_of::<Cpu>() == 52 * 1024);
const _: () = assert!(core::mem::offset_of!(Cpu, stack) % 8 == 0);

/// What `init_in_place` paints each stack with ("QSSTACK!"), so that `stack_used` can tell
/// how deep it has ever been used.
const STACK_PAINT: u64 = 0x214B_4341_5453_5351;

impl Cpu {
    /// Prepares the area at `cpu` (physical address `pa`) for CPU `index`.
    ///
    /// # Safety
    /// `cpu` must point to an unused, page-aligned area of `size_of::<Cpu>()` bytes of the hv's
    /// memory, at physical address `pa`.
    pub unsafe fn init_in_place(cpu: *mut Cpu, index: u32, pa: u64) {
        // SAFETY: forwarded; an all-zero Cpu is valid (integers, bools, atomics, and the
        // vCPU, which `init_in_place` sets up from zero). `vcpu` is the area's first field.
        unsafe {
            core::ptr::write_bytes(cpu, 0, 1);
            let stack = core::ptr::addr_of_mut!((*cpu).stack).cast::<u64>();
            for i in 0..STACK_SIZE / 8 {
                stack.add(i).write(STACK_PAINT);
            }
            Vcpu::init_in_place((*cpu).vcpu.get(), pa);
            core::ptr::addr_of_mut!((*cpu).shared.index).write(index);
            (*(*cpu).stopped.get()).dbg = debug::PerCpu::new();
        }
    }

    /// This CPU's private part.
    ///
    /// # Safety
    /// Only on this CPU, and only one such borrow at a time (`activate`, then the run loop).
    unsafe fn private(&self) -> Private<'_> {
        // SAFETY: forwarded to the caller.
        unsafe {
            Private {
                vcpu: &mut *self.vcpu.get(),
                run: &mut *self.run.get(),
            }
        }
    }

    /// The most of this CPU's stack ever used, in bytes: the words at its bottom still
    /// holding the paint were never reached.
    pub fn stack_used(&self) -> u32 {
        let base = core::ptr::addr_of!(self.stack).cast::<u64>();
        let words = STACK_SIZE / 8;
        let untouched = (0..words)
            .take_while(|&i| {
                // SAFETY: word `i` of this CPU's stack (8-aligned: the area is page-aligned
                // and the stack's offset a multiple of 8, asserted below); its CPU may be
                // writing it, hence an atomic load, never a reference to the bytes.
                let w = unsafe { AtomicU64::from_ptr(base.add(i).cast_mut()) };
                w.load(Relaxed) == STACK_PAINT
            })
            .count();
        ((words - untouched) * 8) as u32
    }

    fn stack_top(&self) -> u64 {
        (self.stack.as_ptr() as u64 + STACK_SIZE as u64) & !15
    }
}

/// Called by `qs_entry_activate` on each CPU. Returns only if the CPU stays native.
///
/// # Safety
/// Only from `qs_entry_activate`, with `frame` the frame it pushed, interrupts off.
pub unsafe extern "C" fn activate(index: u32, frame: *const EntryFrame) -> i64 {
    let Some(hv) = vmm::get() else {
        return Status::NotInitialized as i64;
    };
    let Some(cpu) = hv.cpu(index) else {
        return Status::BadArgument as i64;
    };
    if cpu.shared.is_active() {
        return Status::AlreadyActive as i64;
    }
    // SAFETY: EFER exists on every x86-64 CPU.
    let efer = unsafe { instr::rdmsr(instr::msr::EFER) };
    if efer & instr::EFER_SVME != 0 {
        return Status::SvmInUse as i64;
    }
    if instr::read_cr4() & instr::CR4_LA57 != 0 {
        return Status::La57Unsupported as i64;
    }
    let tsc_entry = instr::rdtsc();
    // SAFETY: `frame` is the frame qs_entry_activate pushed on this CPU, which is the one
    // being captured, still on the kernel's address space.
    let native = unsafe { arch::context::capture_native(&*frame, Status::Ok as u64) };
    // SAFETY: this CPU's own private part; it is not active, so nothing else runs on it.
    let p = unsafe { cpu.private() };
    let setup = VcpuSetup {
        msr_intercepts_pa: hv.msr_intercepts_pa,
        nested_root_pa: hv.npt_root_pa,
        host_cr3: hv.host.cr3,
        io_intercepts_pa: hv.pa_of(&devices::intercept::IO_INTERCEPTS),
    };
    p.run.entry_state = native;
    p.run.entry_state.rax = Status::VmrunFailed as i64 as u64;
    p.run.tsc_entry = tsc_entry;
    p.run.first_run = true;
    // The first VMRUN flushes everything (`prepare`).
    p.run.npt_seen = vmm::NPT_TLB.current();
    cpu.shared.apic_id.store(arch::context::apic_id(), Relaxed);
    cpu.shared.seen.store(true, Relaxed);
    // SAFETY: this CPU's own stopped part: it is not parked (not even active).
    debug::prepare_cpu(unsafe { &mut (*cpu.stopped.get()).dbg });
    cpu.shared.active.store(true, Release);
    LEFT_WHILE_ACTIVE.fetch_and(!(1u64 << (index % 64)), AcqRel);
    if COUNTERS.active_cpus.fetch_add(1, AcqRel) == 0 {
        COUNTERS.activations.fetch_add(1, Relaxed);
        // While dormant the kernel wrote its devices natively: what the hv shadowed is stale.
        devices::intercept::SHADOWS.forget();
        crate::net::CONFIG.forget();
    }
    // SAFETY: on the CPU `native` was captured from, on the kernel's address space; SVM is
    // supported (init) and not in use (checked above). qs_enter_host switches to the hv's
    // tables, which map this code and `cpu` at the same addresses, and never returns.
    unsafe {
        p.vcpu.prepare(&native, &setup);
        arch::enter_host(cpu as *const Cpu as *mut _, cpu.stack_top(), &hv.host)
    }
}

/// The run loop. `cpu` is this CPU's area; we are in host mode on the hv's stack.
///
/// # Safety
/// Only from `qs_enter_host`, with `cpu` this CPU's own area.
pub unsafe extern "C" fn host_main(cpu: *mut core::ffi::c_void) -> ! {
    let Some(hv) = vmm::get() else {
        instr::halt_forever()
    };
    // SAFETY: `activate` passes this CPU's area, which lives as long as the image.
    let cpu: &Cpu = unsafe { &*(cpu as *const Cpu) };
    // SAFETY: the private part is this CPU's alone; no other CPU ever makes a reference to
    // it (the leader of a stop works on `stopped`), so this one lives for the whole loop.
    let p = &mut unsafe { cpu.private() };
    let env = HvEnv {
        hv,
        me: cpu.shared.index,
        held: Default::default(),
    };
    loop {
        if p.run.first_run {
            let cycles = instr::rdtsc() - p.run.tsc_entry;
            cpu.shared.last_activate_cycles.store(cycles, Relaxed);
        }
        if vmm::NPT_TLB.must_flush(&mut p.run.npt_seen) {
            p.vcpu.flush_tlb();
        }
        p.vcpu
            .set_tsc_offset(checkpoint::GUEST_TSC_OFFSET.load(Relaxed));
        // SAFETY: host mode on this CPU, after `prepare` in `activate`.
        let exit = unsafe { p.vcpu.run() };
        let t = instr::rdtsc();
        p.run.tsc_exit = t;
        let first = core::mem::replace(&mut p.run.first_run, false);
        Shared::add(&cpu.shared.exits[exit.kind() as usize], 1);
        match exit {
            VmExit::LostGuestState => lost_guest_state(cpu, p.vcpu),
            VmExit::VmrunFailed => {
                COUNTERS.unexpected_exit(p.vcpu.exit_record(env.me));
                if first {
                    // The VMCB may now hold host state (FACTS.md); the captured entry state
                    // is the one to return to, with RAX = VmrunFailed.
                    let native = p.run.entry_state;
                    step_out(hv, cpu, p, &native);
                }
                fatal(env.me, "VMRUN failed after the guest ran", p.vcpu);
            }
            // An event these exits interrupted is delivered again, unless the handler
            // injects another.
            VmExit::Nmi
            | VmExit::SoftwareInterrupt
            | VmExit::Breakpoint
            | VmExit::DebugException { .. } => p.vcpu.reinject_interrupted(),
            _ => {}
        }
        let action = match exit {
            VmExit::SoftwareInterrupt | VmExit::Breakpoint | VmExit::DebugException { .. } => {
                // SAFETY: this CPU's own stopped part, while it runs (not parked).
                let st = unsafe { &mut *cpu.stopped.get() };
                debug::exit::handle(hv, p.vcpu, st, exit)
            }
            _ => exit::handle(exit, p.vcpu, &env),
        };
        apply(hv, cpu, p, action);
        Shared::add(&cpu.shared.cycles_in_hv, instr::rdtsc() - t);
    }
}

/// Carries out `action` until the guest can run again (or this CPU steps out).
fn apply(hv: &'static Hv, cpu: &Cpu, p: &mut Private, mut action: Action) {
    loop {
        action = match action {
            Action::Resume => {
                p.vcpu.reinject_interrupted();
                return;
            }
            Action::Run => return,
            Action::Inject(e) => {
                p.vcpu.inject(e);
                return;
            }
            Action::Complete(insn, then) => {
                if !skip(hv, p.vcpu, insn) {
                    unexpected(hv, cpu, p);
                }
                match then {
                    Then::Leave => leave(hv, cpu, p),
                    Then::Park(stop) => Action::Park(stop),
                    Then::Run => {
                        // SAFETY: this CPU's own stopped part, while it runs.
                        let st = unsafe { &mut *cpu.stopped.get() };
                        match debug::after_instruction(hv, p.vcpu, st, insn) {
                            Some(stop) => Action::Park(stop),
                            None => return,
                        }
                    }
                }
            }
            Action::Park(stop) => park(hv, cpu, p, Some(stop)),
            Action::Follow => park(hv, cpu, p, None),
            Action::Leave => leave(hv, cpu, p),
            Action::Unexpected => unexpected(hv, cpu, p),
            Action::Reset => reset(cpu.shared.index, p.vcpu),
        }
    }
}

/// The clients of the rendezvous.
const CLIENT_DEBUG: ClientId = 1;
const CLIENT_FREEZE: ClientId = 2;
const CLIENT_CHECKPOINT: ClientId = 3;

/// The hv's rendezvous: every stop of every client goes through it.
pub static STOP: Rendezvous = Rendezvous::new(2000);

/// CPUs that stepped out while others stayed in guest mode (an unexpected exit, a straggler
/// leaving after a debugger's detach, or one CPU of a deactivation under way): one of them
/// runs natively, so no checkpoint may be taken or restored (its writes escape the log).
/// Cleared for a CPU when it activates again, and for all when the last one leaves.
pub static LEFT_WHILE_ACTIVE: AtomicU64 = AtomicU64::new(0);

/// Captures this CPU's state, stops with the others (for `stop`, or following the leader's
/// NMI when `None`), and once released, writes back what a client changed and lets that
/// client decide how this CPU goes on.
fn park(hv: &'static Hv, cpu: &Cpu, p: &mut Private, stop: Option<Stop>) -> Action {
    let me = cpu.shared.index;
    {
        // SAFETY: this CPU's own stopped part: it is not parked yet. The borrow ends before
        // the rendezvous, during which the leader may use it.
        let st = unsafe { &mut *cpu.stopped.get() };
        st.dirty = 0;
        // SAFETY: host mode on this CPU, after an exit.
        unsafe { p.vcpu.save_state(&mut st.state) };
        if let Some(Stop::Debug(reason)) = stop {
            st.dbg.reason = reason;
        }
    }
    let platform = HvPlatform { hv };
    let released = match stop {
        None => STOP.follow(&platform, me),
        Some(Stop::Debug(_)) => Some(STOP.enter(&platform, me, CLIENT_DEBUG, |g| {
            debug::session::lead(hv, Parked::new(hv, g))
        })),
        Some(Stop::Freeze) => Some(STOP.enter(&platform, me, CLIENT_FREEZE, |g| {
            freeze::lead(hv, Parked::new(hv, g))
        })),
        Some(Stop::Checkpoint) => Some(STOP.enter(&platform, me, CLIENT_CHECKPOINT, |g| {
            checkpoint::lead(hv, Parked::new(hv, g))
        })),
    };
    // SAFETY: released (or never parked): this CPU's own stopped part again.
    let st = unsafe { &mut *cpu.stopped.get() };
    let Some((release, client)) = released else {
        // The NMI came after the stop it was for was over.
        return debug::straggler(hv, p.vcpu, st);
    };
    checkpoint::settle(me);
    if st.dirty != 0 {
        // SAFETY: host mode on this CPU; the state was captured here and changed only by a
        // client within the limits it checks.
        unsafe { p.vcpu.restore_state(&st.state, st.dirty) };
        st.dirty = 0;
    }
    if stop == Some(Stop::Freeze) && client != CLIENT_FREEZE {
        // A debugger's stop began first and this CPU joined it: that freeze did not happen.
        freeze::abandon(hv, p.vcpu);
    }
    if stop == Some(Stop::Checkpoint) && client != CLIENT_CHECKPOINT {
        checkpoint::abandon(hv, p.vcpu);
    }
    let action = match client {
        CLIENT_FREEZE => freeze::resumed(hv, me, p.vcpu, st, release),
        CLIENT_CHECKPOINT => checkpoint::resumed(hv, me, p.vcpu, st, release),
        _ => debug::resumed(hv, p.vcpu, st, release),
    };
    if matches!(action, Action::Run | Action::Leave) && checkpoint::take_owed_nmi(me) {
        // After a rollback, the NMI that tells the agent (on whichever CPU led the stop). A
        // rollback leaves a checkpoint kept, so this CPU stays in guest mode anyway.
        return Action::Inject(arch::Event::Nmi);
    }
    if action == Action::Leave && checkpoint::kept() {
        // A debugger's detach steps out by default; kept checkpoints need every CPU in guest
        // mode (a native CPU's writes escape the log), so the CPU runs on under the hv.
        return Action::Run;
    }
    action
}

/// The leader's proof that CPUs are parked, and its access to their stopped state. Made only
/// from the rendezvous' [`Gathered`] inside a leader callback; it must not outlive the
/// callback (the debugger keeps it in its session only while it leads, see
/// `debug::session::lead`). Not `Clone`: one owner, whose `&mut self` keeps its borrows of
/// other CPUs' areas one at a time.
pub struct Parked {
    hv: &'static Hv,
    leader: u32,
}

impl Parked {
    fn new(hv: &'static Hv, g: &Gathered<'_>) -> Parked {
        Parked {
            hv,
            leader: g.leader(),
        }
    }

    pub fn leader(&self) -> u32 {
        self.leader
    }

    pub fn is_parked(&self, i: u32) -> bool {
        i < self.hv.cpus && STOP.is_parked(i)
    }

    /// The parked CPUs.
    pub fn parked(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.hv.cpus).filter(|&i| self.is_parked(i))
    }

    /// CPU `i`'s stopped state, if it is parked.
    pub fn get(&mut self, i: u32) -> Option<&mut Stopped> {
        if !self.is_parked(i) {
            return None;
        }
        let cpu = self.hv.cpu(i)?;
        // SAFETY: CPU `i` is parked: it holds no reference to its stopped part from before
        // it parked until it is released (`park`), and only the leader, which owns the one
        // `Parked` of this stop, reaches it meanwhile; `&mut self` keeps one borrow at a time.
        Some(unsafe { &mut *cpu.stopped.get() })
    }

    /// CPU `i`'s stopped state, read-only.
    pub fn peek(&self, i: u32) -> Option<&Stopped> {
        if !self.is_parked(i) {
            return None;
        }
        let cpu = self.hv.cpu(i)?;
        // SAFETY: as in `get`; `&self` rules out a `&mut` from `get` at the same time.
        Some(unsafe { &*cpu.stopped.get() })
    }

    /// Tells parked CPU `i` what to do when released.
    pub fn set_release(&self, i: u32, r: Release) {
        STOP.set_release(i, r);
    }

    pub fn release_of(&self, i: u32) -> Release {
        STOP.release_of(i)
    }

    pub fn release_all(&self, r: Release) {
        for i in self.parked() {
            self.set_release(i, r);
        }
    }
}

/// The machine, as the rendezvous needs it.
struct HvPlatform<'a> {
    hv: &'a Hv,
}

impl Platform for HvPlatform<'_> {
    fn now(&self) -> u64 {
        instr::rdtsc()
    }
    fn ticks_per_ms(&self) -> u64 {
        self.hv.tsc_khz as u64
    }
    fn send_nmi(&self, cpu: u32) {
        if let Some(c) = self.hv.cpu(cpu) {
            // SAFETY: host mode; the target intercepts NMIs (every VMCB does) and expects
            // this one (a stop NMI, `nmi_expected`) or is parked and takes it as its wake.
            unsafe { instr::send_nmi(c.shared.apic_id()) };
        }
    }
    fn sleep_until_nmi(&self, _me: u32) -> bool {
        // SAFETY: host mode with RFLAGS.IF = 0 (the hv runs with interrupts off), the hv's IDT
        // loaded: only an NMI ends the HLT, into the hv's handler, which returns.
        unsafe { arch::sleep_until_nmi() }
    }
    fn take_nmi(&self, _me: u32) -> bool {
        // SAFETY: as above.
        unsafe { arch::take_nmi() }
    }
    fn in_guest(&self, cpu: u32) -> bool {
        self.hv.cpu(cpu).is_some_and(|c| c.shared.is_active())
    }
    fn expected(&self) -> u32 {
        COUNTERS.active_cpus.load(Acquire)
    }
    fn cpus(&self) -> u32 {
        self.hv.cpus
    }
}

/// The hv, as the exit handlers need it.
struct HvEnv<'a> {
    hv: &'a Hv,
    me: u32,
    /// This CPU's alone, for as long as its run loop.
    held: core::cell::Cell<exit::nmi::Held>,
}

impl exit::Env for HvEnv<'_> {
    fn cpu_index(&self) -> u32 {
        self.me
    }
    fn control(&self, op: Op, buf_gpa: u64, len: u64) -> i64 {
        self.hv.control_phys(op, buf_gpa, len)
    }
    fn freeze_request(&self, buf_gpa: u64, len: u64) -> i64 {
        self.hv.freeze_request(self.me, buf_gpa, len)
    }
    fn checkpoint_request(&self, rollback: bool, buf_gpa: u64, len: u64) -> i64 {
        self.hv.checkpoint_request(self.me, rollback, buf_gpa, len)
    }
    fn copy_on_write(&self, gpa: u64) -> checkpoint::Cow {
        checkpoint::write_fault(self.hv, gpa)
    }
    fn checkpoints_kept(&self) -> bool {
        checkpoint::kept()
    }
    fn take_stop_nmi(&self) -> bool {
        STOP.nmi_was_expected(self.me)
    }
    fn held_nmis(&self) -> exit::nmi::Held {
        self.held.get()
    }
    fn set_held_nmis(&self, held: exit::nmi::Held) {
        self.held.set(held);
    }
    fn page_owner(&self, gpa: u64) -> npf::Owner {
        if self.hv.owns(gpa) {
            npf::Owner::Hv
        } else {
            npf::Owner::Nobody
        }
    }
    fn refuse_hv_access(&self, gpa: u64) -> bool {
        self.hv.map_to_scratch(gpa)
    }
    fn msr_refused(&self) {
        COUNTERS.msr_refusals.fetch_add(1, Relaxed);
    }
    fn svm_instruction_refused(&self) {
        COUNTERS.svm_insn_refusals.fetch_add(1, Relaxed);
    }
    fn hv_access_refused(&self, gpa: u64) {
        COUNTERS.hv_refusals.fetch_add(1, Relaxed);
        COUNTERS.last_refused_gpa.store(gpa, Relaxed);
    }
    fn port_in(&self, port: u16, size: u8) -> u32 {
        if crate::net::config_space::PORTS.contains(&port) {
            return crate::net::CONFIG.guest_in(self.me as usize, port, size, &mut GuestPorts);
        }
        GuestPorts.read(port, size)
    }
    fn port_out(&self, port: u16, size: u8, value: u32) {
        if crate::net::config_space::PORTS.contains(&port) {
            let cpu = self.me as usize;
            return crate::net::CONFIG.guest_out(cpu, port, size, value, &mut GuestPorts);
        }
        devices::intercept::SHADOWS
            .guest_write(port, size, value, || GuestPorts.write(port, size, value));
    }
}

/// The intercepted ports, accessed on the guest's behalf.
struct GuestPorts;

impl crate::net::config_space::Ports for GuestPorts {
    fn read(&mut self, port: u16, size: u8) -> u32 {
        // SAFETY: the guest's own IN (or, for CONFIG_DATA, the CONFIG_ADDRESS write that
        // stands for the guest's own before it), which the CPU checked against the guest's
        // IOPL and TSS permission bitmap before the intercept (APM vol. 2, 15.10.1),
        // performed on the same CPU with the guest's operand size: the device sees the
        // access it would have seen without the hv.
        unsafe {
            match size {
                1 => instr::inb(port) as u32,
                2 => instr::inw(port) as u32,
                _ => instr::inl(port),
            }
        }
    }
    fn write(&mut self, port: u16, size: u8, value: u32) {
        // SAFETY: as for `read`: the guest's own OUT, checked and performed as it would have
        // been.
        unsafe {
            match size {
                1 => instr::outb(port, value as u8),
                2 => instr::outw(port, value as u16),
                _ => instr::outl(port, value),
            }
        }
    }
}

/// Steps out where the guest is.
fn leave(hv: &Hv, cpu: &Cpu, p: &mut Private) -> ! {
    let native = p.vcpu.native_state();
    step_out(hv, cpu, p, &native)
}

/// Advances the guest's RIP past `insn`; false if the bytes there are not `insn`.
fn skip(hv: &Hv, vcpu: &mut Vcpu, insn: Insn) -> bool {
    if let Some(len) = insn.reported_length() {
        // The exit said how long it is: nothing to read.
        vcpu.skip(len as u64);
        return true;
    }
    let mut bytes = [0u8; 15];
    if !vmm::read_guest_insn(hv, vcpu.cr3(), vcpu.rip(), &mut bytes) {
        return false;
    }
    match decode::length(insn, &bytes) {
        Ok(len) => {
            vcpu.skip(len as u64);
            true
        }
        Err(_) => false,
    }
}

/// The unexpected-exit policy: record, then step out at the exiting instruction.
fn unexpected(hv: &Hv, cpu: &Cpu, p: &mut Private) -> ! {
    COUNTERS.unexpected_exit(p.vcpu.exit_record(cpu.shared.index));
    leave(hv, cpu, p)
}

/// Leaves guest mode on this CPU for good (until the next activation).
fn step_out(hv: &Hv, cpu: &Cpu, p: &mut Private, native: &NativeState) -> ! {
    // An unexpected exit's policy: kept checkpoints cannot stay exact once a CPU runs natively.
    checkpoint::cpu_left(hv);
    cpu.shared.active.store(false, Release);
    cpu.shared
        .last_deactivate_cycles
        .store(instr::rdtsc() - p.run.tsc_exit, Relaxed);
    if COUNTERS.active_cpus.fetch_sub(1, AcqRel) != 1 {
        LEFT_WHILE_ACTIVE.fetch_or(1u64 << (cpu.shared.index % 64), AcqRel);
    } else {
        LEFT_WHILE_ACTIVE.store(0, Release);
        COUNTERS.deactivations.fetch_add(1, Relaxed);
        hv.reset_guest_view();
        // Natively the kernel reads the CPU's own TSC: a later activation starts from there.
        checkpoint::GUEST_TSC_OFFSET.store(0, Relaxed);
    }
    // SAFETY: host mode on this CPU after its last exit; the hv's memory is mapped at the same
    // address in the kernel's tables (the agent's mapping).
    unsafe { arch::leave_native(native) }
}

/// The SHUTDOWN policy: the guest triple-faulted; do what bare metal does and reset.
fn reset(index: u32, vcpu: &Vcpu) -> ! {
    let _ = writeln!(
        crate::serial::Com1,
        "\r\nquicksilver hv: guest shutdown (triple fault) on cpu {index}; resetting the machine\r\n\
         quicksilver hv: last state (undefined on silicon, exact under TCG): {:x?}",
        vcpu.exit_record(index)
    );
    hard_reset()
}

/// An exit that brought back the hv's own state instead of the guest's: nothing to return
/// the kernel to on this CPU. Say what happened, then reset as for a triple fault.
fn lost_guest_state(cpu: &Cpu, vcpu: &Vcpu) -> ! {
    let index = cpu.shared.index;
    let _ = writeln!(
        crate::serial::Com1,
        "\r\nquicksilver hv: cpu {index}: exit {:#x} returned the hv's own state instead of the \
         kernel's (a race in stock QEMU's TCG: run the patched QEMU that `cargo xtask setup` \
         builds, see the README); the kernel cannot go on; resetting the machine\r\n\
         quicksilver hv: {:x?}",
        vcpu.exit_code(),
        vcpu.exit_record(index)
    );
    hard_reset()
}

/// Resets the machine, as bare metal does after a triple fault.
fn hard_reset() -> ! {
    // SAFETY: the machine is going down; 0xCF9 = 0x06 is the PCI reset control's hard reset.
    unsafe { instr::outb(0xCF9, 0x06) };
    instr::halt_forever()
}

/// A failure the hv cannot step out of: report and stop this CPU.
fn fatal(cpu: u32, what: &str, vcpu: &Vcpu) -> ! {
    let r = vcpu.exit_record(cpu);
    let _ = writeln!(
        crate::serial::Com1,
        "\r\nquicksilver hv: cpu {cpu}: {what}: {r:x?}"
    );
    instr::halt_forever()
}

/// An exception in host mode (an hv bug): report on the serial port and stop this CPU.
///
/// # Safety
/// Only from `qs_host_exc_common`, with the frame it pushed.
pub unsafe extern "C" fn host_exception(frame: *const [u64; 7]) -> ! {
    // SAFETY: qs_host_exc_common passes the 7-word frame it just pushed.
    let f = unsafe { *frame };
    let _ = writeln!(
        crate::serial::Com1,
        "\r\nquicksilver hv: exception {} (error {:#x}) in host mode at {:#x}, rsp {:#x}; cr2 {:#x}",
        f[0],
        f[1],
        f[2],
        f[5],
        instr::read_cr2()
    );
    instr::halt_forever()
}

/// Memory the image asks for per CPU, as written into its header.
pub const fn mem_per_cpu() -> u64 {
    core::mem::size_of::<Cpu>() as u64
}

/// The exit kinds, for `monitor stats`.
pub fn exit_count(s: &CpuStats, k: ExitKind) -> u64 {
    s.exits[k as usize]
}
