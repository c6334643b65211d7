//! AMD SVM: the vendor layer (AMD APM vol. 2, chapter 15 "Secure Virtual Machine").
//!
//! [`Vcpu`] builds a VMCB from the live state of the CPU it runs on, runs the guest, turns
//! each #VMEXIT into a vendor-neutral [`crate::arch::VmExit`] and offers the neutral
//! [`crate::arch::VirtCpu`] interface; [`leave_native`] puts the guest's state back onto the
//! CPU when the hv steps out. Nothing above `arch/` knows the VMCB layout.
//!
//! The world switch (`world_switch.S`) is assembled by the module that owns its Rust entry
//! points (`crate::vcpu`); the declarations of its assembly routines are here.

pub mod iopm;
pub mod msrpm;
pub mod vmcb;

mod vcpu;

use crate::arch::context::{GuestRegs, HostContext, NativeState};
use crate::arch::instr;
pub use vcpu::{encode_event, parts, Vcpu, VcpuSetup};

extern "C" {
    /// See world_switch.S, step 2.
    pub fn qs_enter_host(
        cpu: *mut core::ffi::c_void,
        stack_top: u64,
        host: *const HostContext,
    ) -> !;
    /// See world_switch.S, step 3.
    pub fn qs_run_guest(regs: *mut GuestRegs, vmcb_pa: u64);
    /// See world_switch.S, step 4.
    pub fn qs_leave_native(state: *const NativeState, efer: u64, cs: u64, ss: u64) -> !;
    /// See world_switch.S, step 5: 32 stubs, 16 bytes apart.
    pub static qs_host_exc_stubs: [u8; 32 * 16];
    /// See world_switch.S, step 6.
    pub static qs_host_nmi: u8;
    /// See world_switch.S, step 7.
    pub fn qs_take_nmi() -> u32;
    /// See world_switch.S, step 7.
    pub fn qs_sleep_until_nmi() -> u32;
}

/// Puts `native` back onto this CPU and continues there, natively.
///
/// # Safety
/// Must run in host mode on the CPU `native` belongs to, after the guest's last #VMEXIT; the
/// hv's memory must be mapped at the same address in `native.cr3` (it is: the agent's
/// mapping), since this code keeps running for a few instructions after the switch.
pub unsafe fn leave_native(native: &NativeState) -> ! {
    // SAFETY: the caller guarantees host mode on the right CPU. The order matters:
    // - CR3 first, to the kernel's tables, which map this code and stack at the same address;
    // - then flush the whole TLB, global entries included (CR4.PGE off and on): the host's
    //   ASID still holds the kernel's global translations from before activation, and the
    //   guest flushed only its own ASID when it changed kernel mappings meanwhile (vfree'd
    //   stacks, text poking): native code must not see those stale entries;
    // - GDT and IDT next, so that once STGI lets held NMIs in they find the kernel's handlers;
    // - then, in qs_leave_native: kernel CS and SS (an NMI let in must return to kernel
    //   selectors: the guest's own if it was in the kernel, SYSCALL's from STAR if it was in
    //   user mode, since a far return to CPL 3 would also pop RSP and SS), STGI before
    //   clearing SVME (STGI needs SVME; FACTS.md), IRETQ last to the guest's own.
    unsafe {
        instr::write_cr3(native.cr3);
        instr::write_cr4(native.cr4 & !instr::CR4_PGE);
        instr::write_cr4(native.cr4);
        instr::write_cr0(native.cr0);
        instr::write_cr2(native.cr2);
        instr::lgdt(&native.gdtr);
        instr::lidt(&native.idtr);
        instr::write_dr7(native.dr7);
        let (cs, ss) = if native.cs & 3 == 0 {
            (native.cs, native.ss)
        } else {
            let kernel_cs = (instr::rdmsr(instr::msr::STAR) >> 32) & 0xFFFC;
            (kernel_cs, kernel_cs + 8)
        };
        qs_leave_native(native, native.efer & !instr::EFER_SVME, cs, ss)
    }
}

/// VMSAVE: stores FS, GS, TR, LDTR (with their hidden parts), KernelGsBase, STAR, LSTAR,
/// CSTAR, SFMASK and the SYSENTER MSRs from the CPU into the VMCB at `vmcb_pa` (APM 15.5.2).
///
/// # Safety
/// Host mode (EFER.SVME set); `vmcb_pa` is a VMCB of the hv's.
pub unsafe fn vmsave(vmcb_pa: u64) {
    // SAFETY: forwarded to the caller; VMSAVE writes only those fields of that VMCB.
    unsafe { core::arch::asm!("vmsave rax", in("rax") vmcb_pa, options(nostack)) };
}

/// VMLOAD: the inverse of [`vmsave`], loading those registers from the VMCB into the CPU.
///
/// # Safety
/// As [`vmsave`]; the fields must hold values valid for the guest (segments it set up,
/// canonical bases).
pub unsafe fn vmload(vmcb_pa: u64) {
    // SAFETY: forwarded to the caller.
    unsafe { core::arch::asm!("vmload rax", in("rax") vmcb_pa, options(nostack)) };
}

/// Did the CPU report SVM, NPT and 1 GiB pages, and did firmware leave SVM enabled?
pub fn check_support() -> Result<(), quicksilver_proto::abi::Status> {
    use quicksilver_proto::abi::Status;
    let ext = instr::cpuid(0x8000_0001, 0);
    if ext[2] & (1 << 2) == 0 {
        return Err(Status::NoSvm);
    }
    // SAFETY: VM_CR exists on every CPU that reports SVM (checked just above).
    if unsafe { instr::rdmsr(instr::msr::VM_CR) } & instr::VM_CR_SVMDIS != 0 {
        return Err(Status::SvmDisabled);
    }
    let svm = instr::cpuid(0x8000_000A, 0);
    if svm[3] & 1 == 0 || ext[3] & (1 << 26) == 0 {
        return Err(Status::NoNpt);
    }
    Ok(())
}
