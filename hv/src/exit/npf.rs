//! Nested page faults: the owner of the faulting guest page decides (AMD APM vol. 2, 15.25.6:
//! EXITINFO2 is the guest-physical address). Owners today: the hv's own memory (its block and
//! its store), which the guest must never reach; and, while checkpoints are kept, every page of
//! RAM, write-protected for copy-on-write (`crate::checkpoint`).

use super::{Action, Env};
use crate::arch::VirtCpu;
use crate::checkpoint::Cow;

/// Who a guest-physical page belongs to, for a nested page fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// The hv's memory: not present to the guest.
    Hv,
    /// Mapped for the guest: a fault there is not one the hv expects.
    Nobody,
}

pub fn handle(
    gpa: u64,
    write: bool,
    fetch: bool,
    cpu: &mut impl VirtCpu,
    env: &impl Env,
) -> Action {
    if write && !fetch && env.page_owner(gpa) == Owner::Nobody {
        match env.copy_on_write(gpa) {
            // The write runs again and goes through.
            Cow::Copied => return Action::Resume,
            // This CPU's TLB held the read-only translation: flush it and run again.
            Cow::Spurious => {
                cpu.flush_tlb();
                return Action::Resume;
            }
            Cow::NotLogged => {}
        }
    }
    match env.page_owner(gpa) {
        // A read or write there is refused by mapping the page to a scratch page (reads see
        // zeros, writes land in scratch, never in the hv). An instruction fetch is not: that
        // would run zeros; it is unexpected, and the CPU steps out to run that code natively.
        Owner::Hv if !fetch => {
            if env.refuse_hv_access(gpa) {
                env.hv_access_refused(gpa);
                // The guest's TLB may hold the not-present walk: flush this ASID on entry.
                cpu.flush_tlb();
                Action::Resume
            } else {
                Action::Unexpected
            }
        }
        Owner::Hv | Owner::Nobody => Action::Unexpected,
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeEnv;
    use super::*;
    use crate::arch::virt_cpu::fake::FakeCpu;

    #[test]
    fn hv_memory_faults_are_refused_others_are_unexpected() {
        let (mut cpu, env) = (FakeCpu::default(), FakeEnv::default());
        assert_eq!(
            handle(0x110_0000, true, false, &mut cpu, &env),
            Action::Resume
        );
        assert_eq!(env.hv_refusals.get(), 1);
        assert!(cpu.tlb_flushed);
        assert_eq!(
            handle(0x9_0000_0000, false, false, &mut cpu, &env),
            Action::Unexpected
        );
        assert_eq!(
            handle(0x110_0000, false, true, &mut cpu, &env),
            Action::Unexpected,
            "a fetch from hv memory is not refused with zeros"
        );
        assert_eq!(env.hv_refusals.get(), 1);
    }

    #[test]
    fn a_write_to_a_page_checkpoints_protect_is_copied_once_then_runs() {
        let (mut cpu, env) = (FakeCpu::default(), FakeEnv::default());
        env.protected.borrow_mut().push(0x5000);
        assert_eq!(handle(0x5008, true, false, &mut cpu, &env), Action::Resume);
        assert_eq!(*env.copied.borrow(), [0x5000]);
        assert!(!cpu.tlb_flushed, "more rights need no flush");
        assert_eq!(handle(0x5010, true, false, &mut cpu, &env), Action::Resume);
        assert!(cpu.tlb_flushed, "a stale read-only translation is flushed");
        assert_eq!(env.copied.borrow().len(), 1);
        assert_eq!(
            handle(0x7000, true, false, &mut cpu, &env),
            Action::Unexpected,
            "a write fault elsewhere is not the checkpoints'"
        );
    }
}
