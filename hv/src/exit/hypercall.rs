//! VMMCALL: the agent's hypercalls while the hv is active (the ABI is in
//! `quicksilver_proto::abi`). One table of operations: each says what the hv does and what
//! comes after the instruction.

use super::{Action, Env, Stop, Then};
use crate::arch::{Event, Gpr, VirtCpu};
use crate::decode::Insn;
use quicksilver_proto::abi::{self, Op, Status};

pub fn handle(
    rax: u64,
    rbx: u64,
    rcx: u64,
    cpl: u8,
    cpu: &mut impl VirtCpu,
    env: &impl Env,
) -> Action {
    // As on a machine without a hypervisor: #UD from user mode, or without our tag.
    if cpl != 0 || rax & 0xFFFF_0000_0000_0000 != abi::HYPERCALL_MAGIC {
        return Action::Inject(Event::UD);
    }
    let (status, then) = match Op::from_u64(rax & 0xFFFF) {
        // The agent's IPI on each CPU: this CPU leaves guest mode after the call.
        // Refused while checkpoints are kept: a CPU running natively writes memory the log
        // does not see.
        Some(Op::Deactivate) if env.checkpoints_kept() => {
            (Status::CheckpointsKept as i64, Then::Run)
        }
        Some(Op::Deactivate) => (Status::Ok as i64, Then::Leave),
        // The request is checked and kept; every CPU stops once the call is complete, and
        // the answer is written when they run again.
        Some(Op::Freeze) => match env.freeze_request(rbx, rcx) {
            0 => (0, Then::Park(Stop::Freeze)),
            refused => (refused, Then::Run),
        },
        Some(op @ (Op::Checkpoint | Op::Rollback)) => {
            match env.checkpoint_request(op == Op::Rollback, rbx, rcx) {
                0 => (0, Then::Park(Stop::Checkpoint)),
                refused => (refused, Then::Run),
            }
        }
        Some(op) => (env.control(op, rbx, rcx), Then::Run),
        None => (Status::BadOp as i64, Then::Run),
    };
    cpu.set_gpr(Gpr::Rax, status as u64);
    Action::Complete(Insn::Vmmcall, then)
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeEnv;
    use super::*;
    use crate::arch::virt_cpu::fake::FakeCpu;

    #[test]
    fn hypercalls_need_cpl0_and_the_tag() {
        let (mut cpu, env) = (FakeCpu::default(), FakeEnv::default());
        let deactivate = abi::HYPERCALL_MAGIC | Op::Deactivate as u64;
        assert_eq!(
            handle(deactivate, 0, 0, 3, &mut cpu, &env),
            Action::Inject(Event::UD)
        );
        assert_eq!(
            handle(1, 0, 0, 0, &mut cpu, &env),
            Action::Inject(Event::UD)
        );
        assert_eq!(
            handle(deactivate, 0, 0, 0, &mut cpu, &env),
            Action::Complete(Insn::Vmmcall, Then::Leave)
        );
        assert_eq!(cpu.gpr(Gpr::Rax), Status::Ok as u64);
        assert_eq!(
            handle(abi::HYPERCALL_MAGIC | 99, 0, 0, 0, &mut cpu, &env),
            Action::Complete(Insn::Vmmcall, Then::Run)
        );
        assert_eq!(cpu.gpr(Gpr::Rax), Status::BadOp as u64);
    }

    #[test]
    fn control_ops_reach_the_hv_with_their_buffer_and_a_freeze_stops_every_cpu_after_the_call() {
        let (mut cpu, env) = (FakeCpu::default(), FakeEnv::default());
        let stats = abi::HYPERCALL_MAGIC | Op::Stats as u64;
        assert_eq!(
            handle(stats, 0x5000, 4096, 0, &mut cpu, &env),
            Action::Complete(Insn::Vmmcall, Then::Run)
        );
        assert_eq!(env.controls.borrow()[0], (Op::Stats, 0x5000, 4096));
        let freeze = abi::HYPERCALL_MAGIC | Op::Freeze as u64;
        assert_eq!(
            handle(freeze, 0x6000, 64, 0, &mut cpu, &env),
            Action::Complete(Insn::Vmmcall, Then::Park(Stop::Freeze))
        );
        assert_eq!(env.freezes.get(), 1);
        env.refuse_freeze.set(true);
        assert_eq!(
            handle(freeze, 0x6000, 64, 0, &mut cpu, &env),
            Action::Complete(Insn::Vmmcall, Then::Run),
            "a refused freeze stops nothing"
        );
        assert_eq!(cpu.gpr(Gpr::Rax), Status::Busy as i64 as u64);
    }

    #[test]
    fn checkpoints_and_rollbacks_stop_every_cpu_and_kept_checkpoints_refuse_deactivation() {
        let (mut cpu, env) = (FakeCpu::default(), FakeEnv::default());
        for op in [Op::Checkpoint, Op::Rollback] {
            assert_eq!(
                handle(
                    abi::HYPERCALL_MAGIC | op as u64,
                    0x6000,
                    64,
                    0,
                    &mut cpu,
                    &env
                ),
                Action::Complete(Insn::Vmmcall, Then::Park(Stop::Checkpoint))
            );
        }
        assert_eq!(env.checkpoints.get(), 2);
        env.kept.set(true);
        let deactivate = abi::HYPERCALL_MAGIC | Op::Deactivate as u64;
        assert_eq!(
            handle(deactivate, 0, 0, 0, &mut cpu, &env),
            Action::Complete(Insn::Vmmcall, Then::Run),
            "a CPU that left would write memory the log does not see"
        );
        assert_eq!(cpu.gpr(Gpr::Rax), Status::CheckpointsKept as u64);
    }
}
