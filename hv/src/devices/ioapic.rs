//! The I/O APIC (Intel 82093AA datasheet, section 3; the AMD FCH's is the same register
//! set): two MMIO registers, IOREGSEL at base + 0x00 and IOWIN at base + 0x10, through which
//! the ID (0x00), the version (0x01: version in bits 7:0, the highest redirection entry in
//! 23:16) and the redirection table (0x10 + 2n low, 0x11 + 2n high) are read and written,
//! 32 bits at a time. Version 0x20 adds an EOI register at base + 0x40.
//!
//! Everything Linux programs is readable, so capture reads it all. What cannot be written
//! back: Delivery Status (bit 12) and Remote IRR (bit 14) of each entry are read-only. A
//! Remote IRR left set by an interrupt in service in the world being abandoned would block that
//! level-triggered pin for ever, so a restore clears it where the capture had it clear: by an
//! EOI to the EOI register (version 0x20), or as Linux's `__eoi_ioapic_pin` does on older
//! ones, by switching the masked entry to edge and back (an edge entry has no Remote IRR).
//!
//! IOREGSEL itself is state: Linux writes it and then IOWIN under `ioapic_lock`, and a stop can
//! come between the two. Capture reads it first and leaves it as found; restore writes it last.
//!
//! Restore is two steps around the other devices' (`super` says the order): [`mask_changing`]
//! first, [`finish`] last. Only entries that will change are masked: an edge that arrives on a
//! masked pin is dropped (82093AA, "Interrupt Mask"; QEMU 7.2's `ioapic_set_irq` does the same),
//! so masking a pin that keeps its route would only risk losing an interrupt.

use super::Mmio;

/// Where the first I/O APIC is on PC platforms (the MADT gives it; Linux's default too).
pub const DEFAULT_BASE: u64 = 0xFEC0_0000;
/// Register offsets from the base.
pub const IOREGSEL: u64 = 0x00;
pub const IOWIN: u64 = 0x10;
pub const EOI: u64 = 0x40;
/// Indirect registers.
pub const IOAPICID: u32 = 0x00;
pub const IOAPICVER: u32 = 0x01;
pub const IOREDTBL: u32 = 0x10;
/// The most redirection entries IOREGSEL can address (0x10 + 2n <= 0xFF).
pub const MAX_ENTRIES: usize = 120;

/// Redirection entry bits (82093AA 3.2.4).
pub mod rte {
    pub const VECTOR: u64 = 0xFF;
    pub const DELIVERY_STATUS: u64 = 1 << 12;
    pub const REMOTE_IRR: u64 = 1 << 14;
    pub const TRIGGER_LEVEL: u64 = 1 << 15;
    pub const MASK: u64 = 1 << 16;
    /// The bits a write cannot set.
    pub const READ_ONLY: u64 = DELIVERY_STATUS | REMOTE_IRR;
}

/// The ID register's writable bits (27:24).
const ID_MASK: u32 = 0x0F00_0000;

/// An I/O APIC's state.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoApicState {
    /// IOREGSEL as found.
    pub ioregsel: u32,
    pub id: u32,
    /// The version register (a record: read-only).
    pub version: u32,
    /// Redirection entries in use in `redirection`.
    pub entries: u32,
    pub redirection: [u64; MAX_ENTRIES],
}

impl Default for IoApicState {
    fn default() -> Self {
        Self::ZERO
    }
}

impl IoApicState {
    pub const ZERO: IoApicState = IoApicState {
        ioregsel: 0,
        id: 0,
        version: 0,
        entries: 0,
        redirection: [0; MAX_ENTRIES],
    };

    /// The version number (bits 7:0 of the version register).
    pub fn version_number(&self) -> u8 {
        self.version as u8
    }

    /// Do the writable parts differ?
    pub fn differs(&self, o: &IoApicState) -> bool {
        let n = self.entries as usize;
        self.ioregsel != o.ioregsel
            || self.id & ID_MASK != o.id & ID_MASK
            || self.entries != o.entries
            || (0..n.min(MAX_ENTRIES)).any(|i| {
                self.redirection[i] & !rte::READ_ONLY != o.redirection[i] & !rte::READ_ONLY
            })
    }
}

fn read(io: &mut impl Mmio, base: u64, reg: u32) -> u32 {
    io.write32(base + IOREGSEL, reg);
    io.read32(base + IOWIN)
}

fn write(io: &mut impl Mmio, base: u64, reg: u32, v: u32) {
    io.write32(base + IOREGSEL, reg);
    io.write32(base + IOWIN, v);
}

fn read_entry(io: &mut impl Mmio, base: u64, i: usize) -> u64 {
    let lo = read(io, base, IOREDTBL + 2 * i as u32);
    let hi = read(io, base, IOREDTBL + 2 * i as u32 + 1);
    (hi as u64) << 32 | lo as u64
}

/// Captures the I/O APIC at `base`; false if none answers there (the version register reads
/// all ones, or zero entries' worth of nothing).
pub fn capture(io: &mut impl Mmio, base: u64, out: &mut IoApicState) -> bool {
    let sel = io.read32(base + IOREGSEL);
    let version = read(io, base, IOAPICVER);
    if version == u32::MAX || version == 0 {
        return false;
    }
    out.ioregsel = sel & 0xFF;
    out.version = version;
    out.id = read(io, base, IOAPICID);
    let n = (((version >> 16) & 0xFF) as usize + 1).min(MAX_ENTRIES);
    out.entries = n as u32;
    for i in 0..n {
        out.redirection[i] = read_entry(io, base, i);
    }
    io.write32(base + IOREGSEL, out.ioregsel);
    true
}

/// Pins a restore changes, one bit each (at most [`MAX_ENTRIES`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changing(pub u128);

/// Restore, step 1: masks every entry that is unmasked now and will change, so that no
/// interrupt is delivered through a half-restored route while the other devices are
/// reprogrammed. Returns the entries [`finish`] will write.
pub fn mask_changing(io: &mut impl Mmio, base: u64, s: &IoApicState) -> Changing {
    let mut changing = Changing(0);
    for i in 0..(s.entries as usize).min(MAX_ENTRIES) {
        let now = read_entry(io, base, i);
        let want = s.redirection[i];
        if now & !rte::READ_ONLY == want & !rte::READ_ONLY {
            continue;
        }
        changing.0 |= 1 << i;
        if now & rte::MASK == 0 {
            write(io, base, IOREDTBL + 2 * i as u32, (now | rte::MASK) as u32);
        }
    }
    changing
}

/// Restore, last step: the ID, the changing entries (destination first, then the low half
/// still masked), Remote IRR cleared where the capture had it clear, then every changing entry
/// unmasked as captured, and IOREGSEL as it was.
pub fn finish(io: &mut impl Mmio, base: u64, s: &IoApicState, changing: Changing) {
    if read(io, base, IOAPICID) & ID_MASK != s.id & ID_MASK {
        write(io, base, IOAPICID, s.id & ID_MASK);
    }
    let n = (s.entries as usize).min(MAX_ENTRIES);
    for i in (0..n).filter(|&i| changing.0 & (1 << i) != 0) {
        let want = s.redirection[i];
        write(io, base, IOREDTBL + 2 * i as u32 + 1, (want >> 32) as u32);
        write(io, base, IOREDTBL + 2 * i as u32, (want | rte::MASK) as u32);
    }
    // Entries written last, unmasked (or masked) as captured.
    let mut last = changing.0;
    for i in 0..n {
        let now = read_entry(io, base, i);
        if now & rte::REMOTE_IRR == 0 || s.redirection[i] & rte::REMOTE_IRR != 0 {
            continue;
        }
        if s.version_number() >= 0x20 {
            // The EOI register clears Remote IRR of every entry with this vector.
            io.write32(base + EOI, (now & rte::VECTOR) as u32);
        } else {
            // No EOI register: as Linux's __eoi_ioapic_pin, masked, edge, then back.
            let lo = (now | rte::MASK) & 0xFFFF_FFFF;
            write(
                io,
                base,
                IOREDTBL + 2 * i as u32,
                (lo & !rte::TRIGGER_LEVEL) as u32,
            );
            write(io, base, IOREDTBL + 2 * i as u32, lo as u32);
            last |= 1 << i;
        }
    }
    for i in (0..n).filter(|&i| last & (1 << i) != 0) {
        write(io, base, IOREDTBL + 2 * i as u32, s.redirection[i] as u32);
    }
    io.write32(base + IOREGSEL, s.ioregsel);
}
