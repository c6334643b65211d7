//! What both sides of Quicksilver agree on, with no dependence on either side.
//!
//! - [`image`]: the hv image format (header, relocations, checksum) that the Linux agent
//!   loads and that `cargo xtask build` writes.
//! - [`abi`]: how the agent calls into the hv (entry points while dormant, `VMMCALL` while
//!   active), and the status codes that come back with their messages.
//! - [`ioctl`]: the agent's device, its requests and their structs (`qsctl` and the module).
//! - [`stats`]: the statistics block the hv fills for `qsctl status` / `qsctl stats`.
//! - [`link`]: frames on the serial link to `qs-bridge` (COBS, CRC-32, channels, replay guard,
//!   challenge/response authentication).
//!
//! The C side of the agent includes `guest-agent/linux/qs_abi.h`, which `cargo xtask
//! abi-header` generates from this crate ([`c_abi`] describes the types for it); a host test
//! fails while the committed header differs from what this crate generates, and the header
//! asserts every size, offset and request number, so the two sides cannot drift apart.
#![cfg_attr(not(any(test, feature = "std")), no_std)]

pub mod abi;
pub mod c_abi;
pub mod gdb;
pub mod image;
pub mod ioctl;
pub mod link;
pub mod stats;

/// CRC-32 (IEEE 802.3, as zlib and Linux's `crc32_le(~0, ..) ^ ~0` compute it).
pub const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// CRC-32 of `bytes`.
pub fn crc32(bytes: &[u8]) -> u32 {
    CRC32.checksum(bytes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc32_matches_the_standard_check_value() {
        // The catalogue's check value for CRC-32/ISO-HDLC.
        assert_eq!(super::crc32(b"123456789"), 0xCBF4_3926);
    }
}
