//! The write-only registers the hv shadows, and the port intercepts that feed the shadows.
//!
//! Two registers a rollback needs cannot be read back: the console UART's FIFO control
//! register (0x3FA) and the CMOS index (0x70). While the hv is active, every guest access to
//! those two ports exits (SVM's I/O permission map, AMD APM vol. 2, 15.10.1); the hv performs
//! the access itself, on the exiting CPU and while the guest's own lock for that device is
//! still held, records what a write left in the register, and steps over the instruction
//! (`crate::exit::io`). The map has no direction bit, so the guest's reads of those ports exit
//! too and are performed the same way: IIR reads (0x3FA on a read), one per UART interrupt,
//! and nothing else Linux does at run time. Besides those, only PCI configuration mechanism
//! #1 exits (0xCF8-0xCFF, `crate::net::config_space`: rare at run time): each exit costs about
//! 17 us under TCG.
//!
//! A shadow is forgotten when the hv becomes active: while it was dormant the guest wrote
//! natively. (A write made natively by a CPU that is still taking its activation IPI while
//! another already runs as a guest is missed; the window is one activation round, and such a
//! write happens under the same lock as the guest-mode writes around it.)

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

/// COM1's FIFO control register (write) / interrupt identification register (read).
pub const COM1_FCR: u16 = super::uart::COM1 + super::uart::IIR_FCR;
/// The CMOS index.
pub const RTC_INDEX: u16 = super::rtc::INDEX;
/// The ports whose accesses exit for the shadows.
pub const INTERCEPTED_PORTS: [u16; 2] = [COM1_FCR, RTC_INDEX];

/// Every port whose accesses exit: the shadows', and PCI configuration mechanism #1's, which
/// the hv performs for the guest so that it cannot reach the fast link's NIC
/// (`crate::net::config_space`).
const ALL_PORTS: [u16; 10] = {
    let cfg = crate::net::config_space::PORTS;
    let mut all = [0u16; 10];
    all[0] = COM1_FCR;
    all[1] = RTC_INDEX;
    let mut i = 0;
    while i < cfg.len() {
        all[2 + i] = cfg[i];
        i += 1;
    }
    all
};

/// The I/O intercept map every vCPU uses (built at compile time; the CPU reads it by
/// physical address, `crate::vcpu::activate` hands it over).
pub static IO_INTERCEPTS: crate::arch::IoIntercepts = crate::arch::IoIntercepts::new(&ALL_PORTS);

/// A shadow's encoding: bit 8 set when known, the value in bits 7:0.
const KNOWN: u32 = 1 << 8;

/// The shadows of the write-only registers.
pub struct WriteShadows {
    com1_fcr: AtomicU32,
    rtc_index: AtomicU32,
    /// Guest writes performed and recorded, since load.
    writes: AtomicU64,
    /// Orders a write's effect on the device with its record (two CPUs writing at once, which
    /// Linux's locks already rule out, would otherwise record in the other order).
    lock: spin::Mutex<()>,
}

impl Default for WriteShadows {
    fn default() -> Self {
        Self::new()
    }
}

fn decode(v: u32) -> Option<u8> {
    (v & KNOWN != 0).then_some(v as u8)
}

fn encode(v: Option<u8>) -> u32 {
    v.map_or(0, |b| KNOWN | b as u32)
}

impl WriteShadows {
    pub const fn new() -> Self {
        WriteShadows {
            com1_fcr: AtomicU32::new(0),
            rtc_index: AtomicU32::new(0),
            writes: AtomicU64::new(0),
            lock: spin::Mutex::new(()),
        }
    }

    /// Performs the guest's write of `size` bytes of `value` at `port` (through `out`, which
    /// does the OUT) and records what landed on a shadowed port.
    pub fn guest_write(&self, port: u16, size: u8, value: u32, out: impl FnOnce()) {
        let _order = self.lock.lock();
        out();
        for k in 0..size.min(4) {
            let p = port.wrapping_add(k as u16);
            let byte = (value >> (8 * k)) as u8;
            match p {
                COM1_FCR => {
                    // Clearing the FIFOs is an action, not a setting.
                    let state = byte & !super::uart::FCR_CLEAR_FIFOS;
                    self.com1_fcr.store(KNOWN | state as u32, Relaxed);
                }
                RTC_INDEX => self.rtc_index.store(KNOWN | byte as u32, Relaxed),
                _ => continue,
            }
            self.writes.fetch_add(1, Relaxed);
        }
    }

    /// Everything unknown again (the hv becomes active: the guest wrote natively meanwhile).
    pub fn forget(&self) {
        let _order = self.lock.lock();
        self.com1_fcr.store(0, Relaxed);
        self.rtc_index.store(0, Relaxed);
    }

    pub fn com1_fcr(&self) -> Option<u8> {
        decode(self.com1_fcr.load(Relaxed))
    }

    /// What a restore wrote (the hv's own writes in host mode are not intercepted).
    pub fn set_com1_fcr(&self, v: Option<u8>) {
        self.com1_fcr.store(encode(v), Relaxed);
    }

    pub fn rtc_index(&self) -> Option<u8> {
        decode(self.rtc_index.load(Relaxed))
    }

    pub fn set_rtc_index(&self, v: Option<u8>) {
        self.rtc_index.store(encode(v), Relaxed);
    }

    pub fn writes(&self) -> u64 {
        self.writes.load(Relaxed)
    }
}

/// The hv's shadows.
pub static SHADOWS: WriteShadows = WriteShadows::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_intercepted_ports_exit() {
        for p in INTERCEPTED_PORTS {
            assert!(IO_INTERCEPTS.intercepts(p, 1));
        }
        // The UART's data, IER, LCR, LSR and the CMOS data port run without an exit.
        for p in [0x3F8, 0x3F9, 0x3FB, 0x3FD, 0x71, 0x2FA, 0x20, 0x40] {
            assert!(!IO_INTERCEPTS.intercepts(p, 1), "port {p:#x}");
        }
        // And PCI configuration mechanism #1's eight ports, 0xCF8-0xCFF.
        for p in crate::net::config_space::PORTS {
            assert!(IO_INTERCEPTS.intercepts(p, 1));
        }
        assert_eq!(
            IO_INTERCEPTS.0.iter().map(|b| b.count_ones()).sum::<u32>(),
            10
        );
    }

    #[test]
    fn a_guest_write_is_performed_then_recorded_without_its_action_bits() {
        let s = WriteShadows::new();
        assert_eq!(s.com1_fcr(), None);
        let mut done = false;
        s.guest_write(COM1_FCR, 1, 0xC7, || done = true);
        assert!(done);
        assert_eq!(s.com1_fcr(), Some(0xC1), "clear-FIFO bits are not state");
        // A word write at 0x3F9 puts its high byte on 0x3FA.
        s.guest_write(0x3F9, 2, 0x4105, || ());
        assert_eq!(s.com1_fcr(), Some(0x41));
        s.guest_write(RTC_INDEX, 1, 0x8A, || ());
        assert_eq!(
            s.rtc_index(),
            Some(0x8A),
            "the NMI mask bit is part of the index byte"
        );
        assert_eq!(s.writes(), 3);
        s.forget();
        assert_eq!((s.com1_fcr(), s.rtc_index()), (None, None));
    }
}
