//! Privileged x86-64 instructions, each wrapped in the smallest possible `unsafe fn`.
//!
//! Reading state is safe where it cannot fault at CPL 0 and has no side effect; anything that
//! changes processor state is `unsafe` and its caller argues why it is sound. On a host build
//! (unit tests) these are never called.

use core::arch::asm;

/// Model-specific registers the hv touches (AMD APM vol. 2, appendix A).
pub mod msr {
    /// Extended Feature Enable Register.
    pub const EFER: u32 = 0xC000_0080;
    /// Page Attribute Table.
    pub const PAT: u32 = 0x0000_0277;
    /// VM_CR: SVM lock and disable bits (APM 15.30.1).
    pub const VM_CR: u32 = 0xC001_0114;
    /// Physical address of the host save area VMRUN uses (APM 15.30.4).
    pub const VM_HSAVE_PA: u32 = 0xC001_0117;
    /// Local APIC base and mode: bit 10 x2APIC, bit 11 enabled, bits 51:12 base.
    pub const APIC_BASE: u32 = 0x0000_001B;
    /// x2APIC interrupt command register.
    pub const X2APIC_ICR: u32 = 0x0000_0830;
    pub const FS_BASE: u32 = 0xC000_0100;
    pub const GS_BASE: u32 = 0xC000_0101;
    pub const KERNEL_GS_BASE: u32 = 0xC000_0102;
    /// SYSCALL/SYSRET selectors: bits 47:32 are the kernel's CS (its SS is that + 8).
    pub const STAR: u32 = 0xC000_0081;
    /// The value RDTSCP and RDPID return (Linux keeps the CPU and node number there).
    pub const TSC_AUX: u32 = 0xC000_0103;
    /// The local APIC timer's deadline in TSC-deadline mode.
    pub const TSC_DEADLINE: u32 = 0x0000_06E0;
    /// x2APIC registers: 0x800 + xAPIC offset / 16.
    pub const X2APIC_BASE: u32 = 0x0000_0800;
}

/// CR4.OSXSAVE: XSAVE and XGETBV enabled by the OS (bit 18).
pub const CR4_OSXSAVE: u64 = 1 << 18;

/// EFER.SVME: SVM enable (bit 12).
pub const EFER_SVME: u64 = 1 << 12;
/// VM_CR.SVMDIS: SVM disabled by firmware (bit 4).
pub const VM_CR_SVMDIS: u64 = 1 << 4;
/// CR4.PGE: global pages (bit 7); clearing it flushes every TLB entry, global ones included.
pub const CR4_PGE: u64 = 1 << 7;
/// CR4.LA57: 5-level paging (bit 12).
pub const CR4_LA57: u64 = 1 << 12;

/// Reads an MSR.
///
/// # Safety
/// `msr` must exist on this CPU, or RDMSR raises #GP.
#[inline]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller guarantees the MSR exists; RDMSR reads only.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    ((hi as u64) << 32) | lo as u64
}

/// Writes an MSR.
///
/// # Safety
/// `msr` must exist, `value` must be valid for it, and the write must not break the
/// invariants the running code relies on (paging, the hv's own state).
#[inline]
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack))
    };
}

/// CPUID of `leaf`/`subleaf`: (eax, ebx, ecx, edx).
#[inline]
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects; CR4.TSD is never set at CPL 0 here.
    unsafe { core::arch::x86_64::_rdtsc() }
}

macro_rules! control_register {
    ($read:ident, $write:ident, $reg:literal) => {
        #[doc = concat!("Reads ", $reg, ".")]
        #[inline]
        pub fn $read() -> u64 {
            let v: u64;
            // SAFETY: reading a control register at CPL 0 has no side effects.
            unsafe { asm!(concat!("mov {}, ", $reg), out(reg) v, options(nomem, nostack)) };
            v
        }

        #[doc = concat!("Writes ", $reg, ".")]
        ///
        /// # Safety
        /// The value must keep the code that runs next mapped and valid (paging mode,
        /// page tables, protection bits).
        #[inline]
        pub unsafe fn $write(v: u64) {
            // SAFETY: forwarded to the caller.
            unsafe { asm!(concat!("mov ", $reg, ", {}"), in(reg) v, options(nostack)) };
        }
    };
}

control_register!(read_cr0, write_cr0, "cr0");
control_register!(read_cr2, write_cr2, "cr2");
control_register!(read_cr3, write_cr3, "cr3");
control_register!(read_cr4, write_cr4, "cr4");
control_register!(read_dr6, write_dr6, "dr6");
control_register!(read_dr7, write_dr7, "dr7");

/// A descriptor-table register as SGDT/SIDT store it.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorTablePointer {
    /// Limit (size - 1).
    pub limit: u16,
    /// Linear base address.
    pub base: u64,
}

/// Stores GDTR.
#[inline]
pub fn sgdt() -> DescriptorTablePointer {
    let mut p = DescriptorTablePointer::default();
    // SAFETY: SGDT writes 10 bytes to the operand, which is a local of that size.
    unsafe { asm!("sgdt [{}]", in(reg) &mut p, options(nostack)) };
    p
}

/// Stores IDTR.
#[inline]
pub fn sidt() -> DescriptorTablePointer {
    let mut p = DescriptorTablePointer::default();
    // SAFETY: SIDT writes 10 bytes to the operand, which is a local of that size.
    unsafe { asm!("sidt [{}]", in(reg) &mut p, options(nostack)) };
    p
}

/// Loads GDTR.
///
/// # Safety
/// The table must stay valid while loaded and describe the segments in use.
#[inline]
pub unsafe fn lgdt(p: &DescriptorTablePointer) {
    // SAFETY: forwarded to the caller.
    unsafe { asm!("lgdt [{}]", in(reg) p, options(readonly, nostack)) };
}

/// Loads IDTR.
///
/// # Safety
/// The table must stay valid while loaded, and every gate the CPU can take must be sound.
#[inline]
pub unsafe fn lidt(p: &DescriptorTablePointer) {
    // SAFETY: forwarded to the caller.
    unsafe { asm!("lidt [{}]", in(reg) p, options(readonly, nostack)) };
}

macro_rules! segment_selector {
    ($name:ident, $reg:literal) => {
        #[doc = concat!("Reads the ", $reg, " selector.")]
        #[inline]
        pub fn $name() -> u16 {
            let v: u16;
            // SAFETY: reading a segment selector has no side effects.
            unsafe { asm!(concat!("mov {0:x}, ", $reg), out(reg) v, options(nomem, nostack)) };
            v
        }
    };
}

segment_selector!(read_cs, "cs");
segment_selector!(read_ss, "ss");
segment_selector!(read_ds, "ds");
segment_selector!(read_es, "es");
segment_selector!(read_fs, "fs");
segment_selector!(read_gs, "gs");

/// Reads RFLAGS.
#[inline]
pub fn read_rflags() -> u64 {
    let v: u64;
    // SAFETY: PUSHFQ/POP touch only the stack slot they use.
    unsafe { asm!("pushfq", "pop {}", out(reg) v, options(nomem, preserves_flags)) };
    v
}

/// Writes a byte to an I/O port.
///
/// # Safety
/// Port writes have device side effects; the caller owns the device.
#[inline]
pub unsafe fn outb(port: u16, v: u8) {
    // SAFETY: forwarded to the caller.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) };
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// Port reads can have device side effects; the caller owns the device.
#[inline]
pub unsafe fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: forwarded to the caller.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack)) };
    v
}

/// Writes a word to an I/O port (ports `port` and `port + 1`).
///
/// # Safety
/// As [`outb`].
#[inline]
pub unsafe fn outw(port: u16, v: u16) {
    // SAFETY: forwarded to the caller.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack)) };
}

/// Writes a doubleword to an I/O port (ports `port` to `port + 3`).
///
/// # Safety
/// As [`outb`].
#[inline]
pub unsafe fn outl(port: u16, v: u32) {
    // SAFETY: forwarded to the caller.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack)) };
}

/// Reads a word from an I/O port.
///
/// # Safety
/// As [`inb`].
#[inline]
pub unsafe fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: forwarded to the caller.
    unsafe { asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack)) };
    v
}

/// Reads a doubleword from an I/O port.
///
/// # Safety
/// As [`inb`].
#[inline]
pub unsafe fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: forwarded to the caller.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack)) };
    v
}

/// Reads a 32-bit device register at physical address `pa` through the hv's identity map.
///
/// A single aligned 32-bit load: the IOAPIC's window accepts only doubleword accesses, and
/// QEMU 7.2's HPET only 4-byte ones (`hpet_ram_ops.valid`), so nothing here is ever split or
/// widened. The identity map is write-back in the PAT; the firmware's MTRRs make the chipset's
/// MMIO range (0xFEC00000 and up) uncacheable, and the effective type of a WB PAT entry over
/// a UC MTRR range is UC (APM vol. 2, 7.8.3), so every access reaches the device.
///
/// # Safety
/// Host mode (the identity map is the address space); `pa` 4-byte aligned, below the identity
/// map's limit, and a device register whose read the caller owns (reads can have effects).
#[inline]
pub unsafe fn mmio_read32(pa: u64) -> u32 {
    // SAFETY: forwarded to the caller.
    unsafe { (pa as *const u32).read_volatile() }
}

/// Writes a 32-bit device register at physical address `pa` through the identity map.
///
/// # Safety
/// As [`mmio_read32`]; the write's effect on the device is the caller's to argue.
#[inline]
pub unsafe fn mmio_write32(pa: u64, v: u32) {
    // SAFETY: forwarded to the caller.
    unsafe { (pa as *mut u32).write_volatile(v) };
}

/// Stops this CPU for good: interrupts off, HLT forever.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: CLI and HLT at CPL 0 only stop this CPU, which is the intent.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Reads CR8 (the task-priority register).
#[inline]
pub fn read_cr8() -> u64 {
    let v: u64;
    // SAFETY: reading CR8 at CPL 0 has no side effect.
    unsafe { asm!("mov {}, cr8", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Reads debug register DR`n` (n in 0..=3).
#[inline]
pub fn read_dr(n: u8) -> u64 {
    let v: u64;
    // SAFETY: reading DR0-3 at CPL 0 has no side effect (DR7.GD is never set by Linux).
    unsafe {
        match n {
            0 => asm!("mov {}, dr0", out(reg) v, options(nomem, nostack, preserves_flags)),
            1 => asm!("mov {}, dr1", out(reg) v, options(nomem, nostack, preserves_flags)),
            2 => asm!("mov {}, dr2", out(reg) v, options(nomem, nostack, preserves_flags)),
            _ => asm!("mov {}, dr3", out(reg) v, options(nomem, nostack, preserves_flags)),
        }
    }
    v
}

/// Writes DR`n` (0..=3) or, with `n == 7`, DR7.
///
/// # Safety
/// Arms or disarms hardware breakpoints on this CPU: the caller owns the slots it changes.
#[inline]
pub unsafe fn write_dr(n: u8, v: u64) {
    // SAFETY: forwarded to the caller.
    unsafe {
        match n {
            0 => asm!("mov dr0, {}", in(reg) v, options(nomem, nostack, preserves_flags)),
            1 => asm!("mov dr1, {}", in(reg) v, options(nomem, nostack, preserves_flags)),
            2 => asm!("mov dr2, {}", in(reg) v, options(nomem, nostack, preserves_flags)),
            3 => asm!("mov dr3, {}", in(reg) v, options(nomem, nostack, preserves_flags)),
            _ => asm!("mov dr7, {}", in(reg) v, options(nomem, nostack, preserves_flags)),
        }
    }
}

/// Writes CR8 (the task-priority register).
///
/// # Safety
/// Changes which interrupts this CPU accepts: the caller restores the guest's own value.
#[inline]
pub unsafe fn write_cr8(v: u64) {
    // SAFETY: forwarded to the caller.
    unsafe { asm!("mov cr8, {}", in(reg) v, options(nomem, nostack, preserves_flags)) };
}

/// XCR0: the state components XSAVE manages. Only with CR4.OSXSAVE set (else #UD).
#[inline]
pub fn xgetbv0() -> u64 {
    if read_cr4() & CR4_OSXSAVE == 0 {
        return 0;
    }
    let (lo, hi): (u32, u32);
    // SAFETY: CR4.OSXSAVE is set (checked above), so XGETBV of XCR0 cannot fault.
    unsafe { asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    ((hi as u64) << 32) | lo as u64
}

/// XSAVE64 of the components in `mask` into a 64-byte aligned area.
///
/// # Safety
/// CR4.OSXSAVE set; `area` 64-byte aligned and large enough for every component `mask`
/// selects (CPUID.(EAX=0DH,ECX=0):EBX).
#[inline]
pub unsafe fn xsave(area: *mut u8, mask: u64) {
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("xsave64 [{}]", in(reg) area, in("eax") mask as u32, in("edx") (mask >> 32) as u32,
             options(nostack, preserves_flags))
    };
}

/// XRSTOR64 of the components in `mask` from an area XSAVE filled.
///
/// # Safety
/// As [`xsave`]; the area must hold a valid image (reserved header bits clear, else #GP).
#[inline]
pub unsafe fn xrstor(area: *const u8, mask: u64) {
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("xrstor64 [{}]", in(reg) area, in("eax") mask as u32, in("edx") (mask >> 32) as u32,
             options(nostack, preserves_flags))
    };
}

/// FXSAVE64 into a 512-byte, 16-byte aligned area.
///
/// # Safety
/// `area` must be valid for 512 bytes and 16-byte aligned; CR0.TS must be clear.
#[inline]
pub unsafe fn fxsave(area: *mut [u8; 512]) {
    // SAFETY: forwarded to the caller.
    unsafe { asm!("fxsave64 [{}]", in(reg) area, options(nostack, preserves_flags)) };
}

/// FXRSTOR64 from an area FXSAVE64 filled (reserved MXCSR bits must stay clear).
///
/// # Safety
/// As [`fxsave`]; the area must hold a valid image (else #GP).
#[inline]
pub unsafe fn fxrstor(area: *const [u8; 512]) {
    // SAFETY: forwarded to the caller.
    unsafe { asm!("fxrstor64 [{}]", in(reg) area, options(nostack, preserves_flags)) };
}

/// Sends an NMI to the CPU whose local APIC ID is `apic_id`, in whichever mode the kernel put
/// this CPU's local APIC (x2APIC by MSR, xAPIC through its MMIO page, identity-mapped in
/// host mode). Intel SDM vol. 3, 10.6.1 / AMD APM vol. 2, 16.5: delivery mode NMI (100b),
/// level assert, no shorthand.
///
/// # Safety
/// Host mode only (the xAPIC page is reached through the hv's identity map); the target must
/// expect the NMI (the hv intercepts NMIs on every CPU in guest mode).
pub unsafe fn send_nmi(apic_id: u32) {
    const NMI: u64 = (0b100 << 8) | (1 << 14);
    // SAFETY: the APIC base MSR exists on every x86-64 CPU with a local APIC.
    let base = unsafe { rdmsr(msr::APIC_BASE) };
    if base & (1 << 10) != 0 {
        // SAFETY: x2APIC mode: writing the ICR sends one IPI.
        unsafe { wrmsr(msr::X2APIC_ICR, ((apic_id as u64) << 32) | NMI) };
        return;
    }
    let mmio = base & 0x000F_FFFF_FFFF_F000;
    let icr_lo = (mmio + 0x300) as *mut u32;
    let icr_hi = (mmio + 0x310) as *mut u32;
    // SAFETY: the xAPIC register page of this CPU, identity-mapped in the hv's tables. The
    // kernel may have been interrupted between writing ICR high and low: keep its high word.
    unsafe {
        for _ in 0..100_000 {
            if icr_lo.read_volatile() & (1 << 12) == 0 {
                break;
            }
        }
        let saved = icr_hi.read_volatile();
        icr_hi.write_volatile(apic_id << 24);
        icr_lo.write_volatile(NMI as u32);
        for _ in 0..100_000 {
            if icr_lo.read_volatile() & (1 << 12) == 0 {
                break;
            }
        }
        icr_hi.write_volatile(saved);
    }
}

/// Copies one 4 KiB page with `REP MOVSQ`: under QEMU's TCG it moves ~183 MiB/s where
/// `REP MOVSB` (what `memcpy` becomes with ERMS) moves ~22 MiB/s (FACTS.md).
///
/// # Safety
/// `dst` and `src` are 8-byte aligned, valid for 4096 bytes (writes, reads), and apart.
#[inline]
pub unsafe fn copy_page(dst: *mut u8, src: *const u8) {
    // SAFETY: forwarded to the caller; DF is clear (the ABI's and the hv's state).
    unsafe {
        asm!(
            "rep movsq",
            inout("rcx") 512u64 => _,
            inout("rdi") dst => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        )
    };
}

/// RDRAND's 64 bits, if the CPU has it and it delivered (a few tries, as the manuals advise).
pub fn rdrand64() -> Option<u64> {
    if cpuid(1, 0)[2] & (1 << 30) == 0 {
        return None;
    }
    for _ in 0..10 {
        let (v, ok): (u64, u8);
        // SAFETY: RDRAND exists (CPUID.1:ECX bit 30); it writes only its operand and CF.
        unsafe {
            asm!("rdrand {v}", "setc {ok}", v = out(reg) v, ok = out(reg_byte) ok, options(nomem, nostack))
        };
        if ok != 0 {
            return Some(v);
        }
    }
    None
}
