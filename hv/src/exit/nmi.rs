//! NMI exits. The hv intercepts NMIs because they are how the rendezvous stops CPUs: an NMI
//! the leader sent joins the stop; any other (a watchdog's, a kernel IPI's) is the kernel's
//! and is delivered to it as if nothing had intercepted it. The vendor layer has already
//! taken the NMI into the hv's own handler when it reports the exit.

use super::{Action, Env};
use crate::arch::{Event, VirtCpu};

pub fn handle(cpu: &mut impl VirtCpu, env: &impl Env) -> Action {
    if env.take_stop_nmi() {
        Action::Follow
    } else {
        cpu.inject(Event::Nmi);
        Action::Run
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeEnv;
    use super::*;
    use crate::arch::virt_cpu::fake::FakeCpu;

    #[test]
    fn a_stop_nmi_joins_the_stop_and_a_foreign_one_goes_to_the_kernel() {
        let (mut cpu, env) = (FakeCpu::default(), FakeEnv::default());
        env.stop_nmi.set(true);
        assert_eq!(handle(&mut cpu, &env), Action::Follow);
        assert_eq!(cpu.injected, None);
        assert_eq!(handle(&mut cpu, &env), Action::Run);
        assert_eq!(cpu.injected, Some(Event::Nmi));
    }
}
