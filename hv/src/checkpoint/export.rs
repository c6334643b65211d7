//! Reading a kept checkpoint while the machine runs (`qsctl export`, and the bridge's export
//! later): its memory as it was when taken, and each CPU's state, vendor-neutral.
//!
//! A page's contents at checkpoint `C` are the oldest pre-image logged since `C` (its first
//! write after `C` kept exactly that), or, for a page not written since, the page itself: it
//! is still write-protected, and a write to it would first have to take the engine's lock to
//! log it, which the reader holds while it copies. So the machine runs on during an export and
//! every page read is `C`'s. The hv's own pages read as zeros.

use super::undo::{NOT_LOGGED, PAGE};
use super::{read, record_bytes, write, Engine, CPU_SLOTS, ENGINE};
use crate::arch::instr;
use crate::cpu_state::{CpuState, LocalApic};
use crate::vmm::Hv;
use quicksilver_proto::abi::{
    CheckpointChanged, CheckpointCpu, CheckpointDevices, CheckpointRead, Status,
    CHECKPOINT_READ_DATA, CPU_INTERRUPT_SHADOW, CPU_NMI_BLOCKED, DEVICES_RECORD_V1,
    LAPIC_RECORD_V1,
};

/// Pages one read copies at most: what a 1 MiB buffer holds after its header page.
const MAX_PAGES: usize = 255;

/// `Op::CheckpointRead`, from a hypercall: `buf` is identity-mapped guest memory (host mode),
/// already logged as the hv's own write (`Hv::guest_buffer`).
/// `Op::CheckpointChanged`: the pages written between two checkpoints (or since one), each
/// entry a u64 after the header, as many as fit; `count` says how many there were.
pub fn changed(buf: &mut [u8]) -> Status {
    let Some(mut args) = read::<CheckpointChanged>(buf) else {
        return Status::BufferTooSmall;
    };
    let head = core::mem::size_of::<CheckpointChanged>();
    let room = (buf.len() - head) / 8;
    let b = (args.b != 0).then_some(args.b);
    let out = &mut buf[head..head + room * 8];
    let n = ENGINE.lock().log.written_between(args.a, b, |i, gpa| {
        if let Some(o) = out.get_mut(i * 8..i * 8 + 8) {
            o.copy_from_slice(&gpa.to_le_bytes());
        }
    });
    let status = match n {
        Ok(n) => {
            args.count = n as u64;
            Status::Ok
        }
        Err(_) => Status::NoSuchCheckpoint,
    };
    args.status = status as i64;
    write(buf, &args);
    status
}

pub fn read_pages(hv: &Hv, buf: &mut [u8]) -> Status {
    let Some(mut args) = read::<CheckpointRead>(buf) else {
        return Status::BufferTooSmall;
    };
    let data = CHECKPOINT_READ_DATA as usize;
    let room = (buf.len().saturating_sub(data) / PAGE).min(MAX_PAGES);
    let n = args.pages as usize;
    let first = args.first_gpa;
    // Whole aligned pages only (the copies are page copies), and no address that wraps.
    let aligned = (buf.as_ptr() as usize).is_multiple_of(PAGE) && first.is_multiple_of(PAGE as u64);
    let status = if n == 0 || n > room || !aligned || first.checked_add((n * PAGE) as u64).is_none()
    {
        Status::BadArgument
    } else {
        copy_pages(
            hv,
            &mut ENGINE.lock(),
            args.id,
            first,
            &mut buf[data..data + n * PAGE],
        )
    };
    args.status = status as i64;
    write(buf, &args);
    status
}

fn copy_pages(hv: &Hv, e: &mut Engine, id: u32, first: u64, out: &mut [u8]) -> Status {
    let n = out.len() / PAGE;
    let end = first + out.len() as u64;
    if !e.ram[..e.ram_n]
        .iter()
        .any(|&(s, t)| s <= first && end <= t)
    {
        return Status::NotInRam;
    }
    let mut slots = [NOT_LOGGED; MAX_PAGES];
    if e.log.preimages(id, first, &mut slots[..n]).is_err() {
        return Status::NoSuchCheckpoint;
    }
    for (i, &slot) in slots[..n].iter().enumerate() {
        let gpa = first + (i * PAGE) as u64;
        if hv.owns(gpa) {
            // The hv's own memory (its image, the checkpoint store) is RAM the kernel gave
            // away and never sees: it reads as zeros. Its contents are the hv's (the link's
            // key among them), and change with every page logged.
            out[i * PAGE..(i + 1) * PAGE].fill(0);
            continue;
        }
        let src = if slot == NOT_LOGGED {
            first + (i * PAGE) as u64
        } else {
            e.log.memory().slot_pa(slot)
        };
        let dst = out[i * PAGE..].as_mut_ptr();
        // SAFETY: host mode, where the identity map is the address space; `src` is a page of
        // guest RAM (inside a RAM range, checked above) that no CPU can write until this lock
        // is released, or a slot of checkpoint memory; `dst` a page of the caller's buffer
        // (a page of `out`). Both page-aligned: RAM pages and slots are, and the buffer's data
        // starts a page after its page-aligned header (the agent's allocation).
        unsafe { instr::copy_page(dst, src as *const u8) };
    }
    Status::Ok
}

/// `Op::CheckpointDevices`: the platform devices' record of a kept checkpoint
/// (`devices::DeviceState`'s bytes, `DEVICES_RECORD_V1`), after the header.
pub fn read_devices(hv: &Hv, buf: &mut [u8]) -> Status {
    let Some(mut args) = read::<CheckpointDevices>(buf) else {
        return Status::BufferTooSmall;
    };
    let head = core::mem::size_of::<CheckpointDevices>();
    let mut d = crate::devices::DeviceState::default();
    let status = if buf.len() < head + crate::devices::DeviceState::SIZE {
        Status::BufferTooSmall
    } else if !record_bytes(
        &mut ENGINE.lock(),
        args.id,
        hv.cpus * CPU_SLOTS,
        super::plain_bytes_mut(&mut d),
    ) {
        Status::NoSuchCheckpoint
    } else {
        let bytes = super::plain_bytes(&d);
        buf[head..head + bytes.len()].copy_from_slice(bytes);
        args.version = DEVICES_RECORD_V1;
        args.len = bytes.len() as u64;
        Status::Ok
    };
    args.status = status as i64;
    write(buf, &args);
    status
}

/// `Op::CheckpointCpu`: one CPU's state in a kept checkpoint, its XSAVE area and local APIC
/// record after it.
pub fn read_cpu(hv: &Hv, buf: &mut [u8]) -> Status {
    let Some(mut args) = read::<CheckpointCpu>(buf) else {
        return Status::BufferTooSmall;
    };
    let head = core::mem::size_of::<CheckpointCpu>();
    let mut st = CpuState::default();
    let status = if args.cpu >= hv.cpus {
        Status::BadArgument
    } else if !record_bytes(
        &mut ENGINE.lock(),
        args.id,
        args.cpu * CPU_SLOTS,
        super::state_bytes_mut(&mut st),
    ) {
        Status::NoSuchCheckpoint
    } else {
        let lapic = lapic_record(&st.apic);
        let xsave = &st.xsave.0[..];
        if buf.len() < head + xsave.len() + lapic.len() {
            Status::BufferTooSmall
        } else {
            fill(&mut args, &st);
            args.xsave_len = xsave.len() as u32;
            args.lapic_len = lapic.len() as u32;
            args.lapic_version = LAPIC_RECORD_V1;
            buf[head..head + xsave.len()].copy_from_slice(xsave);
            buf[head + xsave.len()..head + xsave.len() + lapic.len()].copy_from_slice(&lapic);
            Status::Ok
        }
    };
    args.status = status as i64;
    write(buf, &args);
    status
}

fn fill(a: &mut CheckpointCpu, s: &CpuState) {
    let g = &s.gprs;
    // In xAPIC mode the ID register holds the ID in bits 31:24 (APM vol. 2, 16.3.3).
    a.apic_id = if s.apic.x2apic {
        s.apic.id
    } else {
        s.apic.id >> 24
    };
    a.cpl = s.cpl as u32;
    a.gprs = [
        s.rax, g.rcx, g.rdx, g.rbx, s.rsp, g.rbp, g.rsi, g.rdi, g.r8, g.r9, g.r10, g.r11, g.r12,
        g.r13, g.r14, g.r15,
    ];
    a.rip = s.rip;
    a.rflags = s.rflags;
    for (i, seg) in [s.es, s.cs, s.ss, s.ds, s.fs, s.gs, s.ldtr, s.tr]
        .iter()
        .enumerate()
    {
        a.seg_selector[i] = seg.selector;
        a.seg_attrib[i] = seg.attrib;
        a.seg_limit[i] = seg.limit;
        a.seg_base[i] = seg.base;
    }
    a.gdtr_base = s.gdtr.base;
    a.gdtr_limit = s.gdtr.limit as u32;
    a.idtr_base = s.idtr.base;
    a.idtr_limit = s.idtr.limit as u32;
    a.cr = [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.xcr0];
    let m = &s.msrs;
    a.efer = m.efer;
    a.dr = [s.dr[0], s.dr[1], s.dr[2], s.dr[3], s.dr6, s.dr7];
    a.msrs = [
        m.star,
        m.lstar,
        m.cstar,
        m.sfmask,
        m.kernel_gs_base,
        m.sysenter_cs,
        m.sysenter_esp,
        m.sysenter_eip,
        m.pat,
        m.tsc_aux,
    ];
    let p = &s.interrupts.pending;
    a.pending = if p.valid {
        (1 << 31)
            | ((p.kind as u64 & 7) << 8)
            | p.vector as u64
            | p.error_code.map_or(0, |c| (1 << 11) | ((c as u64) << 32))
    } else {
        0
    };
    a.flags = if s.interrupts.shadow {
        CPU_INTERRUPT_SHADOW
    } else {
        0
    } | if s.interrupts.nmi_blocked == Some(true) {
        CPU_NMI_BLOCKED
    } else {
        0
    };
}

/// The local APIC record, version 1 (`LAPIC_RECORD_V1`): little-endian IA32_APIC_BASE (u64),
/// then u32s: present, x2APIC, ID, TPR, LDR, DFR, SVR, the six LVTs (timer, thermal,
/// performance counter, LINT0, LINT1, error), timer divide, initial and current count, ISR,
/// IRR and TMR (8 each), then IA32_TSC_DEADLINE (u64).
fn lapic_record(a: &LocalApic) -> [u8; LAPIC_RECORD_LEN] {
    let mut out = [0u8; LAPIC_RECORD_LEN];
    let mut at = 0;
    let mut put = |b: &[u8]| {
        out[at..at + b.len()].copy_from_slice(b);
        at += b.len();
    };
    put(&a.base_msr.to_le_bytes());
    for v in [
        a.present as u32,
        a.x2apic as u32,
        a.id,
        a.tpr,
        a.ldr,
        a.dfr,
        a.svr,
    ] {
        put(&v.to_le_bytes());
    }
    for v in a.lvt {
        put(&v.to_le_bytes());
    }
    for v in [a.timer_divide, a.timer_initial, a.timer_current] {
        put(&v.to_le_bytes());
    }
    for v in a.isr.iter().chain(&a.irr).chain(&a.tmr) {
        put(&v.to_le_bytes());
    }
    put(&a.tsc_deadline.to_le_bytes());
    out
}

const LAPIC_RECORD_LEN: usize = 8 + 4 * (7 + 6 + 3 + 24) + 8;
