//! A 16550A UART (National Semiconductor PC16550D datasheet, table II), here COM1 at 0x3F8, the
//! kernel's console. COM2 (0x2F8) is the hv's own link and is left alone.
//!
//! Readable, and captured: the line control register (LCR, +3), the interrupt enable register
//! (IER, +1, with LCR.DLAB clear), the divisor latch (DLL +0, DLM +1, with LCR.DLAB set), the
//! modem control register (MCR, +4) and the scratch register (SCR, +7). Not captured, because
//! reading them has effects: the receive buffer (+0: pops a byte), the interrupt
//! identification register (IIR, +2: reading it acknowledges a THRE interrupt), the line status
//! register (LSR, +5: clears the error bits) and the modem status register (MSR, +6: clears the
//! delta bits). The FIFOs' contents are gone with the world they belonged to.
//!
//! Write-only: the FIFO control register (FCR, +2 on a write): FIFO enable, DMA mode, receive
//! trigger level. The hv shadows it by intercepting writes to port 0x3FA while it is active
//! (`super::intercept`); until the guest's first write after activation it is unknown, and a
//! restore leaves it alone. Its bits 1 and 2 (clear the receive, transmit FIFO) are actions,
//! not state, and are never written back. (On a 16650 or later with LCR = 0xBF that port is
//! EFR instead; Linux's 8250 driver selects that only while probing, at boot.)
//!
//! Restore order: divisor (DLAB set), IER (DLAB clear) where it differs, FCR, MCR, SCR, then
//! LCR last as captured. LCR is written around the divisor even when nothing differs: a
//! stop can come while the driver has DLAB set (`serial8250_do_set_termios`), and capture and
//! restore both leave LCR exactly as they found or were told. IER is written only when it
//! differs: on a 16550 setting ETBEI while the transmitter is empty raises a THRE interrupt.
//!
//! QEMU 7.2 (`hw/char/serial.c`): byte accesses only; FCR stores `value & 0xC9` and flushes
//! both FIFOs when the enable bit changes; MCR keeps bits 4:0; an IER write that changes
//! nothing has no effect.

use super::PortIo;

/// The console UART's base on PCs.
pub const COM1: u16 = 0x3F8;
pub const RBR_DLL: u16 = 0;
pub const IER_DLM: u16 = 1;
pub const IIR_FCR: u16 = 2;
pub const LCR: u16 = 3;
pub const MCR: u16 = 4;
pub const SCR: u16 = 7;
/// LCR's divisor latch access bit.
pub const LCR_DLAB: u8 = 0x80;
/// FCR's action bits: clear the receive and the transmit FIFO.
pub const FCR_CLEAR_FIFOS: u8 = 0x06;

/// A UART's state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UartState {
    pub lcr: u8,
    pub ier: u8,
    pub mcr: u8,
    pub scr: u8,
    pub dll: u8,
    pub dlm: u8,
    /// The shadowed FCR (without the action bits), if `fcr_known`.
    pub fcr: u8,
    pub fcr_known: u8,
}

impl UartState {
    pub const ZERO: UartState = UartState {
        lcr: 0,
        ier: 0,
        mcr: 0,
        scr: 0,
        dll: 0,
        dlm: 0,
        fcr: 0,
        fcr_known: 0,
    };

    /// Do the readable, restorable registers differ?
    pub fn differs(&self, o: &UartState) -> bool {
        (self.lcr, self.ier, self.mcr, self.scr, self.dll, self.dlm)
            != (o.lcr, o.ier, o.mcr, o.scr, o.dll, o.dlm)
    }

    /// Does the shadowed FCR differ (or is it known in one and not the other)?
    pub fn fcr_differs(&self, o: &UartState) -> bool {
        self.fcr_known != o.fcr_known || (self.fcr_known != 0 && self.fcr != o.fcr)
    }
}

/// Captures the UART at `base`; false if nothing answers there (LCR reads all ones: an empty
/// ISA bus floats high).
pub fn capture(io: &mut impl PortIo, base: u16, fcr: Option<u8>, out: &mut UartState) -> bool {
    let lcr = io.inb(base + LCR);
    if lcr == 0xFF {
        return false;
    }
    out.lcr = lcr;
    if lcr & LCR_DLAB != 0 {
        io.outb(base + LCR, lcr & !LCR_DLAB);
    }
    out.ier = io.inb(base + IER_DLM);
    io.outb(base + LCR, lcr | LCR_DLAB);
    out.dll = io.inb(base + RBR_DLL);
    out.dlm = io.inb(base + IER_DLM);
    io.outb(base + LCR, lcr);
    out.mcr = io.inb(base + MCR);
    out.scr = io.inb(base + SCR);
    out.fcr = fcr.unwrap_or(0);
    out.fcr_known = fcr.is_some() as u8;
    true
}

/// Restores the UART at `base` in the order the module gives; returns the FCR written, for the
/// shadow.
pub fn restore(io: &mut impl PortIo, base: u16, s: &UartState) -> Option<u8> {
    io.outb(base + LCR, s.lcr | LCR_DLAB);
    io.outb(base + RBR_DLL, s.dll);
    io.outb(base + IER_DLM, s.dlm);
    io.outb(base + LCR, s.lcr & !LCR_DLAB);
    if io.inb(base + IER_DLM) != s.ier {
        io.outb(base + IER_DLM, s.ier);
    }
    let fcr = (s.fcr_known != 0).then_some(s.fcr & !FCR_CLEAR_FIFOS);
    if let Some(fcr) = fcr {
        io.outb(base + IIR_FCR, fcr);
    }
    io.outb(base + MCR, s.mcr);
    io.outb(base + SCR, s.scr);
    io.outb(base + LCR, s.lcr);
    fcr
}
