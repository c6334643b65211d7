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

pub use svm::{parts, Vcpu, VmcbSetup};
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
