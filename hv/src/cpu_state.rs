//! A CPU's whole state, vendor-neutral: what the kernel needs to resume on that CPU.
//!
//! The vendor layer fills it (`arch::Vcpu::save_state`) from three places: its control block
//! (SVM: the VMCB's state-save area, with VMSAVE for FS, GS, TR, LDTR and the SYSCALL MSRs),
//! the registers VMRUN leaves in the CPU (XSAVE state, DR0-3, CR8, XCR0, TSC_AUX), and the
//! local APIC. The lists follow what QEMU keeps of a restorable x86 CPU
//! (`target/i386/machine.c`) and KVM's `KVM_GET_LAPIC`: the APIC's ISR, IRR, TMR and current
//! count are records (the hardware does not let them be written back), everything else here is
//! restored as it was.
//!
//! Plain data, no privileged instruction: host tests build and compare it.

use crate::arch::context::{GuestRegs, Segment};
use crate::arch::instr::DescriptorTablePointer;

/// Bytes kept for the XSAVE area (standard form). Every component a current AMD CPU enables
/// through XCR0 fits (AVX-512 state with PKRU is 2,696 bytes); `init` refuses a CPU whose
/// CPUID.(EAX=0DH,ECX=0):EBX says more.
pub const XSAVE_AREA_SIZE: usize = 4096;

/// The XSAVE area, 64-byte aligned as XSAVE requires (Intel SDM vol. 1, 13.4; AMD APM vol. 2,
/// 11.5). Its first 512 bytes are the FXSAVE image (x87, SSE, MXCSR); bytes 512..576 the
/// XSAVE header, whose first u64 (XSTATE_BV) says which components hold non-initial state.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct XsaveArea(pub [u8; XSAVE_AREA_SIZE]);

impl Default for XsaveArea {
    fn default() -> Self {
        XsaveArea([0; XSAVE_AREA_SIZE])
    }
}

impl core::fmt::Debug for XsaveArea {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "XsaveArea(xstate_bv {:#x})", self.xstate_bv())
    }
}

impl PartialEq for XsaveArea {
    fn eq(&self, other: &Self) -> bool {
        self.0[..] == other.0[..]
    }
}
impl Eq for XsaveArea {}

/// XSTATE_BV bits of the legacy components.
pub mod xfeature {
    pub const X87: u64 = 1 << 0;
    pub const SSE: u64 = 1 << 1;
}

impl XsaveArea {
    /// XSTATE_BV: components saved with non-initial state.
    pub fn xstate_bv(&self) -> u64 {
        u64::from_le_bytes(self.0[512..520].try_into().unwrap_or([0; 8]))
    }

    pub fn set_xstate_bv(&mut self, v: u64) {
        self.0[512..520].copy_from_slice(&v.to_le_bytes());
    }

    /// The FXSAVE image as the registers are: where XSTATE_BV says x87 or SSE is in its
    /// initial configuration, XSAVE may have left those bytes stale, so they read as the
    /// initial values (FCW 0x037F, every tag empty, zeros; Intel SDM vol. 1, 13.6).
    pub fn legacy(&self) -> [u8; 512] {
        let mut fx = [0u8; 512];
        fx.copy_from_slice(&self.0[..512]);
        let bv = self.xstate_bv();
        if bv & xfeature::X87 == 0 {
            let mxcsr = [
                fx[24], fx[25], fx[26], fx[27], fx[28], fx[29], fx[30], fx[31],
            ];
            fx[..160].fill(0);
            fx[0..2].copy_from_slice(&0x037Fu16.to_le_bytes());
            fx[24..32].copy_from_slice(&mxcsr);
        }
        if bv & xfeature::SSE == 0 {
            fx[160..416].fill(0);
        }
        fx
    }

    /// Writes the FXSAVE image back (a debugger's register write) and marks x87 and SSE as
    /// holding state, so that XRSTOR loads them instead of the initial values.
    pub fn set_legacy(&mut self, fx: &[u8; 512]) {
        self.0[..512].copy_from_slice(fx);
        let bv = self.xstate_bv() | xfeature::X87 | xfeature::SSE;
        self.set_xstate_bv(bv);
    }
}

/// Model-specific registers of the state (those VMRUN and VMSAVE switch, and those it leaves).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Msrs {
    pub efer: u64,
    pub pat: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub kernel_gs_base: u64,
    /// 0 where the CPU has no RDTSCP/RDPID (CPUID.80000001H:EDX[27]).
    pub tsc_aux: u64,
}

/// Number of LVT entries kept: timer, thermal, performance counter, LINT0, LINT1, error.
pub const LVT_COUNT: usize = 6;

/// The local APIC (AMD APM vol. 2, 16.3-16.4; offsets in [`apic_reg`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalApic {
    /// Captured at all (false when the APIC is disabled in IA32_APIC_BASE).
    pub present: bool,
    /// x2APIC mode (IA32_APIC_BASE bit 10): registers are MSRs, LDR is read-only, no DFR.
    pub x2apic: bool,
    /// IA32_APIC_BASE as it was.
    pub base_msr: u64,
    pub id: u32,
    pub tpr: u32,
    pub ldr: u32,
    pub dfr: u32,
    pub svr: u32,
    /// Timer, thermal, performance counter, LINT0, LINT1, error.
    pub lvt: [u32; LVT_COUNT],
    pub timer_divide: u32,
    pub timer_initial: u32,
    /// Records: what the hardware does not let be written back.
    pub timer_current: u32,
    pub isr: [u32; 8],
    pub irr: [u32; 8],
    pub tmr: [u32; 8],
    /// IA32_TSC_DEADLINE, where the timer is in TSC-deadline mode.
    pub tsc_deadline: u64,
}

/// Register offsets in the xAPIC page (x2APIC MSR = 0x800 + offset / 16).
pub mod apic_reg {
    pub const ID: u32 = 0x020;
    pub const TPR: u32 = 0x080;
    pub const LDR: u32 = 0x0D0;
    pub const DFR: u32 = 0x0E0;
    pub const SVR: u32 = 0x0F0;
    pub const EOI: u32 = 0x0B0;
    pub const ISR: u32 = 0x100;
    pub const TMR: u32 = 0x180;
    pub const IRR: u32 = 0x200;
    /// Interrupt command, low half (x2APIC: the whole ICR, MSR 0x830).
    pub const ICR_LOW: u32 = 0x300;
    /// Timer, thermal, performance counter, LINT0, LINT1, error.
    pub const LVT: [u32; super::LVT_COUNT] = [0x320, 0x330, 0x340, 0x350, 0x360, 0x370];
    pub const TIMER_INITIAL: u32 = 0x380;
    pub const TIMER_CURRENT: u32 = 0x390;
    pub const TIMER_DIVIDE: u32 = 0x3E0;
}

impl LocalApic {
    /// LVT timer mode bits 18:17: 00 one-shot, 01 periodic, 10 TSC-deadline.
    pub fn timer_mode(&self) -> u32 {
        (self.lvt[0] >> 17) & 3
    }
}

/// An event the CPU was delivering when it stopped, in the vendor's neutral terms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingEvent {
    pub valid: bool,
    /// 0 external interrupt, 2 NMI, 3 exception, 4 software interrupt (the SVM/VMX type field).
    pub kind: u8,
    pub vector: u8,
    pub error_code: Option<u32>,
}

/// Interrupt state that is not in a register.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InterruptState {
    /// An event whose delivery the exit interrupted, to be delivered again.
    pub pending: PendingEvent,
    /// After STI or MOV SS: interrupts held for one instruction.
    pub shadow: bool,
    /// Inside an NMI handler (NMIs blocked until IRET). `None` where the vendor cannot tell:
    /// SVM without vNMI keeps this in the CPU only.
    pub nmi_blocked: Option<bool>,
}

/// A CPU's whole state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    pub rax: u64,
    pub rsp: u64,
    /// Every other general register.
    pub gprs: GuestRegs,
    pub rip: u64,
    pub rflags: u64,
    pub cs: Segment,
    pub ss: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ldtr: Segment,
    pub tr: Segment,
    pub gdtr: DescriptorTablePointer,
    pub idtr: DescriptorTablePointer,
    pub cpl: u8,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    /// 0 where the CPU has no XSAVE (CR4.OSXSAVE clear): `xsave` then holds an FXSAVE image.
    pub xcr0: u64,
    pub msrs: Msrs,
    /// DR0-3, DR6, DR7.
    pub dr: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
    pub xsave: XsaveArea,
    pub apic: LocalApic,
    pub interrupts: InterruptState,
}

impl CpuState {
    /// The fields that differ between `self` and `other`, by name (for a round-trip check's
    /// report): at most `out.len()` names, returns how many differ in all.
    pub fn differences(&self, other: &CpuState, out: &mut [&'static str]) -> usize {
        let mut n = 0;
        let mut note = |differs: bool, name: &'static str| {
            if differs {
                if let Some(slot) = out.get_mut(n) {
                    *slot = name;
                }
                n += 1;
            }
        };
        let (a, b) = (self, other);
        note(a.rax != b.rax || a.rsp != b.rsp, "rax/rsp");
        note(a.gprs != b.gprs, "gprs");
        note(a.rip != b.rip || a.rflags != b.rflags, "rip/rflags");
        note(
            [a.cs, a.ss, a.ds, a.es] != [b.cs, b.ss, b.ds, b.es],
            "cs/ss/ds/es",
        );
        note([a.fs, a.gs] != [b.fs, b.gs], "fs/gs");
        note([a.ldtr, a.tr] != [b.ldtr, b.tr], "ldtr/tr");
        note(
            a.gdtr != b.gdtr || a.idtr != b.idtr || a.cpl != b.cpl,
            "gdtr/idtr/cpl",
        );
        note(
            [a.cr0, a.cr2, a.cr3, a.cr4, a.cr8] != [b.cr0, b.cr2, b.cr3, b.cr4, b.cr8],
            "cr0/2/3/4/8",
        );
        note(a.xcr0 != b.xcr0, "xcr0");
        note(a.msrs != b.msrs, "msrs");
        note(a.dr != b.dr || a.dr6 != b.dr6 || a.dr7 != b.dr7, "dr");
        note(a.xsave != b.xsave, "xsave");
        note(!a.apic.same_writable(&b.apic), "apic");
        note(a.interrupts != b.interrupts, "interrupts");
        n
    }
}

impl LocalApic {
    /// Equal in everything a restore writes back (the records may move on by themselves).
    pub fn same_writable(&self, o: &LocalApic) -> bool {
        (
            self.present,
            self.x2apic,
            self.base_msr,
            self.id,
            self.tpr,
            self.ldr,
            self.dfr,
            self.svr,
            self.lvt,
            self.timer_divide,
        ) == (
            o.present,
            o.x2apic,
            o.base_msr,
            o.id,
            o.tpr,
            o.ldr,
            o.dfr,
            o.svr,
            o.lvt,
            o.timer_divide,
        )
    }
}

#[cfg(test)]
impl CpuState {
    /// A kernel CPU as it parks, for tests: long mode, paging, some registers in use, a busy
    /// 64-bit TSS, the FPU untouched since boot (XSTATE_BV clear: x87 and SSE in their initial
    /// configuration).
    pub fn kernel_sample() -> CpuState {
        let mut st = CpuState {
            rax: 0x27,
            rsp: 0xffff_c900_0001_3f28,
            rip: 0xffff_ffff_8100_1234,
            rflags: 0x246,
            cr0: 0x8005_0033,
            cr2: 0x7f00_dead_0000,
            cr3: 0x1_2345_6000,
            cr4: 0x3506f0,
            dr6: 0xffff_0ff0,
            dr7: 0x400,
            ..CpuState::default()
        };
        st.gprs.rbx = 1;
        st.gprs.rbp = 0xffff_c900_0001_3f80;
        st.gprs.r15 = 15;
        st.cs = Segment {
            selector: 0x10,
            attrib: 0xA9B,
            limit: 0xFFFF_FFFF,
            base: 0,
        };
        st.ss.selector = 0x18;
        st.tr = Segment {
            selector: 0x40,
            attrib: 0x08B,
            limit: 0x4087,
            base: 0xffff_fe00_0000_3000,
        };
        st.gs.base = 0xffff_8880_7fc0_0000;
        st.gdtr = DescriptorTablePointer {
            limit: 0x7f,
            base: 0xffff_fe00_0000_1000,
        };
        st.msrs.efer = 0xd01;
        st.msrs.lstar = 0xffff_ffff_8200_0040;
        st.msrs.kernel_gs_base = 0x7f12_3456_7000;
        st
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_view_reads_initial_values_where_xsave_left_components_initial() {
        let mut x = XsaveArea::default();
        x.0[..512].fill(0xAB);
        x.0[24..28].copy_from_slice(&0x1F80u32.to_le_bytes());
        x.set_xstate_bv(0);
        let fx = x.legacy();
        assert_eq!(u16::from_le_bytes([fx[0], fx[1]]), 0x037F, "FCW initial");
        assert_eq!(fx[4], 0, "every x87 register empty");
        assert_eq!(
            &fx[24..28],
            &0x1F80u32.to_le_bytes(),
            "MXCSR is always saved"
        );
        assert!(fx[160..416].iter().all(|&b| b == 0), "XMM initial");
        x.set_xstate_bv(xfeature::X87 | xfeature::SSE);
        assert_eq!(x.legacy()[0], 0xAB, "saved state is shown as it is");
    }

    #[test]
    fn a_debugger_write_marks_the_legacy_components_present() {
        let mut x = XsaveArea::default();
        let mut fx = [0u8; 512];
        fx[160] = 7;
        x.set_legacy(&fx);
        assert_eq!(x.xstate_bv() & 3, 3);
        assert_eq!(x.legacy()[160], 7);
    }

    #[test]
    fn differences_name_what_changed() {
        let a = CpuState::default();
        let mut b = a;
        b.msrs.lstar = 1;
        b.xsave.0[200] = 1;
        b.apic.timer_current = 99; // a record: not a difference
        let mut names = [""; 4];
        assert_eq!(a.differences(&b, &mut names), 2);
        assert_eq!(&names[..2], &["msrs", "xsave"]);
        assert_eq!(a.differences(&a, &mut names), 0);
    }
}
