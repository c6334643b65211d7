//! The guest's own virtualization instructions. There is no nested SVM: VMRUN, VMLOAD, VMSAVE,
//! CLGI, SKINIT and INVLPGA get #UD (counted). STGI completes as a no-op: the kernel's reboot
//! path runs it to turn virtualization off, and as far as the guest can tell its GIF is
//! always set. An Intel layer reports VMX's instructions as the same exits.

use super::{Action, Env, Then};
use crate::arch::Event;
use crate::decode::Insn;

pub fn refuse(env: &impl Env) -> Action {
    env.svm_instruction_refused();
    Action::Inject(Event::UD)
}

pub fn stgi() -> Action {
    Action::Complete(Insn::Stgi, Then::Run)
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeEnv;
    use super::*;

    #[test]
    fn a_guest_hypervisor_gets_ud_and_is_counted() {
        let env = FakeEnv::default();
        assert_eq!(refuse(&env), Action::Inject(Event::UD));
        assert_eq!(env.svm_refusals.get(), 1);
    }
}
