//! `cpus ID`: where each CPU of a kept checkpoint was, read over the link without exporting it
//! (a few KiB: the kernel's facts, each CPU's record, the VMCOREINFO note's page), with the
//! kernel symbol each RIP is in when the bridge has the kernel's `vmlinux` (`--vmlinux`): the
//! running kernel is randomized (KASLR), so an address is looked up at its distance from
//! `KERNELOFFSET=` in the checkpoint's own VMCOREINFO.

use crate::checkpoints::{error, Checkpoints};
use crate::facts::{page, parse_facts};
use crate::patch_sites::PatchSites;
use anyhow::{Context, Result};
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
use quicksilver_checkpoint::assemble::{self, cpu_record_from_bytes};
use quicksilver_checkpoint::elf::Pages;
use quicksilver_checkpoint::model::PAGE;
use quicksilver_proto::link::checkpoint::Op;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

/// How long the machine may stay silent in one of these reads.
const IDLE: Duration = Duration::from_secs(10);

/// A kernel's functions, variables and sections, by link-time address.
pub struct Symbols {
    /// (address, size, name), ascending.
    pub(crate) text: Vec<(u64, u64, String)>,
    pub(crate) data: Vec<(u64, u64, String)>,
    /// The image's allocated sections: (address, size, name), ascending.
    pub(crate) sections: Vec<(u64, u64, String)>,
    /// Where the kernel patches its own text.
    pub(crate) sites: PatchSites,
}

impl Symbols {
    /// The function symbols of `vmlinux` (read through a cache: a vmlinux with its debug
    /// information is hundreds of MiB, of which the symbol table is a few).
    pub fn load(vmlinux: &Path) -> Result<Symbols> {
        let f = std::fs::File::open(vmlinux)
            .with_context(|| format!("cannot open --vmlinux {}", vmlinux.display()))?;
        let cache = object::ReadCache::new(f);
        let file = object::File::parse(&cache)
            .with_context(|| format!("--vmlinux {} is not an ELF file", vmlinux.display()))?;
        // The entry code (`SYM_CODE_START`: the `asm_*` handlers, `entry_SYSCALL_64`,
        // `common_interrupt_return`, ...) has untyped symbols: in an executable section they
        // are code all the same. A CPU interrupted there is in the kernel, not a module.
        let code: Vec<object::SectionIndex> = file
            .sections()
            .filter(|s| s.kind() == object::SectionKind::Text)
            .map(|s| s.index())
            .collect();
        let is = |s: &object::Symbol<'_, '_, _>, kind| {
            s.kind() == kind
                || (kind == SymbolKind::Text
                    && s.kind() == SymbolKind::Unknown
                    && s.section_index().is_some_and(|i| code.contains(&i)))
        };
        let of = |kind| {
            let mut v: Vec<(u64, u64, String)> = file
                .symbols()
                .filter(|s| is(s, kind) && s.address() != 0)
                .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?.to_string())))
                .collect();
            v.sort_unstable();
            v
        };
        let (text, data) = (of(SymbolKind::Text), of(SymbolKind::Data));
        let mut sections: Vec<(u64, u64, String)> = file
            .sections()
            .filter(|s| s.address() != 0 && s.size() != 0)
            .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?.to_string())))
            .collect();
        sections.sort_unstable();
        if text.is_empty() {
            anyhow::bail!(
                "--vmlinux {} has no function symbols: give the kernel's unstripped vmlinux (Debian: the linux-image-*-dbg package)",
                vmlinux.display()
            );
        }
        let sites = PatchSites::load(&file);
        Ok(Symbols {
            text,
            data,
            sections,
            sites,
        })
    }

    /// `name+0xoff` for a link-time address inside a function; as the kernel's own kallsyms
    /// does, a symbol without a size (the entry code's, written in assembly) runs up to the
    /// next one.
    pub fn find(&self, addr: u64) -> Option<String> {
        let i = self.text.partition_point(|s| s.0 <= addr).checked_sub(1)?;
        let (start, size, name) = &self.text[i];
        let off = addr - start;
        let next = self.text.get(i + 1).map_or(u64::MAX, |s| s.0);
        let inside = if *size == 0 { addr < next } else { off < *size };
        inside.then(|| format!("{name}+{off:#x}"))
    }
}

/// A few pages of a checkpoint, read over the link.
pub(crate) struct Fetched<'a> {
    pub cps: &'a Checkpoints,
    pub id: u32,
    pub pages: HashMap<u64, Vec<u8>>,
}

impl Pages for Fetched<'_> {
    fn read_page(&mut self, gpa: u64, buf: &mut [u8; PAGE]) -> std::io::Result<()> {
        if !self.pages.contains_key(&gpa) {
            let r = self
                .cps
                .read(
                    Op::ReadPages {
                        id: self.id,
                        first_gpa: gpa,
                        count: 1,
                    },
                    IDLE,
                )
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let p = match r.items.get(&0) {
                Some(bytes) => page(bytes).ok_or_else(|| std::io::Error::other("a bad page"))?,
                None => vec![0; PAGE],
            };
            self.pages.insert(gpa, p);
        }
        buf.copy_from_slice(&self.pages[&gpa]);
        Ok(())
    }
}

/// `KERNELOFFSET=` (hex) in VMCOREINFO.
pub(crate) fn kernel_offset(vmcoreinfo: &[u8]) -> Option<u64> {
    let text = String::from_utf8_lossy(vmcoreinfo);
    let hex = text.lines().find_map(|l| l.strip_prefix("KERNELOFFSET="))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// The `stats` reply: the hv's statistics block (what `qsctl stats` prints), read over the
/// link: each CPU's mode and exits by reason since load, the time it spent in the hv.
pub fn stats(cps: &Checkpoints) -> Value {
    use quicksilver_proto::stats::{ExitKind, Stats};
    let r = match cps.read(Op::ReadStats, IDLE) {
        Ok(r) => r,
        Err(e) => return error(format!("cannot read the hv's statistics: {e}")),
    };
    let Ok(s) = Stats::parse(r.items.get(&0).map_or(&[][..], Vec::as_slice)) else {
        return error(
            "the hv's statistics came malformed: the hv and qs-bridge come from different trees? rebuild both",
        );
    };
    let khz = s.header.tsc_khz.max(1);
    let cpus: Vec<Value> = s
        .cpus
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let exits: serde_json::Map<String, Value> = ExitKind::ALL
                .iter()
                .map(|k| (k.name().to_string(), json!(c.exits[*k as usize])))
                .collect();
            json!({
                "cpu": i,
                "active": c.active != 0,
                "exits": exits,
                "ms_in_hv": c.cycles_in_hv / khz,
            })
        })
        .collect();
    json!({
        "ok": true,
        "hv_version": s.hv_version(),
        "active_cpus": s.header.active_cpus,
        "activations": s.header.activations,
        "unexpected_exits": s.header.unexpected_exits,
        "link_dropped": s.header.link_dropped,
        // What the hv spent sending on the fast link: the whole of it and its NIC driver's
        // part (the rest builds the datagram: headers, tag), in µs over every datagram sent.
        "fast_link": {
            "datagrams_sent": s.header.net.sent,
            "send_us": s.header.net.send_cycles as f64 * 1000.0 / khz as f64,
            "nic_us": s.header.net.nic_cycles as f64 * 1000.0 / khz as f64,
        },
        "cpus": cpus,
    })
}

/// The `cpus ID` reply: each CPU's place, with its symbol where `symbols` knows it.
pub fn cpus(cps: &Checkpoints, symbols: Option<&Symbols>, id: u32) -> Value {
    match read_cpus(cps, symbols, id) {
        Ok(v) => v,
        Err(e) => error(format!("cannot read checkpoint {id}'s CPUs: {e}")),
    }
}

fn read_cpus(cps: &Checkpoints, symbols: Option<&Symbols>, id: u32) -> Result<Value, String> {
    let meta = cps.read(Op::ReadMeta, IDLE).map_err(|e| e.to_string())?;
    let facts = parse_facts(meta.items.get(&0).map_or(&[][..], Vec::as_slice))
        .ok_or("the machine's facts came malformed")?;
    let mut fetched = Fetched {
        cps,
        id,
        pages: HashMap::new(),
    };
    let offset = symbols
        .and_then(|_| assemble::vmcoreinfo(&mut fetched, facts.vmcoreinfo.0, facts.vmcoreinfo.1))
        .and_then(|v| kernel_offset(&v));
    let mut out = Vec::new();
    for cpu in 0..facts.cpus {
        let r = cps
            .read(Op::ReadCpu { id, cpu }, IDLE)
            .map_err(|e| e.to_string())?;
        let c = cpu_record_from_bytes(cpu, r.items.get(&0).map_or(&[][..], Vec::as_slice))
            .ok_or("a CPU's record came shorter than its header says")?;
        let symbol = match (symbols, offset) {
            (Some(s), Some(off)) if c.cpl == 0 => s.find(c.rip.wrapping_sub(off)),
            _ => None,
        };
        out.push(json!({
            "cpu": cpu,
            "apic_id": c.apic_id,
            "rip": format!("{:#x}", c.rip),
            "rsp": format!("{:#x}", c.gprs[4]),
            "cr3": format!("{:#x}", c.cr3),
            "cpl": c.cpl,
            "interrupts": c.rflags & 0x200 != 0,
            "symbol": symbol,
        }));
    }
    Ok(json!({
        "ok": true,
        "id": id,
        "kernel_offset": offset.map(|o| format!("{o:#x}")),
        "symbols": symbols.is_some(),
        "cpus": out,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_named_by_the_function_it_is_in() {
        let s = Symbols {
            text: vec![
                (0x1000, 0x20, "a".into()),
                (0x1020, 0x10, "b".into()),
                (0x2000, 0, "c".into()),
            ],
            data: Vec::new(),
            sections: Vec::new(),
            sites: PatchSites::default(),
        };
        assert_eq!(s.find(0x1000).as_deref(), Some("a+0x0"));
        assert_eq!(s.find(0x1025).as_deref(), Some("b+0x5"));
        assert_eq!(s.find(0x1030), None, "past b's end");
        assert_eq!(s.find(0x2000).as_deref(), Some("c+0x0"));
        assert_eq!(
            s.find(0x2345).as_deref(),
            Some("c+0x345"),
            "no size: up to the next"
        );
        assert_eq!(s.find(0xfff), None);
        assert_eq!(
            kernel_offset(b"OSRELEASE=6.1\nKERNELOFFSET=2a000000\n"),
            Some(0x2a00_0000)
        );
    }

    #[test]
    fn untyped_symbols_in_code_are_code() {
        use object::write::{Object as Writer, Symbol, SymbolSection};
        use object::{Architecture, BinaryFormat, Endianness, SectionKind, SymbolFlags};
        use object::{SymbolKind, SymbolScope};
        let mut w = Writer::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
        let text = w.add_section(Vec::new(), b".text".to_vec(), SectionKind::Text);
        w.append_section_data(text, &[0x90; 0x100], 16);
        let data = w.add_section(Vec::new(), b".data".to_vec(), SectionKind::Data);
        w.append_section_data(data, &[0; 0x100], 16);
        let mut sym = |name: &str, value, size, kind, section| {
            w.add_symbol(Symbol {
                name: name.as_bytes().to_vec(),
                value,
                size,
                kind,
                scope: SymbolScope::Linkage,
                weak: false,
                section: SymbolSection::Section(section),
                flags: SymbolFlags::None,
            });
        };
        sym("f", 0x10, 0x10, SymbolKind::Text, text);
        // As SYM_CODE_START leaves the entry code: no type.
        sym("asm_sysvec_x", 0x40, 0x20, SymbolKind::Label, text);
        sym("a_label_in_data", 0x40, 0, SymbolKind::Label, data);
        let path = std::env::temp_dir().join(format!("qs-untyped-{}.o", std::process::id()));
        std::fs::write(&path, w.write().unwrap()).unwrap();
        let s = Symbols::load(&path);
        let _ = std::fs::remove_file(&path);
        let s = s.unwrap();
        assert_eq!(s.find(0x48).as_deref(), Some("asm_sysvec_x+0x8"));
        assert_eq!(s.find(0x14).as_deref(), Some("f+0x4"));
        assert!(
            s.text.iter().all(|t| t.2 != "a_label_in_data"),
            "{:?}",
            s.text
        );
    }

    #[test]
    fn a_real_binary_has_symbols() {
        // This test binary is an ELF with function symbols of its own.
        let me = std::env::current_exe().unwrap();
        let s = Symbols::load(&me).unwrap();
        assert!(!s.text.is_empty());
        assert!(Symbols::load(Path::new("/nonexistent")).is_err());
        if let Ok(v) = std::env::var("QS_VMLINUX") {
            let s = Symbols::load(Path::new(&v)).unwrap();
            eprintln!("{v}: {} patch sites", s.sites.len());
        }
    }
}
