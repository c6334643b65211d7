//! The hv image `cargo xtask build` made, as the agent will load it on a kernel with IBT and
//! W^X checks: every entry point the agent calls indirectly begins with ENDBR64, the code
//! occupies whole pages of its own (the agent maps them read-only and executable, the rest
//! NX), and no relocation writes into them.

use quicksilver_proto::image::{ImageHeader, HEADER_SIZE};
use xtask::image::ENDBR64;
use xtask::Artifacts;

const PAGE: u64 = 4096;

fn built_image() -> (Vec<u8>, ImageHeader) {
    let a = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let bytes = std::fs::read(&a.hv_image)
        .unwrap_or_else(|e| panic!("{}: {e}: run `cargo xtask build`", a.hv_image.display()));
    let header = ImageHeader::validate(&bytes).unwrap_or_else(|e| panic!("{e}"));
    (bytes, header)
}

#[test]
fn every_entry_point_of_the_built_image_begins_with_endbr64() {
    let (bytes, h) = built_image();
    for (name, at) in [
        ("init", h.entry_init),
        ("activate", h.entry_activate),
        ("control", h.entry_control),
    ] {
        let at = at as usize;
        assert_eq!(
            bytes[at..at + 4],
            ENDBR64,
            "entry {name} at {at:#x} begins with {:02x?}",
            &bytes[at..at + 4]
        );
    }
}

#[test]
fn the_built_image_keeps_its_code_on_pages_no_relocation_touches() {
    let (bytes, h) = built_image();
    assert!(HEADER_SIZE as u64 <= PAGE);
    assert_eq!(h.code_start % PAGE, 0, "code starts at {:#x}", h.code_start);
    let code_pages = h.code_start..h.code_end.next_multiple_of(PAGE);
    for i in 0..h.reloc_count as usize {
        let at = h.reloc_offset as usize + i * 8;
        let site = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        assert!(
            site + 8 <= code_pages.start || site >= code_pages.end,
            "relocation {i} patches {site:#x}, inside the code pages {code_pages:#x?}"
        );
    }
}
