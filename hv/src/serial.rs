//! The last-resort report channel: COM1 (0x3F8), polled, for hv faults only. The kernel's
//! console is on the same port, so a line here lands in the console log between its lines.

use crate::arch::instr;
use core::fmt;

const COM1: u16 = 0x3F8;
const LSR: u16 = COM1 + 5;
const LSR_THR_EMPTY: u8 = 1 << 5;

/// Writes to COM1, waiting (boundedly) for the transmitter before each byte.
pub struct Com1;

impl fmt::Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            for _ in 0..100_000 {
                // SAFETY: reading the UART's line status register has no side effect.
                if unsafe { instr::inb(LSR) } & LSR_THR_EMPTY != 0 {
                    break;
                }
            }
            // SAFETY: the hv reports here only when it is about to stop or reset the machine;
            // interleaving with the kernel's console output is acceptable then.
            unsafe { instr::outb(COM1, b) };
        }
        Ok(())
    }
}
