//! NMI and IRET exits. The hv intercepts NMIs because they are how the rendezvous stops CPUs:
//! an NMI the leader sent joins the stop; any other (a watchdog's, a kernel IPI's) is the
//! kernel's and is delivered to it as if nothing had intercepted it. The vendor layer has
//! already taken the NMI into the hv's own handler when it reports the exit.
//!
//! While the guest runs an NMI handler (from the NMI's delivery to the IRET that ends it,
//! [`VirtCpu::in_nmi`]) a CPU holds further NMIs back. Silicon does that for an NMI injected
//! by VMRUN too; QEMU's TCG does not (its EVENTINJ path never sets NMI blocking), so the hv
//! holds them itself, to the same effect everywhere:
//! - the kernel never sees an NMI nested in its NMI handler;
//! - no stop lands inside one: a CPU stopped there would be captured in a state that cannot
//!   be restored (its NMI blocking is the CPU's, not the state's), and its handler, timed by
//!   the kernel, would seem to run for the whole stop ("NMI handler took too long").
//!
//! At the IRET exit (before the IRET runs, NMIs still blocked) a held NMI is acted on: a
//! foreign one is delivered there, as nested NMIs at that IRET are ones Linux expects and
//! handles (its `nmi` entry code checks for the NMI stack); a stop is joined there, where the
//! CPU's state is outside the handler in every way that matters for a restore.

use super::{Action, Env};
use crate::arch::{Event, VirtCpu};

/// NMIs a CPU holds back while the guest runs its NMI handler (at most one of each kind: the
/// CPU latches one pending NMI).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// The leader's stop NMI: join the stop at the IRET.
    pub stop: bool,
    /// A foreign NMI: deliver it at the IRET.
    pub foreign: bool,
}

pub fn handle(cpu: &mut impl VirtCpu, env: &impl Env) -> Action {
    let stop = env.take_stop_nmi();
    if cpu.in_nmi() {
        let mut held = env.held_nmis();
        if stop {
            held.stop = true;
        } else {
            held.foreign = true;
        }
        env.set_held_nmis(held);
        return Action::Run;
    }
    if stop {
        Action::Follow
    } else {
        cpu.inject(Event::Nmi);
        Action::Run
    }
}

/// The guest's NMI handler ends with this IRET.
pub fn iret(cpu: &mut impl VirtCpu, env: &impl Env) -> Action {
    cpu.end_nmi();
    let mut held = env.held_nmis();
    let action = if held.foreign {
        // A held stop waits for the IRET of this one.
        held.foreign = false;
        cpu.inject(Event::Nmi);
        Action::Run
    } else if held.stop {
        held.stop = false;
        Action::Follow
    } else {
        Action::Resume
    };
    env.set_held_nmis(held);
    action
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
        assert!(!cpu.in_nmi());
        assert_eq!(handle(&mut cpu, &env), Action::Run);
        assert_eq!(cpu.injected, Some(Event::Nmi));
        assert!(cpu.in_nmi(), "its handler runs until its IRET");
    }

    #[test]
    fn inside_an_nmi_handler_a_stop_waits_for_its_iret() {
        let (mut cpu, env) = (FakeCpu::default(), FakeEnv::default());
        cpu.inject(Event::Nmi);
        cpu.injected = None;
        env.stop_nmi.set(true);
        assert_eq!(
            handle(&mut cpu, &env),
            Action::Run,
            "not parked in the handler"
        );
        assert_eq!(cpu.injected, None);
        assert_eq!(iret(&mut cpu, &env), Action::Follow, "parked at its IRET");
        assert!(!cpu.in_nmi());
        assert_eq!(env.held_nmis(), Held::default());
        assert_eq!(iret(&mut cpu, &env), Action::Resume, "joined once");
    }

    #[test]
    fn inside_an_nmi_handler_a_foreign_nmi_is_delivered_at_its_iret_and_a_stop_after_that() {
        let (mut cpu, env) = (FakeCpu::default(), FakeEnv::default());
        cpu.inject(Event::Nmi);
        cpu.injected = None;
        assert_eq!(handle(&mut cpu, &env), Action::Run);
        assert_eq!(cpu.injected, None, "not nested in the handler");
        env.stop_nmi.set(true);
        assert_eq!(handle(&mut cpu, &env), Action::Run);
        assert_eq!(iret(&mut cpu, &env), Action::Run);
        assert_eq!(cpu.injected, Some(Event::Nmi));
        assert!(cpu.in_nmi(), "the held NMI's handler runs");
        assert_eq!(iret(&mut cpu, &env), Action::Follow);
        assert_eq!(iret(&mut cpu, &env), Action::Resume);
    }
}
