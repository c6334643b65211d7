//! The live CPU's state as plain, vendor-neutral types: what the world switch saves and loads
//! (`GuestRegs`, `NativeState`, `HostContext`, `EntryFrame`, whose offsets the assembly
//! relies on), a segment with its hidden part, and reading them from the CPU at activation.
//! RVM1.5's `LinuxContext` is the model: the captured Linux, separate from the vendor's
//! control block.

use super::instr::{self, DescriptorTablePointer};

/// A segment register with its hidden part: selector, base, expanded byte limit and the
/// descriptor's attribute bits packed as `desc[47:40] | desc[55:52] << 8` (type, S, DPL, P,
/// AVL, L, D/B, G: AMD APM vol. 2, 4.7-4.8). SVM's VMCB uses this packing as it is; VMX's
/// access rights are the same bits at other positions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub attrib: u16,
    pub limit: u32,
    pub base: u64,
}

/// Decoding an 8-byte segment descriptor (AMD APM vol. 2, 4.7.1, figure 4-14).
pub mod descriptor {
    /// Attribute bits: `desc[47:40] | desc[55:52] << 8`.
    pub const fn pack_attrib(d: u64) -> u16 {
        (((d >> 40) & 0xFF) | (((d >> 52) & 0xF) << 8)) as u16
    }
    /// The byte limit: 20 bits, scaled by 4 KiB when G (bit 55) is set.
    pub const fn expand_limit(d: u64) -> u32 {
        let raw = ((d & 0xFFFF) | ((d >> 32) & 0xF_0000)) as u32;
        if d & (1 << 55) != 0 {
            (raw << 12) | 0xFFF
        } else {
            raw
        }
    }
    /// The 32-bit base (system descriptors in long mode add 32 more bits in the next entry).
    pub const fn base(d: u64) -> u64 {
        ((d >> 16) & 0xFF_FFFF) | (((d >> 56) & 0xFF) << 24)
    }
}

/// The guest's general registers that VMRUN does not switch (RAX and RSP live in the VMCB).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestRegs {
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

/// Everything needed to run the kernel natively again from a given point.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct NativeState {
    pub regs: GuestRegs,
    pub rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub ds: u64,
    pub es: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    /// EFER without SVME.
    pub efer: u64,
    pub dr7: u64,
    pub gdtr: DescriptorTablePointer,
    pub(crate) _pad0: [u8; 6],
    pub idtr: DescriptorTablePointer,
    pub(crate) _pad1: [u8; 6],
}

/// The hv's own CR3, GDTR and IDTR, loaded by `qs_enter_host`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HostContext {
    pub cr3: u64,
    pub gdtr: DescriptorTablePointer,
    pub(crate) _pad0: [u8; 6],
    pub idtr: DescriptorTablePointer,
    pub(crate) _pad1: [u8; 6],
}

impl HostContext {
    pub fn new(cr3: u64, gdtr: DescriptorTablePointer, idtr: DescriptorTablePointer) -> Self {
        HostContext {
            cr3,
            gdtr,
            idtr,
            ..Default::default()
        }
    }
}

// The assembly relies on these offsets.
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(GuestRegs, rdi) == 32);
    assert!(offset_of!(GuestRegs, r15) == 104);
    assert!(offset_of!(NativeState, rax) == 112);
    assert!(offset_of!(NativeState, rip) == 120);
    assert!(offset_of!(NativeState, cs) == 128);
    assert!(offset_of!(NativeState, ds) == 160);
    assert!(offset_of!(NativeState, ss) == 152);
    assert!(offset_of!(NativeState, es) == 168);
    assert!(offset_of!(HostContext, gdtr) == 8);
    assert!(offset_of!(HostContext, idtr) == 24);
};

/// Selectors of the hv's GDT (world_switch.S hard-codes them too).
pub const HOST_CODE_SELECTOR: u16 = 0x08;
pub const HOST_DATA_SELECTOR: u16 = 0x10;
/// The hv's GDT: null, 64-bit code, data. Accessed bits are preset so the CPU never writes it.
pub const HOST_GDT: [u64; 3] = [0, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF];

/// Reads the segment `selector` of the live CPU, hidden part included, from the GDT at `gdt`.
///
/// # Safety
/// `gdt` must be the CPU's live GDTR, mapped in the current address space.
pub unsafe fn capture_segment(gdt: &DescriptorTablePointer, selector: u16) -> Segment {
    let index = (selector >> 3) as u64;
    if index == 0 || selector & 4 != 0 || index * 8 + 7 > gdt.limit as u64 {
        // Null selector (DS/ES in 64-bit kernels, sometimes SS): unusable, base 0.
        return Segment {
            selector,
            ..Default::default()
        };
    }
    // SAFETY: the index is inside the live GDT (checked against its limit above), which the
    // caller guarantees is mapped.
    let d = unsafe { ((gdt.base + index * 8) as *const u64).read_volatile() };
    Segment {
        selector,
        attrib: descriptor::pack_attrib(d),
        limit: descriptor::expand_limit(d),
        base: descriptor::base(d),
    }
}

/// Callee-saved registers and return address pushed by `qs_entry_activate`.
#[repr(C)]
pub struct EntryFrame {
    pub rbx: u64,
    pub rbp: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub return_rip: u64,
}

/// The state the kernel will have when `qs_entry_activate` returns `status`: the CPU's live
/// control and segment state, the callee-saved registers of the call, RIP at the return
/// address and RSP just above it.
///
/// # Safety
/// Must run on the CPU being captured, on the kernel's address space, with `frame` pointing at
/// the frame `qs_entry_activate` pushed.
pub unsafe fn capture_native(frame: &EntryFrame, status: u64) -> NativeState {
    NativeState {
        regs: GuestRegs {
            rbx: frame.rbx,
            rbp: frame.rbp,
            r12: frame.r12,
            r13: frame.r13,
            r14: frame.r14,
            r15: frame.r15,
            ..Default::default()
        },
        rax: status,
        rip: frame.return_rip,
        cs: instr::read_cs() as u64,
        rflags: instr::read_rflags(),
        rsp: frame as *const EntryFrame as u64 + core::mem::size_of::<EntryFrame>() as u64,
        ss: instr::read_ss() as u64,
        ds: instr::read_ds() as u64,
        es: instr::read_es() as u64,
        cr0: instr::read_cr0(),
        cr2: instr::read_cr2(),
        cr3: instr::read_cr3(),
        cr4: instr::read_cr4(),
        // SAFETY: EFER exists on every x86-64 CPU.
        efer: unsafe { instr::rdmsr(instr::msr::EFER) } & !instr::EFER_SVME,
        dr7: instr::read_dr7(),
        gdtr: instr::sgdt(),
        idtr: instr::sidt(),
        ..Default::default()
    }
}

/// This CPU's local APIC ID, which NMIs to it need: CPUID leaf 0xB has the full x2APIC ID,
/// leaf 1 the 8-bit one (AMD APM vol. 3, appendix E).
pub fn apic_id() -> u32 {
    let max = instr::cpuid(0, 0)[0];
    if max >= 0xB && instr::cpuid(0xB, 0)[1] != 0 {
        instr::cpuid(0xB, 0)[3]
    } else {
        instr::cpuid(1, 0)[1] >> 24
    }
}

#[cfg(test)]
mod tests {
    use super::descriptor::*;

    #[test]
    fn segment_attributes_pack_as_the_manual_says() {
        // Linux __KERNEL_CS: 64-bit code, present, DPL 0, G: attrib 0xA9B (FACTS.md).
        let kernel_cs = 0x00af_9b00_0000_ffff_u64;
        assert_eq!(pack_attrib(kernel_cs), 0xA9B);
        assert_eq!(expand_limit(kernel_cs), 0xFFFF_FFFF);
        // __KERNEL_DS: data, writable, accessed: 0xC93.
        let kernel_ds = 0x00cf_9300_0000_ffff_u64;
        assert_eq!(pack_attrib(kernel_ds), 0xC93);
        // A busy 64-bit TSS with a byte-granular limit of 0x67: 0x08B.
        let tss_low = 0x0000_8b00_0000_0067_u64 | (0x12_3456 << 16) | (0x78 << 56);
        assert_eq!(pack_attrib(tss_low), 0x08B);
        assert_eq!(expand_limit(tss_low), 0x67);
        assert_eq!(base(tss_low), 0x7812_3456);
    }
}
