//! What the machine tells about itself for an export, `cpus` and `compare`: its facts (the
//! `abi::ExportMeta` answer of a `ReadMeta`), and a page as it crosses the link.

use quicksilver_checkpoint::model::{RamRange, PAGE};
use quicksilver_proto::abi::ExportMeta;

/// The kernel's facts from the meta read.
pub struct Facts {
    pub page_offset: u64,
    pub vmcoreinfo: (u64, u64),
    pub cpus: u32,
    pub ram: Vec<RamRange>,
    pub hostname: String,
    pub release: String,
    pub boot_id: String,
}

/// `abi::ExportMeta`, its RAM ranges, then three NUL-terminated strings.
pub fn parse_facts(bytes: &[u8]) -> Option<Facts> {
    let m = ExportMeta::from_bytes(bytes)?;
    let mut at = std::mem::size_of::<ExportMeta>();
    let mut ram = Vec::new();
    for _ in 0..m.ram_ranges {
        let word = |i: usize| Some(u64::from_le_bytes(bytes.get(i..i + 8)?.try_into().ok()?));
        ram.push(RamRange {
            start: word(at)?,
            end: word(at + 8)?,
        });
        at += 16;
    }
    let mut strings = bytes
        .get(at..)?
        .split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned());
    let ascending = ram.windows(2).all(|w| w[0].end <= w[1].start)
        && ram
            .iter()
            .all(|r| r.start < r.end && r.start % PAGE as u64 == 0 && r.end % PAGE as u64 == 0);
    ascending.then_some(())?;
    Some(Facts {
        page_offset: m.page_offset,
        vmcoreinfo: (m.vmcoreinfo_pa, m.vmcoreinfo_size.into()),
        cpus: m.cpus,
        ram,
        hostname: strings.next()?,
        release: strings.next()?,
        boot_id: strings.next()?,
    })
}

/// A page as it crossed the link: whole, or deflated (raw DEFLATE, RFC 1951) when that made
/// it shorter (the agent's choice, told by the length).
pub fn page(bytes: &[u8]) -> Option<Vec<u8>> {
    if bytes.len() == PAGE {
        return Some(bytes.to_vec());
    }
    let mut out = Vec::with_capacity(PAGE);
    let mut z = flate2::read::DeflateDecoder::new(bytes);
    // One byte more than a page, to tell a page from something longer.
    std::io::Read::read_to_end(&mut std::io::Read::take(&mut z, PAGE as u64 + 1), &mut out).ok()?;
    (out.len() == PAGE).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_come_whole_or_deflated_and_nothing_else_passes() {
        use std::io::Write;
        let mut original = vec![0u8; PAGE];
        for (i, b) in original.iter_mut().enumerate() {
            *b = (i % 7) as u8;
        }
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&original).unwrap();
        let deflated = z.finish().unwrap();
        assert!(deflated.len() < PAGE);
        assert_eq!(page(&deflated), Some(original.clone()));
        assert_eq!(page(&original), Some(original.clone()));
        // Half a page deflated, a page and a byte, garbage.
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&original[..PAGE / 2]).unwrap();
        assert_eq!(page(&z.finish().unwrap()), None);
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&[original.clone(), vec![1]].concat()).unwrap();
        assert_eq!(page(&z.finish().unwrap()), None);
        assert_eq!(page(&[0xFF; 100]), None);
    }

    #[test]
    fn facts_parse_and_bad_ones_do_not() {
        let mut b = vec![0u8; std::mem::size_of::<ExportMeta>()];
        b[0..8].copy_from_slice(&0xffff_8880_0000_0000u64.to_le_bytes());
        b[20..24].copy_from_slice(&2u32.to_le_bytes()); // cpus
        b[24..28].copy_from_slice(&1u32.to_le_bytes()); // ram_ranges
        b.extend_from_slice(&0x1000u64.to_le_bytes());
        b.extend_from_slice(&0x9f000u64.to_le_bytes());
        b.extend_from_slice(b"qs-guest\x006.1.0-41-amd64\x00abcd-ef\x00");
        let f = parse_facts(&b).unwrap();
        assert_eq!(f.cpus, 2);
        assert_eq!(
            f.ram,
            vec![RamRange {
                start: 0x1000,
                end: 0x9f000
            }]
        );
        assert_eq!(
            (f.hostname.as_str(), f.release.as_str(), f.boot_id.as_str()),
            ("qs-guest", "6.1.0-41-amd64", "abcd-ef")
        );
        // A range that ends before it starts; strings missing.
        let mut bad = b.clone();
        bad[std::mem::size_of::<ExportMeta>() + 8..][..8].copy_from_slice(&0u64.to_le_bytes());
        assert!(parse_facts(&bad).is_none());
        assert!(parse_facts(&b[..std::mem::size_of::<ExportMeta>() + 16]).is_none());
    }
}
