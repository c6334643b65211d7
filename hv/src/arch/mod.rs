//! Everything that knows the CPU vendor or executes a privileged instruction.
//!
//! - [`virt_cpu`]: the vendor-neutral vCPU interface the layers above are written against
//!   ([`VirtCpu`], [`Event`], [`Gpr`]), and [`vm_exit`]: what an exit was, in neutral terms.
//! - [`context`]: the live CPU's state as plain types (what the world switch saves and loads).
//! - [`live`]: the part of a guest's state no world switch touches (XSAVE, DR0-3, CR8, the
//!   local APIC), read and written on the CPU itself.
//! - [`instr`]: the privileged instructions, one small `unsafe fn` each.
//! - [`svm`]: AMD SVM: the VMCB, the world switch, exit decoding. An Intel layer adds `vmx/`
//!   here and re-exports its `Vcpu` below; nothing above this module changes.
//!
//! Nothing outside this module executes a privileged instruction or knows the VMCB layout.

pub mod context;
pub mod instr;
pub mod live;
pub mod svm;
pub mod virt_cpu;
pub mod vm_exit;

pub use svm::{check_support, leave_native, parts, Vcpu, VcpuSetup};
pub use virt_cpu::{Event, Gpr, VirtCpu};
pub use vm_exit::VmExit;

/// Waits, halted, for an NMI (host mode, RFLAGS.IF = 0: nothing else ends the HLT). Returns
/// whether an NMI was taken; GIF is clear again on return.
///
/// # Safety
/// Host mode with RFLAGS.IF = 0, the hv's IDT loaded (its NMI handler only returns).
pub unsafe fn sleep_until_nmi() -> bool {
    // SAFETY: forwarded to the caller.
    unsafe { svm::qs_sleep_until_nmi() == 1 }
}

/// Takes an NMI held pending in host mode, if any; returns whether one was taken.
///
/// # Safety
/// As [`sleep_until_nmi`].
pub unsafe fn take_nmi() -> bool {
    // SAFETY: forwarded to the caller.
    unsafe { svm::qs_take_nmi() == 1 }
}

/// The vendor's I/O intercept map (SVM's I/O permission map), built at compile time from the
/// ports to intercept; a `static` of it is handed to every vCPU by physical address.
pub use svm::iopm::Iopm as IoIntercepts;

/// Bytes of the vendor's MSR intercept map (SVM's MSR permission map: two pages).
pub const MSR_INTERCEPTS_SIZE: usize = svm::msrpm::MSRPM_SIZE;

/// Fills the vendor's MSR intercept map: writes to EFER (the kernel must not clear SVME) and
/// to the vendor's own control MSRs (SVM's VM_CR and VM_HSAVE_PA) exit; nothing else does.
pub fn intercept_msr_writes(map: &mut [u8; MSR_INTERCEPTS_SIZE]) {
    for msr in [instr::msr::EFER, instr::msr::VM_CR, instr::msr::VM_HSAVE_PA] {
        svm::msrpm::intercept_write(map, msr);
    }
}

/// Enters host mode on this CPU for the first time (world_switch.S, step 2): the hv's stack,
/// CR3, GDT and IDT, then `host_main(cpu)`, which never returns.
///
/// # Safety
/// After `Vcpu::prepare` on this CPU; `cpu` is this CPU's area and `stack_top` its stack,
/// mapped at the same addresses in the hv's tables as in the kernel's.
pub unsafe fn enter_host(
    cpu: *mut core::ffi::c_void,
    stack_top: u64,
    host: &context::HostContext,
) -> ! {
    // SAFETY: forwarded to the caller.
    unsafe { svm::qs_enter_host(cpu, stack_top, host) }
}

/// Fills the hv's IDT: the 32 exception vectors go to the stubs in world_switch.S; the NMI
/// vector to the hv's NMI handler (NMIs the hv intercepted are taken on purpose: it only
/// returns).
///
/// # Safety
/// `idt` is a page of the hv's, with room for 256 16-byte gates.
pub unsafe fn build_host_idt(idt: *mut u64) {
    let stubs = core::ptr::addr_of!(svm::qs_host_exc_stubs) as u64;
    let nmi = core::ptr::addr_of!(svm::qs_host_nmi) as u64;
    for v in 0..32u64 {
        let handler = if v == 2 { nmi } else { stubs + v * 16 };
        // 64-bit interrupt gate (type 0xE), present, DPL 0, IST 0 (APM vol. 2, 4.8.4).
        let low = (handler & 0xFFFF)
            | ((context::HOST_CODE_SELECTOR as u64) << 16)
            | (0x8E << 40)
            | (((handler >> 16) & 0xFFFF) << 48);
        let high = handler >> 32;
        // SAFETY: the caller's page has room for 256 gates.
        unsafe {
            idt.add(2 * v as usize).write(low);
            idt.add(2 * v as usize + 1).write(high);
        }
    }
}
