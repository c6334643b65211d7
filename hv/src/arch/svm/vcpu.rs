//! The SVM virtual CPU: a VMCB, the host save area VMRUN uses, and the general registers VMRUN
//! does not switch. Everything above `arch/` reaches the guest through [`VirtCpu`] and
//! [`Vcpu::run`]; this file is where that becomes VMCB fields (AMD APM vol. 2, 15.5-15.20).

use super::vmcb::{self, event, exceptions, misc1, misc2, tlb_control, ExitCode, Vmcb};
use super::{qs_run_guest, vmload, vmsave};
use crate::arch::context::{GuestRegs, NativeState};
use crate::arch::instr::{self, DescriptorTablePointer};
use crate::arch::live;
use crate::arch::virt_cpu::{Event, Gpr, VirtCpu};
use crate::arch::vm_exit::VmExit;
use crate::cpu_state::{CpuState, PendingEvent};
use quicksilver_proto::stats::ExitRecord;

/// The ASID every guest CPU uses (one guest: the kernel that loaded us).
const GUEST_ASID: u32 = 1;

/// What a vCPU needs beyond the guest's own state.
pub struct VcpuSetup {
    /// The MSR intercept map (`arch::intercept_msr_writes`).
    pub msr_intercepts_pa: u64,
    /// The nested page tables' root.
    pub nested_root_pa: u64,
    /// The hv's own CR3: an exit whose saved CR3 is this one brought back host state.
    pub host_cr3: u64,
    /// The I/O intercept map (`arch::IoIntercepts`, page-aligned), or 0 for none.
    pub io_intercepts_pa: u64,
}

/// One CPU's SVM state: three pages (VMCB, host save area, then this CPU's registers).
#[repr(C, align(4096))]
pub struct Vcpu {
    vmcb: Vmcb,
    host_save: [u8; 4096],
    regs: GuestRegs,
    vmcb_pa: u64,
    host_save_pa: u64,
    host_cr3: u64,
}

const _: () = assert!(core::mem::size_of::<Vcpu>() == 3 * 4096);

/// Which parts of a [`CpuState`] a restore writes back.
pub mod parts {
    /// Registers, segments, control registers, MSRs, interrupt state.
    pub const REGS: u8 = 1 << 0;
    /// The XSAVE area.
    pub const XSAVE: u8 = 1 << 1;
    /// CR8, TSC_AUX, the local APIC.
    pub const LIVE: u8 = 1 << 2;
    pub const ALL: u8 = REGS | XSAVE | LIVE;
    /// With LIVE: the state is a checkpoint's, restored after a rollback
    /// (`live::restore_rolled_back`).
    pub const ROLLBACK: u8 = 1 << 3;
}

impl Vcpu {
    /// Zeroes the vCPU at `p`, whose first byte is at physical address `pa`.
    ///
    /// # Safety
    /// `p` points to an unused, page-aligned area of `size_of::<Vcpu>()` bytes of the hv's
    /// memory, at physical address `pa`.
    pub unsafe fn init_in_place(p: *mut Vcpu, pa: u64) {
        // SAFETY: forwarded; an all-zero Vcpu is valid (plain integers).
        unsafe {
            core::ptr::write_bytes(p, 0, 1);
            (*p).vmcb_pa = pa;
            (*p).host_save_pa = pa + 4096;
        }
    }

    /// Fills the VMCB so that VMRUN continues exactly at `native`, and enables SVM on this CPU.
    ///
    /// # Safety
    /// Must run on the CPU whose state `native` is, still on the kernel's address space (the
    /// GDT is read for segment attributes), with SVM supported and not in use.
    pub unsafe fn prepare(&mut self, native: &NativeState, setup: &VcpuSetup) {
        let vmcb = &mut self.vmcb;
        // SAFETY: Vmcb is plain integers; all-zero is its documented reset state.
        unsafe { core::ptr::write_bytes(vmcb as *mut Vmcb, 0, 1) };
        let c = &mut vmcb.control;
        // Intercept only what the hv must see (every exit costs ~600 native CPUIDs under TCG).
        // NMIs are how the hv stops the CPUs (the rendezvous); foreign ones are reflected.
        c.intercept_misc1 =
            misc1::NMI | misc1::CPUID | misc1::MSR_PROT | misc1::SHUTDOWN | vmcb::MISC1_INVLPGA;
        c.intercept_misc2 = misc2::ALL_SVM;
        c.msrpm_base_pa = setup.msr_intercepts_pa;
        if setup.io_intercepts_pa != 0 {
            // The few ports whose writes the hv shadows (`crate::devices::intercept`); every
            // other port runs without an exit.
            c.intercept_misc1 |= misc1::IOIO_PROT;
            c.iopm_base_pa = setup.io_intercepts_pa;
        }
        c.guest_asid = GUEST_ASID;
        // This ASID may hold translations from an earlier activation with other nested tables.
        c.tlb_control = tlb_control::FLUSH_ALL;
        c.np_enable = 1;
        c.n_cr3 = setup.nested_root_pa;

        let s = &mut vmcb.save;
        let gdt = native.gdtr;
        // SAFETY: forwarded: we run on the captured CPU with its GDT mapped.
        unsafe {
            use crate::arch::context::capture_segment;
            s.cs = capture_segment(&gdt, native.cs as u16);
            s.ss = capture_segment(&gdt, native.ss as u16);
            s.ds = capture_segment(&gdt, native.ds as u16);
            s.es = capture_segment(&gdt, native.es as u16);
        }
        s.gdtr = table_segment(native.gdtr);
        s.idtr = table_segment(native.idtr);
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
        self.regs = native.regs;
        self.host_cr3 = setup.host_cr3;
        // SAFETY: SVM is supported and not in use (the caller); VM_HSAVE_PA is this CPU's
        // own page.
        unsafe {
            instr::wrmsr(instr::msr::EFER, native.efer | instr::EFER_SVME);
            instr::wrmsr(instr::msr::VM_HSAVE_PA, self.host_save_pa);
        }
    }

    /// Runs the guest until its next exit, and says what the exit was.
    ///
    /// # Safety
    /// Host mode on the CPU this vCPU belongs to, after [`Vcpu::prepare`].
    pub unsafe fn run(&mut self) -> VmExit {
        // SAFETY: the VMCB was built by `prepare` and is changed only through this type;
        // VMRUN's consistency checks catch anything wrong, reported as VmrunFailed.
        unsafe { qs_run_guest(&mut self.regs, self.vmcb_pa) };
        let c = &mut self.vmcb.control;
        c.tlb_control = tlb_control::DO_NOTHING;
        c.event_inj = 0;
        if c.exit_code as u32 != vmcb::VMEXIT_INVALID_LOW && self.vmcb.save.cr3 == self.host_cr3 {
            // The save area holds the hv's own state (its CR3, CS, RIP after VMRUN), not the
            // guest's. Stock QEMU's TCG does this to CPU 0 now and then (another vCPU's FPU
            // load stores back a stale copy of CPU 0's SVM flags: xtask/src/emulator.rs);
            // never VMRUN it (that "guest" would run the hv's code under nested paging).
            return VmExit::LostGuestState;
        }
        let exit = self.decode_exit();
        if exit == VmExit::Nmi {
            // The intercepted NMI stays pending until GIF is set (APM 15.12): take it into the
            // hv's own handler now. Left pending, it would be taken by the next STGI in host
            // mode (a parked CPU's sleep, where it would pass for a wake) or at the next VMRUN
            // (another NMI exit, for ever).
            // SAFETY: host mode with RFLAGS.IF = 0: only this NMI can arrive, into the hv's
            // handler, which returns.
            unsafe { super::qs_take_nmi() };
        }
        exit
    }

    /// Turns the VMCB's exit information into a [`VmExit`].
    fn decode_exit(&self) -> VmExit {
        let c = &self.vmcb.control;
        if c.exit_code as u32 == vmcb::VMEXIT_INVALID_LOW {
            return VmExit::VmrunFailed;
        }
        let (rax, regs) = (self.vmcb.save.rax, &self.regs);
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
                cpl: self.vmcb.save.cpl,
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
            // EXITINFO1 is a #PF error code: bit 1 write, bit 4 instruction fetch (APM 15.25.6).
            x if x == ExitCode::Npf as u64 => VmExit::NestedPageFault {
                gpa: c.exit_info2,
                write: c.exit_info1 & 2 != 0,
                fetch: c.exit_info1 & 0x10 != 0,
            },
            x if x == ExitCode::Shutdown as u64 => VmExit::Shutdown,
            x if x == ExitCode::Ioio as u64 => {
                decode_ioio(c.exit_info1, c.exit_info2, self.vmcb.save.rip)
            }
            x if x == ExitCode::Nmi as u64 => VmExit::Nmi,
            x if x == ExitCode::Iret as u64 => VmExit::Iret,
            x if x == ExitCode::Intn as u64 => VmExit::SoftwareInterrupt,
            x if x == ExitCode::ExceptionDb as u64 => VmExit::DebugException {
                dr6: self.vmcb.save.dr6,
            },
            x if x == ExitCode::ExceptionBp as u64 => VmExit::Breakpoint,
            code => VmExit::Unexpected { code },
        }
    }

    /// The native state the guest is in now, for stepping out of guest mode.
    pub fn native_state(&self) -> NativeState {
        let s = &self.vmcb.save;
        NativeState {
            regs: self.regs,
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

    /// A dump of the exit and the guest state, for `qsctl stats`.
    pub fn exit_record(&self, cpu: u32) -> ExitRecord {
        let c = &self.vmcb.control;
        let s = &self.vmcb.save;
        ExitRecord {
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

    /// The exit code, for messages about an exit the hv cannot go on from.
    pub fn exit_code(&self) -> u64 {
        self.vmcb.control.exit_code
    }

    /// Captures this CPU's whole state into `out`: the VMCB's save area, FS, GS, TR, LDTR and
    /// the SYSCALL/SYSENTER MSRs by VMSAVE (VMRUN leaves them in the CPU), and the live rest.
    ///
    /// # Safety
    /// Host mode on this vCPU's own CPU, after an exit.
    pub unsafe fn save_state(&mut self, out: &mut CpuState) {
        // SAFETY: host mode on this CPU; VMSAVE writes only the listed fields of our own VMCB.
        unsafe { vmsave(self.vmcb_pa) };
        state_from_vmcb(&self.vmcb, &self.regs, out);
        live::capture(out);
    }

    /// Writes back `parts` of `s` (see [`parts`]).
    ///
    /// # Safety
    /// Host mode on this vCPU's own CPU, after an exit; `s` a state captured on this CPU
    /// (possibly changed by a debugger within the limits it checks).
    pub unsafe fn restore_state(&mut self, s: &CpuState, which: u8) {
        if which & parts::REGS != 0 {
            state_to_vmcb(s, &mut self.vmcb, &mut self.regs);
            // SAFETY: host mode on this CPU; VMLOAD loads what VMSAVE saved, possibly with
            // the bases a debugger changed (canonical: it refuses others).
            unsafe { vmload(self.vmcb_pa) };
        }
        if which & parts::XSAVE != 0 {
            live::restore_xsave(s);
        }
        if which & parts::LIVE != 0 {
            if which & parts::ROLLBACK != 0 {
                live::restore_rolled_back(s);
            } else {
                live::restore(s);
            }
        }
    }
}

/// An IOIO exit in neutral terms (APM 15.10.2): EXITINFO1 says what, EXITINFO2 where the
/// next instruction is.
fn decode_ioio(info1: u64, next_rip: u64, rip: u64) -> VmExit {
    use vmcb::ioio;
    let size = if info1 & ioio::SZ32 != 0 {
        4
    } else if info1 & ioio::SZ16 != 0 {
        2
    } else {
        1
    };
    // An IN/OUT is 1 to 15 bytes long; anything else means EXITINFO2 was not filled.
    let len = match next_rip.wrapping_sub(rip) {
        l @ 1..=15 => l as u8,
        _ => 0,
    };
    VmExit::PortIo {
        port: (info1 >> ioio::PORT_SHIFT) as u16,
        size,
        input: info1 & ioio::TYPE_IN != 0,
        // REP before a plain IN or OUT is ignored by the CPU: only STR makes it a string access.
        string: info1 & ioio::STR != 0,
        len,
    }
}

fn table_segment(t: DescriptorTablePointer) -> vmcb::VmcbSegment {
    vmcb::VmcbSegment {
        limit: t.limit as u32,
        base: t.base,
        ..Default::default()
    }
}

/// The VMCB's part of a [`CpuState`] (after VMSAVE).
fn state_from_vmcb(vmcb: &Vmcb, regs: &GuestRegs, out: &mut CpuState) {
    let (s, c) = (&vmcb.save, &vmcb.control);
    out.rax = s.rax;
    out.rsp = s.rsp;
    out.gprs = *regs;
    out.rip = s.rip;
    out.rflags = s.rflags;
    [out.cs, out.ss, out.ds, out.es, out.fs, out.gs] = [s.cs, s.ss, s.ds, s.es, s.fs, s.gs];
    [out.ldtr, out.tr] = [s.ldtr, s.tr];
    out.gdtr = DescriptorTablePointer {
        limit: s.gdtr.limit as u16,
        base: s.gdtr.base,
    };
    out.idtr = DescriptorTablePointer {
        limit: s.idtr.limit as u16,
        base: s.idtr.base,
    };
    out.cpl = s.cpl;
    [out.cr0, out.cr2, out.cr3, out.cr4] = [s.cr0, s.cr2, s.cr3, s.cr4];
    out.dr6 = s.dr6;
    out.dr7 = s.dr7;
    let m = &mut out.msrs;
    m.efer = s.efer;
    m.pat = s.g_pat;
    [m.star, m.lstar, m.cstar, m.sfmask] = [s.star, s.lstar, s.cstar, s.sfmask];
    [m.sysenter_cs, m.sysenter_esp, m.sysenter_eip] =
        [s.sysenter_cs, s.sysenter_esp, s.sysenter_eip];
    m.kernel_gs_base = s.kernel_gs_base;
    let info = interrupted_event(c.exit_int_info);
    // Without V, the other bits are whatever the CPU left there: not part of the state.
    out.interrupts.pending = if info & event::VALID != 0 {
        PendingEvent {
            valid: true,
            kind: ((info >> 8) & 7) as u8,
            vector: info as u8,
            error_code: (info & event::ERROR_VALID != 0).then_some((info >> 32) as u32),
        }
    } else {
        PendingEvent::default()
    };
    out.interrupts.shadow = c.interrupt_shadow & 1 != 0;
    // SVM without vNMI keeps NMI blocking in the CPU only; the hv knows it for every NMI the
    // guest gets (it intercepts them all and delivers them itself): the IRET intercept is on
    // from that delivery to the IRET that ends the handler.
    out.interrupts.nmi_blocked = Some(c.intercept_misc1 & misc1::IRET != 0);
}

/// EXITINTINFO as the manual defines it. QEMU's TCG records an external interrupt whose
/// delivery was cut short as an *exception* with the interrupt's vector (type 3, vector >= 32;
/// its `handle_even_inj` knows only exceptions and software interrupts), and VMRUN refuses to
/// inject an exception with a vector of 31 or more (VMEXIT_INVALID). No exception has such a
/// vector (APM vol. 2, 8.2), so that is an external interrupt (type 0). Copy-on-write makes
/// this common: a nested page fault in the middle of delivering an interrupt (the guest's page
/// tables and stack are written as they are used).
/// An NMI it reports the same way (type 3, vector 2), which VMRUN also refuses to inject as
/// an exception: that is an NMI (type 2).
fn interrupted_event(info: u64) -> u64 {
    let (kind, vector) = ((info >> 8) & 7, info & 0xFF);
    if info & event::VALID == 0 || kind != 3 {
        info
    } else if vector >= 32 {
        info & !(7 << 8) & !event::ERROR_VALID & 0xFFFF_FFFF
    } else if vector == event::VECTOR_NMI {
        (info & !(7 << 8) & !event::ERROR_VALID & 0xFFFF_FFFF) | event::TYPE_NMI
    } else {
        info
    }
}

/// Has the guest take event `info` (EXITINTINFO's format) at the next entry (APM vol. 2,
/// 15.20), or nothing when `info` is not valid.
fn deliver(c: &mut vmcb::VmcbControlArea, info: u64) {
    if info & event::VALID != 0 {
        inject_raw(c, interrupted_event(info));
    } else {
        c.event_inj = 0;
    }
}

/// Sets EVENTINJ to `info` (valid, in EVENTINJ's format). An NMI opens the guest's NMI handler:
/// the IRET that ends it is intercepted ([`VirtCpu::in_nmi`]).
fn inject_raw(c: &mut vmcb::VmcbControlArea, info: u64) {
    c.event_inj = info;
    if (info >> 8) & 7 == event::TYPE_NMI >> 8 {
        c.intercept_misc1 |= misc1::IRET;
    }
}

/// Writes a [`CpuState`] into the VMCB and the register block (before VMLOAD).
fn state_to_vmcb(st: &CpuState, vmcb: &mut Vmcb, regs: &mut GuestRegs) {
    let (s, c) = (&mut vmcb.save, &mut vmcb.control);
    s.rax = st.rax;
    s.rsp = st.rsp;
    *regs = st.gprs;
    s.rip = st.rip;
    s.rflags = st.rflags;
    [s.cs, s.ss, s.ds, s.es, s.fs, s.gs] = [st.cs, st.ss, st.ds, st.es, st.fs, st.gs];
    [s.ldtr, s.tr] = [st.ldtr, st.tr];
    s.gdtr = table_segment(st.gdtr);
    s.idtr = table_segment(st.idtr);
    s.cpl = st.cpl;
    [s.cr0, s.cr2, s.cr3, s.cr4] = [st.cr0, st.cr2, st.cr3, st.cr4];
    s.dr6 = st.dr6;
    s.dr7 = st.dr7;
    let m = &st.msrs;
    s.efer = m.efer;
    s.g_pat = m.pat;
    [s.star, s.lstar, s.cstar, s.sfmask] = [m.star, m.lstar, m.cstar, m.sfmask];
    [s.sysenter_cs, s.sysenter_esp, s.sysenter_eip] =
        [m.sysenter_cs, m.sysenter_esp, m.sysenter_eip];
    s.kernel_gs_base = m.kernel_gs_base;
    match st.interrupts.nmi_blocked {
        Some(true) => c.intercept_misc1 |= misc1::IRET,
        Some(false) => c.intercept_misc1 &= !misc1::IRET,
        None => {}
    }
    let p = st.interrupts.pending;
    c.exit_int_info = if p.valid {
        event::VALID
            | ((p.kind as u64 & 7) << 8)
            | p.vector as u64
            | p.error_code
                .map_or(0, |e| event::ERROR_VALID | ((e as u64) << 32))
    } else {
        0
    };
    // The event is delivered at the next entry, as `reinject_interrupted` would.
    deliver(c, c.exit_int_info);
    c.interrupt_shadow = (c.interrupt_shadow & !1) | st.interrupts.shadow as u64;
}

impl VirtCpu for Vcpu {
    fn gpr(&self, r: Gpr) -> u64 {
        let g = &self.regs;
        match r {
            Gpr::Rax => self.vmcb.save.rax,
            Gpr::Rsp => self.vmcb.save.rsp,
            Gpr::Rcx => g.rcx,
            Gpr::Rdx => g.rdx,
            Gpr::Rbx => g.rbx,
            Gpr::Rbp => g.rbp,
            Gpr::Rsi => g.rsi,
            Gpr::Rdi => g.rdi,
            Gpr::R8 => g.r8,
            Gpr::R9 => g.r9,
            Gpr::R10 => g.r10,
            Gpr::R11 => g.r11,
            Gpr::R12 => g.r12,
            Gpr::R13 => g.r13,
            Gpr::R14 => g.r14,
            Gpr::R15 => g.r15,
        }
    }
    fn set_gpr(&mut self, r: Gpr, v: u64) {
        let g = &mut self.regs;
        let slot = match r {
            Gpr::Rax => &mut self.vmcb.save.rax,
            Gpr::Rsp => &mut self.vmcb.save.rsp,
            Gpr::Rcx => &mut g.rcx,
            Gpr::Rdx => &mut g.rdx,
            Gpr::Rbx => &mut g.rbx,
            Gpr::Rbp => &mut g.rbp,
            Gpr::Rsi => &mut g.rsi,
            Gpr::Rdi => &mut g.rdi,
            Gpr::R8 => &mut g.r8,
            Gpr::R9 => &mut g.r9,
            Gpr::R10 => &mut g.r10,
            Gpr::R11 => &mut g.r11,
            Gpr::R12 => &mut g.r12,
            Gpr::R13 => &mut g.r13,
            Gpr::R14 => &mut g.r14,
            Gpr::R15 => &mut g.r15,
        };
        *slot = v;
    }
    fn rip(&self) -> u64 {
        self.vmcb.save.rip
    }
    fn set_rip(&mut self, v: u64) {
        self.vmcb.save.rip = v;
    }
    fn rflags(&self) -> u64 {
        self.vmcb.save.rflags
    }
    fn set_rflags(&mut self, v: u64) {
        self.vmcb.save.rflags = v;
    }
    fn cr3(&self) -> u64 {
        self.vmcb.save.cr3
    }
    fn cpl(&self) -> u8 {
        self.vmcb.save.cpl
    }
    fn efer(&self) -> u64 {
        self.vmcb.save.efer
    }
    fn set_efer(&mut self, v: u64) {
        self.vmcb.save.efer = v;
    }
    fn dr6(&self) -> u64 {
        self.vmcb.save.dr6
    }
    fn set_dr6(&mut self, v: u64) {
        self.vmcb.save.dr6 = v;
    }
    fn dr7(&self) -> u64 {
        self.vmcb.save.dr7
    }
    fn set_dr7(&mut self, v: u64) {
        self.vmcb.save.dr7 = v;
    }
    fn inject(&mut self, e: Event) {
        inject_raw(&mut self.vmcb.control, encode_event(e));
    }
    fn in_nmi(&self) -> bool {
        self.vmcb.control.intercept_misc1 & misc1::IRET != 0
    }
    fn end_nmi(&mut self) {
        self.vmcb.control.intercept_misc1 &= !misc1::IRET;
    }
    fn reinject_interrupted(&mut self) {
        let info = self.vmcb.control.exit_int_info;
        if info & event::VALID != 0 {
            deliver(&mut self.vmcb.control, info);
        }
    }
    fn skip(&mut self, len: u64) {
        self.vmcb.save.rip += len;
        self.vmcb.control.interrupt_shadow &= !1;
    }
    fn set_debug_intercepts(&mut self, on: bool) {
        let c = &mut self.vmcb.control;
        // TCG reports INT3 through the INTn intercept, hardware through #BP (FACTS.md).
        if on {
            c.intercept_misc1 |= misc1::INTN;
            c.intercept_exceptions |= exceptions::DB | exceptions::BP;
        } else {
            c.intercept_misc1 &= !misc1::INTN;
            c.intercept_exceptions &= !(exceptions::DB | exceptions::BP);
        }
    }
    fn hold_interrupts(&mut self, on: bool) {
        // V_INTR_MASKING: physical interrupts stay pending while the guest runs (APM 15.21.1).
        if on {
            self.vmcb.control.vintr |= vmcb::V_INTR_MASKING;
        } else {
            self.vmcb.control.vintr &= !vmcb::V_INTR_MASKING;
        }
    }
    fn flush_tlb(&mut self) {
        self.vmcb.control.tlb_control = tlb_control::FLUSH_GUEST;
    }
}

impl Vcpu {
    /// The guest's TSC is the CPU's plus `offset` (two's complement; APM vol. 2, 15.30.5).
    /// The hv never sets VMCB clean bits, so the next VMRUN loads it.
    pub fn set_tsc_offset(&mut self, offset: u64) {
        self.vmcb.control.tsc_offset = offset;
    }
}

/// The EVENTINJ encoding of `e` (APM 15.20).
pub fn encode_event(e: Event) -> u64 {
    match e {
        Event::Exception { vector, error_code } => match error_code {
            Some(code) => event::exception_with_code(vector as u64, code),
            None => event::exception(vector as u64),
        },
        Event::Nmi => event::VALID | event::TYPE_NMI | event::VECTOR_NMI,
        Event::SoftwareInterrupt { vector } => {
            event::VALID | event::TYPE_SOFTWARE_INT | vector as u64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupt_qemu_reports_as_an_exception_is_delivered_as_an_interrupt() {
        // The timer's vector 0xEC, cut short by a nested page fault, as QEMU's TCG reports it.
        assert_eq!(interrupted_event(0x8000_03EC), 0x8000_00EC);
        // A real exception (#PF with its error code) and an NMI stay what they are.
        assert_eq!(
            interrupted_event(0x0000_0002_8000_0B0E),
            0x0000_0002_8000_0B0E
        );
        assert_eq!(interrupted_event(0x8000_0202), 0x8000_0202);
        assert_eq!(
            interrupted_event(0x8000_0302),
            0x8000_0202,
            "QEMU's NMI, as an NMI"
        );
        assert_eq!(
            interrupted_event(0x0000_03EC),
            0x0000_03EC,
            "not valid: left alone"
        );
        // SAFETY: the VMCB is plain integers; all zero is a valid value.
        let mut v: Box<Vmcb> = unsafe { Box::new(core::mem::zeroed()) };
        deliver(&mut v.control, 0x8000_03EC);
        assert_eq!(v.control.event_inj, 0x8000_00EC);
        deliver(&mut v.control, 0);
        assert_eq!(v.control.event_inj, 0);
    }

    #[test]
    fn events_encode_as_the_manual_says() {
        assert_eq!(encode_event(Event::UD), 0x8000_0306);
        assert_eq!(encode_event(Event::GP), 0x8000_0B0D);
        assert_eq!(encode_event(Event::Nmi), 0x8000_0202);
        assert_eq!(
            encode_event(Event::SoftwareInterrupt { vector: 0x80 }),
            0x8000_0480
        );
    }

    fn boxed_vmcb() -> Box<Vmcb> {
        // SAFETY: Vmcb is plain integers: all-zero is valid.
        unsafe { Box::new(core::mem::zeroed()) }
    }

    #[test]
    fn ioio_exits_decode_as_the_manual_says() {
        // OUT DX, AL to 0x3FA (EE: one byte): TYPE 0, SZ8, port in 31:16.
        let out = (0x3FA << 16) | vmcb::ioio::SZ8;
        assert_eq!(
            decode_ioio(out, 0xFFFF_FFFF_8100_0001, 0xFFFF_FFFF_8100_0000),
            VmExit::PortIo {
                port: 0x3FA,
                size: 1,
                input: false,
                string: false,
                len: 1
            }
        );
        // IN EAX, 0x70 (E5 70: two bytes).
        let inl = (0x70 << 16) | vmcb::ioio::SZ32 | vmcb::ioio::TYPE_IN;
        assert_eq!(
            decode_ioio(inl, 0x1002, 0x1000),
            VmExit::PortIo {
                port: 0x70,
                size: 4,
                input: true,
                string: false,
                len: 2
            }
        );
        // REP OUTSB, and an EXITINFO2 that was not filled (length unknown).
        let outs = (0x3FA << 16) | vmcb::ioio::SZ8 | vmcb::ioio::STR | vmcb::ioio::REP;
        assert!(matches!(
            decode_ioio(outs, 0, 0x1000),
            VmExit::PortIo {
                string: true,
                len: 0,
                ..
            }
        ));
    }

    #[test]
    fn a_cpu_state_survives_the_vmcb_and_back() {
        let mut st = CpuState::kernel_sample();
        st.msrs.efer |= instr::EFER_SVME;
        st.interrupts.pending = PendingEvent {
            valid: true,
            kind: 3,
            vector: 14,
            error_code: Some(2),
        };
        st.interrupts.shadow = true;
        let mut vmcb = boxed_vmcb();
        let mut regs = GuestRegs::default();
        state_to_vmcb(&st, &mut vmcb, &mut regs);
        assert_eq!(vmcb.save.tr.attrib, 0x08B);
        assert_eq!(vmcb.control.exit_int_info, 0x0000_0002_8000_0B0E);
        let mut back = CpuState::default();
        state_from_vmcb(&vmcb, &regs, &mut back);
        assert_eq!(back.interrupts.nmi_blocked, Some(false));
        back.interrupts.nmi_blocked = st.interrupts.nmi_blocked;
        let mut names = [""; 8];
        let n = st.differences(&back, &mut names);
        assert_eq!(n, 0, "differs in {:?}", &names[..n.min(8)]);
    }
}
