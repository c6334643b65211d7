//! How the agent talks to the hv.
//!
//! While **dormant** the agent calls the image's entry points directly (the image is mapped
//! executable in the kernel's address space): `init` once, `activate` on every CPU (from an
//! IPI), `control` for statistics and the link. While **active** the hv's memory is invisible to the
//! guest, so the agent uses `VMMCALL` instead:
//!
//! | register | in | out |
//! | --- | --- | --- |
//! | RAX | [`HYPERCALL_MAGIC`] `|` op | [`Status`] as u64 |
//! | RBX | first argument | preserved |
//! | RCX | second argument | preserved |
//!
//! A `VMMCALL` from CPL > 0 gets `#UD`, as on a machine without a hypervisor.

/// Tag in the high half of RAX that marks a Quicksilver hypercall ("QS").
pub const HYPERCALL_MAGIC: u64 = 0x5153_0000_0000_0000;

/// Control operations, the same numbers for the dormant entry and for hypercalls.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Leave guest mode on this CPU (hypercall only, from the agent's IPI on each CPU).
    Deactivate = 1,
    /// Fill a [`crate::stats`] block: arg0 = buffer (kernel VA dormant, PA active), arg1 = len.
    Stats = 2,
    /// Start serving the serial link: buffer = port (u16 LE) then the key (may be empty: then
    /// every bridge is refused). The hv writes its replies to that UART itself.
    LinkConfig = 3,
    /// Bytes received on the link (the agent's interrupt handler reads the UART). Returns 1 if
    /// an authenticated bridge asked for attention (the agent then activates), else 0.
    LinkRx = 4,
    /// How many CPUs are in guest mode now (the agent's view can go stale: a debugger's detach
    /// steps every CPU out without the agent). Returns the count.
    ActiveCpus = 5,
}

impl Op {
    /// The op for a number, if known.
    pub fn from_u64(v: u64) -> Option<Op> {
        match v {
            1 => Some(Op::Deactivate),
            2 => Some(Op::Stats),
            3 => Some(Op::LinkConfig),
            4 => Some(Op::LinkRx),
            5 => Some(Op::ActiveCpus),
            _ => None,
        }
    }
}

/// CPUID leaf whose answer proves the hv is active on this CPU.
pub const CPUID_SIGNATURE_LEAF: u32 = 0x4000_0000;
/// CPUID leaf with the hv's ABI version (EAX) and this CPU's index (EBX).
pub const CPUID_INFO_LEAF: u32 = 0x4000_0001;
/// EBX, ECX, EDX of the signature leaf spell this.
pub const CPUID_SIGNATURE: [u8; 12] = *b"Quicksilver\0";

/// Arguments to the `init` entry point.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InitArgs {
    /// Kernel virtual address where the image starts; the block is contiguous and mapped RWX.
    pub base_va: u64,
    /// Physical address of the same first byte (the block is physically contiguous).
    pub base_pa: u64,
    /// Bytes in the block: the image rounded up to a page, then the working memory.
    pub mem_size: u64,
    /// Physical addresses below this are identity-mapped into the guest (RAM and MMIO).
    pub phys_limit: u64,
    /// Possible CPUs; `activate` is called with indices below this.
    pub cpus: u32,
    /// TSC frequency in kHz, to turn cycles into time.
    pub tsc_khz: u32,
    /// Where the kernel's text (`_text`) runs, and where it was linked: their difference is
    /// the KASLR offset the debugger reports (qOffsets, `monitor kaslr`). 0 if unknown.
    pub kernel_text: u64,
    pub kernel_text_link: u64,
}

const _: () = assert!(core::mem::size_of::<InitArgs>() == 56);

/// What an entry point or hypercall returns: 0 for success, otherwise a code that names the
/// cause. The numbers are ABI.
#[repr(i64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// CPUID says the CPU has no AMD SVM.
    NoSvm = 1,
    /// SVM is disabled by firmware (VM_CR.SVMDIS).
    SvmDisabled = 2,
    /// EFER.SVME is already set: another hypervisor (such as kvm_amd) owns SVM.
    SvmInUse = 3,
    /// The CPU has no nested paging.
    NoNpt = 4,
    /// The memory given to `init` is too small.
    NotEnoughMemory = 5,
    /// More CPUs than the image supports.
    TooManyCpus = 6,
    /// An argument is out of range.
    BadArgument = 7,
    /// The hv is already active on this CPU.
    AlreadyActive = 8,
    /// The hv is not active.
    NotActive = 9,
    /// VMRUN failed its consistency checks; the CPU stayed native.
    VmrunFailed = 10,
    /// Unknown operation.
    BadOp = 11,
    /// The buffer is too small for the answer.
    BufferTooSmall = 12,
    /// `init` has not run, or failed.
    NotInitialized = 13,
    /// The CPU runs 5-level paging, which the hv does not support yet.
    La57Unsupported = 14,
}

impl Status {
    /// The status for a returned value.
    pub fn from_i64(v: i64) -> Option<Status> {
        use Status::*;
        Some(match v {
            0 => Ok,
            1 => NoSvm,
            2 => SvmDisabled,
            3 => SvmInUse,
            4 => NoNpt,
            5 => NotEnoughMemory,
            6 => TooManyCpus,
            7 => BadArgument,
            8 => AlreadyActive,
            9 => NotActive,
            10 => VmrunFailed,
            11 => BadOp,
            12 => BufferTooSmall,
            13 => NotInitialized,
            14 => La57Unsupported,
            _ => return None,
        })
    }

    /// What went wrong and what to do, in one line.
    pub fn message(self) -> &'static str {
        use Status::*;
        match self {
            Ok => "ok",
            NoSvm => "this CPU has no AMD SVM: Quicksilver needs AMD-V (Intel VMX comes later)",
            SvmDisabled => "SVM is disabled by firmware (VM_CR.SVMDIS): enable SVM/AMD-V in the BIOS",
            SvmInUse => {
                "EFER.SVME is already set: another hypervisor (kvm_amd?) owns SVM; stop its VMs or unload it"
            }
            NoNpt => "this CPU has no nested paging (NPT), which the hv needs",
            NotEnoughMemory => "the hv was given too little memory: a bug in the agent, please report",
            TooManyCpus => "more CPUs than this hv image supports: rebuild with a larger MAX_CPUS",
            BadArgument => "bad argument to the hv",
            AlreadyActive => "the hypervisor is already active",
            NotActive => "the hypervisor is not active (dormant)",
            VmrunFailed => "VMRUN failed its consistency checks; the CPU stayed native (see qsctl stats)",
            BadOp => "unknown operation",
            BufferTooSmall => "buffer too small",
            NotInitialized => "the hv image is not initialized",
            La57Unsupported => "5-level paging is not supported yet",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_round_trips() {
        for v in 0..=14 {
            let s = Status::from_i64(v).unwrap();
            assert_eq!(s as i64, v);
            assert!(!s.message().is_empty());
        }
        assert_eq!(Status::from_i64(15), None);
    }
}
