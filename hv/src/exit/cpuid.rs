//! CPUID exits: the signature leaves say "Quicksilver" (the proof, for `qsctl probe`, that a
//! CPU is in guest mode); every other leaf is answered by the CPU itself.

use super::{Action, Env, Then};
use crate::arch::instr;
use crate::arch::virt_cpu::{set_cpuid_result, VirtCpu};
use crate::decode::Insn;
use quicksilver_proto::abi;

pub fn handle(leaf: u32, subleaf: u32, cpu: &mut impl VirtCpu, env: &impl Env) -> Action {
    let sig = abi::CPUID_SIGNATURE;
    let word = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
    let r = match leaf {
        abi::CPUID_SIGNATURE_LEAF => [abi::CPUID_INFO_LEAF, word(0), word(4), word(8)],
        abi::CPUID_INFO_LEAF => [quicksilver_proto::image::ABI_VERSION, env.cpu_index(), 0, 0],
        _ => instr::cpuid(leaf, subleaf),
    };
    set_cpuid_result(cpu, r);
    Action::Complete(Insn::Cpuid, Then::Run)
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeEnv;
    use super::*;
    use crate::arch::virt_cpu::fake::FakeCpu;
    use crate::arch::Gpr;

    #[test]
    fn signature_leaf_spells_quicksilver() {
        let (mut cpu, env) = (FakeCpu::default(), FakeEnv::default());
        let a = handle(0x4000_0000, 0, &mut cpu, &env);
        assert_eq!(a, Action::Complete(Insn::Cpuid, Then::Run));
        let mut sig = Vec::new();
        for r in [Gpr::Rbx, Gpr::Rcx, Gpr::Rdx] {
            sig.extend_from_slice(&(cpu.gpr(r) as u32).to_le_bytes());
        }
        assert_eq!(&sig, b"Quicksilver\0");
        handle(0x4000_0001, 0, &mut cpu, &env);
        assert_eq!(
            cpu.gpr(Gpr::Rbx),
            3,
            "EBX of the info leaf is the CPU index"
        );
    }
}
