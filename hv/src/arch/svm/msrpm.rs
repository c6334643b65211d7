//! The MSR permission map (AMD APM vol. 2, 15.11): 8 KiB, two bits per MSR (read, write) for
//! three ranges of 8K MSRs each. A set bit intercepts the access.

/// Bytes in the map.
pub const MSRPM_SIZE: usize = 8192;

/// Byte offset and bit of the *read* bit of `msr`, or `None` if the map does not cover it
/// (such MSRs are always intercepted).
pub fn position(msr: u32) -> Option<(usize, u32)> {
    let (base, offset) = match msr {
        0x0000_0000..=0x0000_1FFF => (0x0000_0000, 0x000),
        0xC000_0000..=0xC000_1FFF => (0xC000_0000, 0x800),
        0xC001_0000..=0xC001_1FFF => (0xC001_0000, 0x1000),
        _ => return None,
    };
    let bit = (msr - base) as usize * 2;
    Some((offset + bit / 8, (bit % 8) as u32))
}

/// Intercepts writes to `msr`. Returns false if the map cannot express it.
pub fn intercept_write(map: &mut [u8; MSRPM_SIZE], msr: u32) -> bool {
    match position(msr) {
        Some((byte, bit)) => {
            map[byte] |= 1 << (bit + 1);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_follow_the_manual() {
        // EFER (C000_0080): second range, MSR 0x80 -> bit 0x100 -> byte 0x800 + 0x20.
        assert_eq!(position(0xC000_0080), Some((0x820, 0)));
        // VM_CR (C001_0114): third range, 0x114 * 2 = 0x228 bits -> byte 0x1045, bit 0.
        assert_eq!(position(0xC001_0114), Some((0x1045, 0)));
        // VM_HSAVE_PA (C001_0117): 0x22E bits -> byte 0x1045, bit 6.
        assert_eq!(position(0xC001_0117), Some((0x1045, 6)));
        assert_eq!(position(0x1FFF), Some((0x7FF, 6)));
        assert_eq!(position(0x4000_0000), None);
    }

    #[test]
    fn write_intercepts_set_only_the_write_bit() {
        let mut map = [0u8; MSRPM_SIZE];
        assert!(intercept_write(&mut map, 0xC000_0080));
        assert_eq!(map[0x820], 0b10);
        assert!(intercept_write(&mut map, 0xC001_0117));
        assert_eq!(map[0x1045], 0b1000_0000);
        assert_eq!(map.iter().filter(|&&b| b != 0).count(), 2);
    }
}
