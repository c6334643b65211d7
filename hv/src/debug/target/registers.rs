//! A parked CPU's state as gdb's register file ([`X86Regs`], the `g` and `G` packets): read
//! whole, written back only where a debugger may change a running kernel's CPU.

use crate::arch::parts;
use crate::cpu_state::CpuState;
use crate::debug::regs::{gpr, sys, X86Regs};

/// Is `a` canonical (bits 63:47 all equal; AMD APM vol. 2, 5.3.1)? A non-canonical RIP or
/// segment base would make the VMRUN that resumes the CPU fail.
fn canonical(a: u64) -> bool {
    let top = a >> 47;
    top == 0 || top == 0x1_FFFF
}

/// gdb's view of a CPU's state (the `g` packet).
pub fn registers_from_state(st: &CpuState, r: &mut X86Regs) {
    let g = &st.gprs;
    r.gpr = [
        st.rax, g.rbx, g.rcx, g.rdx, g.rsi, g.rdi, g.rbp, st.rsp, g.r8, g.r9, g.r10, g.r11, g.r12,
        g.r13, g.r14, g.r15,
    ];
    r.rip = st.rip;
    r.eflags = st.rflags as u32;
    r.seg = [st.cs, st.ss, st.ds, st.es, st.fs, st.gs].map(|s| s.selector as u32);
    let fx = st.xsave.legacy();
    for (n, reg) in r.st.iter_mut().enumerate() {
        reg.copy_from_slice(&fx[32 + 16 * n..42 + 16 * n]);
    }
    let w16 = |o: usize| u16::from_le_bytes([fx[o], fx[o + 1]]) as u32;
    let w32 = |o: usize| u32::from_le_bytes([fx[o], fx[o + 1], fx[o + 2], fx[o + 3]]);
    // FXSAVE keeps an abridged tag (1 bit per register, 1 = valid); gdb wants the full one
    // (2 bits, 11 = empty). Valid registers are reported as valid (00).
    let abridged = fx[4];
    let ftag = (0..8).fold(0u32, |t, n| {
        t | if abridged & (1 << n) == 0 {
            3 << (2 * n)
        } else {
            0
        }
    });
    r.fpu = [
        w16(0),
        w16(2),
        ftag,
        w16(12),
        w32(8),
        w16(20),
        w32(16),
        w16(6) & 0x7FF,
    ];
    for (n, x) in r.xmm.iter_mut().enumerate() {
        let o = 160 + 16 * n;
        *x = u128::from_le_bytes(fx[o..o + 16].try_into().unwrap_or([0; 16]));
    }
    r.mxcsr = w32(24);
    r.fs_base = st.fs.base;
    r.gs_base = st.gs.base;
    r.sys = [
        st.msrs.kernel_gs_base,
        st.cr0,
        st.cr2,
        st.cr3,
        st.cr4,
        st.cr8,
        st.msrs.efer,
    ];
}

/// gdb's `G` packet into a CPU's state: which parts changed (`arch::parts`), or `None` for
/// a value the CPU would refuse (a non-canonical RIP or base). Selectors, CR0/CR3/CR4 and EFER
/// are shown, not written: changing them under a running kernel is not a debugger's job. CR2
/// is harmless.
pub fn registers_into_state(r: &X86Regs, st: &mut CpuState) -> Option<u8> {
    let bases = [r.fs_base, r.gs_base, r.sys[sys::K_GS_BASE]];
    if !canonical(r.rip) || !bases.iter().all(|&b| canonical(b)) {
        return None;
    }
    let v = &r.gpr;
    // What a `G` may change besides the FPU (compared after, without copying the XSAVE area).
    let regs = |st: &CpuState| {
        (
            st.rax,
            st.rsp,
            st.gprs,
            st.rip,
            st.rflags,
            st.cr2,
            [st.fs.base, st.gs.base, st.msrs.kernel_gs_base],
        )
    };
    let before = regs(st);
    st.rax = v[gpr::RAX];
    st.rsp = v[gpr::RSP];
    let g = &mut st.gprs;
    [g.rbx, g.rcx, g.rdx, g.rsi, g.rdi, g.rbp] = [
        v[gpr::RBX],
        v[gpr::RCX],
        v[gpr::RDX],
        v[gpr::RSI],
        v[gpr::RDI],
        v[gpr::RBP],
    ];
    [g.r8, g.r9, g.r10, g.r11, g.r12, g.r13, g.r14, g.r15] =
        [v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]];
    st.rip = r.rip;
    // Reserved bit 1 stays set, the other reserved bits clear; VM (17), VIF (19) and VIP (20)
    // cannot be chosen in long mode (VMRUN would refuse the state), so gdb cannot set them.
    st.rflags = (r.eflags as u64 & 0x25_7FD5) | 2;
    st.cr2 = r.sys[sys::CR2];
    [st.fs.base, st.gs.base, st.msrs.kernel_gs_base] = bases;
    let mut fx = st.xsave.legacy();
    let old_fx = fx;
    for (n, reg) in r.st.iter().enumerate() {
        fx[32 + 16 * n..42 + 16 * n].copy_from_slice(reg);
    }
    fx[0..2].copy_from_slice(&(r.fpu[0] as u16).to_le_bytes());
    fx[2..4].copy_from_slice(&(r.fpu[1] as u16).to_le_bytes());
    for (n, x) in r.xmm.iter().enumerate() {
        fx[160 + 16 * n..176 + 16 * n].copy_from_slice(&x.to_le_bytes());
    }
    // Reserved MXCSR bits make XRSTOR fault: keep the architectural ones only.
    fx[24..28].copy_from_slice(&(r.mxcsr & 0xFFFF).to_le_bytes());
    let mut changed = 0;
    if fx != old_fx {
        st.xsave.set_legacy(&fx);
        changed |= parts::XSAVE;
    }
    if regs(st) != before {
        changed |= parts::REGS;
    }
    Some(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_state::xfeature;

    fn kernel_cpu() -> CpuState {
        CpuState::kernel_sample()
    }

    fn read(st: &CpuState) -> X86Regs {
        let mut r = X86Regs::default();
        registers_from_state(st, &mut r);
        r
    }

    #[test]
    fn a_g_packet_shows_the_registers_the_cpu_parked_with() {
        let st = kernel_cpu();
        let r = read(&st);
        assert_eq!(r.gpr[gpr::RAX], 0x27);
        assert_eq!(r.gpr[gpr::RBX], 1);
        assert_eq!(r.gpr[gpr::RSP], st.rsp);
        assert_eq!(r.gpr[gpr::RBP], st.gprs.rbp);
        assert_eq!(r.gpr[15], 15);
        assert_eq!(r.rip, st.rip);
        assert_eq!(r.eflags, 0x246);
        assert_eq!(r.seg[..2], [0x10, 0x18]);
        assert_eq!(r.gs_base, st.gs.base);
        assert_eq!(r.sys[sys::K_GS_BASE], st.msrs.kernel_gs_base);
        assert_eq!(r.sys[sys::CR0], st.cr0);
        assert_eq!(r.sys[sys::CR3], st.cr3);
        assert_eq!(r.sys[sys::EFER], 0xd01);
        // An FPU in its initial configuration: FCW 0x037F, every tag empty, MXCSR as saved.
        assert_eq!(r.fpu[0], 0x037F);
        assert_eq!(r.fpu[2], 0xFFFF);
    }

    #[test]
    fn writing_back_what_gdb_read_changes_nothing() {
        let mut st = kernel_cpu();
        let before = st;
        assert_eq!(registers_into_state(&read(&st), &mut st), Some(0));
        assert_eq!(st, before);
    }

    #[test]
    fn registers_gdb_changes_come_back_as_it_wrote_them() {
        let mut st = kernel_cpu();
        let mut r = read(&st);
        r.gpr[gpr::RAX] = 0x1111;
        r.gpr[gpr::RDI] = 0x2222;
        r.gpr[gpr::RSP] -= 8;
        r.gpr[12] = 0x1212;
        r.rip += 5;
        r.eflags = 0x202;
        r.fs_base = 0x7f00_0000_1000;
        r.sys[sys::CR2] = 0x4000;
        assert_eq!(registers_into_state(&r, &mut st), Some(parts::REGS));
        assert_eq!(read(&st), r);
        assert_eq!(st.gprs.rdi, 0x2222);
        assert_eq!(st.gprs.r12, 0x1212);
    }

    #[test]
    fn a_g_packet_does_not_change_control_registers_efer_or_selectors() {
        let mut st = kernel_cpu();
        let before = st;
        let mut r = read(&st);
        r.sys[sys::CR0] = 0;
        r.sys[sys::CR3] = 0x1000;
        r.sys[sys::CR4] = 0;
        r.sys[sys::CR8] = 15;
        r.sys[sys::EFER] = 0;
        r.seg = [0x33, 0x2b, 0, 0, 0, 0];
        assert_eq!(registers_into_state(&r, &mut st), Some(0));
        assert_eq!(st, before);
    }

    #[test]
    fn eflags_keep_reserved_bit_1_set_and_the_other_reserved_bits_clear() {
        let mut st = kernel_cpu();
        let mut r = read(&st);
        // Bit 1 cleared; reserved bits 3, 5, 15, 22 and 31 set; IF and AC set.
        r.eflags = 1 << 31 | 1 << 22 | 1 << 18 | 1 << 15 | 0x200 | 1 << 5 | 1 << 3;
        registers_into_state(&r, &mut st);
        assert_eq!(st.rflags, 1 << 18 | 0x200 | 2);
    }

    #[test]
    fn eflags_vm_vif_and_vip_cannot_be_set_from_gdb_but_rf_and_id_can() {
        let mut st = kernel_cpu();
        let mut r = read(&st);
        r.eflags = 1 << 21 | 1 << 20 | 1 << 19 | 1 << 17 | 1 << 16 | 0x200;
        registers_into_state(&r, &mut st);
        assert_eq!(st.rflags, 1 << 21 | 1 << 16 | 0x200 | 2);
    }

    #[test]
    fn a_non_canonical_rip_or_base_is_refused_and_nothing_is_written() {
        let mut st = kernel_cpu();
        let before = st;
        for bad in [
            |r: &mut X86Regs| r.rip = 0x0000_8000_0000_0000,
            |r: &mut X86Regs| r.fs_base = 0x1234_5678_9abc_def0,
            |r: &mut X86Regs| r.gs_base = 0xffff_0000_0000_0000,
            |r: &mut X86Regs| r.sys[sys::K_GS_BASE] = 0x0001_0000_0000_0000,
        ] {
            let mut r = read(&st);
            r.gpr[gpr::RAX] = 0x5555;
            bad(&mut r);
            assert_eq!(registers_into_state(&r, &mut st), None);
            assert_eq!(st, before);
        }
    }

    #[test]
    fn an_fpu_change_marks_the_xsave_area_and_its_components_present() {
        let mut st = kernel_cpu();
        assert_eq!(st.xsave.xstate_bv(), 0);
        let mut r = read(&st);
        r.xmm[3] = 0x0123_4567_89ab_cdef_0011_2233_4455_6677;
        r.st[0] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0x40];
        r.fpu[0] = 0x027F;
        assert_eq!(registers_into_state(&r, &mut st), Some(parts::XSAVE));
        assert_eq!(
            st.xsave.xstate_bv() & (xfeature::X87 | xfeature::SSE),
            xfeature::X87 | xfeature::SSE,
            "XRSTOR must load x87 and SSE from the area, not their initial values"
        );
        let back = read(&st);
        assert_eq!(back.xmm[3], r.xmm[3]);
        assert_eq!(back.st[0], r.st[0]);
        assert_eq!(back.fpu[0], 0x027F);
    }

    #[test]
    fn reserved_mxcsr_bits_never_reach_the_xsave_area() {
        let mut st = kernel_cpu();
        let mut r = read(&st);
        r.mxcsr = 0xdead_1f80;
        registers_into_state(&r, &mut st);
        assert_eq!(read(&st).mxcsr, 0x1f80);
    }
}
