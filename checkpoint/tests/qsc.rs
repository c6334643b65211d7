//! The `.qsc` format's promises, as properties: any checkpoint series round-trips exactly
//! (state, devices, every page of RAM), and any single flipped bit or any truncation of a
//! file is refused.

use proptest::prelude::*;
use quicksilver_checkpoint::model::*;
use quicksilver_checkpoint::qsc::format::CheckpointSection;
use quicksilver_checkpoint::qsc::read::Archive;
use quicksilver_checkpoint::qsc::write::Writer;
use quicksilver_checkpoint::qsc::FormatError;
use std::collections::BTreeMap;

const RAM: [RamRange; 2] = [
    RamRange {
        start: 0,
        end: 0x8000,
    },
    RamRange {
        start: 0x10_0000,
        end: 0x10_6000,
    },
];

/// One checkpoint as a test builds it: its section, CPUs, devices and the pages it lists.
#[derive(Clone, Debug)]
struct Ckpt {
    section: CheckpointSection,
    cpus: Vec<CpuRecord>,
    devices: Vec<DeviceRecord>,
    pages: BTreeMap<u64, u8>,
}

fn page_of(fill: u8, gpa: u64) -> [u8; PAGE] {
    let mut p = [fill; PAGE];
    p[..8].copy_from_slice(&gpa.to_le_bytes());
    p
}

fn all_pages() -> Vec<u64> {
    RAM.iter()
        .flat_map(|r| (r.start..r.end).step_by(PAGE))
        .collect()
}

fn cpu() -> impl Strategy<Value = CpuRecord> {
    (
        any::<[u64; 16]>(),
        any::<u64>(),
        any::<u64>(),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(gprs, rip, cr3, xsave)| CpuRecord {
            gprs,
            rip,
            cr3,
            xsave: Blob {
                version: 1,
                bytes: xsave,
            },
            ..Default::default()
        })
}

fn series() -> impl Strategy<Value = Vec<Ckpt>> {
    let n = all_pages().len();
    prop::collection::vec(
        (
            prop::collection::vec(cpu(), 1..3),
            prop::collection::vec("[a-z]{1,8}", 0..3),
            prop::collection::btree_map(0..n, any::<u8>(), 0..n),
            any::<u64>(),
        ),
        1..4,
    )
    .prop_map(|raw| {
        let pages = all_pages();
        raw.into_iter()
            .enumerate()
            .map(|(i, (cpus, devs, listed, t))| Ckpt {
                section: CheckpointSection {
                    meta: Meta {
                        id: i as u32 + 1,
                        parent: i as u32,
                        taken_unix_ns: t,
                        kernel_release: "6.12.117+deb13-amd64".into(),
                        ram: RAM.to_vec(),
                        vmcoreinfo: b"OSRELEASE=6.12.117+deb13-amd64\n".to_vec(),
                        ..Default::default()
                    },
                    cpus: cpus.len() as u32,
                    devices: devs.len() as u32,
                    delta_of: (i > 0).then_some(i as u32),
                },
                cpus,
                devices: devs
                    .into_iter()
                    .map(|name| DeviceRecord {
                        name,
                        state: Blob {
                            version: 1,
                            bytes: vec![7; 16],
                        },
                    })
                    .collect(),
                pages: listed.into_iter().map(|(k, v)| (pages[k], v)).collect(),
            })
            .collect()
    })
}

fn write(series: &[Ckpt]) -> Vec<u8> {
    let mut w = Writer::new(Vec::new()).unwrap();
    for c in series {
        w.checkpoint(&c.section).unwrap();
        for cpu in &c.cpus {
            w.cpu(cpu).unwrap();
        }
        for d in &c.devices {
            w.device(d).unwrap();
        }
        let data: Vec<(u64, [u8; PAGE])> =
            c.pages.iter().map(|(&g, &f)| (g, page_of(f, g))).collect();
        let refs: Vec<(u64, &[u8; PAGE])> = data.iter().map(|(g, p)| (*g, p)).collect();
        w.pages(&refs).unwrap();
    }
    w.finish().unwrap()
}

fn open(bytes: Vec<u8>) -> Result<Archive<[u8]>, String> {
    Archive::open(bytes.into_boxed_slice()).map_err(|e| e.to_string())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_checkpoint_series_round_trips(series in series()) {
        let a = open(write(&series)).unwrap();
        prop_assert_eq!(a.checkpoints().len(), series.len());
        // What each page holds at each checkpoint: listed, else the one before's (a delta),
        // else zero (the first, full one).
        let mut expect: BTreeMap<u64, Option<u8>> = all_pages().into_iter().map(|g| (g, None)).collect();
        let mut buf = [0u8; PAGE];
        for (i, c) in series.iter().enumerate() {
            let e = &a.checkpoints()[i];
            prop_assert_eq!(&e.section, &c.section);
            prop_assert_eq!(&e.cpus, &c.cpus);
            prop_assert_eq!(&e.devices, &c.devices);
            for (&g, &f) in &c.pages {
                expect.insert(g, Some(f));
            }
            for (&g, f) in &expect {
                a.read_page(i, g, &mut buf).unwrap();
                let want = f.map_or([0u8; PAGE], |f| page_of(f, g));
                prop_assert!(buf == want, "checkpoint {} page {:#x}", i, g);
            }
        }
    }

    #[test]
    fn any_single_flipped_bit_is_refused(series in series(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut bytes = write(&series);
        let i = at.index(bytes.len());
        bytes[i] ^= 1 << bit;
        prop_assert!(open(bytes).is_err(), "bit {} of byte {} flipped, and the file opened", bit, i);
    }

    #[test]
    fn any_truncation_is_refused(series in series(), at in any::<prop::sample::Index>()) {
        let mut bytes = write(&series);
        let keep = at.index(bytes.len());
        bytes.truncate(keep);
        let err = open(bytes).err().unwrap_or_default();
        prop_assert!(err.contains("truncated") || err.contains("not a Quicksilver"), "{}", err);
    }
}

#[test]
fn a_foreign_file_a_newer_version_and_a_damaged_section_are_refused_by_name() {
    let series = vec![Ckpt {
        section: CheckpointSection {
            meta: Meta {
                id: 1,
                ram: RAM.to_vec(),
                ..Default::default()
            },
            cpus: 1,
            devices: 0,
            delta_of: None,
        },
        cpus: vec![CpuRecord::default()],
        devices: vec![],
        pages: [(0x1000, 3)].into_iter().collect(),
    }];
    let good = write(&series);
    let err = open(b"\x7fELF\x02\x01\x01\0 and then some more bytes of a core".to_vec())
        .err()
        .unwrap_or_default();
    assert!(
        err.contains("not a Quicksilver checkpoint file (.qsc)"),
        "{err}"
    );

    // A newer version, with its header checksum right: refused as newer, not as corrupt.
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&2u32.to_le_bytes());
    let crc = quicksilver_checkpoint::qsc::format::CRC.checksum(&newer[..28]);
    newer[28..32].copy_from_slice(&crc.to_le_bytes());
    let err = open(newer).err().unwrap_or_default();
    assert!(
        err.contains("format version 2, newer than this reader's (1)"),
        "{err}"
    );

    // A byte of the page's contents: its memory section's checksum names it.
    let mut damaged = good.clone();
    let at = damaged.len() - 24 - 12 - 100;
    damaged[at] ^= 0x40;
    let err = open(damaged).err().unwrap_or_default();
    assert!(
        err.contains("corrupt: section 2 (memory)") && err.contains("checksum"),
        "{err}"
    );
    assert!(matches!(
        Archive::open(good[..40].to_vec().into_boxed_slice()).err(),
        Some(quicksilver_checkpoint::qsc::read::OpenError::Format(
            FormatError::Truncated { .. }
        ))
    ));
}
