//! The MC146818 RTC and CMOS (Motorola MC146818A datasheet): an index port (0x70, write-only;
//! bit 7 of the byte written is the NMI mask on PCs) and a data port (0x71) that reads or
//! writes the register the index selects.
//!
//! Captured: register A (divider, bits 6:4, and periodic rate, 3:0; bit 7, update in
//! progress, is read-only) and register B (SET, the interrupt enables PIE/AIE/UIE, data mode,
//! 24-hour mode, daylight saving), which Linux's `rtc-cmos` programs (periodic and alarm
//! interrupts); and the index. Not captured: the clock and calendar (registers 0-9: the
//! world's time, which a rollback must not take back), register C (reading it clears the
//! interrupt flags) and D (read-only), and the CMOS RAM beyond (firmware settings Linux does
//! not write at run time).
//!
//! The index: Linux writes it before every access, under `rtc_lock` with interrupts off
//! (`CMOS_READ`/`CMOS_WRITE`: `outb(addr, 0x70)`, then `inb`/`outb` at 0x71). A stop can still
//! land between the two, so the index is part of the state, and it cannot be read (QEMU 7.2
//! returns 0xFF for an IN from 0x70). The hv intercepts writes to 0x70 while it is active and
//! shadows them (`super::intercept`): a CPU stopped between the two accesses made its index
//! write in guest mode, where the hv saw it. Before the guest's first write since activation
//! the index is unknown, and then no CPU is inside such a pair (a CPU in the middle of one when
//! the hv was activated could not take the activation IPI before it left `rtc_lock`).
//!
//! Capture and restore themselves must select registers: they leave the index as the guest
//! last wrote it, or at register D (read-only, reading it has no effect) when that is unknown.

use super::PortIo;

pub const INDEX: u16 = 0x70;
pub const DATA: u16 = 0x71;
pub const REG_A: u8 = 0x0A;
pub const REG_B: u8 = 0x0B;
pub const REG_D: u8 = 0x0D;
/// Register A's writable bits (UIP, bit 7, is read-only).
const REG_A_WRITABLE: u8 = 0x7F;

/// The RTC's state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RtcState {
    /// The index as the guest last wrote it (NMI mask in bit 7), if `index_known`.
    pub index: u8,
    pub index_known: u8,
    pub reg_a: u8,
    pub reg_b: u8,
    pub reserved: [u8; 4],
}

impl RtcState {
    pub const ZERO: RtcState = RtcState {
        index: 0,
        index_known: 0,
        reg_a: 0,
        reg_b: 0,
        reserved: [0; 4],
    };

    /// Do the restorable parts differ?
    pub fn differs(&self, o: &RtcState) -> bool {
        self.index_known != o.index_known
            || (self.index_known != 0 && self.index != o.index)
            || self.reg_a & REG_A_WRITABLE != o.reg_a & REG_A_WRITABLE
            || self.reg_b != o.reg_b
    }
}

fn read(io: &mut impl PortIo, reg: u8) -> u8 {
    io.outb(INDEX, reg);
    io.inb(DATA)
}

fn leave_index(io: &mut impl PortIo, index: Option<u8>) {
    io.outb(INDEX, index.unwrap_or(REG_D));
}

/// Captures registers A and B and the index (`index`: the shadow's, if known).
pub fn capture(io: &mut impl PortIo, index: Option<u8>, out: &mut RtcState) {
    out.index = index.unwrap_or(0);
    out.index_known = index.is_some() as u8;
    out.reg_a = read(io, REG_A);
    out.reg_b = read(io, REG_B);
    leave_index(io, index);
}

/// Writes A and B where they differ (a write of A can reset the divider chain, one of B
/// re-evaluates the interrupt flag: same-value writes are not free), then the index, which it
/// returns for the shadow.
pub fn restore(io: &mut impl PortIo, s: &RtcState) -> Option<u8> {
    if read(io, REG_A) & REG_A_WRITABLE != s.reg_a & REG_A_WRITABLE {
        io.outb(INDEX, REG_A);
        io.outb(DATA, s.reg_a & REG_A_WRITABLE);
    }
    if read(io, REG_B) != s.reg_b {
        io.outb(INDEX, REG_B);
        io.outb(DATA, s.reg_b);
    }
    let index = (s.index_known != 0).then_some(s.index);
    leave_index(io, index);
    index
}
