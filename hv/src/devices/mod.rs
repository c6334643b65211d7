//! Platform devices: the legacy PC devices a running Linux relies on, captured into one plain
//! snapshot ([`DeviceState`]) and restored from it, so that a rollback can put them back as
//! they were at the checkpoint. One file per device, each saying what can be read back, what
//! cannot and why, and what QEMU's model of it does:
//!
//! - [`ioapic`]: the I/O APIC's redirection table, ID, and IOREGSEL;
//! - [`pic`]: the two 8259As (masks, trigger modes; the init words are Linux's boot values);
//! - [`pit`]: the 8254's channels 0 and 2 (mode and count) and port 0x61;
//! - [`hpet`]: the HPET's configuration and timers, never its main counter;
//! - [`rtc`]: the RTC's registers A and B and the CMOS index;
//! - [`uart`]: the console UART (COM1), with its write-only FIFO control register;
//! - [`intercept`]: the two write-only registers the hv shadows by intercepting port writes
//!   while active (COM1's FCR, the CMOS index), and the I/O intercept map that does it.
//!
//! The code is written against two small traits, [`PortIo`] and [`Mmio`]: the hv's own
//! implementation (`HostIo`) performs the accesses through `crate::arch`; host tests run the
//! same code against fake devices that model the datasheets (`fake`).
//!
//! # Restore order
//!
//! [`restore_with`] writes the devices in this order, for these reasons:
//!
//! 1. **IOAPIC, masking**: every redirection entry that will change and is unmasked now is
//!    masked, so that nothing the next steps make a device raise is delivered through a
//!    half-restored route. Entries that keep their value are not touched (an edge arriving on
//!    a masked pin is dropped, by the 82093AA and by QEMU alike).
//! 2. **8259 PICs**: ELCR, both masked, the full ICW1-ICW4 sequence on master then slave (the
//!    only way to set the write-only init state; Linux's own resume does the same), then the
//!    captured masks.
//! 3. **8254 PIT**: a channel whose mode differs is reprogrammed; then port 0x61's gate bits.
//! 4. **HPET**: each timer that differs (interrupt off, comparator, route, configuration as
//!    captured), then the general configuration with the enable bit, last of the HPET's writes.
//! 5. **RTC**: registers A and B where they differ, then the index as shadowed.
//! 6. **COM1**: divisor, IER, FCR (as shadowed), MCR, SCR, then LCR last.
//! 7. **IOAPIC, finishing**: ID; changing entries written masked (destination first); Remote
//!    IRR cleared where the capture had it clear; changing entries unmasked as captured (the
//!    last redirection-table writes); IOREGSEL as captured, the very last write.
//!
//! Everything runs with every CPU stopped in host mode (no guest driver can interleave) and
//! with interrupts held (the CPUs are in the hv). A device the capture did not find is not
//! touched; restoring `DeviceState::default()` writes nothing.

pub mod hpet;
pub mod intercept;
pub mod ioapic;
pub mod pic;
pub mod pit;
pub mod rtc;
pub mod uart;

#[cfg(test)]
pub mod fake;
#[cfg(test)]
mod tests;

use quicksilver_proto::stats::{device, DevicesRecord, SHADOW_KNOWN};

/// Port I/O, as the device code needs it.
pub trait PortIo {
    fn inb(&mut self, port: u16) -> u8;
    fn outb(&mut self, port: u16, value: u8);
    /// Waits about `us` microseconds (the 8259's init sequence is paced, as Linux paces it).
    fn delay_us(&mut self, us: u32);
}

/// 32-bit memory-mapped device registers, by physical address.
pub trait Mmio {
    fn read32(&mut self, pa: u64) -> u32;
    fn write32(&mut self, pa: u64, value: u32);
}

/// Where the devices are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bases {
    pub ioapic: u64,
    pub hpet: u64,
    pub com1: u16,
}

impl Bases {
    /// The PC's usual places (what QEMU's `pc` and `q35` machines and most firmware use).
    /// The ACPI MADT and HPET tables say where they really are; the hv does not read ACPI, so
    /// a machine that puts them elsewhere needs the agent to pass them (not done yet).
    pub const PC: Bases = Bases {
        ioapic: ioapic::DEFAULT_BASE,
        hpet: hpet::DEFAULT_BASE,
        com1: uart::COM1,
    };
}

impl Default for Bases {
    fn default() -> Self {
        Bases::PC
    }
}

/// [`DeviceState::layout`] of this build's snapshots.
pub const LAYOUT: u32 = 1;

/// Platform devices: every legacy device's state, as plain data (no pointers: a checkpoint
/// store can copy its bytes). `present` says which devices were found
/// (`quicksilver_proto::stats::device` bits); a restore touches only those.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceState {
    /// [`LAYOUT`] for a captured state, 0 for the default (nothing captured).
    pub layout: u32,
    pub present: u32,
    pub pic: pic::PicState,
    pub pit: pit::PitState,
    pub rtc: rtc::RtcState,
    pub com1: uart::UartState,
    pub ioapic: ioapic::IoApicState,
    pub hpet: hpet::HpetState,
}

impl DeviceState {
    /// Bytes of a snapshot (no padding anywhere: every byte is a field's).
    pub const SIZE: usize = core::mem::size_of::<DeviceState>();

    /// Nothing captured (the default): restoring it writes nothing.
    pub const EMPTY: DeviceState = DeviceState {
        layout: 0,
        present: 0,
        pic: pic::PicState::ZERO,
        pit: pit::PitState::ZERO,
        rtc: rtc::RtcState::ZERO,
        com1: uart::UartState::ZERO,
        ioapic: ioapic::IoApicState::ZERO,
        hpet: hpet::HpetState::ZERO,
    };
}

const _: () = {
    use core::mem::size_of;
    assert!(size_of::<pic::PicState>() == 8);
    assert!(size_of::<pit::PitState>() == 16);
    assert!(size_of::<rtc::RtcState>() == 8);
    assert!(size_of::<uart::UartState>() == 8);
    assert!(size_of::<ioapic::IoApicState>() == 16 + 8 * ioapic::MAX_ENTRIES);
    assert!(size_of::<hpet::HpetState>() == 24 + 24 * hpet::MAX_TIMERS);
    assert!(DeviceState::SIZE == 8 + 8 + 16 + 8 + 8 + 976 + 792);
};

impl Default for DeviceState {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// Captures every device at `bases`, with the write-only registers from `shadows`. Leaves
/// every device as it found it (the registers capture must select are put back).
pub fn capture_with<T: PortIo + Mmio>(
    io: &mut T,
    bases: &Bases,
    shadows: &intercept::WriteShadows,
) -> DeviceState {
    let mut s = DeviceState {
        layout: LAYOUT,
        present: device::PIC | device::PIT | device::RTC,
        ..Default::default()
    };
    if ioapic::capture(io, bases.ioapic, &mut s.ioapic) {
        s.present |= device::IOAPIC;
    }
    pic::capture(io, &mut s.pic);
    pit::capture(io, &mut s.pit);
    if hpet::capture(io, bases.hpet, &mut s.hpet) {
        s.present |= device::HPET;
    }
    rtc::capture(io, shadows.rtc_index(), &mut s.rtc);
    if uart::capture(io, bases.com1, shadows.com1_fcr(), &mut s.com1) {
        s.present |= device::COM1;
    }
    s
}

/// Restores every device `s` found, in the order the module gives; the shadows then say
/// what was written.
pub fn restore_with<T: PortIo + Mmio>(
    io: &mut T,
    bases: &Bases,
    s: &DeviceState,
    shadows: &intercept::WriteShadows,
) {
    if s.layout != LAYOUT {
        return;
    }
    let has = |d: u32| s.present & d != 0;
    let changing = if has(device::IOAPIC) {
        ioapic::mask_changing(io, bases.ioapic, &s.ioapic)
    } else {
        ioapic::Changing::default()
    };
    if has(device::PIC) {
        pic::restore(io, &s.pic);
    }
    if has(device::PIT) {
        pit::restore(io, &s.pit);
    }
    if has(device::HPET) {
        hpet::restore(io, bases.hpet, &s.hpet);
    }
    if has(device::RTC) {
        shadows.set_rtc_index(rtc::restore(io, &s.rtc));
    }
    if has(device::COM1) {
        if let Some(fcr) = uart::restore(io, bases.com1, &s.com1) {
            shadows.set_com1_fcr(Some(fcr));
        }
    }
    if has(device::IOAPIC) {
        ioapic::finish(io, bases.ioapic, &s.ioapic, changing);
    }
}

/// Names the devices whose restorable state differs between `a` and `b` ("ioapic", "pic",
/// "pit", "hpet", "rtc", "uart", "uart-fcr") into `out`; returns how many differ (which can
/// exceed `out.len()`).
pub fn differences(a: &DeviceState, b: &DeviceState, out: &mut [&'static str]) -> usize {
    let both = |d: u32| a.present & b.present & d != 0;
    let presence = |d: u32| (a.present ^ b.present) & d != 0;
    let checks: [(&'static str, bool); 7] = [
        (
            "ioapic",
            presence(device::IOAPIC) || both(device::IOAPIC) && a.ioapic.differs(&b.ioapic),
        ),
        (
            "pic",
            presence(device::PIC) || both(device::PIC) && a.pic.differs(&b.pic),
        ),
        (
            "pit",
            presence(device::PIT) || both(device::PIT) && a.pit.differs(&b.pit),
        ),
        (
            "hpet",
            presence(device::HPET) || both(device::HPET) && a.hpet.differs(&b.hpet),
        ),
        (
            "rtc",
            presence(device::RTC) || both(device::RTC) && a.rtc.differs(&b.rtc),
        ),
        (
            "uart",
            presence(device::COM1) || both(device::COM1) && a.com1.differs(&b.com1),
        ),
        (
            "uart-fcr",
            both(device::COM1) && a.com1.fcr_differs(&b.com1),
        ),
    ];
    let mut n = 0;
    for (name, differs) in checks {
        if differs {
            if let Some(slot) = out.get_mut(n) {
                *slot = name;
            }
            n += 1;
        }
    }
    n
}

/// The hv's own device access: port I/O and MMIO through `crate::arch`, in host mode.
struct HostIo {
    ticks_per_us: u64,
}

impl HostIo {
    /// # Safety
    /// Host mode (MMIO is reached through the hv's identity map), every other CPU stopped
    /// (no guest driver in the middle of a device's register sequence that the accesses
    /// would interleave with).
    unsafe fn new() -> HostIo {
        let khz = crate::vmm::get().map_or(1_000_000, |hv| hv.tsc_khz as u64);
        HostIo {
            ticks_per_us: (khz / 1000).max(1),
        }
    }
}

impl PortIo for HostIo {
    fn inb(&mut self, port: u16) -> u8 {
        // SAFETY: host mode with every other CPU stopped (`HostIo::new`); the ports are the
        // legacy devices' own, whose reads capture and restore choose for having no effect
        // beyond the ones their modules restore.
        unsafe { crate::arch::instr::inb(port) }
    }
    fn outb(&mut self, port: u16, value: u8) {
        // SAFETY: as for `inb`; the writes are the restore sequences the device modules
        // argue, with the guest's own values.
        unsafe { crate::arch::instr::outb(port, value) }
    }
    fn delay_us(&mut self, us: u32) {
        let start = crate::arch::instr::rdtsc();
        while crate::arch::instr::rdtsc() - start < us as u64 * self.ticks_per_us {
            core::hint::spin_loop();
        }
    }
}

impl Mmio for HostIo {
    fn read32(&mut self, pa: u64) -> u32 {
        // SAFETY: host mode (`HostIo::new`): the identity map reaches the IOAPIC and HPET
        // pages; the addresses are their 4-byte aligned registers (`Bases`), whose reads have
        // no effect.
        unsafe { crate::arch::instr::mmio_read32(pa) }
    }
    fn write32(&mut self, pa: u64, value: u32) {
        // SAFETY: as for `read32`; the writes are the restore sequences the device modules
        // argue.
        unsafe { crate::arch::instr::mmio_write32(pa, value) }
    }
}

/// Captures the platform's devices (at [`Bases::PC`], with the hv's shadows).
///
/// For host mode with every CPU stopped (the rendezvous' leader), as every hv path that can
/// call it is: it reads device registers through the hv's identity map, which only host mode
/// has, and selects registers that a running guest driver could be using.
pub fn capture() -> DeviceState {
    // SAFETY: the hv runs in host mode everywhere but in `init` (which does not call this),
    // and its callers are stop leaders with every other CPU parked (see above).
    let mut io = unsafe { HostIo::new() };
    capture_with(&mut io, &Bases::PC, &intercept::SHADOWS)
}

/// Restores the platform's devices to `s` (see the module for the order).
///
/// # Safety
/// Host mode, every other CPU stopped; `s` a state [`capture`] made on this machine (its
/// values are written to the devices as they are).
pub unsafe fn restore(s: &DeviceState) {
    // SAFETY: forwarded to the caller.
    let mut io = unsafe { HostIo::new() };
    restore_with(&mut io, &Bases::PC, s, &intercept::SHADOWS)
}

/// What `qsctl stats` shows: the last round trip's capture and verdict.
struct Last {
    state: DeviceState,
    checks: u32,
    differing: u32,
    what: [u8; 32],
}

static LAST: spin::Mutex<Last> = spin::Mutex::new(Last {
    state: DeviceState::EMPTY,
    checks: 0,
    differing: 0,
    what: [0; 32],
});

/// `qsctl freeze --check`'s device round trip, in place: capture, restore, capture again,
/// compare. Returns the differing devices' names in `out` and their count.
///
/// For host mode with every other CPU stopped, as [`capture`].
pub fn check_in_place(out: &mut [&'static str]) -> usize {
    let before = capture();
    // SAFETY: host mode with every other CPU stopped (this function's contract); `before` was
    // captured just now on this machine.
    unsafe { restore(&before) };
    let after = capture();
    let n = differences(&before, &after, out);
    let mut last = LAST.lock();
    last.state = after;
    last.checks += 1;
    if n > 0 {
        last.differing += 1;
        last.what = [0; 32];
        let mut at = 0;
        for name in out.iter().take(n.min(out.len())) {
            for &b in name.as_bytes().iter().chain(b",") {
                if at < last.what.len() - 1 {
                    last.what[at] = b;
                    at += 1;
                }
            }
        }
    }
    n
}

/// The devices' part of the statistics block.
pub fn stats_record() -> DevicesRecord {
    let last = LAST.lock();
    let s = &last.state;
    let shadow = |v: Option<u8>| v.map_or(0, |b| SHADOW_KNOWN | b as u32);
    let known = |known: u8, v: u8| {
        if known != 0 {
            SHADOW_KNOWN | v as u32
        } else {
            0
        }
    };
    let io = &s.ioapic;
    let n = (io.entries as usize).min(ioapic::MAX_ENTRIES);
    DevicesRecord {
        checks: last.checks,
        checks_differing: last.differing,
        present: s.present,
        com1_fcr: shadow(intercept::SHADOWS.com1_fcr()),
        rtc_index: shadow(intercept::SHADOWS.rtc_index()),
        captured_com1_fcr: known(s.com1.fcr_known, s.com1.fcr),
        pic_imr: s.pic.master.imr as u32 | (s.pic.slave.imr as u32) << 8,
        pit_status: s.pit.channels[0].status as u32 | (s.pit.channels[1].status as u32) << 8,
        rtc_ab: s.rtc.reg_a as u32 | (s.rtc.reg_b as u32) << 8,
        ioapic_pins: io.entries,
        hpet_config: s.hpet.config as u32,
        hpet_timers: s.hpet.timers,
        hpet_enabled_timers: s.hpet.enabled_timers(),
        reserved: 0,
        com1: s.com1.lcr as u64
            | (s.com1.ier as u64) << 8
            | (s.com1.mcr as u64) << 16
            | (s.com1.dll as u64) << 32
            | (s.com1.dlm as u64) << 40,
        ioapic_unmasked: (0..n.min(64))
            .filter(|&i| io.redirection[i] & ioapic::rte::MASK == 0)
            .fold(0, |m, i| m | 1 << i),
        shadowed_writes: intercept::SHADOWS.writes(),
        what: last.what,
    }
}
