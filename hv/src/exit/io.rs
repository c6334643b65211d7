//! IN/OUT exits (SVM's IOIO intercept, AMD APM vol. 2, 15.10): only the ports whose writes the
//! hv shadows exit (`crate::devices::intercept`). The hv performs the guest's access itself,
//! with the guest's operand size, on the CPU that made it and while the guest still holds
//! whatever lock it took for the device; the write is recorded on the way; then the hv steps
//! over the instruction with the length the exit reported.
//!
//! INS/OUTS (string I/O) to these ports is not emulated: Linux never does it there, and
//! emulating it would mean walking the guest's page tables for each element. It is an
//! unexpected exit (recorded; that CPU steps out and runs the instruction natively). So is an
//! exit whose length the vendor did not report.

use super::{Action, Env, Then};
use crate::arch::{Gpr, VirtCpu};
use crate::decode::Insn;

/// One IN or OUT, as the exit described it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortAccess {
    pub port: u16,
    /// 1, 2 or 4 bytes (AL, AX, EAX).
    pub size: u8,
    pub input: bool,
    pub string: bool,
    /// The instruction's length (0: not reported).
    pub len: u8,
}

pub fn handle(a: PortAccess, cpu: &mut impl VirtCpu, env: &impl Env) -> Action {
    let mask: u64 = match a.size {
        1 => 0xFF,
        2 => 0xFFFF,
        4 => 0xFFFF_FFFF,
        _ => return Action::Unexpected,
    };
    if a.string || a.len == 0 {
        return Action::Unexpected;
    }
    let rax = cpu.gpr(Gpr::Rax);
    if a.input {
        let v = env.port_in(a.port, a.size) as u64 & mask;
        // IN AL/AX keeps the rest of RAX; IN EAX zero-extends into RAX, as every 32-bit
        // register write does in 64-bit mode.
        let merged = if a.size == 4 { v } else { (rax & !mask) | v };
        cpu.set_gpr(Gpr::Rax, merged);
    } else {
        env.port_out(a.port, a.size, (rax & mask) as u32);
    }
    Action::Complete(Insn::PortIo { len: a.len }, Then::Run)
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeEnv;
    use super::*;
    use crate::arch::virt_cpu::fake::FakeCpu;

    fn access(port: u16, size: u8, input: bool) -> PortAccess {
        PortAccess {
            port,
            size,
            input,
            string: false,
            len: 1,
        }
    }

    #[test]
    fn an_out_is_performed_with_the_guests_operand_and_stepped_over() {
        let (mut cpu, env) = (FakeCpu::default(), FakeEnv::default());
        cpu.gprs[Gpr::Rax as usize] = 0xDEAD_BEEF_1234_5641;
        let a = handle(access(0x3FA, 1, false), &mut cpu, &env);
        assert_eq!(a, Action::Complete(Insn::PortIo { len: 1 }, Then::Run));
        assert_eq!(env.port_writes.borrow().as_slice(), &[(0x3FA, 1, 0x41)]);
        handle(access(0x70, 4, false), &mut cpu, &env);
        assert_eq!(env.port_writes.borrow()[1], (0x70, 4, 0x1234_5641));
        assert_eq!(
            cpu.gpr(Gpr::Rax),
            0xDEAD_BEEF_1234_5641,
            "an OUT leaves RAX alone"
        );
    }

    #[test]
    fn an_in_fills_al_keeping_the_rest_and_eax_zero_extends() {
        let (mut cpu, env) = (FakeCpu::default(), FakeEnv::default());
        env.port_value.set(0xAABB_CCC1);
        cpu.gprs[Gpr::Rax as usize] = 0x1111_2222_3333_4444;
        handle(access(0x3FA, 1, true), &mut cpu, &env);
        assert_eq!(cpu.gpr(Gpr::Rax), 0x1111_2222_3333_44C1);
        handle(access(0x3FA, 2, true), &mut cpu, &env);
        assert_eq!(cpu.gpr(Gpr::Rax), 0x1111_2222_3333_CCC1);
        handle(access(0x3F8, 4, true), &mut cpu, &env);
        assert_eq!(cpu.gpr(Gpr::Rax), 0xAABB_CCC1);
        assert!(env.port_writes.borrow().is_empty());
    }

    #[test]
    fn string_io_and_an_unreported_length_are_unexpected() {
        let (mut cpu, env) = (FakeCpu::default(), FakeEnv::default());
        let mut outs = access(0x3FA, 1, false);
        outs.string = true;
        assert_eq!(handle(outs, &mut cpu, &env), Action::Unexpected);
        let mut unknown = access(0x3FA, 1, false);
        unknown.len = 0;
        assert_eq!(handle(unknown, &mut cpu, &env), Action::Unexpected);
        assert!(env.port_writes.borrow().is_empty(), "nothing performed");
    }
}
