//! The bulk channel: what the machine sends for a bridge's read request (`checkpoint::Op::
//! ReadMeta`, `ReadCpu`, `ReadPages`). One type byte, then fixed little-endian fields:
//!
//! ```text
//! Data: 1 | tag u32 | item u32 | offset u32 | bytes (up to MAX_DATA)
//! End:  2 | tag u32 | status i32 | zero_mask u64 | crc u32 | total u64
//! ```
//!
//! A request's data are its items (a page each for a read of pages, one for a CPU or the
//! meta), each sent in order in pieces of at most [`MAX_DATA`] bytes. The end says how it
//! went, which pages were all zero (and not sent), and the CRC-32 and count of every data byte
//! in the order sent: the link's frames each have their own CRC and sequence number, so a
//! frame lost to noise shows as a gap; the end's checksum covers what the frames cannot, a
//! piece that went to the wrong place. A bridge that finds either asks again.

use super::MAX_PAYLOAD;

const DATA: u8 = 1;
const END: u8 = 2;

/// Bytes before a [`Data`]'s bytes.
pub const DATA_HEADER: usize = 13;
/// Most data bytes one frame carries.
pub const MAX_DATA: usize = MAX_PAYLOAD - DATA_HEADER;
/// An [`End`]'s length.
pub const END_LEN: usize = 29;

/// Machine to bridge: bytes of an item of the request `tag`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Data<'a> {
    pub tag: u32,
    pub item: u32,
    /// Where in the item these bytes start.
    pub offset: u32,
    pub bytes: &'a [u8],
}

/// Machine to bridge: the request `tag` is over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct End {
    pub tag: u32,
    /// The request's outcome (an `abi::Status`).
    pub status: i32,
    /// Bit `i`: page `i` of a read of pages is all zero and was not sent.
    pub zero_mask: u64,
    /// CRC-32 of every data byte, in the order sent.
    pub crc: u32,
    /// Data bytes sent in all.
    pub total: u64,
}

/// A bulk message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Data(Data<'a>),
    End(End),
}

/// A payload that is not a bulk message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadMessage;

impl Data<'_> {
    /// Encodes into `out` (at least `DATA_HEADER + bytes.len()`); returns the length.
    /// `bytes` is at most [`MAX_DATA`].
    pub fn encode(&self, out: &mut [u8; MAX_PAYLOAD]) -> usize {
        let n = self.bytes.len().min(MAX_DATA);
        out[0] = DATA;
        out[1..5].copy_from_slice(&self.tag.to_le_bytes());
        out[5..9].copy_from_slice(&self.item.to_le_bytes());
        out[9..13].copy_from_slice(&self.offset.to_le_bytes());
        out[DATA_HEADER..DATA_HEADER + n].copy_from_slice(&self.bytes[..n]);
        DATA_HEADER + n
    }
}

impl Data<'_> {
    /// Encodes into `out`, whatever its length (a fast link's datagram carries more than a
    /// serial frame); `None` if the header and bytes do not fit.
    pub fn encode_into(&self, out: &mut [u8]) -> Option<usize> {
        let n = DATA_HEADER + self.bytes.len();
        let out = out.get_mut(..n)?;
        out[0] = DATA;
        out[1..5].copy_from_slice(&self.tag.to_le_bytes());
        out[5..9].copy_from_slice(&self.item.to_le_bytes());
        out[9..13].copy_from_slice(&self.offset.to_le_bytes());
        out[DATA_HEADER..].copy_from_slice(self.bytes);
        Some(n)
    }
}

impl End {
    /// Encodes into `out`; returns the length ([`END_LEN`]).
    pub fn encode(&self, out: &mut [u8; END_LEN]) -> usize {
        out[0] = END;
        out[1..5].copy_from_slice(&self.tag.to_le_bytes());
        out[5..9].copy_from_slice(&self.status.to_le_bytes());
        out[9..17].copy_from_slice(&self.zero_mask.to_le_bytes());
        out[17..21].copy_from_slice(&self.crc.to_le_bytes());
        out[21..29].copy_from_slice(&self.total.to_le_bytes());
        END_LEN
    }
}

fn u32_at(p: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}

fn u64_at(p: &[u8], at: usize) -> u64 {
    u64::from(u32_at(p, at)) | u64::from(u32_at(p, at + 4)) << 32
}

impl Message<'_> {
    /// Decodes a payload; a wrong type or length is an error.
    pub fn decode(p: &[u8]) -> Result<Message<'_>, BadMessage> {
        match p.first() {
            Some(&DATA) if p.len() > DATA_HEADER => Ok(Message::Data(Data {
                tag: u32_at(p, 1),
                item: u32_at(p, 5),
                offset: u32_at(p, 9),
                bytes: &p[DATA_HEADER..],
            })),
            Some(&END) if p.len() == END_LEN => Ok(Message::End(End {
                tag: u32_at(p, 1),
                status: u32_at(p, 5) as i32,
                zero_mask: u64_at(p, 9),
                crc: u32_at(p, 17),
                total: u64_at(p, 21),
            })),
            _ => Err(BadMessage),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_longer_piece_encodes_into_a_longer_buffer_and_round_trips() {
        let bytes = [0x5Au8; 1419];
        let d = Data {
            tag: 1,
            item: 2,
            offset: 3,
            bytes: &bytes,
        };
        let mut out = [0u8; 1432];
        let n = d.encode_into(&mut out).unwrap();
        assert_eq!(n, 1432);
        assert_eq!(Message::decode(&out[..n]), Ok(Message::Data(d)));
        assert_eq!(d.encode_into(&mut [0u8; 1431]), None);
    }

    #[test]
    fn data_and_end_round_trip() {
        let bytes = [0xA5u8; MAX_DATA];
        let d = Data {
            tag: 9,
            item: 63,
            offset: 3 * MAX_DATA as u32,
            bytes: &bytes,
        };
        let mut buf = [0u8; MAX_PAYLOAD];
        let n = d.encode(&mut buf);
        assert_eq!(n, MAX_PAYLOAD);
        assert_eq!(Message::decode(&buf[..n]), Ok(Message::Data(d)));
        let e = End {
            tag: 9,
            status: -4,
            zero_mask: 1 << 63 | 5,
            crc: 0xDEAD_BEEF,
            total: 1 << 40,
        };
        let mut end = [0u8; END_LEN];
        assert_eq!(e.encode(&mut end), END_LEN);
        assert_eq!(Message::decode(&end), Ok(Message::End(e)));
        assert_eq!(Message::decode(&end[..END_LEN - 1]), Err(BadMessage));
        // Data with no bytes, an unknown type, nothing.
        assert_eq!(Message::decode(&buf[..DATA_HEADER]), Err(BadMessage));
        assert_eq!(Message::decode(&[3, 0, 0]), Err(BadMessage));
        assert_eq!(Message::decode(&[]), Err(BadMessage));
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
            let _ = Message::decode(&bytes);
        }
    }
}
