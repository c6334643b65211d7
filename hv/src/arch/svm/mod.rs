//! AMD SVM: the vendor layer (AMD APM vol. 2, chapter 15 "Secure Virtual Machine").
//!
//! This module builds a VMCB from the live state of the CPU it runs on, runs the guest, turns
//! each #VMEXIT into a vendor-neutral [`crate::exit::VmExit`], applies the vendor-neutral
//! [`crate::exit::Action`] that comes back, and puts the guest's state back onto the CPU when
//! the hv steps out. Nothing above this module knows the VMCB layout.

pub mod msrpm;
pub mod vmcb;

use crate::arch::instr::{self, DescriptorTablePointer};
use crate::exit::{Event, VmExit};
pub use vmcb::Vmcb;
use vmcb::{event, misc1, misc2, ExitCode, VmcbSegment};

core::arch::global_asm!(
    include_str!("world_switch.S"),
    activate = sym crate::vcpu::activate,
    host_main = sym crate::vcpu::host_main,
    host_exception = sym crate::vcpu::host_exception,
);

extern "C" {
    /// See world_switch.S, step 2.
    pub fn qs_enter_host(cpu: *mut crate::vcpu::Cpu, stack_top: u64, host: *const HostContext)
        -> !;
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

/// The guest's general registers that VMRUN does not switch (RAX and RSP live in the VMCB).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
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
    _pad0: [u8; 6],
    pub idtr: DescriptorTablePointer,
    _pad1: [u8; 6],
}

/// The hv's own CR3, GDTR and IDTR, loaded by `qs_enter_host`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HostContext {
    pub cr3: u64,
    pub gdtr: DescriptorTablePointer,
    _pad0: [u8; 6],
    pub idtr: DescriptorTablePointer,
    _pad1: [u8; 6],
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

/// The ASID every guest CPU uses (one guest: the kernel that loaded us).
const GUEST_ASID: u32 = 1;

/// Reads the segment `selector` of the live CPU into VMCB form, using the GDT at `gdt`.
///
/// # Safety
/// `gdt` must be the CPU's live GDTR, mapped in the current address space.
unsafe fn capture_segment(gdt: &DescriptorTablePointer, selector: u16) -> VmcbSegment {
    let index = (selector >> 3) as u64;
    if index == 0 || selector & 4 != 0 || index * 8 + 7 > gdt.limit as u64 {
        // Null selector (DS/ES in 64-bit kernels, sometimes SS): unusable, base 0.
        return VmcbSegment {
            selector,
            ..Default::default()
        };
    }
    // SAFETY: the index is inside the live GDT (checked against its limit above), which the
    // caller guarantees is mapped.
    let d = unsafe { ((gdt.base + index * 8) as *const u64).read_volatile() };
    VmcbSegment {
        selector,
        attrib: vmcb::pack_attrib(d),
        limit: vmcb::expand_limit(d),
        base: vmcb::descriptor_base(d),
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

/// What the VMCB needs beyond the guest's own state.
pub struct VmcbSetup {
    pub msrpm_pa: u64,
    pub npt_root_pa: u64,
}

/// Fills `vmcb` so that VMRUN continues exactly at `native`.
///
/// # Safety
/// Must run on the CPU whose state `native` is, still on the kernel's address space (the GDT
/// is read for segment attributes).
pub unsafe fn build_vmcb(vmcb: &mut Vmcb, native: &NativeState, setup: &VmcbSetup) {
    // SAFETY: Vmcb is plain integers; all-zero is its documented reset state.
    unsafe { core::ptr::write_bytes(vmcb as *mut Vmcb, 0, 1) };
    let c = &mut vmcb.control;
    // Intercept only what the hv must see (every exit costs ~600 native CPUIDs under TCG).
    // NMIs are how the hv stops the CPUs for a debugger; foreign ones are reflected.
    c.intercept_misc1 =
        misc1::NMI | misc1::CPUID | misc1::MSR_PROT | misc1::SHUTDOWN | vmcb::MISC1_INVLPGA;
    c.intercept_misc2 = misc2::ALL_SVM;
    c.msrpm_base_pa = setup.msrpm_pa;
    c.guest_asid = GUEST_ASID;
    // This ASID may hold translations from an earlier activation with other nested tables.
    c.tlb_control = vmcb::tlb_control::FLUSH_ALL;
    c.np_enable = 1;
    c.n_cr3 = setup.npt_root_pa;

    let s = &mut vmcb.save;
    let gdt = native.gdtr;
    // SAFETY: forwarded: we run on the captured CPU with its GDT mapped.
    unsafe {
        s.cs = capture_segment(&gdt, native.cs as u16);
        s.ss = capture_segment(&gdt, native.ss as u16);
        s.ds = capture_segment(&gdt, native.ds as u16);
        s.es = capture_segment(&gdt, native.es as u16);
    }
    s.gdtr = VmcbSegment {
        limit: gdt.limit as u32,
        base: gdt.base,
        ..Default::default()
    };
    let idt = native.idtr;
    s.idtr = VmcbSegment {
        limit: idt.limit as u32,
        base: idt.base,
        ..Default::default()
    };
    s.cpl = 0;
    s.efer = native.efer | instr::EFER_SVME;
    s.cr0 = native.cr0;
    s.cr2 = native.cr2;
    s.cr3 = native.cr3;
    s.cr4 = native.cr4;
    s.dr6 = instr::read_dr6();
    s.dr7 = native.dr7;
    s.rflags = native.rflags;
    s.rip = native.rip;
    s.rsp = native.rsp;
    s.rax = native.rax;
    // SAFETY: PAT exists on every x86-64 CPU; with nested paging the guest's PAT is G_PAT.
    s.g_pat = unsafe { instr::rdmsr(instr::msr::PAT) };
}

/// The native state the guest is in now, for stepping out.
pub fn native_from_guest(vmcb: &Vmcb, regs: &GuestRegs) -> NativeState {
    let s = &vmcb.save;
    NativeState {
        regs: *regs,
        rax: s.rax,
        rip: s.rip,
        cs: s.cs.selector as u64,
        rflags: s.rflags,
        rsp: s.rsp,
        ss: s.ss.selector as u64,
        ds: s.ds.selector as u64,
        es: s.es.selector as u64,
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        efer: s.efer & !instr::EFER_SVME,
        dr7: s.dr7,
        gdtr: DescriptorTablePointer {
            limit: s.gdtr.limit as u16,
            base: s.gdtr.base,
        },
        idtr: DescriptorTablePointer {
            limit: s.idtr.limit as u16,
            base: s.idtr.base,
        },
        ..Default::default()
    }
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

/// Turns the VMCB's exit information into a [`VmExit`].
pub fn decode_exit(vmcb: &Vmcb, regs: &GuestRegs) -> VmExit {
    let c = &vmcb.control;
    if c.exit_code as u32 == vmcb::VMEXIT_INVALID_LOW {
        return VmExit::VmrunFailed;
    }
    let rax = vmcb.save.rax;
    match c.exit_code {
        x if x == ExitCode::Cpuid as u64 => VmExit::Cpuid {
            leaf: rax as u32,
            subleaf: regs.rcx as u32,
        },
        x if x == ExitCode::Msr as u64 => {
            let msr = regs.rcx as u32;
            if c.exit_info1 & 1 == 1 {
                let value = (regs.rdx << 32) | (rax & 0xFFFF_FFFF);
                VmExit::MsrWrite { msr, value }
            } else {
                VmExit::MsrRead { msr }
            }
        }
        x if x == ExitCode::Vmmcall as u64 => VmExit::Hypercall {
            rax,
            rbx: regs.rbx,
            rcx: regs.rcx,
            cpl: vmcb.save.cpl,
        },
        x if x == ExitCode::Stgi as u64 => VmExit::Stgi,
        x if x == ExitCode::Vmrun as u64
            || x == ExitCode::Vmload as u64
            || x == ExitCode::Vmsave as u64
            || x == ExitCode::Clgi as u64
            || x == ExitCode::Skinit as u64
            || x == ExitCode::Invlpga as u64 =>
        {
            VmExit::VirtualizationInstruction {
                vmrun: x == ExitCode::Vmrun as u64,
            }
        }
        x if x == ExitCode::Npf as u64 => {
            // EXITINFO1 is a #PF error code: bit 1 write, bit 4 instruction fetch (APM 15.25.6).
            VmExit::NestedPageFault {
                gpa: c.exit_info2,
                write: c.exit_info1 & 2 != 0,
                fetch: c.exit_info1 & 0x10 != 0,
            }
        }
        x if x == ExitCode::Shutdown as u64 => VmExit::Shutdown,
        x if x == ExitCode::Nmi as u64 => VmExit::Nmi,
        x if x == ExitCode::Intn as u64 => VmExit::SoftwareInterrupt,
        x if x == ExitCode::ExceptionDb as u64 => VmExit::DebugException { dr6: vmcb.save.dr6 },
        x if x == ExitCode::ExceptionBp as u64 => VmExit::Breakpoint,
        code => VmExit::Unexpected { code },
    }
}

/// The vendor's encoding of an event to inject.
pub fn encode_event(e: Event) -> u64 {
    match e {
        Event::InvalidOpcode => event::exception(event::VECTOR_UD),
        Event::GeneralProtection => event::exception_with_code(event::VECTOR_GP, 0),
    }
}

/// An exit that interrupted the delivery of an event must deliver it again (APM 15.7.2):
/// returns the EXITINTINFO to re-inject, if any.
pub fn pending_event(vmcb: &Vmcb) -> Option<u64> {
    let info = vmcb.control.exit_int_info;
    (info & event::VALID != 0).then_some(info)
}

/// A dump of the guest state for `qsctl stats`.
pub fn exit_record(cpu: u32, vmcb: &Vmcb) -> quicksilver_proto::stats::ExitRecord {
    let c = &vmcb.control;
    let s = &vmcb.save;
    quicksilver_proto::stats::ExitRecord {
        cpu,
        valid: 1,
        exit_code: c.exit_code,
        exit_info1: c.exit_info1,
        exit_info2: c.exit_info2,
        exit_int_info: c.exit_int_info,
        rip: s.rip,
        rsp: s.rsp,
        rflags: s.rflags,
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        efer: s.efer,
        cs: s.cs.selector as u64,
        cpl: s.cpl as u64,
    }
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
