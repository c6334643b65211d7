//! `qsctl`: control Quicksilver from inside the machine it protects.
//!
//! ```text
//! qsctl status                    dormant or active, hv version, memory, CPUs
//! qsctl activate                  put the hypervisor under the running kernel, every CPU
//! qsctl deactivate                return every CPU to native
//! qsctl stats                     per-CPU exits by reason, time in the hv, refusals
//! qsctl probe [--expect STATE]    each CPU as a pinned process sees it (STATE: active|native)
//! qsctl peek OFFSET               the kernel reads 8 bytes of the hv's memory
//! qsctl poke OFFSET VALUE         the kernel writes 8 bytes of the hv's memory (active only)
//! qsctl peek-phys ADDRESS         the kernel reads 8 bytes of device memory or a hole
//! qsctl peek-nic BAR OFFSET [--width N]  the kernel reads a register of the fast link's NIC
//!                                 through the agent's mapping (N bytes: 1, 2, 4 (default), 8)
//! qsctl poke-nic BAR OFFSET VALUE [--width N]  the kernel writes one (active only)
//! qsctl bench-switch N            N activate/deactivate round trips and N of the IPI floor
//!                                 (two empty calls on every CPU); one JSON line of medians
//! qsctl checkpoint                checkpoint the whole machine (activates the hv if dormant)
//! qsctl checkpoint --delete ID|all  delete one, or all (then the hv goes dormant again if a
//!                                 checkpoint woke it)
//! qsctl checkpoint --every MS|off [--keep N]  a checkpoint every MS ms, the last N kept
//!                                 (default 20): the periodic ring; off stops it
//! qsctl checkpoints               the checkpoints kept: id, age, pause, pages, bytes, parent
//! qsctl export ID FILE [--elf]    a checkpoint into FILE (.qsc, or an ELF core for crash/gdb)
//! qsctl rollback ID               put the whole machine back at checkpoint ID
//! ```

mod checkpoint;
mod export;
mod ioctl;

use anyhow::{bail, Context, Result};
use quicksilver_proto::abi;
use quicksilver_proto::ioctl::{SwitchResult, DEVICE};
use quicksilver_proto::stats::{
    device, CpuStats, DevicesRecord, ExitKind, NetRecord, Stats, SHADOW_KNOWN,
};
use std::fs::{File, OpenOptions};

fn open() -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(DEVICE)
        .with_context(|| {
            format!("cannot open {DEVICE}: load the agent first (insmod quicksilver.ko image=PATH)")
        })
}

fn status_error(s: i64) -> anyhow::Error {
    anyhow::anyhow!("{}", abi::status_message(s))
}

fn read_stats(dev: &File) -> Result<Stats> {
    let mut buf = vec![0u8; 64 << 10];
    let status = ioctl::stats(dev, &mut buf).context("statistics request failed")?;
    if status != 0 {
        return Err(status_error(status));
    }
    Stats::parse(&buf).map_err(|e| anyhow::anyhow!("the hv's statistics block is bad: {e:?}"))
}

fn switch(dev: &File, activate: bool) -> Result<SwitchResult> {
    let r = if activate {
        ioctl::activate(dev)
    } else {
        ioctl::deactivate(dev)
    }
    .context("switch request failed")?;
    if r.status != 0 {
        let cpu = if r.failed_cpu >= 0 {
            format!(" (CPU {})", r.failed_cpu)
        } else {
            String::new()
        };
        return Err(status_error(r.status).context(format!(
            "{} refused{cpu}",
            if activate { "activate" } else { "deactivate" }
        )));
    }
    Ok(r)
}

fn online_cpus() -> Vec<u32> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as u32;
    (0..n)
        .filter(|c| {
            std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu{c}/online"))
                .map(|s| s.trim() == "1")
                .unwrap_or(true) // cpu0 often has no "online" file: it cannot go offline
        })
        .collect()
}

fn pin_to(cpu: u32) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it; the call reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu as usize, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "cannot pin to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Does CPUID, from user space on this CPU, answer with Quicksilver's signature?
fn cpuid_signature() -> bool {
    let r = core::arch::x86_64::__cpuid(abi::CPUID_SIGNATURE_LEAF);
    let mut sig = [0u8; 12];
    sig[..4].copy_from_slice(&r.ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&r.ecx.to_le_bytes());
    sig[8..].copy_from_slice(&r.edx.to_le_bytes());
    sig == abi::CPUID_SIGNATURE
}

fn cmd_status() -> Result<()> {
    let dev = open()?;
    let s = read_stats(&dev)?;
    let h = &s.header;
    let state = if h.active_cpus > 0 {
        "active"
    } else {
        "dormant"
    };
    println!(
        "state: {state} ({} of {} online CPUs in guest mode)",
        h.active_cpus,
        online_cpus().len()
    );
    println!(
        "hv: version {}, {} KiB at {:#x}",
        s.hv_version(),
        h.mem_bytes >> 10,
        h.mem_base_pa
    );
    println!("cpus: {} possible, {} online", h.cpus, online_cpus().len());
    println!(
        "code: {}",
        if h.code_intact == 1 {
            "intact (checksum matches the image)"
        } else {
            "MODIFIED"
        }
    );
    println!(
        "switches: {} activations, {} deactivations",
        h.activations, h.deactivations
    );
    let info = ioctl::agent_info(&dev).context("agent information request failed")?;
    if info.store_chunks == 0 {
        println!("store: none (loaded with store_mem=0)");
    } else {
        println!(
            "store: {} MiB in {} blocks of {} MiB",
            info.store_bytes >> 20,
            info.store_chunks,
            abi::STORE_CHUNK_SIZE >> 20
        );
    }
    if let Some(line) = fast_link_line() {
        println!("{line}");
    }
    Ok(())
}

/// The fast link as the agent was loaded (`net=`, `net_ip=`, `net_port=`) and who holds the
/// NIC now (the agent's stub driver, `quicksilver-net`, while the hv drives it); `None`
/// without `net=`.
fn fast_link_line() -> Option<String> {
    let param = |name: &str| {
        std::fs::read_to_string(format!("/sys/module/quicksilver/parameters/{name}"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let net = param("net");
    if net.is_empty() {
        return None;
    }
    // The agent takes 00:04.0 as well as 0000:00:04.0; sysfs names the device with its domain.
    let bdf = if net.matches(':').count() == 1 {
        format!("0000:{net}")
    } else {
        net.clone()
    };
    let driver = std::fs::read_link(format!("/sys/bus/pci/devices/{bdf}/driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "no driver".into());
    Some(format!(
        "fast link: NIC {bdf} (held by {driver}), {}:{}",
        param("net_ip"),
        param("net_port")
    ))
}

fn cmd_switch(activate: bool) -> Result<()> {
    let dev = open()?;
    let r = switch(&dev, activate)?;
    println!(
        "{} on {} CPUs in {} us",
        if activate { "active" } else { "native" },
        r.cpus,
        r.elapsed_ns / 1000
    );
    Ok(())
}

fn cmd_stats() -> Result<()> {
    let dev = open()?;
    let s = read_stats(&dev)?;
    let h = &s.header;
    let khz = h.tsc_khz.max(1);
    print!("cpu  state   ");
    for k in ExitKind::ALL {
        print!("{:>9}", k.name());
    }
    println!("  hv-time-us  act-us  deact-us");
    for (i, c) in s.cpus.iter().enumerate().filter(|(_, c)| c.seen == 1) {
        print!(
            "{i:<4} {:<7} ",
            if c.active == 1 { "active" } else { "native" }
        );
        for n in c.exits {
            print!("{n:>9}");
        }
        println!(
            "  {:>10}  {:>6}  {:>8}  {}",
            c.cycles_in_hv * 1000 / khz,
            c.last_activate_cycles * 1000 / khz,
            c.last_deactivate_cycles * 1000 / khz,
            stack_figure(c)
        );
    }
    println!(
        "refused: {} accesses to hv memory (last at {:#x}), {} MSR writes, {} SVM instructions",
        h.hv_memory_refusals, h.last_refused_gpa, h.msr_refusals, h.svm_insn_refusals
    );
    println!(
        "code: {}",
        if h.code_intact == 1 {
            "intact"
        } else {
            "MODIFIED"
        }
    );
    let link = match h.link_state {
        0 => "off",
        1 => "waiting for a bridge",
        _ => "bridge authenticated",
    };
    println!(
        "link: {link}; {} frames dropped, {} wrong keys, {} unauthenticated requests ignored, {} frames with no consumer yet (bulk, other control), {} checkpoint replies from before a rollback dropped",
        h.link_dropped, h.link_wrong_keys, h.link_unauthenticated, h.link_unrouted, h.link_stale_replies
    );
    println!("{}", fast_link_stats(&h.net, h.tsc_khz));
    if h.breakpoints_left > 0 {
        println!(
            "WARNING: {} gdb breakpoints could not be removed from kernel memory when a gdb session \
             ended (the hv's log on the console names them): the kernel oopses if it runs into one; \
             reboot when you can",
            h.breakpoints_left
        );
    }
    println!("{}", devices_line(&h.devices));
    println!("unexpected exits: {}", h.unexpected_exits);
    let r = &h.last_unexpected;
    if r.valid == 1 {
        println!(
            "last unexpected exit: cpu {} code {:#x} info1 {:#x} info2 {:#x} intinfo {:#x}\n  rip {:#x} rsp {:#x} rflags {:#x} cs {:#x} cpl {}\n  cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
            r.cpu, r.exit_code, r.exit_info1, r.exit_info2, r.exit_int_info, r.rip, r.rsp,
            r.rflags, r.cs, r.cpl, r.cr0, r.cr2, r.cr3, r.cr4, r.efer
        );
    }
    Ok(())
}

/// The deepest this CPU's hv stack has been: it has no guard page, so a figure near the
/// whole means the next deeper path overwrites the CPU's own state below it.
fn stack_figure(c: &CpuStats) -> String {
    if c.stack_size == 0 {
        return "hv stack: unknown".into();
    }
    format!(
        "hv stack: {} KiB of {} KiB used",
        c.stack_used.div_ceil(1024),
        c.stack_size / 1024
    )
}

/// The fast link as the hv sees it: whether a bridge is in, what went through the NIC, where
/// a datagram's time goes, and every datagram it dropped, by reason.
fn fast_link_stats(n: &NetRecord, tsc_khz: u64) -> String {
    let state = match n.state {
        0 => "off (no NIC)",
        1 => "waiting for a bridge",
        2 => "bridge authenticated, answering on the serial link",
        _ => "bridge authenticated, answering on the fast link",
    };
    // Microseconds per datagram sent: all of sending, and the driver's part.
    let per = |cycles: u64| match (n.sent, tsc_khz) {
        (0, _) | (_, 0) => "-".to_string(),
        (sent, khz) => format!("{:.1}", cycles as f64 * 1000.0 / khz as f64 / sent as f64),
    };
    format!(
        "fast link: {state}; frames: {} in, {} out ({} not sent); datagrams: {} accepted, {} sent \
         ({} us each, {} us of it in the NIC's driver); \
         {} ARP requests answered; {} wrong keys; dropped: {} malformed, {} fragmented, \
         {} oversized, {} not for us, {} bad magic, {} unauthenticated, {} bad tag, \
         {} wrong session, {} replayed, {} spoofed; {} configuration-space accesses to the NIC refused",
        n.rx_frames,
        n.tx_frames,
        n.tx_dropped,
        n.accepted,
        n.sent,
        per(n.send_cycles),
        per(n.nic_cycles),
        n.arp_answered,
        n.wrong_key,
        n.malformed,
        n.fragmented,
        n.oversized,
        n.not_for_us,
        n.bad_magic,
        n.unauthenticated,
        n.bad_tag,
        n.wrong_session,
        n.replayed,
        n.spoofed,
        n.config_refused
    )
}

/// The legacy devices as the hv last captured them (each `freeze --check` does), and the
/// write-only registers it shadows now.
fn devices_line(d: &DevicesRecord) -> String {
    let shadow = |v: u32| {
        if v & SHADOW_KNOWN != 0 {
            format!("{:#04x}", v as u8)
        } else {
            "unknown".to_string()
        }
    };
    let mut found = Vec::new();
    let has = |bit: u32| d.present & bit != 0;
    if has(device::IOAPIC) {
        found.push(format!(
            "ioapic ({} pins, {} unmasked)",
            d.ioapic_pins,
            d.ioapic_unmasked.count_ones()
        ));
    }
    if has(device::PIC) {
        found.push(format!(
            "pic (imr {:#04x}/{:#04x})",
            d.pic_imr as u8,
            (d.pic_imr >> 8) as u8
        ));
    }
    if has(device::PIT) {
        found.push(format!(
            "pit (status {:#04x}/{:#04x})",
            d.pit_status as u8,
            (d.pit_status >> 8) as u8
        ));
    }
    if has(device::HPET) {
        found.push(format!(
            "hpet (config {:#x}, {} timers, {:#x} armed)",
            d.hpet_config, d.hpet_timers, d.hpet_enabled_timers
        ));
    }
    if has(device::RTC) {
        found.push(format!(
            "rtc (A {:#04x} B {:#04x})",
            d.rtc_ab as u8,
            (d.rtc_ab >> 8) as u8
        ));
    }
    if has(device::COM1) {
        found.push(format!(
            "com1 (lcr {:#04x} ier {:#04x} mcr {:#04x} divisor {}, fcr {})",
            d.com1 as u8,
            (d.com1 >> 8) as u8,
            (d.com1 >> 16) as u8,
            (d.com1 >> 32) as u16,
            shadow(d.captured_com1_fcr)
        ));
    }
    let what = String::from_utf8_lossy(&d.what);
    let what = what.trim_end_matches(['\0', ',']);
    format!(
        "devices: {} round trips, {} differed{}; last capture: {}; shadowed now: com1 fcr {}, cmos index {} ({} guest writes)",
        d.checks,
        d.checks_differing,
        if what.is_empty() { String::new() } else { format!(" (last in {what})") },
        if found.is_empty() { "none yet".to_string() } else { found.join(", ") },
        shadow(d.com1_fcr),
        shadow(d.rtc_index),
        d.shadowed_writes
    )
}

fn cmd_probe(expect: Option<&str>) -> Result<()> {
    let want = match expect {
        None => None,
        Some("active") => Some(true),
        Some("native") => Some(false),
        Some(other) => bail!("--expect takes active or native, not {other:?}"),
    };
    let dev = open()?;
    let mut bad = Vec::new();
    for cpu in online_cpus() {
        pin_to(cpu)?;
        let user_sig = cpuid_signature();
        let p = ioctl::probe(&dev, cpu).context("probe request failed")?;
        let svme = (p.efer >> 12) & 1;
        println!(
            "cpu {cpu}: signature {} (kernel: {}), EFER {:#x} SVME={svme}",
            if user_sig { "Quicksilver" } else { "none" },
            if p.signature == 1 {
                "Quicksilver"
            } else {
                "none"
            },
            p.efer
        );
        if let Some(w) = want {
            let consistent = user_sig == w && (p.signature == 1) == w && (svme == 1) == w;
            if !consistent {
                bad.push(cpu);
            }
        }
    }
    if !bad.is_empty() {
        bail!("CPUs {bad:?} are not {}", expect.unwrap_or_default());
    }
    Ok(())
}

fn parse_u64(s: &str) -> Result<u64> {
    let r = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.with_context(|| format!("{s:?} is not a number"))
}

/// The ioctls' offset of `offset` into the store: the store follows the hv's block.
fn store_offset(dev: &File, offset: &str) -> Result<String> {
    let block = read_stats(dev)?.header.mem_bytes;
    Ok((block + parse_u64(offset)?).to_string())
}

fn cmd_peek(offset: &str) -> Result<()> {
    let dev = open()?;
    let value = ioctl::peek(&dev, parse_u64(offset)?)
        .context("peek refused (offset 8-aligned, inside the hv or its store?)")?;
    let text: String = value
        .to_le_bytes()
        .iter()
        .map(|&b| if b.is_ascii_graphic() { b as char } else { '.' })
        .collect();
    println!("{value:#018x} {text}");
    Ok(())
}

fn cmd_peek_phys(address: &str) -> Result<()> {
    let dev = open()?;
    let address = parse_u64(address)?;
    let value = ioctl::peek_phys(&dev, address).context(
        "peek-phys refused (8-aligned, and not RAM: ioremap maps only devices and holes)",
    )?;
    println!("{value:#018x} at physical {address:#x}");
    Ok(())
}

fn cmd_poke(offset: &str, value: &str) -> Result<()> {
    let dev = open()?;
    let (offset, value) = (parse_u64(offset)?, parse_u64(value)?);
    ioctl::poke(&dev, offset, value)
        .context("poke refused: only while active (the test of the hv's isolation)")?;
    println!("wrote {value:#x} at offset {offset:#x}");
    Ok(())
}

/// `--width N` after a NIC register's address: 4 bytes unless given.
fn nic_width(rest: &[&str]) -> Result<u32> {
    match rest {
        [] => Ok(4),
        ["--width", n @ ("1" | "2" | "4" | "8")] => Ok(n.parse()?),
        _ => bail!("--width takes 1, 2, 4 or 8 (bytes)"),
    }
}

fn cmd_peek_nic(bar: &str, offset: &str, rest: &[&str]) -> Result<()> {
    let dev = open()?;
    let (bar, offset, width) = (parse_u64(bar)? as u32, parse_u64(offset)?, nic_width(rest)?);
    let value = ioctl::peek_nic(&dev, bar, offset, width).context(
        "peek-nic refused (is net= given? a memory BAR of the NIC, the offset inside it and a multiple of the width)",
    )?;
    println!("{value:#x} at BAR {bar} offset {offset:#x} ({width}-byte)");
    Ok(())
}

fn cmd_poke_nic(bar: &str, offset: &str, value: &str, rest: &[&str]) -> Result<()> {
    let dev = open()?;
    let (bar, offset, width) = (parse_u64(bar)? as u32, parse_u64(offset)?, nic_width(rest)?);
    let value = parse_u64(value)?;
    ioctl::poke_nic(&dev, bar, offset, width, value).context(
        "poke-nic refused: only while active (the test of the hv's isolation), on a memory BAR of the NIC",
    )?;
    println!("wrote {value:#x} at BAR {bar} offset {offset:#x} ({width}-byte)");
    Ok(())
}

/// "0,3" for bits 0 and 3.
fn cpu_list(mask: u64) -> String {
    let cpus: Vec<String> = (0..64u32)
        .filter(|n| mask & (1 << n) != 0)
        .map(|n| n.to_string())
        .collect();
    cpus.join(",")
}

/// `qsctl freeze MS [--check]`: every CPU stopped for MS ms and resumed; with `--check`,
/// each CPU writes its whole captured state back, captures it again and compares.
fn cmd_freeze(ms: &str, check: bool) -> Result<()> {
    let dev = open()?;
    let ms: u32 = ms
        .parse()
        .with_context(|| format!("{ms:?} is not a number of milliseconds"))?;
    if ms > abi::FREEZE_MAX_MS {
        bail!(
            "{ms} ms is too long: at most {} ms (the kernel's watchdogs complain of stops over ~20 s)",
            abi::FREEZE_MAX_MS
        );
    }
    let flags = if check { abi::FREEZE_CHECK } else { 0 };
    let f = ioctl::freeze(&dev, ms, flags).context("the freeze ioctl failed")?;
    if f.status != 0 {
        return Err(status_error(f.status).context("freeze refused"));
    }
    if f.missing_cpus != 0 {
        bail!(
            "froze {} CPUs for {:.1} ms, but CPUs {} did not stop (no answer to the hv's NMI \
             within 2 s) and ran on: not a consistent cut; retry, and if it persists, see \
             `dmesg` for that CPU",
            f.cpus,
            f.held_us as f64 / 1000.0,
            cpu_list(f.missing_cpus)
        );
    }
    println!(
        "froze {} CPUs for {:.1} ms (every CPU stopped {} us after the request)",
        f.cpus,
        f.held_us as f64 / 1000.0,
        f.gather_us
    );
    if check {
        // The leader's round trip of the platform's devices, as the hv recorded it.
        if let Ok(s) = read_stats(&dev) {
            println!("{}", devices_line(&s.header.devices));
        }
        if f.identical == f.cpus {
            println!(
                "state check: {} of {} CPUs came back identical",
                f.identical, f.cpus
            );
        } else {
            let what = String::from_utf8_lossy(&f.what);
            bail!(
                "state check: {} of {} CPUs came back identical; CPUs {} differed in {}",
                f.identical,
                f.cpus,
                cpu_list(f.differing_cpus),
                what.trim_end_matches(['\0', ','])
            );
        }
    }
    Ok(())
}

/// N freezes of 0 ms, 20 ms apart, then N with `--check`: medians of how long every CPU took
/// to stop (the hv's count, from the request) and of the whole pause as the caller sees it (the
/// ioctl), as one JSON line, with the count of freezes that did not stop every CPU.
fn cmd_bench_freeze(n: &str) -> Result<()> {
    let n = parse_u64(n)? as usize;
    let dev = open()?;
    let mut incomplete = 0;
    let mut series = |flags: u32| -> Result<(Vec<u64>, Vec<u64>, u32)> {
        let (mut gather, mut pause, mut identical) = (vec![], vec![], 0);
        for _ in 0..n {
            // Every CPU back in the kernel first: a freeze right after the last one finds CPUs
            // that have not left it yet still parked, and gathers them at no cost.
            std::thread::sleep(std::time::Duration::from_millis(20));
            let t = std::time::Instant::now();
            let f = ioctl::freeze(&dev, 0, flags).context("the freeze ioctl failed")?;
            pause.push(t.elapsed().as_nanos() as u64);
            if f.status != 0 {
                return Err(status_error(f.status).context("freeze refused"));
            }
            gather.push(f.gather_us);
            incomplete += u32::from(f.missing_cpus != 0);
            identical += u32::from(f.identical == f.cpus && f.missing_cpus == 0);
        }
        Ok((gather, pause, identical))
    };
    let (mut gather, mut pause, _) = series(0)?;
    let (mut gather_c, mut pause_c, identical) = series(abi::FREEZE_CHECK)?;
    println!(
        "QS-BENCH {{\"freezes\":{n},\"gather_us\":{},\"pause_us\":{:.1},\"check_gather_us\":{},\"check_pause_us\":{:.1},\"checks_identical\":{identical},\"incomplete\":{incomplete}}}",
        median(&mut gather),
        median(&mut pause) as f64 / 1000.0,
        median(&mut gather_c),
        median(&mut pause_c) as f64 / 1000.0,
    );
    Ok(())
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// N round trips; one JSON line with medians (the request-to-all-switched time measured by
/// the agent, the hv's own part from its cycle counters, max over CPUs, and the platform's
/// floor: two IPIs to every CPU with nothing to do, measured between the round trips so that
/// both see the same machine).
fn cmd_bench_switch(n: &str) -> Result<()> {
    let n = parse_u64(n)? as usize;
    let dev = open()?;
    let (mut act, mut deact, mut hv_act, mut hv_deact) = (vec![], vec![], vec![], vec![]);
    let mut floor = vec![];
    for _ in 0..n {
        floor.push(
            ioctl::ipi_floor(&dev)
                .context("the IPI floor request failed: is the agent as new as qsctl?")?
                .elapsed_ns,
        );
        let a = switch(&dev, true)?;
        let s = read_stats(&dev)?;
        let d = switch(&dev, false)?;
        let s2 = read_stats(&dev)?;
        let khz = s.header.tsc_khz.max(1);
        act.push(a.elapsed_ns);
        deact.push(d.elapsed_ns);
        hv_act.push(
            s.cpus
                .iter()
                .map(|c| c.last_activate_cycles)
                .max()
                .unwrap_or(0)
                * 1_000_000
                / khz,
        );
        hv_deact.push(
            s2.cpus
                .iter()
                .map(|c| c.last_deactivate_cycles)
                .max()
                .unwrap_or(0)
                * 1_000_000
                / khz,
        );
    }
    let ns = |v: &mut Vec<u64>| median(v) as f64 / 1000.0;
    let (a, d, ha, hd, f) = (
        ns(&mut act),
        ns(&mut deact),
        ns(&mut hv_act),
        ns(&mut hv_deact),
        ns(&mut floor),
    );
    println!(
        "QS-BENCH {{\"switches\":{n},\"activate_us\":{a:.1},\"deactivate_us\":{d:.1},\"roundtrip_us\":{:.1},\"roundtrip_hv_us\":{:.1},\"ipi_floor_us\":{f:.1}}}",
        a + d,
        ha + hd
    );
    Ok(())
}

fn main() {
    // Behave like other command-line tools in a pipeline (`qsctl stats | head`): end quietly
    // when the reader goes away instead of panicking on EPIPE.
    // SAFETY: setting SIGPIPE's disposition to the default before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = match a.as_slice() {
        ["status"] => cmd_status(),
        ["activate"] => cmd_switch(true),
        ["deactivate"] => cmd_switch(false),
        ["stats"] => cmd_stats(),
        ["probe"] => cmd_probe(None),
        ["probe", "--expect", s] => cmd_probe(Some(s)),
        ["peek", off] => cmd_peek(off),
        ["poke", off, v] => cmd_poke(off, v),
        ["peek-store", off] => open()
            .and_then(|d| store_offset(&d, off))
            .and_then(|o| cmd_peek(&o)),
        ["poke-store", off, v] => open()
            .and_then(|d| store_offset(&d, off))
            .and_then(|o| cmd_poke(&o, v)),
        ["peek-phys", addr] => cmd_peek_phys(addr),
        ["peek-nic", bar, off, rest @ ..] => cmd_peek_nic(bar, off, rest),
        ["poke-nic", bar, off, v, rest @ ..] => cmd_poke_nic(bar, off, v, rest),
        ["bench-switch", n] => cmd_bench_switch(n),
        ["freeze", ms] => cmd_freeze(ms, false),
        ["bench-freeze", n] => cmd_bench_freeze(n),
        ["freeze", ms, "--check"] => cmd_freeze(ms, true),
        ["checkpoint"] => checkpoint::take(),
        ["checkpoint", "--delete", which] => checkpoint::delete(which),
        ["checkpoint", "--every", every] => checkpoint::periodic(every, None),
        ["checkpoint", "--every", every, "--keep", keep] => checkpoint::periodic(every, Some(keep)),
        ["checkpoints"] => checkpoint::list(),
        ["rollback", id] => checkpoint::rollback(id),
        ["export", id, file] => export::export(id, file, false),
        ["export", id, file, "--elf"] => export::export(id, file, true),
        _ => {
            eprintln!("usage: qsctl status|activate|deactivate|stats|probe [--expect active|native]|freeze MS [--check]|checkpoint [--delete ID|all] [--every MS|off [--keep N]]|checkpoints|rollback ID|export ID FILE [--elf]|peek OFFSET|poke OFFSET VALUE|peek-store OFFSET|poke-store OFFSET VALUE|peek-phys ADDRESS|peek-nic BAR OFFSET [--width N]|poke-nic BAR OFFSET VALUE [--width N]|bench-switch N|bench-freeze N");
            std::process::exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("qsctl: {e:#}");
        std::process::exit(1);
    }
}
