//! The I/O permission map (AMD APM vol. 2, 15.10.1): one bit per I/O port, 64K + 3 bits in
//! 12 KiB of contiguous, page-aligned physical memory. With the IOIO_PROT intercept set, an
//! IN, OUT, INS or OUTS whose access touches a port whose bit is set exits with EXITCODE 0x7B
//! (an access of N bytes checks the bits of all N ports it covers, which is why the map has
//! three bits past port 0xFFFF). There is no direction bit: a port in the map is intercepted
//! for reads and writes alike, so the hv performs both on the guest's behalf.
//!
//! The map is built at compile time from a list of ports and never changes: a `static` in the
//! image, which the CPU reads by physical address.

/// Bytes of the map (three pages; the manual's "12 Kbytes").
pub const IOPM_SIZE: usize = 3 * 4096;

/// An I/O permission map: page-aligned, as IOPM_BASE_PA requires.
#[repr(C, align(4096))]
pub struct Iopm(pub [u8; IOPM_SIZE]);

impl Iopm {
    /// A map that intercepts exactly the ports in `ports`.
    pub const fn new(ports: &[u16]) -> Iopm {
        let mut map = [0u8; IOPM_SIZE];
        let mut i = 0;
        while i < ports.len() {
            let p = ports[i] as usize;
            map[p / 8] |= 1 << (p % 8);
            i += 1;
        }
        Iopm(map)
    }

    /// Is an access of `size` bytes at `port` intercepted by this map?
    pub const fn intercepts(&self, port: u16, size: u8) -> bool {
        let mut k = 0;
        while k < size as usize {
            let p = port as usize + k;
            if self.0[p / 8] & (1 << (p % 8)) != 0 {
                return true;
            }
            k += 1;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_listed_ports_exit_and_a_wide_access_exits_if_it_covers_one() {
        let map = Iopm::new(&[0x3FA, 0x70]);
        assert_eq!(map.0.iter().filter(|&&b| b != 0).count(), 2);
        // 0x3FA: byte 0x7F, bit 2; 0x70: byte 0x0E, bit 0.
        assert_eq!(map.0[0x7F], 1 << 2);
        assert_eq!(map.0[0x0E], 1);
        assert!(map.intercepts(0x3FA, 1));
        assert!(!map.intercepts(0x3F8, 1) && !map.intercepts(0x3FD, 1));
        assert!(
            !map.intercepts(0x71, 1),
            "the CMOS data port runs without an exit"
        );
        // A word at 0x3F9 covers 0x3F9-0x3FA; a doubleword at 0x3F8 covers 0x3F8-0x3FB.
        assert!(map.intercepts(0x3F9, 2) && map.intercepts(0x3F8, 4));
        assert!(!map.intercepts(0x3F8, 2));
        // The last port's access may run past 0xFFFF: the map has room for it.
        assert!(!Iopm::new(&[]).intercepts(0xFFFF, 4));
    }
}
