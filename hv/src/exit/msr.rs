//! MSR-write exits (only EFER, VM_CR and VM_HSAVE_PA are intercepted, by the MSR permission
//! map): the kernel must not pull SVM from under the hv, nor move its host save area.

use super::{Action, Env, Then};
use crate::arch::instr;
use crate::arch::{Event, VirtCpu};
use crate::decode::Insn;

pub fn write(msr: u32, value: u64, cpu: &mut impl VirtCpu, env: &impl Env) -> Action {
    match msr {
        instr::msr::EFER => {
            if value & instr::EFER_SVME == 0 {
                env.msr_refused();
            }
            cpu.set_efer(value | instr::EFER_SVME);
            Action::Complete(Insn::Wrmsr, Then::Run)
        }
        // The kernel's reboot path (cpu_svm_disable) zeroes it: a no-op, quietly.
        instr::msr::VM_HSAVE_PA if value == 0 => Action::Complete(Insn::Wrmsr, Then::Run),
        instr::msr::VM_CR | instr::msr::VM_HSAVE_PA => {
            env.msr_refused();
            Action::Inject(Event::GP)
        }
        _ => Action::Unexpected,
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeEnv;
    use super::*;
    use crate::arch::virt_cpu::fake::FakeCpu;

    #[test]
    fn efer_keeps_svme_and_counts_an_attempt_to_clear_it() {
        let (mut cpu, env) = (FakeCpu::default(), FakeEnv::default());
        let a = write(0xC000_0080, 0xD01, &mut cpu, &env);
        assert_eq!(a, Action::Complete(Insn::Wrmsr, Then::Run));
        assert_eq!(cpu.efer, 0xD01 | instr::EFER_SVME);
        assert_eq!(env.msr_refusals.get(), 1);
        let a = write(0xC001_0117, 0x1000, &mut cpu, &env);
        assert_eq!(a, Action::Inject(Event::GP));
        assert_eq!(env.msr_refusals.get(), 2);
    }

    #[test]
    fn the_kernels_reboot_path_turning_svm_off_completes_quietly() {
        // cpu_svm_disable: VM_HSAVE_PA = 0, STGI, EFER without SVME.
        let (mut cpu, env) = (FakeCpu::default(), FakeEnv::default());
        assert_eq!(
            write(0xC001_0117, 0, &mut cpu, &env),
            Action::Complete(Insn::Wrmsr, Then::Run)
        );
        assert_eq!(
            super::super::svm_insn::stgi(),
            Action::Complete(Insn::Stgi, Then::Run)
        );
        assert_eq!(env.msr_refusals.get(), 0, "nothing refused");
    }
}
