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

/// The target description. Register order = `g` packet order = [`X86Regs`].
pub const TARGET_XML: &str = r#"<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target><architecture>i386:x86-64</architecture><feature name="org.gnu.gdb.i386.core"><flags id="i386_eflags" size="4"><field name="CF" start="0" end="0"/><field name="" start="1" end="1"/><field name="PF" start="2" end="2"/><field name="AF" start="4" end="4"/><field name="ZF" start="6" end="6"/><field name="SF" start="7" end="7"/><field name="TF" start="8" end="8"/><field name="IF" start="9" end="9"/><field name="DF" start="10" end="10"/><field name="OF" start="11" end="11"/><field name="NT" start="14" end="14"/><field name="RF" start="16" end="16"/><field name="VM" start="17" end="17"/><field name="AC" start="18" end="18"/><field name="VIF" start="19" end="19"/><field name="VIP" start="20" end="20"/><field name="ID" start="21" end="21"/></flags><reg name="rax" bitsize="64" type="int64" regnum="0"/><reg name="rbx" bitsize="64" type="int64"/><reg name="rcx" bitsize="64" type="int64"/><reg name="rdx" bitsize="64" type="int64"/><reg name="rsi" bitsize="64" type="int64"/><reg name="rdi" bitsize="64" type="int64"/><reg name="rbp" bitsize="64" type="data_ptr"/><reg name="rsp" bitsize="64" type="data_ptr"/><reg name="r8" bitsize="64" type="int64"/><reg name="r9" bitsize="64" type="int64"/><reg name="r10" bitsize="64" type="int64"/><reg name="r11" bitsize="64" type="int64"/><reg name="r12" bitsize="64" type="int64"/><reg name="r13" bitsize="64" type="int64"/><reg name="r14" bitsize="64" type="int64"/><reg name="r15" bitsize="64" type="int64"/><reg name="rip" bitsize="64" type="code_ptr"/><reg name="eflags" bitsize="32" type="i386_eflags"/><reg name="cs" bitsize="32" type="int32"/><reg name="ss" bitsize="32" type="int32"/><reg name="ds" bitsize="32" type="int32"/><reg name="es" bitsize="32" type="int32"/><reg name="fs" bitsize="32" type="int32"/><reg name="gs" bitsize="32" type="int32"/><reg name="st0" bitsize="80" type="i387_ext"/><reg name="st1" bitsize="80" type="i387_ext"/><reg name="st2" bitsize="80" type="i387_ext"/><reg name="st3" bitsize="80" type="i387_ext"/><reg name="st4" bitsize="80" type="i387_ext"/><reg name="st5" bitsize="80" type="i387_ext"/><reg name="st6" bitsize="80" type="i387_ext"/><reg name="st7" bitsize="80" type="i387_ext"/><reg name="fctrl" bitsize="32" type="int" group="float"/><reg name="fstat" bitsize="32" type="int" group="float"/><reg name="ftag" bitsize="32" type="int" group="float"/><reg name="fiseg" bitsize="32" type="int" group="float"/><reg name="fioff" bitsize="32" type="int" group="float"/><reg name="foseg" bitsize="32" type="int" group="float"/><reg name="fooff" bitsize="32" type="int" group="float"/><reg name="fop" bitsize="32" type="int" group="float"/></feature><feature name="org.gnu.gdb.i386.sse"><vector id="v4f" type="ieee_single" count="4"/><vector id="v2d" type="ieee_double" count="2"/><vector id="v16i8" type="int8" count="16"/><vector id="v8i16" type="int16" count="8"/><vector id="v4i32" type="int32" count="4"/><vector id="v2i64" type="int64" count="2"/><union id="vec128"><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/><field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/><field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/><field name="uint128" type="uint128"/></union><reg name="xmm0" bitsize="128" type="vec128" regnum="40"/><reg name="xmm1" bitsize="128" type="vec128"/><reg name="xmm2" bitsize="128" type="vec128"/><reg name="xmm3" bitsize="128" type="vec128"/><reg name="xmm4" bitsize="128" type="vec128"/><reg name="xmm5" bitsize="128" type="vec128"/><reg name="xmm6" bitsize="128" type="vec128"/><reg name="xmm7" bitsize="128" type="vec128"/><reg name="xmm8" bitsize="128" type="vec128"/><reg name="xmm9" bitsize="128" type="vec128"/><reg name="xmm10" bitsize="128" type="vec128"/><reg name="xmm11" bitsize="128" type="vec128"/><reg name="xmm12" bitsize="128" type="vec128"/><reg name="xmm13" bitsize="128" type="vec128"/><reg name="xmm14" bitsize="128" type="vec128"/><reg name="xmm15" bitsize="128" type="vec128"/><reg name="mxcsr" bitsize="32" type="int" group="vector"/></feature><feature name="org.gnu.gdb.i386.segments"><reg name="fs_base" bitsize="64" type="int64" regnum="57"/><reg name="gs_base" bitsize="64" type="int64"/></feature><feature name="org.quicksilver.x86.sys"><reg name="k_gs_base" bitsize="64" type="int64" regnum="59"/><reg name="cr0" bitsize="64" type="int64"/><reg name="cr2" bitsize="64" type="int64"/><reg name="cr3" bitsize="64" type="int64"/><reg name="cr4" bitsize="64" type="int64"/><reg name="cr8" bitsize="64" type="int64"/><reg name="efer" bitsize="64" type="int64"/></feature></target>"#;

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
