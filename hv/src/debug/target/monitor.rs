//! gdb's `monitor` commands (`qRcmd`): what the hv, its CPUs and the session are doing, the
//! detach policy, and guest-physical memory. The arguments are parsed by plain functions
//! ([`hex`], [`devirt_word`], [`phys_args`]); the handler only reads the hv and prints.

use super::{Buf, Debugger, Devirt, Error};
use crate::vmm::{self, COUNTERS};
use core::fmt::Write;
use core::sync::atomic::Ordering::*;
use gdbstub::outputln;
use gdbstub::target::ext::monitor_cmd::{ConsoleOutput, MonitorCmd};

const HELP: &str = "Quicksilver monitor commands:
  status               the hv, the CPUs, the session
  stats                exits and refusals per CPU
  kaslr                the kernel's KASLR offset and the gdb command that uses it
  cpus                 each CPU: APIC ID, where it stopped, why
  devirt [deactivate|stay]  what detach does: leave guest mode (default) or keep the hv active
  phys ADDR [LEN]      read guest-physical memory (hex, up to 256 bytes)
  checkpoint           checkpoint the whole machine where it stands
  checkpoints          the checkpoints kept
  rollback ID          put the whole machine back at checkpoint ID
  help                 this list";

/// Bytes `phys` shows without a LEN.
pub const PHYS_DEFAULT_LEN: usize = 16;
/// Most bytes `phys` shows at once.
pub const PHYS_MAX_LEN: usize = 256;

/// A number as gdb users type addresses: hex, with or without `0x`.
pub fn hex(word: &str) -> Option<u64> {
    let digits = word
        .strip_prefix("0x")
        .or_else(|| word.strip_prefix("0X"))
        .unwrap_or(word);
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

/// `devirt`'s argument: the policy to set, `Ok(None)` to only show it, or the word that is
/// none of `deactivate` and `stay`.
pub fn devirt_word(word: Option<&str>) -> Result<Option<Devirt>, &str> {
    match word {
        None => Ok(None),
        Some("deactivate") => Ok(Some(Devirt::Deactivate)),
        Some("stay") => Ok(Some(Devirt::Stay)),
        Some(other) => Err(other),
    }
}

/// Guest-physical bytes `phys` reads: `len` (1 to [`PHYS_MAX_LEN`]) from `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhysRange {
    pub addr: u64,
    pub len: usize,
}

impl PhysRange {
    /// The last byte's address.
    pub fn last(&self) -> u64 {
        self.addr + (self.len as u64 - 1)
    }
}

/// Why `phys`'s arguments name nothing to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhysError {
    /// No ADDR, or one that is not a hex number.
    Usage,
    /// The range runs past the end of the address space.
    Wraps { addr: u64, len: usize },
}

/// `phys ADDR [LEN]`'s arguments. A missing or unreadable LEN means [`PHYS_DEFAULT_LEN`]; a
/// LEN above [`PHYS_MAX_LEN`] is cut to it, and 0 shows one byte.
pub fn phys_args<'a>(mut words: impl Iterator<Item = &'a str>) -> Result<PhysRange, PhysError> {
    let addr = words.next().and_then(hex).ok_or(PhysError::Usage)?;
    let len = words.next().and_then(hex).map_or(PHYS_DEFAULT_LEN, |l| {
        l.clamp(1, PHYS_MAX_LEN as u64) as usize
    });
    match addr.checked_add(len as u64 - 1) {
        Some(_) => Ok(PhysRange { addr, len }),
        None => Err(PhysError::Wraps { addr, len }),
    }
}

fn policy_line(p: Devirt) -> &'static str {
    match p {
        Devirt::Deactivate => "deactivate (detach leaves guest mode on every CPU)",
        Devirt::Stay => "stay (detach keeps the hv active; qsctl deactivate ends it)",
    }
}

impl MonitorCmd for Debugger {
    fn handle_monitor_cmd(&mut self, cmd: &[u8], mut out: ConsoleOutput<'_>) -> Result<(), Error> {
        let cmd = core::str::from_utf8(cmd).unwrap_or("");
        let mut words = cmd.split_whitespace();
        let hv = self.hv;
        match words.next().unwrap_or("help") {
            "help" => outputln!(out, "{}", HELP),
            "status" => {
                outputln!(
                    out,
                    "hv active on {} of {} CPUs; {} stopped for gdb",
                    COUNTERS.active_cpus.load(Relaxed),
                    hv.cpus,
                    self.threads()
                );
                outputln!(
                    out,
                    "breakpoints: {} software, {} of {} hardware slots (the kernel uses {})",
                    self.sw.iter().flatten().count(),
                    self.slots.armed().count_ones(),
                    4 - self.slots.kernel.count_ones(),
                    self.slots.kernel.count_ones()
                );
                outputln!(
                    out,
                    "on detach: {}",
                    match self.policy {
                        Devirt::Deactivate => "every CPU leaves guest mode (devirt deactivate)",
                        Devirt::Stay => "the hv stays active (devirt stay)",
                    }
                );
                outputln!(out, "hv code intact: {}", hv.code_intact());
                let us = crate::vcpu::STOP.last_gather_ticks() * 1000 / (hv.tsc_khz as u64).max(1);
                outputln!(out, "last stop gathered every CPU in {us} us");
            }
            "stats" => {
                outputln!(
                    out,
                    "activations {}, deactivations {}, unexpected exits {}, hv memory refusals {}",
                    COUNTERS.activations.load(Relaxed),
                    COUNTERS.deactivations.load(Relaxed),
                    COUNTERS.unexpected.load(Relaxed),
                    COUNTERS.hv_refusals.load(Relaxed)
                );
                for i in 0..hv.cpus {
                    let Some(s) = hv.cpu(i).map(|c| c.shared.stats()) else {
                        continue;
                    };
                    if s.seen == 0 {
                        continue;
                    }
                    let e = &s.exits;
                    outputln!(
                        out,
                        "cpu {i}: cpuid {} msr {} vmmcall {} npf {} debug {} other {}",
                        e[0],
                        e[1],
                        e[2],
                        e[5],
                        e[8],
                        e[7]
                    );
                }
            }
            "kaslr" => match hv.kernel_text {
                0 => outputln!(
                    out,
                    "the agent could not find the kernel's text (no kprobes?): KASLR offset unknown; \
                     read _text from /proc/kallsyms on the machine and use symbol-file vmlinux -o <_text - {:#x}>",
                    hv.kernel_text_link
                ),
                text => {
                    let off = text.wrapping_sub(hv.kernel_text_link);
                    outputln!(
                        out,
                        "KASLR offset {off:#x}: _text at {text:#x}, linked at {:#x}",
                        hv.kernel_text_link
                    );
                    outputln!(
                        out,
                        "gdb already relocated vmlinux from qOffsets; by hand: symbol-file vmlinux -o {off:#x}"
                    );
                }
            },
            "cpus" => {
                for i in 0..hv.cpus {
                    let Some(c) = hv.cpu(i).filter(|c| c.shared.is_active()) else {
                        continue;
                    };
                    let apic = c.shared.apic_id();
                    match self.parked.as_ref().and_then(|p| p.peek(i)) {
                        Some(st) => {
                            let s = &st.state;
                            outputln!(
                                out,
                                "cpu {i} (thread {}): apic {apic} stopped rip {:#x} cpl {} cr3 {:#x} dr7 {:#x} dr0-3 {:x?}",
                                i + 1,
                                s.rip,
                                s.cpl,
                                s.cr3,
                                s.dr7,
                                s.dr
                            );
                        }
                        None => outputln!(out, "cpu {i}: apic {apic} running"),
                    }
                }
            }
            "checkpoint" => self.monitor_checkpoint(&mut out),
            "checkpoints" => self.monitor_checkpoints(&mut out),
            "rollback" => self.monitor_rollback(words.next(), &mut out),
            "devirt" => {
                match devirt_word(words.next()) {
                    Ok(Some(p)) => self.policy = p,
                    Ok(None) => {}
                    Err(other) => {
                        outputln!(
                            out,
                            "unknown policy {other:?}: use devirt deactivate or devirt stay"
                        );
                        return Ok(());
                    }
                }
                outputln!(out, "devirt policy: {}", policy_line(self.policy));
            }
            "phys" => {
                let r = match phys_args(words) {
                    Ok(r) => r,
                    Err(PhysError::Usage) => {
                        outputln!(out, "usage: monitor phys ADDR [LEN] (hex)");
                        return Ok(());
                    }
                    Err(PhysError::Wraps { addr, len }) => {
                        outputln!(
                            out,
                            "cannot read {len} bytes at physical {addr:#x}: past the end of the address space"
                        );
                        return Ok(());
                    }
                };
                let (addr, len) = (r.addr, r.len);
                let mut buf = [0u8; PHYS_MAX_LEN];
                if hv.owns(addr)
                    || hv.owns(r.last())
                    || !vmm::read_guest_phys(hv, addr, &mut buf[..len])
                {
                    outputln!(out, "cannot read {len} bytes at physical {addr:#x}: outside RAM the hv maps, or the hv's own memory");
                    return Ok(());
                }
                for (row, chunk) in buf[..len].chunks(16).enumerate() {
                    let mut line = Buf {
                        buf: &mut [0u8; 80],
                        len: 0,
                    };
                    let _ = write!(line, "{:#012x}:", addr + 16 * row as u64);
                    for b in chunk {
                        let _ = write!(line, " {b:02x}");
                    }
                    let n = line.len;
                    outputln!(out, "{}", core::str::from_utf8(&line.buf[..n]).unwrap_or(""));
                }
            }
            other => outputln!(out, "unknown command {other:?}: monitor help lists the commands"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_numbers_are_read_with_or_without_0x() {
        assert_eq!(hex("1000"), Some(0x1000));
        assert_eq!(hex("0x1000"), Some(0x1000));
        assert_eq!(hex("0XfFfF"), Some(0xffff));
        assert_eq!(hex("ffffffff81000000"), Some(0xffff_ffff_8100_0000));
        for bad in [
            "",
            "0x",
            "g",
            "0x0x10",
            "+10",
            "-1",
            "1_000",
            "10000000000000000",
        ] {
            assert_eq!(hex(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn devirt_takes_deactivate_or_stay_and_names_any_other_word() {
        assert_eq!(devirt_word(None), Ok(None));
        assert_eq!(
            devirt_word(Some("deactivate")),
            Ok(Some(Devirt::Deactivate))
        );
        assert_eq!(devirt_word(Some("stay")), Ok(Some(Devirt::Stay)));
        assert_eq!(devirt_word(Some("Stay")), Err("Stay"));
        assert_eq!(devirt_word(Some("leave")), Err("leave"));
    }

    #[test]
    fn phys_reads_16_bytes_by_default_and_never_more_than_256() {
        let args = |s: &'static str| phys_args(s.split_whitespace());
        assert_eq!(
            args("0x1000"),
            Ok(PhysRange {
                addr: 0x1000,
                len: 16
            })
        );
        assert_eq!(
            args("1000 40"),
            Ok(PhysRange {
                addr: 0x1000,
                len: 0x40
            })
        );
        assert_eq!(
            args("1000 0x100"),
            Ok(PhysRange {
                addr: 0x1000,
                len: 256
            })
        );
        assert_eq!(
            args("1000 1000"),
            Ok(PhysRange {
                addr: 0x1000,
                len: 256
            })
        );
        assert_eq!(
            args("1000 0"),
            Ok(PhysRange {
                addr: 0x1000,
                len: 1
            })
        );
        assert_eq!(
            args("1000 lots"),
            Ok(PhysRange {
                addr: 0x1000,
                len: 16
            }),
            "a LEN that is not a number is the default"
        );
        assert_eq!(args("1000 20").map(|r| r.last()), Ok(0x101f));
    }

    #[test]
    fn phys_without_an_address_shows_the_usage_and_refuses_a_range_that_wraps() {
        let args = |s: &'static str| phys_args(s.split_whitespace());
        assert_eq!(args(""), Err(PhysError::Usage));
        assert_eq!(args("ram"), Err(PhysError::Usage));
        assert_eq!(
            args("fffffffffffffff8 10"),
            Err(PhysError::Wraps {
                addr: 0xffff_ffff_ffff_fff8,
                len: 16
            })
        );
        assert_eq!(
            args("fffffffffffffff0 10").map(|r| r.last()),
            Ok(u64::MAX),
            "the last 16 bytes are a range"
        );
    }
}
