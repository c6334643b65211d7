//! The Virtual Machine Control Block (AMD APM vol. 2, appendix B).
//!
//! One 4 KiB page per CPU: the control area (offset 0x000) says what to intercept and reports
//! why the guest exited; the state-save area (offset 0x400) holds the guest state VMRUN loads
//! and #VMEXIT stores. Every field carries its manual offset, checked at compile time.

use core::mem::offset_of;

/// A segment register in the state-save area (APM table B-2): selector, 12-bit packed
/// attributes, expanded byte limit, base. The VMCB's layout is the neutral one.
pub use crate::arch::context::Segment as VmcbSegment;

/// Control area (APM table B-1).
#[repr(C)]
pub struct VmcbControlArea {
    /// 0x000: intercept reads (bits 15:0) and writes (31:16) of CR0-15.
    pub intercept_cr: u32,
    /// 0x004: intercept reads and writes of DR0-15.
    pub intercept_dr: u32,
    /// 0x008: intercept exception vectors 0-31.
    pub intercept_exceptions: u32,
    /// 0x00C: INTR, NMI, ..., CPUID (18), ..., MSR_PROT (28), ..., SHUTDOWN (31).
    pub intercept_misc1: u32,
    /// 0x010: VMRUN (0), VMMCALL (1), VMLOAD, VMSAVE, STGI, CLGI, SKINIT (6), ...
    pub intercept_misc2: u32,
    /// 0x014: further instruction intercepts.
    pub intercept_misc3: u32,
    _reserved1: [u8; 0x03C - 0x018],
    /// 0x03C: PAUSE filter threshold.
    pub pause_filter_threshold: u16,
    /// 0x03E: PAUSE filter count.
    pub pause_filter_count: u16,
    /// 0x040: physical address of the I/O permission map.
    pub iopm_base_pa: u64,
    /// 0x048: physical address of the MSR permission map.
    pub msrpm_base_pa: u64,
    /// 0x050: TSC offset.
    pub tsc_offset: u64,
    /// 0x058: guest ASID (never 0).
    pub guest_asid: u32,
    /// 0x05C: TLB_CONTROL (bits 7:0).
    pub tlb_control: u32,
    /// 0x060: virtual interrupt control (V_TPR, V_IRQ, ..., V_INTR_MASKING bit 24).
    pub vintr: u64,
    /// 0x068: interrupt shadow (bit 0), guest interrupt mask (bit 1).
    pub interrupt_shadow: u64,
    /// 0x070: EXITCODE.
    pub exit_code: u64,
    /// 0x078: EXITINFO1.
    pub exit_info1: u64,
    /// 0x080: EXITINFO2.
    pub exit_info2: u64,
    /// 0x088: EXITINTINFO: an event that was being delivered when the exit happened.
    pub exit_int_info: u64,
    /// 0x090: NP_ENABLE (bit 0) and other enables.
    pub np_enable: u64,
    _reserved2: [u8; 0x0A8 - 0x098],
    /// 0x0A8: EVENTINJ: event to inject at the next VMRUN.
    pub event_inj: u64,
    /// 0x0B0: N_CR3: nested page table root.
    pub n_cr3: u64,
    /// 0x0B8: LBR virtualization enable.
    pub lbr_virt_enable: u64,
    /// 0x0C0: VMCB clean bits.
    pub vmcb_clean: u32,
    _reserved3: u32,
    /// 0x0C8: next sequential RIP (only with NRIP save: absent under QEMU TCG).
    pub next_rip: u64,
    /// 0x0D0: number of guest instruction bytes fetched (decode assists).
    pub insn_len: u8,
    /// 0x0D1: the bytes.
    pub insn_bytes: [u8; 15],
    _reserved4: [u8; 0x400 - 0x0E0],
}

/// State-save area (APM table B-2), at VMCB offset 0x400.
#[repr(C)]
pub struct VmcbStateSaveArea {
    pub es: VmcbSegment,
    pub cs: VmcbSegment,
    pub ss: VmcbSegment,
    pub ds: VmcbSegment,
    pub fs: VmcbSegment,
    pub gs: VmcbSegment,
    pub gdtr: VmcbSegment,
    pub ldtr: VmcbSegment,
    pub idtr: VmcbSegment,
    pub tr: VmcbSegment,
    _reserved1: [u8; 0x0CB - 0x0A0],
    /// 0x0CB: current privilege level.
    pub cpl: u8,
    _reserved2: u32,
    /// 0x0D0: EFER.
    pub efer: u64,
    _reserved3: [u8; 0x148 - 0x0D8],
    pub cr4: u64,
    pub cr3: u64,
    pub cr0: u64,
    pub dr7: u64,
    pub dr6: u64,
    pub rflags: u64,
    pub rip: u64,
    _reserved4: [u8; 0x1D8 - 0x180],
    pub rsp: u64,
    _reserved5: [u8; 0x1F8 - 0x1E0],
    pub rax: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub cr2: u64,
    _reserved6: [u8; 0x268 - 0x248],
    /// 0x268: guest PAT, used with nested paging.
    pub g_pat: u64,
    _reserved7: [u8; 0xC00 - 0x270],
}

/// The whole VMCB: one page, page-aligned.
#[repr(C, align(4096))]
pub struct Vmcb {
    pub control: VmcbControlArea,
    pub save: VmcbStateSaveArea,
}

// Manual offsets, checked at compile time (APM vol. 2, tables B-1 and B-2).
const _: () = {
    assert!(core::mem::size_of::<Vmcb>() == 4096);
    assert!(offset_of!(VmcbControlArea, pause_filter_threshold) == 0x03C);
    assert!(offset_of!(VmcbControlArea, iopm_base_pa) == 0x040);
    assert!(offset_of!(VmcbControlArea, msrpm_base_pa) == 0x048);
    assert!(offset_of!(VmcbControlArea, guest_asid) == 0x058);
    assert!(offset_of!(VmcbControlArea, tlb_control) == 0x05C);
    assert!(offset_of!(VmcbControlArea, vintr) == 0x060);
    assert!(offset_of!(VmcbControlArea, exit_code) == 0x070);
    assert!(offset_of!(VmcbControlArea, exit_int_info) == 0x088);
    assert!(offset_of!(VmcbControlArea, np_enable) == 0x090);
    assert!(offset_of!(VmcbControlArea, event_inj) == 0x0A8);
    assert!(offset_of!(VmcbControlArea, n_cr3) == 0x0B0);
    assert!(offset_of!(VmcbControlArea, vmcb_clean) == 0x0C0);
    assert!(offset_of!(VmcbControlArea, next_rip) == 0x0C8);
    assert!(offset_of!(VmcbControlArea, insn_len) == 0x0D0);
    assert!(offset_of!(Vmcb, save) == 0x400);
    assert!(offset_of!(VmcbStateSaveArea, gdtr) == 0x060);
    assert!(offset_of!(VmcbStateSaveArea, idtr) == 0x080);
    assert!(offset_of!(VmcbStateSaveArea, tr) == 0x090);
    assert!(offset_of!(VmcbStateSaveArea, cpl) == 0x0CB);
    assert!(offset_of!(VmcbStateSaveArea, efer) == 0x0D0);
    assert!(offset_of!(VmcbStateSaveArea, cr4) == 0x148);
    assert!(offset_of!(VmcbStateSaveArea, cr3) == 0x150);
    assert!(offset_of!(VmcbStateSaveArea, cr0) == 0x158);
    assert!(offset_of!(VmcbStateSaveArea, dr7) == 0x160);
    assert!(offset_of!(VmcbStateSaveArea, rflags) == 0x170);
    assert!(offset_of!(VmcbStateSaveArea, rip) == 0x178);
    assert!(offset_of!(VmcbStateSaveArea, rsp) == 0x1D8);
    assert!(offset_of!(VmcbStateSaveArea, rax) == 0x1F8);
    assert!(offset_of!(VmcbStateSaveArea, kernel_gs_base) == 0x220);
    assert!(offset_of!(VmcbStateSaveArea, cr2) == 0x240);
    assert!(offset_of!(VmcbStateSaveArea, g_pat) == 0x268);
};

/// Bits of [`VmcbControlArea::intercept_misc1`] (APM table B-1, offset 0x00C).
pub mod misc1 {
    pub const NMI: u32 = 1 << 1;
    pub const CPUID: u32 = 1 << 18;
    /// IRET: intercepted only while the guest runs an NMI handler the hv delivered, to see
    /// where it ends (SVM without vNMI keeps NMI blocking in the CPU, out of the VMCB).
    pub const IRET: u32 = 1 << 20;
    pub const INTN: u32 = 1 << 21;
    /// IN/OUT/INS/OUTS to a port the I/O permission map lists (APM 15.10.1).
    pub const IOIO_PROT: u32 = 1 << 27;
    pub const MSR_PROT: u32 = 1 << 28;
    pub const SHUTDOWN: u32 = 1 << 31;
}

/// Bits of [`VmcbControlArea::intercept_misc2`] (APM table B-1, offset 0x010).
pub mod misc2 {
    pub const VMRUN: u32 = 1 << 0;
    pub const VMMCALL: u32 = 1 << 1;
    pub const VMLOAD: u32 = 1 << 2;
    pub const VMSAVE: u32 = 1 << 3;
    pub const STGI: u32 = 1 << 4;
    pub const CLGI: u32 = 1 << 5;
    pub const SKINIT: u32 = 1 << 6;
    /// INVLPGA is in misc1 on the manual's table (bit 26); kept with its SVM peers here.
    pub const ALL_SVM: u32 = VMRUN | VMMCALL | VMLOAD | VMSAVE | STGI | CLGI | SKINIT;
}

/// INVLPGA intercept, misc1 bit 26.
pub const MISC1_INVLPGA: u32 = 1 << 26;

/// Bits of [`VmcbControlArea::intercept_exceptions`]: one per vector.
pub mod exceptions {
    pub const DB: u32 = 1 << 1;
    pub const BP: u32 = 1 << 3;
}

/// [`VmcbControlArea::vintr`] V_INTR_MASKING (bit 24): the guest's IF masks only virtual
/// interrupts; physical ones follow the host's IF, which is clear in host mode, so they stay
/// pending while the guest runs (APM 15.21.1). Used to hold interrupts during a single step.
pub const V_INTR_MASKING: u64 = 1 << 24;

/// TLB_CONTROL values (APM 15.16.1).
pub mod tlb_control {
    pub const DO_NOTHING: u32 = 0;
    pub const FLUSH_ALL: u32 = 1;
    pub const FLUSH_GUEST: u32 = 3;
}

/// EXITCODE values (APM appendix C).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum ExitCode {
    /// Exceptions are 0x40 + vector: #DB and #BP.
    ExceptionDb = 0x41,
    ExceptionBp = 0x43,
    Nmi = 0x61,
    Cpuid = 0x72,
    /// Taken before the IRET executes (APM 15.9): NMIs are still blocked at this exit.
    Iret = 0x74,
    Intn = 0x75,
    Invlpga = 0x7A,
    /// IN, OUT, INS, OUTS to an intercepted port (APM 15.10.2).
    Ioio = 0x7B,
    Msr = 0x7C,
    Shutdown = 0x7F,
    Vmrun = 0x80,
    Vmmcall = 0x81,
    Vmload = 0x82,
    Vmsave = 0x83,
    Stgi = 0x84,
    Clgi = 0x85,
    Skinit = 0x86,
    Npf = 0x400,
}

/// EXITINFO1 of an IOIO exit (APM vol. 2, 15.10.2, figure 15-2); EXITINFO2 holds the rIP of
/// the instruction after the IN/OUT, with or without NRIP save (QEMU's TCG, which has no NRIP
/// save, fills it too: `helper_svm_check_io`).
pub mod ioio {
    /// TYPE: 1 = IN, 0 = OUT.
    pub const TYPE_IN: u64 = 1 << 0;
    /// STR: INS or OUTS.
    pub const STR: u64 = 1 << 2;
    /// REP prefix.
    pub const REP: u64 = 1 << 3;
    /// SZ8, SZ16, SZ32: the operand size, one-hot.
    pub const SZ8: u64 = 1 << 4;
    pub const SZ16: u64 = 1 << 5;
    pub const SZ32: u64 = 1 << 6;
    /// PORT: bits 31:16.
    pub const PORT_SHIFT: u32 = 16;
}

/// EXITCODE of a VMRUN that failed its consistency checks. QEMU stores it as
/// 0x0000_0000_FFFF_FFFF, hardware as all ones: compare the low 32 bits (FACTS.md).
pub const VMEXIT_INVALID_LOW: u32 = 0xFFFF_FFFF;

/// EVENTINJ / EXITINTINFO layout (APM 15.20): vector 7:0, type 10:8, EV 11, V 31, errcode 63:32.
pub mod event {
    pub const VALID: u64 = 1 << 31;
    pub const ERROR_VALID: u64 = 1 << 11;
    pub const TYPE_NMI: u64 = 2 << 8;
    pub const TYPE_EXCEPTION: u64 = 3 << 8;
    pub const TYPE_SOFTWARE_INT: u64 = 4 << 8;
    pub const VECTOR_DB: u64 = 1;
    pub const VECTOR_NMI: u64 = 2;
    pub const VECTOR_BP: u64 = 3;
    pub const VECTOR_UD: u64 = 6;
    pub const VECTOR_GP: u64 = 13;

    /// An exception without error code.
    pub const fn exception(vector: u64) -> u64 {
        VALID | TYPE_EXCEPTION | vector
    }

    /// An exception with an error code.
    pub const fn exception_with_code(vector: u64, code: u32) -> u64 {
        VALID | TYPE_EXCEPTION | ERROR_VALID | vector | ((code as u64) << 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_encode_as_the_manual_says() {
        assert_eq!(event::exception(event::VECTOR_UD), 0x8000_0306);
        assert_eq!(event::exception_with_code(event::VECTOR_GP, 0), 0x8000_0B0D);
    }
}
