//! The two 8259A PICs (Intel 8259A datasheet): master at 0x20/0x21, slave at 0xA0/0xA1, and
//! the chipset's edge/level control registers (ELCR) at 0x4D0/0x4D1 (PIIX/ICH).
//!
//! What can be read back: the interrupt mask (IMR, an IN from the data port: OCW1), the
//! request and in-service registers (IRR, ISR: OCW3 selects which one the command port reads),
//! and the ELCR. What cannot: the initialization words ICW1-ICW4 (vector base, cascade wiring,
//! auto-EOI) are write-only, and so are the modes OCW2/OCW3 set (rotation, special mask, which
//! register a read returns).
//!
//! Why the boot values are right (Linux's `arch/x86/kernel/i8259.c`, the same in 6.1 and 6.12):
//! Linux programs the PICs only in `init_8259A(auto_eoi)`: mask all, ICW1 = 0x11 (edge,
//! cascade, ICW4 follows), ICW2 = `ISA_IRQ_VECTOR(0)` = 0x30 (master) and `ISA_IRQ_VECTOR(8)`
//! = 0x38 (slave; `((FIRST_EXTERNAL_VECTOR + 16) & ~15) + irq` with FIRST_EXTERNAL_VECTOR
//! 0x20), ICW3 = `1 << PIC_CASCADE_IR` = 0x04 (master) and `PIC_CASCADE_IR` = 0x02 (slave),
//! ICW4 = `MASTER_ICW4_DEFAULT` = 0x01 (8086 mode, normal EOI), then the cached masks. Its
//! own resume from suspend (`i8259A_resume`) re-runs exactly that sequence and then restores
//! the ELCR, which is the model followed here. Auto-EOI (`init_8259A(1)`) is used only when
//! the timer has to be wired through the PIC as a last resort (`check_timer` in io_apic.c); it
//! is not readable, so this restore assumes normal EOI. Linux never uses rotation, special mask
//! or poll mode; it reads the command port only through `i8259A_irq_real` and
//! `i8259A_irq_pending`, and leaves OCW3 selecting the IRR (0x0A) each time, which is also
//! what ICW1 selects: restore and capture leave it there too.
//!
//! QEMU 7.2 (`hw/intc/i8259.c`): ICW1 clears IMR, ISR, the priority, the read selection and
//! the IRR bits of edge-triggered inputs, but not the ELCR; a poll command pending when the
//! hv reads would be consumed by the hv's read (Linux never polls).

use super::PortIo;

pub const MASTER_CMD: u16 = 0x20;
pub const MASTER_DATA: u16 = 0x21;
pub const SLAVE_CMD: u16 = 0xA0;
pub const SLAVE_DATA: u16 = 0xA1;
pub const ELCR_MASTER: u16 = 0x4D0;
pub const ELCR_SLAVE: u16 = 0x4D1;

/// ICW1: edge triggered, cascade, ICW4 follows.
pub const ICW1: u8 = 0x11;
/// ICW2: vector bases (Linux's `ISA_IRQ_VECTOR(0)`, `ISA_IRQ_VECTOR(8)`).
pub const ICW2_MASTER: u8 = 0x30;
pub const ICW2_SLAVE: u8 = 0x38;
/// ICW3: the slave hangs on the master's IR2.
pub const ICW3_MASTER: u8 = 1 << 2;
pub const ICW3_SLAVE: u8 = 2;
/// ICW4: 8086 mode, normal EOI.
pub const ICW4: u8 = 0x01;
/// OCW3: the command port reads the IRR / the ISR.
pub const OCW3_READ_IRR: u8 = 0x0A;
pub const OCW3_READ_ISR: u8 = 0x0B;
/// ELCR bits that exist (IRQ 0, 1, 2, 8 and 13 are always edge: Linux's `save_ELCR`).
pub const ELCR_MASTER_MASK: u8 = 0xF8;
pub const ELCR_SLAVE_MASK: u8 = 0xDE;

/// One 8259A's readable state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PicChip {
    pub imr: u8,
    /// Records: pending and in-service requests (not restorable).
    pub irr: u8,
    pub isr: u8,
    pub elcr: u8,
}

/// Both PICs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PicState {
    pub master: PicChip,
    pub slave: PicChip,
}

impl PicState {
    pub const ZERO: PicState = PicState {
        master: PicChip {
            imr: 0,
            irr: 0,
            isr: 0,
            elcr: 0,
        },
        slave: PicChip {
            imr: 0,
            irr: 0,
            isr: 0,
            elcr: 0,
        },
    };

    /// Do the restorable parts (masks and trigger modes) differ?
    pub fn differs(&self, o: &PicState) -> bool {
        self.master.imr != o.master.imr
            || self.slave.imr != o.slave.imr
            || self.master.elcr & ELCR_MASTER_MASK != o.master.elcr & ELCR_MASTER_MASK
            || self.slave.elcr & ELCR_SLAVE_MASK != o.slave.elcr & ELCR_SLAVE_MASK
    }
}

fn capture_chip(io: &mut impl PortIo, cmd: u16, data: u16, elcr: u16) -> PicChip {
    let imr = io.inb(data);
    io.outb(cmd, OCW3_READ_ISR);
    let isr = io.inb(cmd);
    io.outb(cmd, OCW3_READ_IRR);
    let irr = io.inb(cmd);
    PicChip {
        imr,
        irr,
        isr,
        elcr: io.inb(elcr),
    }
}

/// Captures both PICs (leaving OCW3 on the IRR, as Linux does).
pub fn capture(io: &mut impl PortIo, out: &mut PicState) {
    out.master = capture_chip(io, MASTER_CMD, MASTER_DATA, ELCR_MASTER);
    out.slave = capture_chip(io, SLAVE_CMD, SLAVE_DATA, ELCR_SLAVE);
}

/// Re-initializes both PICs as Linux's `init_8259A(0)` does and restores the masks and the
/// trigger modes: ELCR first (ICW1 keeps it, and clears the IRR bits of edge inputs by it),
/// both masked, master ICW1-4, slave ICW1-4, then the captured masks. Each write is followed
/// by 2 us and the sequence by 100 us, as Linux's `outb_pic` and `init_8259A` pace it for
/// chipsets that need it.
pub fn restore(io: &mut impl PortIo, s: &PicState) {
    for (port, want, mask) in [
        (ELCR_MASTER, s.master.elcr, ELCR_MASTER_MASK),
        (ELCR_SLAVE, s.slave.elcr, ELCR_SLAVE_MASK),
    ] {
        let now = io.inb(port);
        if now & mask != want & mask {
            io.outb(port, (now & !mask) | (want & mask));
        }
    }
    io.outb(MASTER_DATA, 0xFF);
    io.outb(SLAVE_DATA, 0xFF);
    let mut paced = |port: u16, v: u8| {
        io.outb(port, v);
        io.delay_us(2);
    };
    paced(MASTER_CMD, ICW1);
    paced(MASTER_DATA, ICW2_MASTER);
    paced(MASTER_DATA, ICW3_MASTER);
    paced(MASTER_DATA, ICW4);
    paced(SLAVE_CMD, ICW1);
    paced(SLAVE_DATA, ICW2_SLAVE);
    paced(SLAVE_DATA, ICW3_SLAVE);
    paced(SLAVE_DATA, ICW4);
    io.delay_us(100);
    io.outb(MASTER_DATA, s.master.imr);
    io.outb(SLAVE_DATA, s.slave.imr);
}
