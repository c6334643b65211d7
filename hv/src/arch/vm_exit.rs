//! A #VMEXIT in vendor-neutral terms: what the vendor layer's `run` returns. SVM-only
//! instructions appear as what the guest executed (an Intel layer maps VMX's to the same
//! variants: the policy, #UD, is the same).

use quicksilver_proto::stats::ExitKind;

/// A #VMEXIT, in vendor-neutral terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    Cpuid {
        leaf: u32,
        subleaf: u32,
    },
    MsrWrite {
        msr: u32,
        value: u64,
    },
    MsrRead {
        msr: u32,
    },
    Hypercall {
        rax: u64,
        rbx: u64,
        rcx: u64,
        cpl: u8,
    },
    /// STGI.
    Stgi,
    /// VMRUN, VMLOAD, VMSAVE, CLGI, SKINIT, INVLPGA.
    VirtualizationInstruction {
        vmrun: bool,
    },
    NestedPageFault {
        gpa: u64,
        write: bool,
        fetch: bool,
    },
    Shutdown,
    /// IN, OUT, INS or OUTS to a port the hv intercepts. `size` is 1, 2 or 4 bytes; `len` is
    /// the instruction's length as the vendor reported it (0 if it did not: the exit is then
    /// unexpected, the hv does not guess).
    PortIo {
        port: u16,
        size: u8,
        input: bool,
        string: bool,
        len: u8,
    },
    /// A physical NMI (intercepted: the hv's own stop request, or a foreign one to reflect).
    Nmi,
    /// IRET, intercepted while the guest is inside an NMI handler the hv delivered (RIP at
    /// the IRET, which has not run: NMIs are still blocked).
    Iret,
    /// INT n / INT3 / INTO (the INTn intercept; RIP at the instruction).
    SoftwareInterrupt,
    /// #BP intercepted (real hardware; TCG reports INT3 as a software interrupt).
    Breakpoint,
    /// #DB intercepted: single step, hardware breakpoint or watchpoint; `dr6` says which.
    DebugException {
        dr6: u64,
    },
    /// VMRUN refused the guest state (VMEXIT_INVALID).
    VmrunFailed,
    /// The exit brought back the hv's own state instead of the guest's (a race in stock
    /// QEMU's TCG, see xtask/src/emulator.rs): the kernel's state on this CPU is gone.
    LostGuestState,
    Unexpected {
        code: u64,
    },
}

impl VmExit {
    /// The statistics bucket.
    pub fn kind(&self) -> ExitKind {
        match self {
            VmExit::Cpuid { .. } => ExitKind::Cpuid,
            VmExit::MsrWrite { .. } | VmExit::MsrRead { .. } => ExitKind::Msr,
            VmExit::Hypercall { .. } => ExitKind::Vmmcall,
            VmExit::VirtualizationInstruction { vmrun: true } => ExitKind::Vmrun,
            VmExit::VirtualizationInstruction { vmrun: false } | VmExit::Stgi => {
                ExitKind::SvmInstruction
            }
            VmExit::NestedPageFault { .. } => ExitKind::Npf,
            VmExit::Shutdown => ExitKind::Shutdown,
            VmExit::PortIo { .. } => ExitKind::PortIo,
            VmExit::Nmi
            | VmExit::Iret
            | VmExit::SoftwareInterrupt
            | VmExit::Breakpoint
            | VmExit::DebugException { .. } => ExitKind::Debug,
            VmExit::VmrunFailed | VmExit::LostGuestState | VmExit::Unexpected { .. } => {
                ExitKind::Other
            }
        }
    }
}
