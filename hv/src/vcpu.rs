//! One CPU's life under the hv: activation, the run loop, stepping out.
//!
//! `activate` runs on the kernel's stack and address space in the agent's IPI on that CPU; it
//! captures the CPU's live state so that the guest continues as if `qs_entry_activate` had
//! just returned 0, then enters host mode (`qs_enter_host`) where `host_main` runs the guest
//! until a hypercall or an unexpected exit sends this CPU back to native execution.

use crate::arch::instr;
use crate::arch::svm::{self, vmcb, EntryFrame, GuestRegs, NativeState, Vmcb, VmcbSetup};
use crate::debug;
use crate::decode::{self, Insn};
use crate::exit::{self, Action, GuestCpu};
use crate::vmm::{self, COUNTERS};
use core::fmt::Write;
use core::sync::atomic::Ordering::*;
use quicksilver_proto::abi::{Op, Status};
use quicksilver_proto::stats::CpuStats;

/// Bytes of host stack per CPU.
pub const STACK_SIZE: usize = 36 * 1024;

/// A CPU's private state; lives in the third page of its [`Cpu`] area.
#[repr(C, align(4096))]
pub struct CpuState {
    index: u32,
    /// In guest mode now (written by this CPU only).
    active: bool,
    /// The next exit is the first of this activation.
    first_run: bool,
    vmcb_pa: u64,
    host_save_pa: u64,
    pub(crate) regs: GuestRegs,
    /// Native state at activation, returned to if the first VMRUN fails.
    entry_state: NativeState,
    /// TSC when `activate` was entered and when the last exit arrived.
    tsc_entry: u64,
    tsc_exit: u64,
    stats: CpuStats,
    /// The debugger's view of this CPU.
    pub dbg: crate::debug::PerCpu,
}

impl CpuState {
    pub fn index(&self) -> u32 {
        self.index
    }

    /// In guest mode (read by other CPUs: a volatile read of a flag its CPU writes).
    pub fn is_active(&self) -> bool {
        // SAFETY: a valid, aligned bool field.
        unsafe { core::ptr::read_volatile(&self.active) }
    }

    /// A copy of this CPU's counters (they are only written by their CPU; torn reads of a
    /// counter being incremented cannot happen for aligned u64 on x86-64).
    pub fn stats_snapshot(&self) -> CpuStats {
        // SAFETY: `stats` and `active` are valid, aligned fields; volatile reads keep the
        // compiler from assuming no other CPU writes them.
        unsafe {
            let mut s = core::ptr::read_volatile(&self.stats);
            s.active = core::ptr::read_volatile(&self.active) as u32;
            s
        }
    }
}

/// A CPU's area in the hv's memory: VMCB, host save area, state, stack (48 KiB).
#[repr(C, align(4096))]
pub struct Cpu {
    pub(crate) vmcb: Vmcb,
    host_save: [u8; 4096],
    pub state: CpuState,
    stack: [u8; STACK_SIZE],
}

const _: () = assert!(core::mem::size_of::<CpuState>() == 4096);
const _: () = assert!(core::mem::size_of::<Cpu>() == 48 * 1024);

impl Cpu {
    /// Prepares the area at `cpu` (physical address `pa`) for CPU `index`.
    ///
    /// # Safety
    /// `cpu` must point to an unused, page-aligned area of `size_of::<Cpu>()` bytes of the hv's
    /// memory, at physical address `pa`.
    pub unsafe fn init_in_place(cpu: *mut Cpu, index: u32, pa: u64) {
        // SAFETY: forwarded; an all-zero Cpu is valid (plain integers and bools).
        unsafe {
            core::ptr::write_bytes(cpu, 0, 1);
            let s = &mut (*cpu).state;
            s.index = index;
            s.vmcb_pa = pa;
            s.host_save_pa = pa + 4096;
        }
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
    if index >= hv.cpus {
        return Status::BadArgument as i64;
    }
    // SAFETY: index < cpus; this CPU is the only user of its own area.
    let cpu = unsafe { &mut *hv.cpu(index) };
    if cpu.state.active {
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
    let native = unsafe { svm::capture_native(&*frame, Status::Ok as u64) };
    let setup = VmcbSetup {
        msrpm_pa: hv.msrpm_pa,
        npt_root_pa: hv.npt_root_pa,
    };
    // SAFETY: as above.
    unsafe { svm::build_vmcb(&mut cpu.vmcb, &native, &setup) };
    let s = &mut cpu.state;
    s.regs = native.regs;
    s.entry_state = native;
    s.entry_state.rax = Status::VmrunFailed as i64 as u64;
    s.tsc_entry = tsc_entry;
    s.first_run = true;
    s.active = true;
    s.stats.seen = 1;
    crate::debug::prepare_cpu(&mut s.dbg);
    if COUNTERS.active_cpus.fetch_add(1, AcqRel) == 0 {
        COUNTERS.activations.fetch_add(1, Relaxed);
    }
    // SAFETY: SVM is supported and not in use (checked in init and above); VM_HSAVE_PA is
    // this CPU's own page. qs_enter_host switches to the hv's tables, which map this code
    // and `cpu` at the same addresses, and never returns.
    unsafe {
        instr::wrmsr(instr::msr::EFER, efer | instr::EFER_SVME);
        instr::wrmsr(instr::msr::VM_HSAVE_PA, s.host_save_pa);
        svm::qs_enter_host(cpu, cpu.stack_top(), &hv.host)
    }
}

/// The view of a CPU the exit handlers get.
struct Guest<'a> {
    hv: &'a vmm::Hv,
    cpu: &'a mut Cpu,
}

impl GuestCpu for Guest<'_> {
    fn index(&self) -> u32 {
        self.cpu.state.index
    }
    fn set_cpuid_result(&mut self, r: [u32; 4]) {
        self.cpu.vmcb.save.rax = r[0] as u64;
        self.cpu.state.regs.rbx = r[1] as u64;
        self.cpu.state.regs.rcx = r[2] as u64;
        self.cpu.state.regs.rdx = r[3] as u64;
    }
    fn set_rax(&mut self, v: u64) {
        self.cpu.vmcb.save.rax = v;
    }
    fn set_efer(&mut self, v: u64) {
        self.cpu.vmcb.save.efer = v;
    }
    fn refuse_hv_access(&mut self, gpa: u64) -> bool {
        let done = self.hv.map_to_scratch(gpa);
        if done {
            // The guest's TLB may hold the not-present walk; flush this ASID on re-entry.
            self.cpu.vmcb.control.tlb_control = vmcb::tlb_control::FLUSH_GUEST;
        }
        done
    }
    fn control(&mut self, op: Op, buf_gpa: u64, len: u64) -> i64 {
        self.hv.control_phys(op, buf_gpa, len)
    }
}

/// The run loop. `cpu` is this CPU's area; we are in host mode on the hv's stack.
///
/// # Safety
/// Only from `qs_enter_host`, with `cpu` this CPU's own area.
pub unsafe extern "C" fn host_main(cpu: *mut Cpu) -> ! {
    let Some(hv) = vmm::get() else {
        instr::halt_forever()
    };
    let cpu_ptr = cpu;
    // SAFETY: `cpu` is this CPU's own area, passed by `activate`; only this CPU uses it.
    // The debugger's leader reads and writes it only while this CPU is parked (debug::stop).
    let cpu = unsafe { &mut *cpu };
    loop {
        if cpu.state.first_run {
            cpu.state.stats.last_activate_cycles = instr::rdtsc() - cpu.state.tsc_entry;
        }
        // SAFETY: the VMCB was built by `activate` and is updated only by this loop; VMRUN's
        // consistency checks catch anything wrong, reported as VmrunFailed below.
        unsafe { svm::qs_run_guest(&mut cpu.state.regs, cpu.state.vmcb_pa) };
        let t = instr::rdtsc();
        cpu.state.tsc_exit = t;
        let first = core::mem::replace(&mut cpu.state.first_run, false);
        let c = &mut cpu.vmcb.control;
        c.tlb_control = vmcb::tlb_control::DO_NOTHING;
        c.event_inj = 0;

        if cpu.vmcb.save.cr3 == hv.host.cr3 {
            // The save area holds the hv's own state (its CR3, CS, RIP after VMRUN), not the
            // guest's: the kernel's state on this CPU is gone. Stock QEMU's TCG does this to
            // CPU 0 now and then (another vCPU's FPU load stores back a stale copy of CPU 0's
            // SVM flags: xtask/src/emulator.rs); never VMRUN it (that "guest" would run the
            // hv's code under nested paging and triple-fault).
            lost_guest_state(cpu)
        }
        let exit = svm::decode_exit(&cpu.vmcb, &cpu.state.regs);
        cpu.state.stats.exits[exit.kind() as usize] += 1;
        if exit == exit::VmExit::VmrunFailed {
            COUNTERS.unexpected_exit(svm::exit_record(cpu.state.index, &cpu.vmcb));
            if first {
                // The VMCB may now hold host state (FACTS.md); the captured entry state is
                // the one to return to, with RAX = VmrunFailed.
                let native = cpu.state.entry_state;
                step_out(hv, cpu, &native);
            }
            fatal(
                cpu.state.index,
                "VMRUN failed after the guest ran",
                &cpu.vmcb,
            );
        }
        let action = exit::handle(exit, &mut Guest { hv, cpu: &mut *cpu }, &COUNTERS);
        match action {
            Action::Resume => reinject(&mut cpu.vmcb),
            Action::Complete(insn) => {
                if !skip(hv, cpu, insn) {
                    unexpected(hv, cpu);
                }
                let hypercall = insn == Insn::Vmmcall;
                // SAFETY: our own area; `cpu` is not used during the call.
                let after = unsafe { debug::after_completed(hv, cpu_ptr, hypercall) };
                if let debug::After::Leave = after {
                    leave(hv, cpu);
                }
            }
            Action::Debug(e) => {
                reinject(&mut cpu.vmcb);
                // SAFETY: as above.
                match unsafe { debug::handle_exit(hv, cpu_ptr, e) } {
                    debug::After::Run => {}
                    debug::After::Leave => leave(hv, cpu),
                    debug::After::Unexpected => unexpected(hv, cpu),
                }
            }
            Action::Inject(e) => cpu.vmcb.control.event_inj = svm::encode_event(e),
            Action::CompleteAndLeave => {
                if !skip(hv, cpu, Insn::Vmmcall) {
                    unexpected(hv, cpu);
                }
                let native = svm::native_from_guest(&cpu.vmcb, &cpu.state.regs);
                step_out(hv, cpu, &native);
            }
            Action::Unexpected => unexpected(hv, cpu),
            Action::Reset => reset(cpu),
        }
        cpu.state.stats.cycles_in_hv += instr::rdtsc() - t;
    }
}

/// Steps out where the guest is (the debugger detached with the deactivate policy).
fn leave(hv: &vmm::Hv, cpu: &mut Cpu) -> ! {
    let native = svm::native_from_guest(&cpu.vmcb, &cpu.state.regs);
    step_out(hv, cpu, &native)
}

/// Re-delivers an event the exit interrupted.
fn reinject(vmcb: &mut Vmcb) {
    if let Some(info) = svm::pending_event(vmcb) {
        vmcb.control.event_inj = info;
    }
}

/// Advances the guest's RIP past `insn`; false if the bytes there are not `insn`.
fn skip(hv: &vmm::Hv, cpu: &mut Cpu, insn: Insn) -> bool {
    let mut bytes = [0u8; 15];
    let s = &cpu.vmcb.save;
    if !vmm::read_guest_insn(hv, s.cr3, s.rip, &mut bytes) {
        return false;
    }
    match decode::length(insn, &bytes) {
        Ok(len) => {
            cpu.vmcb.save.rip += len as u64;
            // The instruction is done: an interrupt shadow it had (after STI or MOV SS) no
            // longer applies to the next one (APM 15.21.5).
            cpu.vmcb.control.interrupt_shadow &= !1;
            true
        }
        Err(_) => false,
    }
}

/// The unexpected-exit policy: record, then step out at the exiting instruction.
fn unexpected(hv: &vmm::Hv, cpu: &mut Cpu) -> ! {
    COUNTERS.unexpected_exit(svm::exit_record(cpu.state.index, &cpu.vmcb));
    let native = svm::native_from_guest(&cpu.vmcb, &cpu.state.regs);
    step_out(hv, cpu, &native)
}

/// Leaves guest mode on this CPU for good (until the next activation).
fn step_out(hv: &vmm::Hv, cpu: &mut Cpu, native: &NativeState) -> ! {
    cpu.state.active = false;
    cpu.state.stats.last_deactivate_cycles = instr::rdtsc() - cpu.state.tsc_exit;
    if COUNTERS.active_cpus.fetch_sub(1, AcqRel) == 1 {
        COUNTERS.deactivations.fetch_add(1, Relaxed);
        hv.reset_guest_view();
    }
    // SAFETY: host mode on this CPU after its last exit; the hv's memory is mapped at the same
    // address in the kernel's tables (the agent's mapping).
    unsafe { svm::leave_native(native) }
}

/// The SHUTDOWN policy: the guest triple-faulted; do what bare metal does and reset.
fn reset(cpu: &Cpu) -> ! {
    let _ = writeln!(
        crate::serial::Com1,
        "\r\nquicksilver hv: guest shutdown (triple fault) on cpu {}; resetting the machine\r\n\
         quicksilver hv: last state (undefined on silicon, exact under TCG): {:x?}",
        cpu.state.index,
        svm::exit_record(cpu.state.index, &cpu.vmcb)
    );
    hard_reset()
}

/// An exit that brought back the hv's own state instead of the guest's: nothing to return
/// the kernel to on this CPU. Say what happened, then reset as for a triple fault.
fn lost_guest_state(cpu: &Cpu) -> ! {
    let _ = writeln!(
        crate::serial::Com1,
        "\r\nquicksilver hv: cpu {}: exit {:#x} returned the hv's own state instead of the \
         kernel's (a race in stock QEMU's TCG: run the patched QEMU that `cargo xtask setup` \
         builds, see the README); the kernel cannot go on; resetting the machine\r\n\
         quicksilver hv: {:x?}",
        cpu.state.index,
        cpu.vmcb.control.exit_code,
        svm::exit_record(cpu.state.index, &cpu.vmcb)
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
fn fatal(cpu: u32, what: &str, vmcb: &Vmcb) -> ! {
    let r = svm::exit_record(cpu, vmcb);
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
