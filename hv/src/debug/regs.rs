//! The registers gdb sees: an x86-64 target description with the core, x87, SSE,
//! segment-base and system registers, in the order of its `regnum`s (GDB manual, "Target
//! Description Format"; gdb's `i386/64bit-*.xml` features). gdb validates the core and SSE
//! features by register name, takes `fs_base`/`gs_base` from the segments feature, and shows
//! the system registers of the Quicksilver feature in `info registers` like any other.

use core::num::NonZeroUsize;
use gdbstub::arch::{Arch, RegId, Registers};

/// One CPU's registers as gdb reads and writes them (`g`/`G` packets).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct X86Regs {
    /// rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8-r15: gdb's amd64 order.
    pub gpr: [u64; 16],
    pub rip: u64,
    pub eflags: u32,
    /// cs, ss, ds, es, fs, gs.
    pub seg: [u32; 6],
    /// st0-7 as 80-bit values.
    pub st: [[u8; 10]; 8],
    /// fctrl, fstat, ftag, fiseg, fioff, foseg, fooff, fop.
    pub fpu: [u32; 8],
    pub xmm: [u128; 16],
    pub mxcsr: u32,
    pub fs_base: u64,
    pub gs_base: u64,
    /// k_gs_base, cr0, cr2, cr3, cr4, cr8, efer.
    pub sys: [u64; 7],
}

/// Indices into [`X86Regs::gpr`].
pub mod gpr {
    pub const RAX: usize = 0;
    pub const RBX: usize = 1;
    pub const RCX: usize = 2;
    pub const RDX: usize = 3;
    pub const RSI: usize = 4;
    pub const RDI: usize = 5;
    pub const RBP: usize = 6;
    pub const RSP: usize = 7;
}

/// Indices into [`X86Regs::sys`].
pub mod sys {
    pub const K_GS_BASE: usize = 0;
    pub const CR0: usize = 1;
    pub const CR2: usize = 2;
    pub const CR3: usize = 3;
    pub const CR4: usize = 4;
    pub const CR8: usize = 5;
    pub const EFER: usize = 6;
}

/// Bytes of the `g` packet: the sum of the sizes below.
pub const G_SIZE: usize = 16 * 8 + 8 + 4 + 6 * 4 + 8 * 10 + 8 * 4 + 16 * 16 + 4 + 2 * 8 + 7 * 8;

impl Registers for X86Regs {
    type ProgramCounter = u64;

    fn pc(&self) -> u64 {
        self.rip
    }

    fn gdb_serialize(&self, mut write: impl FnMut(Option<u8>)) {
        let mut put = |b: &[u8]| b.iter().for_each(|&x| write(Some(x)));
        self.gpr.iter().for_each(|r| put(&r.to_le_bytes()));
        put(&self.rip.to_le_bytes());
        put(&self.eflags.to_le_bytes());
        self.seg.iter().for_each(|r| put(&r.to_le_bytes()));
        self.st.iter().for_each(|r| put(r));
        self.fpu.iter().for_each(|r| put(&r.to_le_bytes()));
        self.xmm.iter().for_each(|r| put(&r.to_le_bytes()));
        put(&self.mxcsr.to_le_bytes());
        put(&self.fs_base.to_le_bytes());
        put(&self.gs_base.to_le_bytes());
        self.sys.iter().for_each(|r| put(&r.to_le_bytes()));
    }

    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        if bytes.len() != G_SIZE {
            return Err(());
        }
        let mut at = 0;
        let mut take = |n: usize| {
            let s = &bytes[at..at + n];
            at += n;
            s
        };
        let u64_of = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
        let u32_of = |s: &[u8]| u32::from_le_bytes(s.try_into().unwrap_or([0; 4]));
        for r in self.gpr.iter_mut() {
            *r = u64_of(take(8));
        }
        self.rip = u64_of(take(8));
        self.eflags = u32_of(take(4));
        for r in self.seg.iter_mut() {
            *r = u32_of(take(4));
        }
        for r in self.st.iter_mut() {
            r.copy_from_slice(take(10));
        }
        for r in self.fpu.iter_mut() {
            *r = u32_of(take(4));
        }
        for r in self.xmm.iter_mut() {
            *r = u128::from_le_bytes(take(16).try_into().unwrap_or([0; 16]));
        }
        self.mxcsr = u32_of(take(4));
        self.fs_base = u64_of(take(8));
        self.gs_base = u64_of(take(8));
        for r in self.sys.iter_mut() {
            *r = u64_of(take(8));
        }
        Ok(())
    }
}

/// A register number of the description. The stub leaves `p`/`P` to `g`/`G`; numbers are
/// used to expedite registers in stop replies.
#[derive(Clone, Copy, Debug)]
pub struct X86RegId(pub usize);

/// Expedited in every stop reply: gdb needs no `g` packet to show where a CPU stopped.
pub const RBP: X86RegId = X86RegId(6);
pub const RSP: X86RegId = X86RegId(7);
pub const RIP: X86RegId = X86RegId(16);

impl RegId for X86RegId {
    fn from_raw_id(id: usize) -> Option<(Self, Option<NonZeroUsize>)> {
        (id < 66).then_some((X86RegId(id), None))
    }
    fn to_raw_id(&self) -> Option<usize> {
        Some(self.0)
    }
}

/// The architecture as the gdbstub crate wants it.
pub enum X86_64Sys {}

impl Arch for X86_64Sys {
    type Usize = u64;
    type Registers = X86Regs;
    type RegId = X86RegId;
    type BreakpointKind = usize;

    fn target_description_xml() -> Option<&'static str> {
        Some(TARGET_XML)
    }
}

pub use quicksilver_proto::gdb::TARGET_XML;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn g_packet_round_trips_and_has_the_described_size() {
        let mut r = X86Regs::default();
        r.gpr[gpr::RSP] = 0xffff_c900_0001_3f28;
        r.rip = 0xffff_ffff_8100_0000;
        r.eflags = 0x246;
        r.seg = [0x10, 0x18, 0, 0, 0, 0];
        r.st[7] = [9; 10];
        r.xmm[15] = u128::MAX - 5;
        r.mxcsr = 0x1f80;
        r.sys[sys::EFER] = 0xd01;
        let mut bytes = Vec::new();
        r.gdb_serialize(|b| bytes.push(b.unwrap()));
        assert_eq!(bytes.len(), G_SIZE);
        let mut back = X86Regs::default();
        back.gdb_deserialize(&bytes).unwrap();
        assert_eq!(back, r);
        assert!(back.gdb_deserialize(&bytes[1..]).is_err());
    }

    #[test]
    fn the_description_numbers_its_registers_as_the_packet_lays_them_out() {
        // Count the <reg> elements and their sizes: the same total as the g packet.
        let regs: Vec<&str> = TARGET_XML.split("<reg ").skip(1).collect();
        assert_eq!(regs.len(), 66);
        let bits: usize = regs
            .iter()
            .map(|r| {
                let s = r.split("bitsize=\"").nth(1).unwrap();
                s[..s.find('"').unwrap()].parse::<usize>().unwrap()
            })
            .sum();
        assert_eq!(bits / 8, G_SIZE);
        for (name, num) in [("xmm0", 40), ("fs_base", 57), ("k_gs_base", 59)] {
            let i = regs
                .iter()
                .position(|r| r.starts_with(&format!("name=\"{name}\"")))
                .unwrap();
            assert_eq!(i, num, "{name}");
            assert!(regs[i].contains(&format!("regnum=\"{num}\"")));
        }
        for name in ["cr0", "cr3", "cr4", "efer", "gs_base"] {
            assert!(TARGET_XML.contains(&format!("name=\"{name}\"")), "{name}");
        }
    }
}
