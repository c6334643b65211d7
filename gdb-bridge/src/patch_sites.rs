//! Where a running Linux patches its own text, read from its `vmlinux`, and what a change
//! found in a page of kernel text between two checkpoints is.
//!
//! After boot the kernel rewrites its text only at places it recorded at build time:
//! - jump labels (`static_branch_*`): a 2- or 5-byte NOP or JMP at each `__jump_table` entry;
//! - static calls: the CALL at each `.static_call_sites` entry, and the `__SCT__*` trampolines;
//! - ftrace: the 5-byte `call __fentry__` at each `__mcount_loc` address, and the calls inside
//!   its own trampolines (`ftrace_call`, `ftrace_regs_call`, `ftrace_graph_call`);
//! - alternatives: each `.altinstructions` entry's instructions, and `.smp_locks`' LOCK
//!   prefixes (CPUs coming and going);
//! - the BPF dispatchers (`bpf_dispatcher_*_func`), rewritten whole as programs attach;
//! - kprobes, anywhere: an INT3 written over an instruction's first byte, later perhaps a JMP
//!   (an optimized kprobe), which cannot be told from a hook without the kernel's kprobe list.
//!
//! Anything else written into the text is not the kernel's own doing: a corruption, a bad
//! module, or a rootkit. The entries' layouts are those of Linux 6.1 to 6.12 on x86-64
//! (`arch/x86/include/asm/jump_label.h`, `static_call_types.h`, `alternative.h`): 32-bit
//! offsets from the entry's own address, so they hold for any KASLR slide; `__mcount_loc`
//! holds link-time addresses.

use object::{Object, ObjectSection, ObjectSymbol};

/// What wrote a change into kernel text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    JumpLabel,
    StaticCall,
    Ftrace,
    Alternative,
    BpfDispatcher,
    /// One byte to or from INT3: a kprobe (or a breakpoint) placed or removed.
    Int3,
    /// None of the kernel's own places.
    Unexpected,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::JumpLabel => "jump label",
            Kind::StaticCall => "static call",
            Kind::Ftrace => "ftrace",
            Kind::Alternative => "alternative",
            Kind::BpfDispatcher => "BPF dispatcher",
            Kind::Int3 => "int3 (kprobe or breakpoint)",
            Kind::Unexpected => "not the kernel's own patch",
        }
    }
}

/// The sites, by link-time address.
#[derive(Default)]
pub struct PatchSites {
    /// (start, length, kind), sorted by start.
    sites: Vec<(u64, u64, Kind)>,
}

/// x86's INT3.
const INT3: u8 = 0xCC;
/// A jump label's or a static call's or an fentry call's instruction: at most 5 bytes.
const CALL_OR_JMP: u64 = 5;

/// `__jump_table`'s `struct jump_entry { s32 code; s32 target; long key; }`.
const JUMP_ENTRY: usize = 16;
/// `.static_call_sites`' `struct static_call_site { s32 addr; s32 key; }`.
const STATIC_CALL_SITE: usize = 8;
/// `.altinstructions`' packed `struct alt_instr { s32 instr_offset; s32 repl_offset;
/// u32 ft_flags; u8 instrlen; u8 replacementlen; }`.
const ALT_INSTR: usize = 14;

/// The tables: (the section's own name, its start symbol, its stop symbol).
const TABLES: [(&str, &str, &str); 5] = [
    (
        "__jump_table",
        "__start___jump_table",
        "__stop___jump_table",
    ),
    (
        ".static_call_sites",
        "__start_static_call_sites",
        "__stop_static_call_sites",
    ),
    (
        ".altinstructions",
        "__alt_instructions",
        "__alt_instructions_end",
    ),
    (".smp_locks", "__smp_locks", "__smp_locks_end"),
    ("__mcount_loc", "__start_mcount_loc", "__stop_mcount_loc"),
];

fn s32_at(b: &[u8], at: usize) -> Option<i64> {
    Some(i32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as i64)
}

impl PatchSites {
    /// The sites `file` (a `vmlinux`) records; tables it lacks add none.
    pub fn load<'d, R: object::ReadRef<'d>>(file: &object::File<'d, R>) -> PatchSites {
        let mut sites = Vec::new();
        // The linker merges the tables into larger output sections (`.data`, `.init.data`,
        // `.rodata`) and marks each with start and stop symbols; a relocatable object (as in
        // the tests) keeps them as sections of their own.
        let mut bounds: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
        for s in file.symbols() {
            if let Ok(name) = s.name() {
                if TABLES.iter().any(|t| t.1 == name || t.2 == name) {
                    bounds.insert(name, s.address());
                }
            }
        }
        let table = |(section, start, stop): (&str, &str, &str)| -> Option<(u64, Vec<u8>)> {
            if let (Some(&a), Some(&b)) = (bounds.get(start), bounds.get(stop)) {
                let s = file
                    .sections()
                    .find(|s| (s.address()..s.address() + s.size()).contains(&a))?;
                let data = s.data().ok()?;
                let from = usize::try_from(a - s.address()).ok()?;
                let to = usize::try_from(b.checked_sub(s.address())?).ok()?;
                return Some((a, data.get(from..to)?.to_vec()));
            }
            let s = file.section_by_name(section)?;
            Some((s.address(), s.data().ok()?.to_vec()))
        };
        // Entries whose first field is a 32-bit offset from the entry to the site.
        let mut relative = |t: usize, entry: usize, len: &dyn Fn(&[u8]) -> u64, kind| {
            let Some((base, data)) = table(TABLES[t]) else {
                return;
            };
            for (i, e) in data.chunks_exact(entry).enumerate() {
                if let Some(off) = s32_at(e, 0) {
                    let at = (base + (i * entry) as u64).wrapping_add_signed(off);
                    sites.push((at, len(e), kind));
                }
            }
        };
        relative(0, JUMP_ENTRY, &|_| CALL_OR_JMP, Kind::JumpLabel);
        relative(1, STATIC_CALL_SITE, &|_| CALL_OR_JMP, Kind::StaticCall);
        relative(2, ALT_INSTR, &|e| e[12] as u64, Kind::Alternative);
        relative(3, 4, &|_| 1, Kind::Alternative);
        if let Some((_, data)) = table(TABLES[4]) {
            for c in data.chunks_exact(8) {
                let at = u64::from_le_bytes(c.try_into().unwrap_or_default());
                sites.push((at, CALL_OR_JMP, Kind::Ftrace));
            }
        }
        for s in file.symbols() {
            let Ok(name) = s.name() else { continue };
            let kind = if name.starts_with("__SCT__") {
                Kind::StaticCall
            } else if matches!(
                name,
                "ftrace_call" | "ftrace_regs_call" | "ftrace_graph_call"
            ) {
                Kind::Ftrace
            } else if name.starts_with("bpf_dispatcher_") && name.ends_with("_func") {
                Kind::BpfDispatcher
            } else {
                continue;
            };
            sites.push((s.address(), s.size().max(CALL_OR_JMP), kind));
        }
        sites.sort_unstable_by_key(|s| s.0);
        PatchSites { sites }
    }

    pub fn len(&self) -> usize {
        self.sites.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// What wrote `new` over `old` at link-time address `at`: the kind of the site holding
    /// its first byte, if sites hold it whole (neighbouring sites patched together read as
    /// one change).
    pub fn classify(&self, at: u64, old: &[u8], new: &[u8]) -> Kind {
        let end = at + new.len() as u64;
        let (mut pos, mut first) = (at, None);
        while pos < end {
            match self.holding(pos) {
                Some((site_end, kind)) => {
                    first.get_or_insert(kind);
                    pos = site_end;
                }
                None => break,
            }
        }
        if let (true, Some(kind)) = (pos >= end, first) {
            return kind;
        }
        if new.len() == 1 && (old[0] == INT3) != (new[0] == INT3) {
            return Kind::Int3;
        }
        Kind::Unexpected
    }
}

impl PatchSites {
    /// The end and kind of a site holding `pos` (the one reaching furthest).
    fn holding(&self, pos: u64) -> Option<(u64, Kind)> {
        // Sites are short (an alternative's is at most a few dozen bytes): look back a page.
        let i = self.sites.partition_point(|s| s.0 <= pos);
        self.sites[..i]
            .iter()
            .rev()
            .take_while(|s| pos - s.0 < 4096)
            .filter(|s| s.0 + s.1 > pos)
            .max_by_key(|s| s.0 + s.1)
            .map(|s| (s.0 + s.1, s.2))
    }
}

/// The byte ranges where `new` differs from `old` (two pages, or any equal-length spans), as
/// (offset, length); differences fewer than 4 bytes apart are one range, as one patched
/// instruction often keeps a byte of the old one.
pub fn differences(old: &[u8], new: &[u8]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for i in (0..old.len().min(new.len())).filter(|&i| old[i] != new[i]) {
        match out.last_mut() {
            Some((start, len)) if i - (*start + *len) < 4 => *len = i + 1 - *start,
            _ => out.push((i, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sites() -> PatchSites {
        PatchSites {
            sites: vec![
                (0x1000, 5, Kind::JumpLabel),
                (0x1100, 5, Kind::Ftrace),
                (0x1200, 11, Kind::Alternative),
            ],
        }
    }

    #[test]
    fn a_change_inside_a_site_is_that_sites_kind() {
        let s = sites();
        let nop5 = [0x0f, 0x1f, 0x44, 0x00, 0x00];
        let jmp5 = [0xe9, 0x10, 0x20, 0x00, 0x00];
        assert_eq!(s.classify(0x1000, &nop5, &jmp5), Kind::JumpLabel);
        assert_eq!(
            s.classify(0x1001, &nop5[1..3], &jmp5[1..3]),
            Kind::JumpLabel
        );
        assert_eq!(s.classify(0x1100, &nop5, &jmp5), Kind::Ftrace);
        assert_eq!(s.classify(0x1204, &[1; 7], &[2; 7]), Kind::Alternative);
        let three = PatchSites {
            sites: vec![
                (0x10, 2, Kind::JumpLabel),
                (0x12, 2, Kind::JumpLabel),
                (0x14, 2, Kind::JumpLabel),
            ],
        };
        let (nops, jmps) = ([0x66, 0x90].repeat(3), [0xeb, 0x54, 0xeb, 0x45, 0xeb, 0x21]);
        assert_eq!(
            three.classify(0x10, &nops, &jmps),
            Kind::JumpLabel,
            "neighbours together"
        );
        assert_eq!(
            three.classify(0x10, &[0; 7], &[1; 7]),
            Kind::Unexpected,
            "and one byte past"
        );
    }

    #[test]
    fn a_change_outside_every_site_is_unexpected_unless_it_is_an_int3() {
        let s = sites();
        assert_eq!(
            s.classify(0x1003, &[0; 4], &[1; 4]),
            Kind::Unexpected,
            "runs past the site"
        );
        assert_eq!(s.classify(0x1050, &[0x55], &[0x90]), Kind::Unexpected);
        assert_eq!(
            s.classify(0x1050, &[0x55], &[INT3]),
            Kind::Int3,
            "a kprobe placed"
        );
        assert_eq!(
            s.classify(0x1050, &[INT3], &[0x55]),
            Kind::Int3,
            "and removed"
        );
        assert_eq!(
            s.classify(0x1050, &[0x55, 0x48], &[INT3, 0x48]),
            Kind::Unexpected
        );
        assert_eq!(
            s.classify(0x0fff, &[0], &[1]),
            Kind::Unexpected,
            "before the first"
        );
        assert_eq!(
            PatchSites::default().classify(0x1000, &[0], &[1]),
            Kind::Unexpected
        );
    }

    #[test]
    fn nearby_differences_are_one_range() {
        let old = [0u8; 32];
        let mut new = old;
        new[2] = 1;
        new[5] = 1; // 2 apart from the last: the same range
        new[20] = 1;
        assert_eq!(differences(&old, &new), vec![(2, 4), (20, 1)]);
        assert!(differences(&old, &old).is_empty());
    }

    #[test]
    fn a_vmlinux_sites_are_read_from_its_sections_and_symbols() {
        use object::write::{Object as Writer, Symbol, SymbolSection};
        use object::{Architecture, BinaryFormat, Endianness, SectionKind, SymbolFlags};
        use object::{SymbolKind, SymbolScope};
        let mut w = Writer::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
        let text = w.add_section(Vec::new(), b".text".to_vec(), SectionKind::Text);
        w.append_section_data(text, &[0x90; 0x200], 16);
        // Relocatable: every section at address 0, so an entry's site is its own offset
        // in the section plus its field.
        let mut entry = |name: &[u8], entries: &[Vec<u8>]| {
            let id = w.add_section(Vec::new(), name.to_vec(), SectionKind::Data);
            w.append_section_data(id, &entries.concat(), 8);
        };
        let jump = |code: i32| [code.to_le_bytes(), [0; 4], [0; 4], [0; 4]].concat();
        // The second entry is 16 bytes in: its code field is from there.
        entry(b"__jump_table", &[jump(0x100), jump(0x120 - 16)]);
        let alt = [0x40i32.to_le_bytes(), [0; 4], [0; 4]].concat();
        entry(b".altinstructions", &[[alt, vec![6, 6]].concat()]);
        entry(b"__mcount_loc", &[0x180u64.to_le_bytes().to_vec()]);
        w.add_symbol(Symbol {
            name: b"__SCT__tp_func_foo".to_vec(),
            value: 0x1c0,
            size: 8,
            kind: SymbolKind::Text,
            scope: SymbolScope::Linkage,
            weak: false,
            section: SymbolSection::Section(text),
            flags: SymbolFlags::None,
        });
        let bytes = w.write().unwrap();
        let s = PatchSites::load(&object::File::parse(&*bytes).unwrap());
        assert_eq!(
            s.sites,
            vec![
                (0x40, 6, Kind::Alternative),
                (0x100, 5, Kind::JumpLabel),
                (0x120, 5, Kind::JumpLabel),
                (0x180, 5, Kind::Ftrace),
                (0x1c0, 8, Kind::StaticCall),
            ]
        );
        assert_eq!(s32_at(&[1, 2], 0), None, "an entry cut short");
    }
}
