//! The HPET (IA-PC HPET specification 1.0a, section 2.3): MMIO, 1 KiB at the base the ACPI
//! HPET table gives (0xFED00000 on PCs). General capabilities and ID at 0x000 (read-only:
//! timers - 1 in bits 12:8, the counter period in femtoseconds in 63:32), general
//! configuration at 0x010 (ENABLE_CNF bit 0, LEG_RT_CNF bit 1), the main counter at 0x0F0,
//! and per timer N at 0x100 + 0x20 N: configuration and capabilities (+0x00), comparator
//! (+0x08), FSB interrupt route (+0x10). Accessed 32 bits at a time (QEMU 7.2 accepts only
//! 4-byte accesses: `hpet_ram_ops`; Linux's `hpet_readl`/`hpet_writel` are 32-bit too).
//!
//! Captured: the general configuration, and each timer's configuration, comparator and FSB
//! route. Not captured, on purpose: the main counter. It is a clock, and the world's time
//! moves on; Linux uses it as a clocksource (or the clocksource's watchdog). Writing it needs
//! the counter halted, and halting it even for the length of a restore would make it lag real
//! time for good. Not readable: a periodic timer's period (the comparator reads as the next
//! match; the increment is hidden: QEMU's `period`), and the write-only `Tn_VAL_SET_CNF`.
//! Linux programs periodic mode only at boot, before it switches to one-shot or leaves the
//! HPET for the local APIC timer.
//!
//! Restore, with the counter left running: each timer whose configuration, comparator or
//! route differs gets its interrupt disabled first, then comparator and route, then its
//! configuration as captured (interrupt enable included); the general configuration, with
//! ENABLE_CNF, is the last write. A one-shot comparator from a checkpoint is in the past by
//! the time it is restored: on hardware it matches again only after the counter wraps, under
//! QEMU 7.2 it fires at once (`hpet_calculate_diff` clamps a past comparator to one tick).
//! Re-arming timers for the present is the rollback's timer policy, as for the local APIC.

use super::Mmio;

/// Where the HPET is on PC platforms.
pub const DEFAULT_BASE: u64 = 0xFED0_0000;
pub const GCAP_ID: u64 = 0x000;
pub const GCAP_PERIOD: u64 = 0x004;
pub const GEN_CONF: u64 = 0x010;
/// Timer N's registers: `TIMER0 + N * TIMER_STRIDE + TN_*`.
pub const TIMER0: u64 = 0x100;
pub const TIMER_STRIDE: u64 = 0x20;
pub const TN_CONF: u64 = 0x00;
pub const TN_COMPARATOR: u64 = 0x08;
pub const TN_FSB_ROUTE: u64 = 0x10;
/// The most timers a block can have.
pub const MAX_TIMERS: usize = 32;

/// General configuration bits.
pub const ENABLE_CNF: u32 = 1 << 0;
pub const LEG_RT_CNF: u32 = 1 << 1;
const GEN_CONF_WRITABLE: u64 = (ENABLE_CNF | LEG_RT_CNF) as u64;

/// Timer configuration bits (spec table 7).
pub mod tn {
    pub const INT_TYPE_LEVEL: u64 = 1 << 1;
    pub const INT_ENB: u64 = 1 << 2;
    pub const TYPE_PERIODIC: u64 = 1 << 3;
    pub const VAL_SET: u64 = 1 << 6;
    pub const MODE_32: u64 = 1 << 8;
    /// The bits software sets (INT_TYPE, INT_ENB, TYPE, 32MODE, INT_ROUTE, FSB_EN), without
    /// the write-only VAL_SET.
    pub const WRITABLE: u64 = 0x7F0E;
}

/// The spec's longest counter period (100 ns), in femtoseconds.
const MAX_PERIOD_FS: u32 = 100_000_000;

/// One timer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HpetTimer {
    pub config: u64,
    pub comparator: u64,
    pub fsb_route: u64,
}

impl HpetTimer {
    fn differs(&self, o: &HpetTimer) -> bool {
        let periodic = self.config & tn::TYPE_PERIODIC != 0;
        self.config & tn::WRITABLE != o.config & tn::WRITABLE
            // A periodic timer's comparator moves on by itself at every period.
            || (!periodic && self.comparator != o.comparator)
            || self.fsb_route != o.fsb_route
    }
}

/// The HPET's state.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HpetState {
    /// General capabilities and ID (a record).
    pub capabilities: u64,
    pub config: u64,
    /// Timers in `timer`.
    pub timers: u32,
    pub reserved: u32,
    pub timer: [HpetTimer; MAX_TIMERS],
}

impl Default for HpetState {
    fn default() -> Self {
        Self::ZERO
    }
}

impl HpetState {
    pub const ZERO: HpetState = HpetState {
        capabilities: 0,
        config: 0,
        timers: 0,
        reserved: 0,
        timer: [HpetTimer {
            config: 0,
            comparator: 0,
            fsb_route: 0,
        }; MAX_TIMERS],
    };

    /// Do the restorable parts differ?
    pub fn differs(&self, o: &HpetState) -> bool {
        self.config & GEN_CONF_WRITABLE != o.config & GEN_CONF_WRITABLE
            || self.timers != o.timers
            || self.timer[..(self.timers as usize).min(MAX_TIMERS)]
                .iter()
                .zip(o.timer.iter())
                .any(|(a, b)| a.differs(b))
    }

    /// A bit per timer with its interrupt enabled.
    pub fn enabled_timers(&self) -> u32 {
        (0..(self.timers as usize).min(MAX_TIMERS))
            .filter(|&i| self.timer[i].config & tn::INT_ENB != 0)
            .fold(0, |m, i| m | 1 << i)
    }
}

fn read64(io: &mut impl Mmio, pa: u64) -> u64 {
    let lo = io.read32(pa) as u64;
    lo | (io.read32(pa + 4) as u64) << 32
}

fn timer_base(base: u64, i: usize) -> u64 {
    base + TIMER0 + i as u64 * TIMER_STRIDE
}

fn read_timer(io: &mut impl Mmio, base: u64, i: usize) -> HpetTimer {
    let t = timer_base(base, i);
    HpetTimer {
        config: read64(io, t + TN_CONF),
        comparator: read64(io, t + TN_COMPARATOR),
        fsb_route: read64(io, t + TN_FSB_ROUTE),
    }
}

/// Captures the HPET at `base`; false if none answers there (vendor ID 0 or all ones, or a
/// period the spec does not allow).
pub fn capture(io: &mut impl Mmio, base: u64, out: &mut HpetState) -> bool {
    let id = io.read32(base + GCAP_ID);
    let period = io.read32(base + GCAP_PERIOD);
    let vendor = id >> 16;
    if vendor == 0 || vendor == 0xFFFF || period == 0 || period > MAX_PERIOD_FS {
        return false;
    }
    out.capabilities = (period as u64) << 32 | id as u64;
    out.config = io.read32(base + GEN_CONF) as u64;
    let n = (((id >> 8) & 0x1F) as usize + 1).min(MAX_TIMERS);
    out.timers = n as u32;
    for i in 0..n {
        out.timer[i] = read_timer(io, base, i);
    }
    true
}

/// Restores the timers that differ and then the general configuration (see the module).
pub fn restore(io: &mut impl Mmio, base: u64, s: &HpetState) {
    for i in 0..(s.timers as usize).min(MAX_TIMERS) {
        let want = s.timer[i];
        let now = read_timer(io, base, i);
        if !now.differs(&want) && !want.differs(&now) {
            continue;
        }
        let t = timer_base(base, i);
        let config = want.config & tn::WRITABLE;
        io.write32(t + TN_CONF, (config & !tn::INT_ENB) as u32);
        io.write32(t + TN_COMPARATOR, want.comparator as u32);
        io.write32(t + TN_COMPARATOR + 4, (want.comparator >> 32) as u32);
        io.write32(t + TN_FSB_ROUTE, want.fsb_route as u32);
        io.write32(t + TN_FSB_ROUTE + 4, (want.fsb_route >> 32) as u32);
        io.write32(t + TN_CONF, config as u32);
    }
    let now = io.read32(base + GEN_CONF) as u64;
    io.write32(
        base + GEN_CONF,
        ((now & !GEN_CONF_WRITABLE) | (s.config & GEN_CONF_WRITABLE)) as u32,
    );
}
