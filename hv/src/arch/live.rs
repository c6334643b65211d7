//! The part of a guest CPU's state that no world switch touches: it stays in the CPU while
//! the hv runs in host mode, so it is read and written there, on that CPU, with ordinary
//! instructions. XSAVE state, DR0-3, CR8, XCR0, TSC_AUX and the local APIC (AMD APM vol. 2,
//! 16.3-16.4: xAPIC registers at their MMIO page, identity-mapped in the hv's tables; x2APIC
//! registers as MSRs 0x800 + offset / 16).

use super::instr::{self, msr};
use crate::cpu_state::{apic_reg, CpuState, LocalApic, LVT_COUNT, XSAVE_AREA_SIZE};

/// Does the XSAVE area fit what this CPU enables? (`init` refuses a CPU where it does not.)
pub fn xsave_fits() -> bool {
    if instr::xgetbv0() == 0 {
        return true;
    }
    instr::cpuid(0xD, 0)[1] as usize <= XSAVE_AREA_SIZE
}

/// Reads the live part of the state into `s` (on the CPU itself, host mode after an exit).
pub fn capture(s: &mut CpuState) {
    s.xcr0 = instr::xgetbv0();
    let area = s.xsave.0.as_mut_ptr();
    if s.xcr0 != 0 {
        // The header must be clean for a later XRSTOR: XSAVE writes XSTATE_BV and leaves the
        // rest of the header, which a capture into a reused area must not inherit.
        s.xsave.0[512..576].fill(0);
        // SAFETY: CR4.OSXSAVE is set (xcr0 != 0); the area is 64-byte aligned and large enough
        // for XCR0's components (checked by `init` through `xsave_fits`).
        unsafe { instr::xsave(area, s.xcr0) };
    } else {
        // SAFETY: 512 bytes, 16-byte aligned (the area is 64-byte aligned); Linux runs with
        // CR0.TS clear (eager FPU) and host mode has the guest's CR0.
        unsafe { instr::fxsave(area.cast()) };
    }
    for (n, d) in s.dr.iter_mut().enumerate() {
        *d = instr::read_dr(n as u8);
    }
    s.cr8 = instr::read_cr8();
    s.msrs.tsc_aux = if has_tsc_aux() {
        // SAFETY: TSC_AUX exists where CPUID says RDTSCP is supported (checked).
        unsafe { instr::rdmsr(msr::TSC_AUX) }
    } else {
        0
    };
    s.apic = capture_apic();
}

/// Writes the x87/SSE/AVX state back (a debugger changed it, or a restore).
pub fn restore_xsave(s: &CpuState) {
    let area = s.xsave.0.as_ptr();
    if s.xcr0 != 0 {
        // SAFETY: an image XSAVE made on this CPU with the same XCR0 (host mode does not
        // change XCR0); a debugger's writes go through `XsaveArea::set_legacy`, which keeps
        // the header valid, and MXCSR's reserved bits clear (the debugger masks them).
        unsafe { instr::xrstor(area, s.xcr0) };
    } else {
        // SAFETY: an FXSAVE image, MXCSR reserved bits clear, as above.
        unsafe { instr::fxrstor(area.cast()) };
    }
}

/// Writes back the live part of the state other than XSAVE (see [`restore_xsave`]) and the
/// debug registers, which the debugger owns while a session is on.
pub fn restore(s: &CpuState) {
    // SAFETY: the guest's own CR8 value, captured on this CPU.
    unsafe { instr::write_cr8(s.cr8) };
    if has_tsc_aux() {
        // SAFETY: the MSR exists (checked); the guest's own value.
        unsafe { instr::wrmsr(msr::TSC_AUX, s.msrs.tsc_aux) };
    }
    restore_apic(&s.apic);
}

/// As [`restore`], for a rollback: the state is from another instant, not from this stop.
/// First every interrupt in service now is ended (EOI until the ISR is empty: the
/// checkpoint's CPU had none in service, and a handler that will never run to its EOI would
/// block its priority class for good); then the registers; and a one-shot timer that was
/// counting at the checkpoint is armed again with what it had left, whatever the live timer
/// says now (every CPU must have its tick coming, or it may sleep for ever in HLT). Last, each
/// interrupt that was pending in the checkpoint's IRR is raised again (a self-IPI of its
/// vector): the kernel at the checkpoint was about to take it (a timer tick that had fired,
/// an IPI), and the live IRR is another instant's. One the kernel gets twice is spurious and
/// harmless; one it never gets is a CPU whose tick is lost for good (an RCU stall).
pub fn restore_rolled_back(s: &CpuState) {
    if let Some((apic, base)) = Apic::current() {
        if s.apic.present && base == s.apic.base_msr {
            end_in_service(&apic);
            // The registers first, the timer's LVT and divider among them, with the count
            // left out (`write_back` re-arms only a timer the live APIC still counts); then
            // the count: written before its LVT, the LVT write would cancel it in QEMU's APIC.
            let mut a = s.apic;
            a.timer_current = 0;
            write_back(&apic, &a);
            if s.apic.timer_mode() == 0 && s.apic.timer_current != 0 {
                apic.write(apic_reg::TIMER_INITIAL, s.apic.timer_current);
            }
            raise_pending(&apic, &s.apic.irr);
        }
    }
    // SAFETY: the guest's own CR8 value, captured on this CPU at the checkpoint.
    unsafe { instr::write_cr8(s.cr8) };
    if has_tsc_aux() {
        // SAFETY: the MSR exists (checked); the guest's own value.
        unsafe { instr::wrmsr(msr::TSC_AUX, s.msrs.tsc_aux) };
    }
}

/// This CPU's IRR as it is now (zero where the APIC is off). Read after the capture, it
/// also holds what reached the APIC since: nothing is accepted in host mode (GIF is clear),
/// so bits are only added.
pub fn irr_now() -> [u32; 8] {
    let mut irr = [0u32; 8];
    if let Some((apic, _)) = Apic::current() {
        for (i, w) in irr.iter_mut().enumerate() {
            *w = apic.read(apic_reg::IRR + 0x10 * i as u32);
        }
    }
    irr
}

/// A self-IPI (ICR: shorthand self, fixed delivery) for every vector set in `irr` from 16 up
/// (0-15 are not deliverable as interrupts).
fn raise_pending(apic: &impl ApicRegs, irr: &[u32; 8]) {
    const SELF: u32 = 1 << 18;
    for v in 16..256u32 {
        if irr[(v / 32) as usize] & (1 << (v % 32)) != 0 {
            apic.write(apic_reg::ICR_LOW, SELF | v);
        }
    }
}

/// EOI until no interrupt is in service (at most one per vector class: 16 tries).
fn end_in_service(apic: &impl ApicRegs) {
    for _ in 0..16 {
        if (0..8u32).all(|i| apic.read(apic_reg::ISR + 0x10 * i) == 0) {
            return;
        }
        apic.write(apic_reg::EOI, 0);
    }
}

fn has_tsc_aux() -> bool {
    instr::cpuid(0x8000_0001, 0)[3] & (1 << 27) != 0
}

/// This CPU's local APIC, whichever mode the kernel put it in.
enum Apic {
    X2,
    X(u64),
}

impl Apic {
    fn current() -> Option<(Apic, u64)> {
        // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU with a local APIC.
        let base = unsafe { instr::rdmsr(msr::APIC_BASE) };
        if base & (1 << 11) == 0 {
            return None;
        }
        let apic = if base & (1 << 10) != 0 {
            Apic::X2
        } else {
            Apic::X(base & 0x000F_FFFF_FFFF_F000)
        };
        Some((apic, base))
    }
}

/// Register access to one local APIC: the live one, or a test's.
trait ApicRegs {
    fn read(&self, reg: u32) -> u32;
    fn write(&self, reg: u32, v: u32);
    /// IA32_TSC_DEADLINE (only called in TSC-deadline mode, where it exists).
    fn tsc_deadline(&self) -> u64;
    fn set_tsc_deadline(&self, v: u64);
}

impl ApicRegs for Apic {
    fn read(&self, reg: u32) -> u32 {
        match self {
            // SAFETY: x2APIC mode is on; the register exists (the offsets used are
            // architectural and readable).
            Apic::X2 => unsafe { instr::rdmsr(msr::X2APIC_BASE + (reg >> 4)) as u32 },
            // SAFETY: the xAPIC page of this CPU, identity-mapped in the hv's tables (host
            // mode); reading these registers has no side effect.
            Apic::X(page) => unsafe { ((page + reg as u64) as *const u32).read_volatile() },
        }
    }

    fn write(&self, reg: u32, v: u32) {
        match self {
            // SAFETY: x2APIC mode is on; the callers write only the kernel's own values into
            // registers that are writable in this mode.
            Apic::X2 => unsafe { instr::wrmsr(msr::X2APIC_BASE + (reg >> 4), v as u64) },
            // SAFETY: the xAPIC page, as in `read`; the kernel's own values.
            Apic::X(page) => unsafe { ((page + reg as u64) as *mut u32).write_volatile(v) },
        }
    }

    fn tsc_deadline(&self) -> u64 {
        // SAFETY: called in TSC-deadline mode only, which exists only where the MSR does.
        unsafe { instr::rdmsr(msr::TSC_DEADLINE) }
    }

    fn set_tsc_deadline(&self, v: u64) {
        // SAFETY: as in `tsc_deadline`; the kernel's own deadline.
        unsafe { instr::wrmsr(msr::TSC_DEADLINE, v) }
    }
}

fn capture_apic() -> LocalApic {
    let Some((apic, base)) = Apic::current() else {
        return LocalApic::default();
    };
    let x2apic = matches!(apic, Apic::X2);
    let mut a = LocalApic {
        present: true,
        x2apic,
        base_msr: base,
        id: apic.read(apic_reg::ID),
        tpr: apic.read(apic_reg::TPR),
        ldr: apic.read(apic_reg::LDR),
        // x2APIC has no DFR (reading it faults).
        dfr: if x2apic { 0 } else { apic.read(apic_reg::DFR) },
        svr: apic.read(apic_reg::SVR),
        timer_divide: apic.read(apic_reg::TIMER_DIVIDE),
        timer_initial: apic.read(apic_reg::TIMER_INITIAL),
        timer_current: apic.read(apic_reg::TIMER_CURRENT),
        ..Default::default()
    };
    for (n, lvt) in a.lvt.iter_mut().enumerate().take(LVT_COUNT) {
        *lvt = apic.read(apic_reg::LVT[n]);
    }
    for i in 0..8u32 {
        a.isr[i as usize] = apic.read(apic_reg::ISR + 0x10 * i);
        a.irr[i as usize] = apic.read(apic_reg::IRR + 0x10 * i);
        a.tmr[i as usize] = apic.read(apic_reg::TMR + 0x10 * i);
    }
    if a.timer_mode() == 2 {
        a.tsc_deadline = apic.tsc_deadline();
    }
    a
}

/// LVT bit 12, delivery status: read-only, so it does not make a saved entry differ.
const LVT_DELIVERY_STATUS: u32 = 1 << 12;

/// Writes back the APIC's writable registers, each only where it differs from what the APIC
/// holds now. A write of the same value is not a no-op in every APIC: QEMU's re-evaluates the
/// timer on an LVT-timer write and cancels a one-shot expiry that is due but not yet raised,
/// which loses that interrupt for good (a CPU idling in HLT then sleeps for ever: found by the
/// 4-CPU freeze test, an RCU stall on the CPU whose tick was lost).
///
/// The timer: its LVT and divider first, then the count. A one-shot timer that was still
/// counting is re-armed with what it had left when captured (the time the CPU was stopped does
/// not count against it); one that fired meanwhile is not re-armed (its interrupt is pending in
/// the IRR and will be delivered). A TSC deadline is written back when it differs: if it
/// passed meanwhile, the APIC raises it at once (a spurious tick is harmless; a lost one is not).
fn restore_apic(a: &LocalApic) {
    let Some((apic, base)) = Apic::current() else {
        return;
    };
    if !a.present || base != a.base_msr {
        // The APIC changed mode or place since the capture: writing the old values into the
        // other mode's registers would be wrong.
        return;
    }
    write_back(&apic, a);
}

fn write_back(apic: &impl ApicRegs, a: &LocalApic) {
    let put = |reg: u32, v: u32, read_only: u32| {
        if (apic.read(reg) ^ v) & !read_only != 0 {
            apic.write(reg, v);
        }
    };
    put(apic_reg::TPR, a.tpr, 0);
    if !a.x2apic {
        put(apic_reg::DFR, a.dfr, 0);
        put(apic_reg::LDR, a.ldr, 0);
    }
    put(apic_reg::SVR, a.svr, 0);
    for (n, &lvt) in a.lvt.iter().enumerate() {
        put(apic_reg::LVT[n], lvt, LVT_DELIVERY_STATUS);
    }
    put(apic_reg::TIMER_DIVIDE, a.timer_divide, 0);
    match a.timer_mode() {
        // Periodic: the period is the initial count.
        1 => put(apic_reg::TIMER_INITIAL, a.timer_initial, 0),
        // TSC-deadline: the deadline MSR.
        2 => {
            if a.tsc_deadline != 0 && apic.tsc_deadline() != a.tsc_deadline {
                apic.set_tsc_deadline(a.tsc_deadline);
            }
        }
        _ => {
            if a.timer_current != 0 && apic.read(apic_reg::TIMER_CURRENT) != 0 {
                apic.write(apic_reg::TIMER_INITIAL, a.timer_current);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// An APIC holding registers, recording every write.
    #[derive(Default)]
    struct FakeApic {
        regs: RefCell<BTreeMap<u32, u32>>,
        deadline: RefCell<u64>,
        writes: RefCell<Vec<(u32, u64)>>,
    }

    const DEADLINE: u32 = u32::MAX;

    impl FakeApic {
        /// An APIC whose registers hold what `a` captured.
        fn holding(a: &LocalApic) -> FakeApic {
            let f = FakeApic::default();
            let mut r = f.regs.borrow_mut();
            for (reg, v) in [
                (apic_reg::TPR, a.tpr),
                (apic_reg::DFR, a.dfr),
                (apic_reg::LDR, a.ldr),
                (apic_reg::SVR, a.svr),
                (apic_reg::TIMER_DIVIDE, a.timer_divide),
                (apic_reg::TIMER_INITIAL, a.timer_initial),
                (apic_reg::TIMER_CURRENT, a.timer_current),
            ] {
                r.insert(reg, v);
            }
            for (n, &v) in a.lvt.iter().enumerate() {
                r.insert(apic_reg::LVT[n], v);
            }
            drop(r);
            *f.deadline.borrow_mut() = a.tsc_deadline;
            f
        }

        fn writes(&self) -> Vec<(u32, u64)> {
            self.writes.borrow().clone()
        }
    }

    impl ApicRegs for FakeApic {
        fn read(&self, reg: u32) -> u32 {
            self.regs.borrow().get(&reg).copied().unwrap_or(0)
        }
        fn write(&self, reg: u32, v: u32) {
            self.writes.borrow_mut().push((reg, v as u64));
            self.regs.borrow_mut().insert(reg, v);
        }
        fn tsc_deadline(&self) -> u64 {
            *self.deadline.borrow()
        }
        fn set_tsc_deadline(&self, v: u64) {
            self.writes.borrow_mut().push((DEADLINE, v));
            *self.deadline.borrow_mut() = v;
        }
    }

    /// Linux's xAPIC on `-cpu EPYC`: one-shot timer on vector 0xEC, 0x1000 counts left.
    fn one_shot() -> LocalApic {
        LocalApic {
            present: true,
            tpr: 0,
            ldr: 0x0100_0000,
            dfr: 0xFFFF_FFFF,
            svr: 0x1FF,
            lvt: [0xEC, 0x1_0000, 0x400, 0x700, 0x400, 0xFE],
            timer_divide: 0xB,
            timer_initial: 0x8000,
            timer_current: 0x1000,
            ..Default::default()
        }
    }

    #[test]
    fn an_apic_that_holds_the_saved_state_gets_no_write_but_the_timer_rearm() {
        // A freeze's round trip: nothing changed, so nothing but the still-counting one-shot
        // timer is written (an LVT-timer write can cancel a due tick in QEMU's APIC).
        let saved = one_shot();
        let apic = FakeApic::holding(&saved);
        write_back(&apic, &saved);
        assert_eq!(apic.writes(), vec![(apic_reg::TIMER_INITIAL, 0x1000)]);
    }

    #[test]
    fn a_one_shot_timer_that_fired_meanwhile_is_not_rearmed() {
        let saved = one_shot();
        let apic = FakeApic::holding(&saved);
        apic.regs.borrow_mut().insert(apic_reg::TIMER_CURRENT, 0);
        write_back(&apic, &saved);
        assert_eq!(apic.writes(), vec![]);
    }

    #[test]
    fn after_a_rollback_what_was_in_service_ends_and_what_was_pending_comes_again() {
        let saved = one_shot();
        let apic = FakeApic::holding(&saved);
        apic.regs
            .borrow_mut()
            .insert(apic_reg::ISR + 0x10 * 7, 1 << 0xC);
        end_in_service(&apic);
        // The fake's ISR does not clear on EOI: one EOI per try, bounded.
        assert_eq!(apic.writes().len(), 16);
        let mut irr = [0u32; 8];
        irr[7] |= 1 << 0xC; // 0xEC, the timer's tick that had fired
        irr[7] |= 1 << 0x1D; // 0xFD, an IPI
        irr[0] |= 1 << 3; // not deliverable as an interrupt: left alone
        let apic = FakeApic::holding(&saved);
        raise_pending(&apic, &irr);
        assert_eq!(
            apic.writes(),
            vec![
                (apic_reg::ICR_LOW, (1 << 18) | 0xEC),
                (apic_reg::ICR_LOW, (1 << 18) | 0xFD)
            ]
        );
    }

    #[test]
    fn registers_that_differ_are_written_back_and_delivery_status_is_not_a_difference() {
        let saved = one_shot();
        let apic = FakeApic::holding(&saved);
        {
            let mut r = apic.regs.borrow_mut();
            r.insert(apic_reg::TPR, 0x20);
            r.insert(apic_reg::LVT[3], saved.lvt[3] | 0x1_0000); // LINT0 masked
            r.insert(apic_reg::LVT[5], saved.lvt[5] | LVT_DELIVERY_STATUS);
            r.insert(apic_reg::TIMER_CURRENT, 0);
        }
        write_back(&apic, &saved);
        assert_eq!(
            apic.writes(),
            vec![(apic_reg::TPR, 0), (apic_reg::LVT[3], saved.lvt[3] as u64)]
        );
    }

    #[test]
    fn a_periodic_timer_gets_its_period_and_a_deadline_its_deadline_where_they_differ() {
        let mut periodic = one_shot();
        periodic.lvt[0] |= 1 << 17;
        let apic = FakeApic::holding(&periodic);
        write_back(&apic, &periodic);
        assert_eq!(apic.writes(), vec![], "same period: no write");
        apic.regs.borrow_mut().insert(apic_reg::TIMER_INITIAL, 5);
        write_back(&apic, &periodic);
        assert_eq!(apic.writes(), vec![(apic_reg::TIMER_INITIAL, 0x8000)]);

        let mut deadline = one_shot();
        deadline.lvt[0] = 0xEC | 2 << 17;
        deadline.tsc_deadline = 123_456;
        let apic = FakeApic::holding(&deadline);
        write_back(&apic, &deadline);
        assert_eq!(
            apic.writes(),
            vec![],
            "armed with the same deadline: no write"
        );
        *apic.deadline.borrow_mut() = 0; // it fired (reads 0), or a rollback
        write_back(&apic, &deadline);
        assert_eq!(apic.writes(), vec![(DEADLINE, 123_456)]);
    }
}
