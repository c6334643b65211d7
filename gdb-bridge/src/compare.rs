//! `compare A B|now`: what changed between two kept checkpoints, or since one, in terms a
//! kernel engineer acts on, without exporting either. The hv's undo log knows every page
//! written between two checkpoints (each is logged at its first write after each checkpoint);
//! the agent sends them as runs (`Op::ReadChanged`). With the kernel's `vmlinux`
//! (`--vmlinux`), the pages inside the kernel's image are named by section, and those of its
//! data by the variables in them; the variables of at most 8 bytes get their old and new values
//! (between two checkpoints, reading those pages from both). The kernel patches its own text
//! only through jump labels, static calls, alternatives, ftrace and kprobes, so anything else
//! written there is a corruption, a bad module or a rootkit: between two checkpoints, each
//! changed page of text (up to 64) is read from both and every changed byte range
//! named by function and by what wrote it ([`crate::patch_sites`]); the text is flagged if one
//! is no place the kernel patches. Against now the text's pages cannot be read as they are:
//! changed text is flagged unverified. The rest of RAM is named by what the kernel used each
//! page for at the later checkpoint ([`crate::page_kinds`]: modules, page tables, slab, process
//! memory, page cache, free pages); what cannot be read is "other RAM".

use crate::checkpoints::{error, Checkpoints};
use crate::facts::parse_facts;
use crate::inspect::{kernel_offset, Fetched, Symbols};
use crate::page_kinds::{self, MemMap, Use};
use crate::patch_sites::{differences, Kind};
use quicksilver_checkpoint::assemble;
use quicksilver_checkpoint::elf::Pages;
use quicksilver_checkpoint::model::PAGE;
use quicksilver_proto::abi::{CheckpointChanged, CHANGED_RUN_PAGES};
use quicksilver_proto::link::checkpoint::Op;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

const IDLE: Duration = Duration::from_secs(10);
/// Where x86-64 maps the kernel's image (`__START_KERNEL_map`).
const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// Variables whose values are shown, at most (each needs its page read twice).
const VALUE_PAGES: usize = 16;
/// Names listed per region, at most.
const NAMES: usize = 40;
/// Pages of kernel text read from both checkpoints to tell the kernel's own patching from
/// other writes, at most (turning on ftrace's function tracer rewrites hundreds).
const TEXT_PAGES: usize = 64;
/// Changes to kernel text listed, at most.
const PATCHES: usize = 40;
/// Pages outside the kernel's image classified by their `struct page`, at most (each 64 cost
/// up to a page read; the rest are "other RAM").
const OTHER_PAGES: usize = 16384;

/// The runs of `abi::CheckpointChanged`'s answer, as (first page, pages).
fn runs(bytes: &[u8]) -> Option<(CheckpointChanged, Vec<(u64, u64)>)> {
    let h = CheckpointChanged::from_bytes(bytes)?;
    let at = std::mem::size_of::<CheckpointChanged>();
    let body = bytes.get(at..at + h.runs as usize * 8)?;
    let runs = body
        .chunks_exact(8)
        .map(|c| {
            let v = u64::from_le_bytes(c.try_into().unwrap_or_default());
            (v & !(PAGE as u64 - 1), (v & (CHANGED_RUN_PAGES - 1)) + 1)
        })
        .collect();
    Some((h, runs))
}

/// `NUMBER(phys_base)=` (decimal) in VMCOREINFO.
fn phys_base(vmcoreinfo: &[u8]) -> Option<u64> {
    let text = String::from_utf8_lossy(vmcoreinfo);
    let v = text
        .lines()
        .find_map(|l| l.strip_prefix("NUMBER(phys_base)="))?;
    v.trim().parse::<i64>().ok().map(|v| v as u64)
}

/// The image's init sections, freed after boot.
const FREED_INIT: &str = "freed init memory";

/// The region a section's name falls in.
fn region(section: &str) -> &'static str {
    match section {
        s if s.starts_with(".text") || s == ".noinstr.text" || s == ".entry.text" => "kernel text",
        s if s.starts_with(".rodata") || s == "__ex_table" || s.starts_with("__param") => {
            "kernel read-only data"
        }
        s if s.starts_with(".init") || s.starts_with(".exit") => FREED_INIT,
        ".bss" | ".brk" => "kernel bss",
        s if s.starts_with(".data..percpu") => "kernel per-CPU data (boot copy)",
        _ => "kernel data",
    }
}

/// The `compare A B|now` reply.
pub fn compare(cps: &Checkpoints, symbols: Option<&Symbols>, a: u32, b: Option<u32>) -> Value {
    match run(cps, symbols, a, b) {
        Ok(v) => v,
        Err(e) => error(format!(
            "cannot compare checkpoint {a} with {}: {e}",
            b.map_or("now".to_string(), |b| b.to_string())
        )),
    }
}

fn run(
    cps: &Checkpoints,
    symbols: Option<&Symbols>,
    a: u32,
    b: Option<u32>,
) -> Result<Value, String> {
    let r = cps
        .read(
            Op::ReadChanged {
                a,
                b: b.unwrap_or(0),
            },
            IDLE,
        )
        .map_err(|e| e.to_string())?;
    let (h, runs) = runs(r.items.get(&0).map_or(&[][..], Vec::as_slice))
        .ok_or("the machine's list of pages came malformed")?;
    // The kernel's place: where its image is in physical memory and how far KASLR moved it.
    let meta = cps.read(Op::ReadMeta, IDLE).map_err(|e| e.to_string())?;
    let facts = parse_facts(meta.items.get(&0).map_or(&[][..], Vec::as_slice))
        .ok_or("the machine's facts came malformed")?;
    let mut at_a = Fetched {
        cps,
        id: a,
        pages: HashMap::new(),
    };
    let vmcoreinfo =
        assemble::vmcoreinfo(&mut at_a, facts.vmcoreinfo.0, facts.vmcoreinfo.1).unwrap_or_default();
    let place = kernel_offset(&vmcoreinfo).zip(phys_base(&vmcoreinfo));
    // Page by page: its region, and for the kernel's data the variables in it.
    let mut regions: BTreeMap<&'static str, (u64, Vec<String>)> = BTreeMap::new();
    let mut small: Vec<(u64, u64, String, u64)> = Vec::new(); // (link addr, size, name, gpa)
    let mut text_pages: Vec<(u64, u64)> = Vec::new(); // (gpa, link addr)
    let mut other: Vec<u64> = Vec::new(); // outside the kernel's image
    for &(first, n) in &runs {
        for k in 0..n {
            let gpa = first + k * PAGE as u64;
            let link = place.map(|(off, base)| {
                gpa.wrapping_sub(base)
                    .wrapping_add(START_KERNEL_MAP)
                    .wrapping_sub(off)
            });
            let section = symbols.zip(link).and_then(|(s, v)| {
                s.sections
                    .iter()
                    .find(|(start, size, _)| (*start..start + size).contains(&v))
                    .map(|(_, _, name)| name.as_str())
            });
            let Some(section) = section else {
                other.push(gpa);
                continue;
            };
            let what = region(section);
            if what == FREED_INIT {
                // Ordinary RAM since boot (a module loaded later may live there): named by
                // what the kernel uses it for, as the rest of RAM.
                other.push(gpa);
                continue;
            }
            let e = regions.entry(what).or_default();
            e.0 += 1;
            let (Some(s), Some(v)) = (symbols, link) else {
                continue;
            };
            let page_start = v & !(PAGE as u64 - 1);
            let in_page = |list: &Vec<(u64, u64, String)>| -> Vec<(u64, u64, String)> {
                let i = list.partition_point(|x| x.0 < page_start);
                let mut out: Vec<(u64, u64, String)> = list[i..]
                    .iter()
                    .take_while(|x| x.0 < page_start + PAGE as u64)
                    .cloned()
                    .collect();
                // The variable that starts before the page and runs into it.
                if let Some(prev) = i.checked_sub(1).map(|j| &list[j]) {
                    if prev.0 + prev.1 > page_start {
                        out.insert(0, prev.clone());
                    }
                }
                out
            };
            let names = if what == "kernel text" {
                text_pages.push((gpa, page_start));
                in_page(&s.text)
            } else {
                in_page(&s.data)
            };
            for (addr, size, name) in names {
                if e.1.len() < NAMES && !e.1.contains(&name) {
                    e.1.push(name.clone());
                }
                if what != "kernel text" && (1..=8).contains(&size) && addr >= page_start {
                    small.push((addr, size, name, gpa + (addr - page_start)));
                }
            }
        }
    }
    // RAM outside the image, by what the kernel used it for (at the later checkpoint).
    let mut at_b = b.map(|id| Fetched {
        cps,
        id,
        pages: HashMap::new(),
    });
    let layout = page_kinds::Layout::parse(&vmcoreinfo);
    let vmemmap_base = symbols.and_then(|s| s.data.iter().find(|d| d.2 == "vmemmap_base"));
    let mut map = match (layout, place, vmemmap_base) {
        (Some(layout), Some((off, base)), Some(v)) => {
            let pages: &mut dyn Pages = match at_b.as_mut() {
                Some(f) => f,
                None => &mut at_a,
            };
            MemMap::new(pages, layout, base, v.0.wrapping_add(off))
        }
        _ => None,
    };
    let modules = map.as_mut().map(MemMap::module_pages).unwrap_or_default();
    for (i, &gpa) in other.iter().enumerate() {
        let kind = match map.as_mut() {
            _ if modules.binary_search(&gpa).is_ok() => Use::Module,
            Some(m) if i < OTHER_PAGES => m.classify(gpa),
            _ => Use::Unknown,
        };
        regions.entry(kind.name()).or_default().0 += 1;
    }
    drop(map);
    // Old and new values of small variables, and what was written into the kernel's text,
    // between two checkpoints: the pages from both.
    let mut values = Vec::new();
    let text = match (at_b.as_mut(), symbols) {
        (Some(at_b), Some(s)) => text_changes(&mut at_a, at_b, s, &text_pages),
        _ => TextChanges::default(),
    };
    if let Some(at_b) = at_b.as_mut() {
        let mut pages_seen: Vec<u64> = Vec::new();
        for (addr, size, name, gpa) in &small {
            let page_gpa = gpa & !(PAGE as u64 - 1);
            if !pages_seen.contains(&page_gpa) {
                if pages_seen.len() == VALUE_PAGES {
                    break;
                }
                pages_seen.push(page_gpa);
            }
            let read = |f: &mut Fetched| {
                let mut p = [0u8; PAGE];
                quicksilver_checkpoint::elf::Pages::read_page(f, page_gpa, &mut p).ok()?;
                let at = (gpa - page_gpa) as usize;
                let bytes = p.get(at..at + *size as usize)?;
                let mut v = [0u8; 8];
                v[..bytes.len()].copy_from_slice(bytes);
                Some(u64::from_le_bytes(v))
            };
            if let (Some(old), Some(new)) = (read(&mut at_a), read(at_b)) {
                if old != new {
                    values.push(json!({ "name": name, "address": format!("{addr:#x}"), "size": size, "old": old, "new": new }));
                }
            }
        }
    }
    let list: Vec<Value> = regions
        .iter()
        .map(|(what, (pages, names))| {
            json!({
                "region": what,
                "pages": pages,
                // Between two checkpoints, text is flagged for what is not the kernel's own
                // patching; since one (against now) every change is, unread.
                "flagged": *what == "kernel text" && (b.is_none() || symbols.is_none() || text.unexpected > 0 || text.unread > 0),
                "names": names,
            })
        })
        .collect();
    Ok(json!({
        "ok": true,
        "a": a,
        "b": b,
        "pages": h.pages,
        "runs": runs.len(),
        "truncated": h.truncated != 0,
        "symbols": symbols.is_some() && place.is_some(),
        "regions": list,
        "values": values,
        "patches": text.patches,
        "unexpected": text.unexpected,
    }))
}

/// What was written into the kernel's text between two checkpoints.
#[derive(Default)]
struct TextChanges {
    /// Each change (at most [`PATCHES`]): where, by whom, its bytes before and after.
    patches: Vec<Value>,
    /// Changes at no place the kernel patches itself.
    unexpected: usize,
    /// Changed text pages not read (past [`TEXT_PAGES`], or a read that failed).
    unread: usize,
}

/// Reads each changed text page (gpa, link address) from both checkpoints and classifies
/// every changed byte range by the vmlinux's patch sites.
fn text_changes(
    at_a: &mut Fetched,
    at_b: &mut Fetched,
    s: &Symbols,
    pages: &[(u64, u64)],
) -> TextChanges {
    let mut t = TextChanges {
        unread: pages.len().saturating_sub(TEXT_PAGES),
        ..TextChanges::default()
    };
    let hex = |b: &[u8]| -> String { b.iter().take(16).map(|x| format!("{x:02x}")).collect() };
    for &(gpa, link) in pages.iter().take(TEXT_PAGES) {
        let (mut old, mut new) = ([0u8; PAGE], [0u8; PAGE]);
        if at_a.read_page(gpa, &mut old).is_err() || at_b.read_page(gpa, &mut new).is_err() {
            t.unread += 1;
            continue;
        }
        for (at, len) in differences(&old, &new) {
            let (o, n, addr) = (&old[at..at + len], &new[at..at + len], link + at as u64);
            let kind = s.sites.classify(addr, o, n);
            t.unexpected += (kind == Kind::Unexpected) as usize;
            if t.patches.len() < PATCHES {
                t.patches.push(json!({
                    "at": s.find(addr).unwrap_or_else(|| format!("{addr:#x}")),
                    "kind": kind.name(),
                    "expected": kind != Kind::Unexpected,
                    "bytes": len,
                    "old": hex(o),
                    "new": hex(n),
                }));
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_facts_read_as_the_agent_writes_them() {
        let h = CheckpointChanged {
            pages: 5,
            runs: 2,
            ..CheckpointChanged::default()
        };
        let mut b = vec![0u8; std::mem::size_of::<CheckpointChanged>()];
        let at = std::mem::offset_of!(CheckpointChanged, pages);
        b[at..at + 8].copy_from_slice(&h.pages.to_le_bytes());
        let at = std::mem::offset_of!(CheckpointChanged, runs);
        b[at..at + 4].copy_from_slice(&h.runs.to_le_bytes());
        b.extend_from_slice(&(0x10_0000u64 | 3).to_le_bytes());
        b.extend_from_slice(&0x20_0000u64.to_le_bytes());
        let (got, r) = runs(&b).unwrap();
        assert_eq!(got.pages, 5);
        assert_eq!(r, vec![(0x10_0000, 4), (0x20_0000, 1)]);
        assert!(runs(&b[..b.len() - 1]).is_none(), "a run cut short");
        assert_eq!(
            phys_base(b"NUMBER(phys_base)=-2113929216\n"),
            Some((-2113929216i64) as u64)
        );
        assert_eq!(region(".text"), "kernel text");
        assert_eq!(region(".bss"), "kernel bss");
        assert_eq!(region(".data"), "kernel data");
        assert_eq!(region(".rodata"), "kernel read-only data");
        assert_eq!(region(".init.data"), FREED_INIT);
    }
}
