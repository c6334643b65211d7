//! PCI configuration mechanism #1 (CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at 0xCFC-0xCFF; PCI
//! Local Bus 3.0, 3.2.2.3.2) while the hv drives the fast link's NIC: the guest must not move
//! its BARs out from under the nested tables' hole, nor turn its bus mastering or memory
//! decoding off or on. So while the hv is active every guest access to those eight ports exits
//! (`crate::devices::intercept`), and the hv performs it, with one difference: a data access
//! whose address names the NIC's function reads all ones (as a function that is not there)
//! and writes nothing, and is counted.
//!
//! Each CPU's CONFIG_ADDRESS is kept by the hv (as Jailhouse does), and a data access writes it
//! to the device and performs the access under one lock: another CPU's address write cannot
//! slip between the check and the access. (Linux takes its own lock around the pair; a guest
//! that did not would only confuse itself, never reach the NIC.) Accesses that are not
//! doublewords at 0xCF8 are not CONFIG_ADDRESS (0xCF9 is the chipset's reset control, for
//! one) and are passed through.
//!
//! Not covered: the memory-mapped configuration space (ECAM, MMCONFIG), which Linux uses
//! where the firmware describes one (q35, real servers); the project's machine (`-M pc`) has
//! none. Hiding the NIC's 4 KiB ECAM page in the nested tables would do there.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

/// CONFIG_ADDRESS and the first CONFIG_DATA port.
pub const CONFIG_ADDRESS: u16 = 0xCF8;
pub const CONFIG_DATA: u16 = 0xCFC;
/// CONFIG_ADDRESS's enable bit, and the bits that name a function (bus, device, function).
const ENABLE: u32 = 1 << 31;
const FUNCTION: u32 = 0x00FF_FF00;

/// The ports whose accesses exit (with the hv's other intercepts).
pub const PORTS: [u16; 8] = [0xCF8, 0xCF9, 0xCFA, 0xCFB, 0xCFC, 0xCFD, 0xCFE, 0xCFF];

/// The port accesses the guard makes on the guest's behalf.
pub trait Ports {
    fn read(&mut self, port: u16, size: u8) -> u32;
    fn write(&mut self, port: u16, size: u8, value: u32);
}

/// The guard: the NIC's function, each CPU's CONFIG_ADDRESS, what was refused.
pub struct Guard<const CPUS: usize> {
    /// CONFIG_ADDRESS's function bits of the NIC, with [`ENABLE`] while the hv drives it
    /// (0: no NIC to guard, every access passes).
    nic: AtomicU32,
    address: [AtomicU32; CPUS],
    /// Guest accesses to the NIC's configuration space refused, since load.
    pub refused: AtomicU64,
    lock: spin::Mutex<()>,
}

impl<const CPUS: usize> Guard<CPUS> {
    pub const fn new() -> Self {
        Guard {
            nic: AtomicU32::new(0),
            address: [const { AtomicU32::new(0) }; CPUS],
            refused: AtomicU64::new(0),
            lock: spin::Mutex::new(()),
        }
    }

    /// Guards the function `bdf` (bus << 8 | device << 3 | function), or nothing (`None`).
    pub fn guard(&self, bdf: Option<u32>) {
        self.nic
            .store(bdf.map_or(0, |b| ENABLE | ((b & 0xFFFF) << 8)), Release);
    }

    /// The guest's IN of `size` bytes at `port` (one of [`PORTS`]) on CPU `cpu`.
    pub fn guest_in(&self, cpu: usize, port: u16, size: u8, dev: &mut impl Ports) -> u32 {
        let Some(address) = self.address.get(cpu) else {
            return self.unknown_cpu_in(port, size, dev);
        };
        if port == CONFIG_ADDRESS && size == 4 {
            return address.load(Relaxed);
        }
        if port < CONFIG_DATA {
            return dev.read(port, size);
        }
        let a = address.load(Relaxed);
        if self.names_nic(a) {
            self.refused.fetch_add(1, Relaxed);
            return u32::MAX >> (32 - 8 * u32::from(size.clamp(1, 4)));
        }
        let _one = self.lock.lock();
        dev.write(CONFIG_ADDRESS, 4, a);
        dev.read(port, size)
    }

    /// The guest's OUT of `size` bytes of `value` at `port` (one of [`PORTS`]) on CPU `cpu`.
    pub fn guest_out(&self, cpu: usize, port: u16, size: u8, value: u32, dev: &mut impl Ports) {
        let Some(address) = self.address.get(cpu) else {
            if self.nic.load(Acquire) == 0 {
                dev.write(port, size, value);
            } else {
                self.refused.fetch_add(1, Relaxed);
            }
            return;
        };
        if port == CONFIG_ADDRESS && size == 4 {
            return address.store(value, Relaxed);
        }
        if port < CONFIG_DATA {
            return dev.write(port, size, value);
        }
        let a = address.load(Relaxed);
        if self.names_nic(a) {
            self.refused.fetch_add(1, Relaxed);
            return;
        }
        let _one = self.lock.lock();
        dev.write(CONFIG_ADDRESS, 4, a);
        dev.write(port, size, value);
    }

    /// A CPU the guard keeps no address for (never: it is sized for every CPU the hv
    /// supports) is served only while no NIC is guarded.
    fn unknown_cpu_in(&self, port: u16, size: u8, dev: &mut impl Ports) -> u32 {
        if self.nic.load(Acquire) == 0 {
            return dev.read(port, size);
        }
        self.refused.fetch_add(1, Relaxed);
        u32::MAX >> (32 - 8 * u32::from(size.clamp(1, 4)))
    }

    /// Does CONFIG_ADDRESS value `a` name the guarded NIC?
    fn names_nic(&self, a: u32) -> bool {
        let nic = self.nic.load(Acquire);
        nic != 0 && a & ENABLE != 0 && a & FUNCTION == nic & FUNCTION
    }

    /// Forgets every CPU's CONFIG_ADDRESS: the guest wrote it natively while the hv was
    /// dormant, so the device's own register holds it; each CPU's next data access after
    /// activation is preceded by its own address write (Linux writes both every time).
    pub fn forget(&self) {
        for a in &self.address {
            a.store(0, Relaxed);
        }
    }
}

impl<const CPUS: usize> Default for Guard<CPUS> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chipset: CONFIG_ADDRESS, and configuration space of two functions (each a
    /// doubleword per register), and a log of every access.
    #[derive(Default)]
    struct Chipset {
        address: u32,
        regs: std::collections::HashMap<(u32, u32), u32>,
        log: Vec<(bool, u16, u8, u32)>,
    }

    impl Ports for Chipset {
        fn read(&mut self, port: u16, size: u8) -> u32 {
            let v = match port {
                0xCF8 => self.address,
                0xCFC..=0xCFF => {
                    let r = self
                        .regs
                        .get(&(self.address & FUNCTION, self.address & 0xFC));
                    r.copied().unwrap_or(u32::MAX) >> (8 * (port - 0xCFC))
                }
                _ => 0x5A,
            };
            self.log.push((false, port, size, v));
            v
        }
        fn write(&mut self, port: u16, size: u8, value: u32) {
            self.log.push((true, port, size, value));
            match port {
                0xCF8 if size == 4 => self.address = value,
                0xCFC => {
                    self.regs
                        .insert((self.address & FUNCTION, self.address & 0xFC), value);
                }
                _ => {}
            }
        }
    }

    const NIC: u32 = 4 << 3; // 00:04.0
    const OTHER: u32 = 1 << 3; // 00:01.0

    fn address(bdf: u32, reg: u32) -> u32 {
        ENABLE | (bdf << 8) | reg
    }

    #[test]
    fn the_nics_configuration_space_reads_as_absent_and_takes_no_write() {
        let g = Guard::<2>::new();
        let mut c = Chipset::default();
        c.regs.insert((NIC << 8, 0), 0x1000_1AF4);
        c.regs.insert((OTHER << 8, 0), 0x7000_8086);
        // Unguarded, the NIC's ID reads through.
        g.guest_out(0, 0xCF8, 4, address(NIC, 0), &mut c);
        assert_eq!(g.guest_in(0, 0xCFC, 4, &mut c), 0x1000_1AF4);
        g.guard(Some(NIC));
        assert_eq!(g.guest_in(0, 0xCFC, 4, &mut c), u32::MAX);
        assert_eq!(g.guest_in(0, 0xCFE, 2, &mut c), 0xFFFF);
        assert_eq!(g.guest_in(0, 0xCFD, 1, &mut c), 0xFF);
        // The command register, cleared: bus mastering and memory decoding off.
        g.guest_out(0, 0xCF8, 4, address(NIC, 4), &mut c);
        g.guest_out(0, 0xCFC, 4, 0, &mut c);
        assert_eq!(c.regs.get(&(NIC << 8, 4)), None, "the write did not land");
        assert_eq!(g.refused.load(Relaxed), 4);
        // Another function is served, with the CPU's own address written first.
        g.guest_out(0, 0xCF8, 4, address(OTHER, 0), &mut c);
        assert_eq!(g.guest_in(0, 0xCFC, 4, &mut c), 0x7000_8086);
        assert_eq!(g.refused.load(Relaxed), 4);
        g.guard(None);
        g.guest_out(0, 0xCF8, 4, address(NIC, 0), &mut c);
        assert_eq!(g.guest_in(0, 0xCFC, 4, &mut c), 0x1000_1AF4);
    }

    #[test]
    fn each_cpu_keeps_its_own_address_so_another_cannot_redirect_its_access() {
        let g = Guard::<2>::new();
        g.guard(Some(NIC));
        let mut c = Chipset::default();
        c.regs.insert((OTHER << 8, 0), 0x7000_8086);
        // CPU 0 names the other function; CPU 1 then names the NIC before CPU 0's read.
        g.guest_out(0, 0xCF8, 4, address(OTHER, 0), &mut c);
        g.guest_out(1, 0xCF8, 4, address(NIC, 0), &mut c);
        assert_eq!(g.guest_in(0, 0xCF8, 4, &mut c), address(OTHER, 0));
        assert_eq!(g.guest_in(0, 0xCFC, 4, &mut c), 0x7000_8086);
        assert_eq!(g.guest_in(1, 0xCFC, 4, &mut c), u32::MAX);
        // Only data accesses reached the chipset's address register, each preceded by the
        // address of the CPU making it.
        let addresses: Vec<u32> = c
            .log
            .iter()
            .filter(|(w, p, ..)| *w && *p == 0xCF8)
            .map(|e| e.3)
            .collect();
        assert_eq!(addresses, vec![address(OTHER, 0)]);
    }

    #[test]
    fn what_is_not_config_address_passes_through() {
        let g = Guard::<1>::new();
        g.guard(Some(NIC));
        let mut c = Chipset::default();
        // The reset control register is a byte at 0xCF9.
        g.guest_out(0, 0xCF9, 1, 0x06, &mut c);
        assert_eq!(c.log, vec![(true, 0xCF9, 1, 0x06)]);
        assert_eq!(g.guest_in(0, 0xCF9, 1, &mut c), 0x5A);
        // A CPU the guard has no room for (never so: it is sized for MAX_CPUS) is refused
        // while a NIC is guarded, served when none is.
        assert_eq!(g.guest_in(7, 0xCFC, 4, &mut c), u32::MAX);
        g.guard(None);
        assert_eq!(g.guest_in(7, 0xCF9, 1, &mut c), 0x5A);
    }
}
