//! Turns the hv's ELF (a static PIE linked at address 0) into the flat image format of
//! [`quicksilver_proto::image`].
//!
//! The loader in the Linux agent is deliberately dumb: it copies one file into memory, adds
//! its load address at every offset of a table, and calls an entry point. Everything an ELF
//! loader would do is therefore done here, once, at build time:
//!
//! 1. flatten the `PT_LOAD` segments into one buffer laid out by virtual address (file bytes
//!    copied, the rest of each segment zero, as `.bss` needs);
//! 2. check that every dynamic relocation is `R_X86_64_RELATIVE` (anything else would need a
//!    symbol lookup the loader cannot do), store its addend at its offset (so the buffer holds
//!    "the value if loaded at 0") and collect the offsets into a table;
//! 3. fill the header the hv placed at offset 0 (`.qs_header`): sizes, code range and its
//!    CRC, the relocation table, the entry points (from symbols), and the file checksum;
//! 4. run the loader's own validation ([`ImageHeader::validate`]) on the result.

use std::path::Path;

use anyhow::Context as _;
use object::elf;
use object::read::elf::{
    FileHeader as _, ProgramHeader as _, Rela as _, SectionHeader as _, Sym as _,
};
use object::LittleEndian as LE;
use quicksilver_proto::image::{
    self, ImageError, ImageHeader, HEADER_SIZE, IMAGE_MAGIC, MAX_IMAGE_SIZE, PAGE_SIZE,
};

/// Symbols the hv's linker script and code define, in the order [`Symbols`] holds them.
pub const CODE_START: &str = "__qs_code_start";
/// End of code and read-only data.
pub const CODE_END: &str = "__qs_code_end";
/// `extern "C" fn(&InitArgs) -> i64`.
pub const ENTRY_INIT: &str = "qs_entry_init";
/// `extern "C" fn(cpu: u32) -> i64`.
pub const ENTRY_ACTIVATE: &str = "qs_entry_activate";
/// `extern "C" fn(op: u64, buf: *mut u8, len: u64) -> i64`.
pub const ENTRY_CONTROL: &str = "qs_entry_control";
/// `endbr64` (F3 0F 1E FA): where an indirect branch may land when IBT is on. Every entry
/// point starts with it (the agent reaches each by an indirect call).
pub const ENDBR64: [u8; 4] = [0xF3, 0x0F, 0x1E, 0xFA];

/// Why an ELF could not be turned into an image. Each message names what to change.
#[derive(Debug, thiserror::Error)]
pub enum ImageBuildError {
    #[error("cannot parse the hv ELF: {0}")]
    Elf(#[from] object::read::Error),
    #[error("the hv ELF is {what}; expected a 64-bit little-endian x86-64 executable (build it with --target x86_64-unknown-none)")]
    WrongKind { what: String },
    #[error("the hv ELF has no PT_LOAD segment: nothing to load (is the linker script passed?)")]
    NoSegments,
    #[error("the hv's first PT_LOAD segment is at {vaddr:#x}; the image must be linked at address 0 with the header first (check hv's linker script)")]
    NotAtZero { vaddr: u64 },
    #[error("PT_LOAD segment at {vaddr:#x} is malformed: {why}")]
    BadSegment { vaddr: u64, why: &'static str },
    #[error("the image would be {size} bytes, over the loader's limit of {MAX_IMAGE_SIZE}: shrink the hv (large .bss belongs in the working memory the header declares)")]
    TooBig { size: u64 },
    #[error("relocation section {section} is {kind}; only SHT_RELA is handled (do not link with -z pack-relative-relocs)")]
    UnsupportedRelocationSection { section: String, kind: &'static str },
    #[error("relocation at offset {offset:#x} has type {kind} ({}, symbol {symbol}); only R_X86_64_RELATIVE (8) with no symbol can be applied by the loader: the hv must not reference symbols it does not define (relocation-model pie, no dynamic linking)", relocation_name(*kind))]
    UnsupportedRelocation { offset: u64, kind: u32, symbol: u32 },
    #[error("relocation at offset {offset:#x} does not fit inside the {size}-byte image")]
    RelocationOutside { offset: u64, size: u64 },
    #[error("relocation at offset {offset:#x} patches code or read-only data [{start:#x}, {end:#x}), which the hv checksums as built: move the pointer it patches to a writable section")]
    RelocationInCode { offset: u64, start: u64, end: u64 },
    #[error("symbol {0} is missing from the hv ELF (the linker script must define __qs_code_start/__qs_code_end, the hv must export qs_entry_*)")]
    MissingSymbol(&'static str),
    #[error("entry point {name} at {offset:#x} does not begin with ENDBR64 (found {found:02x?}): on a kernel built with IBT (Debian's 6.12) the agent's indirect call into it would fault; begin it with endbr64 (hv/src/main.rs has trampolines for the Rust entry points)")]
    NoEndbr64 {
        name: &'static str,
        offset: u64,
        found: Vec<u8>,
    },
    #[error("no image header at offset 0 (found {found:02x?} instead of the magic {IMAGE_MAGIC:02x?}): the hv must place its ImageHeader static in section .qs_header first")]
    NoHeader { found: Vec<u8> },
    #[error("code range [{start:#x}, {end:#x}) is not inside the {size}-byte image")]
    BadCodeRange { start: u64, end: u64, size: u64 },
    #[error("the built image fails the loader's checks: {error} ({})", error.fix())]
    Invalid { error: ImageError },
}

/// The x86-64 psABI name of relocation type `kind`, for error messages.
pub fn relocation_name(kind: u32) -> &'static str {
    elf::machine_names(elf::EM_X86_64)
        .r
        .name(elf::RelocationType(kind))
        .unwrap_or("unknown")
}

/// One loadable segment: `data` goes at `vaddr`, followed by zeros up to `memsz`.
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    /// Virtual address, which is also the offset in the flat image (linked at 0).
    pub vaddr: u64,
    /// Bytes from the file (`p_filesz` of them).
    pub data: &'a [u8],
    /// Size in memory (`p_memsz`), at least `data.len()`.
    pub memsz: u64,
}

/// One `Elf64_Rela` entry, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Relocation {
    /// Where to patch (an offset in the flat image).
    pub offset: u64,
    /// `ELF64_R_TYPE(r_info)`.
    pub kind: u32,
    /// `ELF64_R_SYM(r_info)`.
    pub symbol: u32,
    /// `r_addend`.
    pub addend: i64,
}

/// Addresses (= image offsets) the header needs from the ELF's symbol table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Symbols {
    /// `__qs_code_start`.
    pub code_start: u64,
    /// `__qs_code_end`.
    pub code_end: u64,
    /// `qs_entry_init`.
    pub entry_init: u64,
    /// `qs_entry_activate`.
    pub entry_activate: u64,
    /// `qs_entry_control`.
    pub entry_control: u64,
}

/// Lays out `segments` in one zeroed buffer as long as the highest `vaddr + memsz`, rounded
/// up to a page. Segments must not overlap.
pub fn flatten(segments: &[Segment<'_>]) -> Result<Vec<u8>, ImageBuildError> {
    let first = segments
        .iter()
        .map(|s| s.vaddr)
        .min()
        .ok_or(ImageBuildError::NoSegments)?;
    if first != 0 {
        return Err(ImageBuildError::NotAtZero { vaddr: first });
    }
    let mut end = 0u64;
    for s in segments {
        if (s.data.len() as u64) > s.memsz {
            return Err(ImageBuildError::BadSegment {
                vaddr: s.vaddr,
                why: "file size exceeds memory size",
            });
        }
        let seg_end = s
            .vaddr
            .checked_add(s.memsz)
            .ok_or(ImageBuildError::BadSegment {
                vaddr: s.vaddr,
                why: "address + size overflows",
            })?;
        end = end.max(seg_end);
    }
    // Checked before allocating, so that a stray huge vaddr is an error and not an OOM.
    let size = end.next_multiple_of(PAGE_SIZE);
    if size > MAX_IMAGE_SIZE {
        return Err(ImageBuildError::TooBig { size });
    }
    let mut sorted: Vec<_> = segments.to_vec();
    sorted.sort_by_key(|s| s.vaddr);
    for pair in sorted.windows(2) {
        if pair[0].vaddr + pair[0].memsz > pair[1].vaddr {
            return Err(ImageBuildError::BadSegment {
                vaddr: pair[1].vaddr,
                why: "overlaps the previous segment",
            });
        }
    }
    let mut flat = vec![0u8; size as usize];
    for s in &sorted {
        let at = s.vaddr as usize;
        flat[at..at + s.data.len()].copy_from_slice(s.data);
    }
    Ok(flat)
}

/// Checks that every relocation is one the loader can apply (`R_X86_64_RELATIVE`, symbol 0,
/// 8 bytes inside `flat`, outside `code`), stores each addend at its offset, and returns the
/// offsets in ascending order for the image's table.
pub fn apply_relocations(
    flat: &mut [u8],
    relocations: &[Relocation],
    code: std::ops::Range<u64>,
) -> Result<Vec<u64>, ImageBuildError> {
    let size = flat.len() as u64;
    let mut offsets = Vec::with_capacity(relocations.len());
    for r in relocations {
        if r.kind != elf::R_X86_64_RELATIVE.0 || r.symbol != 0 {
            return Err(ImageBuildError::UnsupportedRelocation {
                offset: r.offset,
                kind: r.kind,
                symbol: r.symbol,
            });
        }
        if r.offset.checked_add(8).is_none_or(|end| end > size) {
            return Err(ImageBuildError::RelocationOutside {
                offset: r.offset,
                size,
            });
        }
        if r.offset + 8 > code.start && r.offset < code.end {
            return Err(ImageBuildError::RelocationInCode {
                offset: r.offset,
                start: code.start,
                end: code.end,
            });
        }
        let at = r.offset as usize;
        flat[at..at + 8].copy_from_slice(&(r.addend as u64).to_le_bytes());
        offsets.push(r.offset);
    }
    offsets.sort_unstable();
    Ok(offsets)
}

/// Appends the relocation table to `flat` (whose header the hv already filled with its
/// constants), completes the header, and validates the result as the loader will.
pub fn assemble(
    mut flat: Vec<u8>,
    reloc_offsets: &[u64],
    symbols: &Symbols,
) -> Result<Vec<u8>, ImageBuildError> {
    if flat.len() < HEADER_SIZE || flat[..8] != IMAGE_MAGIC {
        return Err(ImageBuildError::NoHeader {
            found: flat.iter().take(8).copied().collect(),
        });
    }
    let flat_size = flat.len() as u64;
    if symbols.code_start > symbols.code_end || symbols.code_end > flat_size {
        return Err(ImageBuildError::BadCodeRange {
            start: symbols.code_start,
            end: symbols.code_end,
            size: flat_size,
        });
    }
    let mut header =
        ImageHeader::read(&flat).map_err(|error| ImageBuildError::Invalid { error })?;
    header.code_start = symbols.code_start;
    header.code_end = symbols.code_end;
    header.code_crc =
        quicksilver_proto::crc32(&flat[symbols.code_start as usize..symbols.code_end as usize]);
    // The flat part is a page multiple, so the table that follows is 8-aligned.
    header.reloc_offset = flat_size;
    header.reloc_count = reloc_offsets.len() as u64;
    for (name, offset) in [
        (ENTRY_INIT, symbols.entry_init),
        (ENTRY_ACTIVATE, symbols.entry_activate),
        (ENTRY_CONTROL, symbols.entry_control),
    ] {
        let found = flat.get(offset as usize..).unwrap_or(&[]);
        if !found.starts_with(&ENDBR64) {
            return Err(ImageBuildError::NoEndbr64 {
                name,
                offset,
                found: found.iter().take(4).copied().collect(),
            });
        }
    }
    header.entry_init = symbols.entry_init;
    header.entry_activate = symbols.entry_activate;
    header.entry_control = symbols.entry_control;
    for offset in reloc_offsets {
        flat.extend_from_slice(&offset.to_le_bytes());
    }
    header.image_size = flat.len() as u64;
    header.checksum = 0;
    flat[..HEADER_SIZE].copy_from_slice(&header.to_bytes());
    header.checksum = image::checksum(&flat);
    flat[..HEADER_SIZE].copy_from_slice(&header.to_bytes());
    ImageHeader::validate(&flat).map_err(|error| ImageBuildError::Invalid { error })?;
    Ok(flat)
}

/// The whole conversion: ELF bytes in, image bytes out.
pub fn build_image(elf_bytes: &[u8]) -> Result<Vec<u8>, ImageBuildError> {
    let header = elf::FileHeader64::<LE>::parse(elf_bytes)?;
    let endian = header.endian()?;
    let machine = header.e_machine(endian);
    if machine != elf::EM_X86_64 {
        return Err(ImageBuildError::WrongKind {
            what: format!("for machine {}", machine.0),
        });
    }
    let kind = header.e_type(endian);
    if kind != elf::ET_DYN && kind != elf::ET_EXEC {
        return Err(ImageBuildError::WrongKind {
            what: format!("of ELF type {} (not an executable)", kind.0),
        });
    }

    let mut segments = Vec::new();
    for ph in header.program_headers(endian, elf_bytes)? {
        if ph.p_type(endian) == elf::PT_LOAD {
            let data = ph
                .data(endian, elf_bytes)
                .map_err(|()| ImageBuildError::BadSegment {
                    vaddr: ph.p_vaddr(endian),
                    why: "file range lies outside the ELF",
                })?;
            segments.push(Segment {
                vaddr: ph.p_vaddr(endian),
                data,
                memsz: ph.p_memsz(endian),
            });
        }
    }
    let mut flat = flatten(&segments)?;

    let sections = header.sections(endian, elf_bytes)?;
    let mut relocations = Vec::new();
    for section in sections.iter() {
        let name = || {
            String::from_utf8_lossy(sections.section_name(endian, section).unwrap_or(b"?"))
                .into_owned()
        };
        match section.sh_type(endian) {
            elf::SHT_REL => {
                return Err(ImageBuildError::UnsupportedRelocationSection {
                    section: name(),
                    kind: "SHT_REL",
                })
            }
            elf::SHT_RELR => {
                return Err(ImageBuildError::UnsupportedRelocationSection {
                    section: name(),
                    kind: "SHT_RELR",
                })
            }
            elf::SHT_RELA => {
                let (entries, _) = section
                    .rela(endian, elf_bytes)?
                    .expect("an SHT_RELA section has entries");
                relocations.extend(entries.iter().map(|r| Relocation {
                    offset: r.r_offset(endian),
                    kind: r.r_type(endian, false).0,
                    symbol: r.r_sym(endian, false),
                    addend: r.r_addend(endian),
                }));
            }
            _ => {}
        }
    }

    // Prefer the full symbol table; a stripped image still has .dynsym if it exports them.
    let find = |name: &'static str| -> Result<u64, ImageBuildError> {
        for table in [elf::SHT_SYMTAB, elf::SHT_DYNSYM] {
            let symbols = sections.symbols(endian, elf_bytes, table)?;
            for sym in symbols.iter() {
                if !sym.is_undefined(endian) && symbols.symbol_name(endian, sym)? == name.as_bytes()
                {
                    return Ok(sym.st_value(endian));
                }
            }
        }
        Err(ImageBuildError::MissingSymbol(name))
    };
    let symbols = Symbols {
        code_start: find(CODE_START)?,
        code_end: find(CODE_END)?,
        entry_init: find(ENTRY_INIT)?,
        entry_activate: find(ENTRY_ACTIVATE)?,
        entry_control: find(ENTRY_CONTROL)?,
    };
    let offsets = apply_relocations(
        &mut flat,
        &relocations,
        symbols.code_start..symbols.code_end,
    )?;
    assemble(flat, &offsets, &symbols)
}

/// Reads the ELF at `elf_path`, writes the image to `out`, and returns its header.
pub fn build_image_file(elf_path: &Path, out: &Path) -> anyhow::Result<ImageHeader> {
    let elf_bytes = std::fs::read(elf_path)
        .with_context(|| format!("reading the hv ELF {}", elf_path.display()))?;
    let bytes = build_image(&elf_bytes)
        .with_context(|| format!("converting {} to an hv image", elf_path.display()))?;
    // Through a rename: tests reading the image meanwhile see the old one or the new one.
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &bytes)
        .and_then(|()| std::fs::rename(&tmp, out))
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(ImageHeader::read(&bytes).expect("a validated image has a header"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::endian::{I64, U16, U32, U64};
    use object::pod::bytes_of;
    use quicksilver_proto::image::ABI_VERSION;

    /// The header constants the hv itself would put in `.qs_header`.
    fn hv_header() -> ImageHeader {
        let mut version = [0; 32];
        version[..5].copy_from_slice(b"0.1.0");
        ImageHeader {
            magic: IMAGE_MAGIC,
            abi_version: ABI_VERSION,
            header_size: HEADER_SIZE as u32,
            image_size: 0,
            checksum: 0,
            code_crc: 0,
            code_start: 0,
            code_end: 0,
            reloc_offset: 0,
            reloc_count: 0,
            entry_init: 0,
            entry_activate: 0,
            entry_control: 0,
            mem_fixed: 1 << 20,
            mem_per_cpu: 64 << 10,
            mem_per_gib: 8 << 10,
            max_cpus: 64,
            flags: 0,
            version,
            reserved: [0; 104],
        }
    }

    #[test]
    fn flatten_places_segments_and_zero_fills() {
        let flat = flatten(&[
            Segment {
                vaddr: 0,
                data: b"abc",
                memsz: 3,
            },
            Segment {
                vaddr: 0x1000,
                data: b"de",
                memsz: 0x1800,
            },
        ])
        .unwrap();
        assert_eq!(flat.len(), 0x3000);
        assert_eq!(&flat[..4], b"abc\0");
        assert_eq!(&flat[0x1000..0x1003], b"de\0");
        assert!(flat[0x1003..].iter().all(|&b| b == 0));
    }

    #[test]
    fn flatten_refuses_bad_layouts() {
        let seg = |vaddr, memsz| Segment {
            vaddr,
            data: b"",
            memsz,
        };
        assert!(matches!(flatten(&[]), Err(ImageBuildError::NoSegments)));
        assert!(matches!(
            flatten(&[seg(0x1000, 8)]),
            Err(ImageBuildError::NotAtZero { vaddr: 0x1000 })
        ));
        assert!(matches!(
            flatten(&[seg(0, 0x2000), seg(0x1000, 8)]),
            Err(ImageBuildError::BadSegment { .. })
        ));
        assert!(matches!(
            flatten(&[seg(0, 1 << 40)]),
            Err(ImageBuildError::TooBig { .. })
        ));
    }

    #[test]
    fn relocations_store_addends_and_refuse_what_the_loader_cannot_do() {
        let rel = |offset, kind, symbol| Relocation {
            offset,
            kind,
            symbol,
            addend: 0x1234,
        };
        let mut flat = vec![0xffu8; 0x400];
        let offsets = apply_relocations(
            &mut flat,
            &[rel(0x310, 8, 0), rel(0x300, 8, 0)],
            0x100..0x200,
        )
        .unwrap();
        assert_eq!(offsets, [0x300, 0x310]);
        assert_eq!(&flat[0x300..0x308], &0x1234u64.to_le_bytes());

        let err = apply_relocations(&mut flat, &[rel(0x300, 1, 5)], 0..0).unwrap_err();
        assert!(matches!(
            err,
            ImageBuildError::UnsupportedRelocation {
                offset: 0x300,
                kind: 1,
                symbol: 5
            }
        ));
        assert!(err.to_string().contains("type 1 (R_X86_64_64"), "{err}");
        assert!(matches!(
            apply_relocations(&mut flat, &[rel(0x3fc, 8, 0)], 0..0),
            Err(ImageBuildError::RelocationOutside { .. })
        ));
        assert!(matches!(
            apply_relocations(&mut flat, &[rel(0x1fc, 8, 0)], 0x100..0x200),
            Err(ImageBuildError::RelocationInCode { .. })
        ));
    }

    /// Writes a minimal static-PIE-shaped ELF: a code segment holding the header and 256
    /// bytes of "code" at 0, a data segment at 0x1000 with 16 file bytes and 0x1000 of bss,
    /// `.rela.dyn` with two relative relocations into the data, and a symbol table.
    fn tiny_elf(reloc_kind: elf::RelocationType) -> Vec<u8> {
        let e = LE;
        let syms: [(&str, u64); 5] = [
            (CODE_START, 0x100),
            (CODE_END, 0x200),
            (ENTRY_INIT, 0x100),
            (ENTRY_ACTIVATE, 0x140),
            (ENTRY_CONTROL, 0x180),
        ];
        let mut strtab = vec![0u8];
        let mut symtab = vec![0u8; 24];
        for (name, value) in syms {
            let sym = elf::Sym64::<LE> {
                st_name: U32::new(e, strtab.len() as u32),
                st_info: elf::SymbolInfo::new(elf::STB_GLOBAL, elf::STT_FUNC),
                st_other: elf::SymbolOther(0),
                st_shndx: U16::new(e, elf::SymbolSection(1)),
                st_value: U64::new(e, value),
                st_size: U64::new(e, 0),
            };
            symtab.extend_from_slice(bytes_of(&sym));
            strtab.extend_from_slice(name.as_bytes());
            strtab.push(0);
        }
        let mut rela = Vec::new();
        for (offset, addend) in [(0x1000u64, 0x140i64), (0x1008, 0x180)] {
            let r = elf::Rela64::<LE> {
                r_offset: U64::new(e, offset),
                r_info: U64::new(e, reloc_kind.0 as u64),
                r_addend: I64::new(e, addend),
            };
            rela.extend_from_slice(bytes_of(&r));
        }
        let mut code = hv_header().to_bytes().to_vec();
        code.resize(0x200, 0x90);
        for entry in [0x100, 0x140, 0x180] {
            code[entry..entry + 4].copy_from_slice(&ENDBR64);
        }

        // File layout: ELF header, 2 program headers, code at 0x1000, data at 0x2000, then
        // .rela.dyn, .symtab, .strtab, .shstrtab and the section headers.
        let shstrtab = b"\0.text\0.rela.dyn\0.symtab\0.strtab\0.shstrtab\0";
        let rela_at = 0x2010u64;
        let symtab_at = rela_at + rela.len() as u64;
        let strtab_at = symtab_at + symtab.len() as u64;
        let shstrtab_at = strtab_at + strtab.len() as u64;
        let shdrs_at = (shstrtab_at + shstrtab.len() as u64).next_multiple_of(8);

        let mut out = vec![0u8; shdrs_at as usize];
        let file_header = elf::FileHeader64::<LE> {
            e_ident: elf::Ident {
                magic: elf::ELFMAG,
                class: elf::ELFCLASS64,
                data: elf::ELFDATA2LSB,
                version: elf::EV_CURRENT,
                os_abi: elf::OsAbi(0),
                abi_version: 0,
                padding: [0; 7],
            },
            e_type: U16::new(e, elf::ET_DYN),
            e_machine: U16::new(e, elf::EM_X86_64),
            e_version: U32::new(e, 1),
            e_entry: U64::new(e, 0x100),
            e_phoff: U64::new(e, 64),
            e_shoff: U64::new(e, shdrs_at),
            e_flags: U32::new(e, elf::FileFlags(0)),
            e_ehsize: U16::new(e, 64),
            e_phentsize: U16::new(e, 56),
            e_phnum: U16::new(e, 2),
            e_shentsize: U16::new(e, 64),
            e_shnum: U16::new(e, 6),
            e_shstrndx: U16::new(e, elf::SymbolSection(5)),
        };
        out[..64].copy_from_slice(bytes_of(&file_header));
        let phdr = |offset: u64, vaddr: u64, filesz: u64, memsz: u64| elf::ProgramHeader64::<LE> {
            p_type: U32::new(e, elf::PT_LOAD),
            p_flags: U32::new(e, elf::PF_R),
            p_offset: U64::new(e, offset),
            p_vaddr: U64::new(e, vaddr),
            p_paddr: U64::new(e, vaddr),
            p_filesz: U64::new(e, filesz),
            p_memsz: U64::new(e, memsz),
            p_align: U64::new(e, 0x1000),
        };
        out[64..120].copy_from_slice(bytes_of(&phdr(0x1000, 0, 0x200, 0x200)));
        out[120..176].copy_from_slice(bytes_of(&phdr(0x2000, 0x1000, 0x10, 0x1010)));
        out[0x1000..0x1200].copy_from_slice(&code);
        out[0x2000..0x2010].copy_from_slice(b"data data data!!");
        for (at, bytes) in [
            (rela_at, &rela[..]),
            (symtab_at, &symtab[..]),
            (strtab_at, &strtab[..]),
            (shstrtab_at, &shstrtab[..]),
        ] {
            out[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        }
        let shdr =
            |name: u32, kind: elf::SectionType, offset: u64, size: u64, link: u32, entsize: u64| {
                elf::SectionHeader64::<LE> {
                    sh_name: U32::new(e, name),
                    sh_type: U32::new(e, kind),
                    sh_flags: U64::new(e, elf::SectionFlags(0)),
                    sh_addr: U64::new(e, 0),
                    sh_offset: U64::new(e, offset),
                    sh_size: U64::new(e, size),
                    sh_link: U32::new(e, link),
                    sh_info: U32::new(e, if kind == elf::SHT_SYMTAB { 1 } else { 0 }),
                    sh_addralign: U64::new(e, 8),
                    sh_entsize: U64::new(e, entsize),
                }
            };
        let headers = [
            shdr(0, elf::SHT_NULL, 0, 0, 0, 0),
            shdr(1, elf::SHT_PROGBITS, 0x1000, 0x200, 0, 0),
            shdr(7, elf::SHT_RELA, rela_at, rela.len() as u64, 3, 24),
            shdr(17, elf::SHT_SYMTAB, symtab_at, symtab.len() as u64, 4, 24),
            shdr(25, elf::SHT_STRTAB, strtab_at, strtab.len() as u64, 0, 0),
            shdr(
                33,
                elf::SHT_STRTAB,
                shstrtab_at,
                shstrtab.len() as u64,
                0,
                0,
            ),
        ];
        for h in &headers {
            out.extend_from_slice(bytes_of(h));
        }
        out
    }

    #[test]
    fn a_tiny_elf_becomes_a_valid_image() {
        let bytes = build_image(&tiny_elf(elf::R_X86_64_RELATIVE)).unwrap();
        let h = ImageHeader::validate(&bytes).unwrap();
        assert_eq!((h.code_start, h.code_end), (0x100, 0x200));
        assert_eq!(
            (h.entry_init, h.entry_activate, h.entry_control),
            (0x100, 0x140, 0x180)
        );
        assert_eq!(h.code_crc, quicksilver_proto::crc32(&bytes[0x100..0x200]));
        assert_eq!(&bytes[0x140..0x144], ENDBR64);
        // Flat part: 0x1010 bytes rounded up to two pages; then two table entries.
        assert_eq!(
            (h.reloc_offset, h.reloc_count, h.image_size),
            (0x3000, 2, 0x3010)
        );
        assert_eq!(
            &bytes[0x3000..0x3010],
            [0x1000u64.to_le_bytes(), 0x1008u64.to_le_bytes()].concat()
        );
        assert_eq!(
            &bytes[0x1000..0x1010],
            [0x140u64.to_le_bytes(), 0x180u64.to_le_bytes()].concat()
        );
        assert!(bytes[0x1010..0x3000].iter().all(|&b| b == 0), "bss is zero");
        // The hv's own constants survive.
        assert_eq!(
            (h.mem_fixed, h.max_cpus, h.version_str()),
            (1 << 20, 64, "0.1.0")
        );
    }

    #[test]
    fn an_entry_point_without_endbr64_is_refused_and_named() {
        let mut elf_bytes = tiny_elf(elf::R_X86_64_RELATIVE);
        // entry_control at 0x180 in the image, 0x1180 in the file.
        elf_bytes[0x1180..0x1184].copy_from_slice(&[0x55, 0x48, 0x89, 0xE5]);
        let err = build_image(&elf_bytes).unwrap_err();
        assert!(
            matches!(
                err,
                ImageBuildError::NoEndbr64 {
                    name: ENTRY_CONTROL,
                    offset: 0x180,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("IBT"), "{err}");
    }

    #[test]
    fn a_symbolic_relocation_is_named_in_the_error() {
        let err = build_image(&tiny_elf(elf::R_X86_64_64)).unwrap_err();
        assert!(
            matches!(
                err,
                ImageBuildError::UnsupportedRelocation {
                    offset: 0x1000,
                    kind: 1,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn an_elf_without_the_header_is_refused() {
        let mut elf_bytes = tiny_elf(elf::R_X86_64_RELATIVE);
        elf_bytes[0x1000] = b'X';
        assert!(matches!(
            build_image(&elf_bytes),
            Err(ImageBuildError::NoHeader { .. })
        ));
    }
}
