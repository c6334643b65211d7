//! The statistics block: a [`StatsHeader`] followed by one [`CpuStats`] per possible CPU.
//! The hv writes it (into a kernel buffer while dormant, into guest-physical memory while
//! active); `qsctl` reads it. The agent only passes the bytes along.

/// "QSST".
pub const STATS_MAGIC: u32 = 0x5453_5351;
/// Layout version of this block.
pub const STATS_VERSION: u32 = 7;

/// Kinds of #VMEXIT counted per CPU. The numbers index [`CpuStats::exits`].
#[repr(usize)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// CPUID (intercepted for the signature leaf).
    Cpuid = 0,
    /// WRMSR/RDMSR of a protected MSR (EFER, VM_CR, VM_HSAVE_PA).
    Msr = 1,
    /// VMMCALL: hypercalls.
    Vmmcall = 2,
    /// VMRUN by the guest (refused with #UD).
    Vmrun = 3,
    /// VMLOAD, VMSAVE, STGI, CLGI, SKINIT, INVLPGA (refused with #UD).
    SvmInstruction = 4,
    /// Nested page fault: a guest access to the hv's own memory.
    Npf = 5,
    /// SHUTDOWN (guest triple fault).
    Shutdown = 6,
    /// Anything else: unexpected, recorded with a VMCB dump.
    Other = 7,
    /// The debugger's: NMIs, software interrupts, #BP, #DB.
    Debug = 8,
    /// IN/OUT to a port whose writes the hv shadows (the console UART's FIFO control
    /// register, the CMOS index): done by the hv on the guest's behalf.
    PortIo = 9,
}

/// Number of [`ExitKind`]s.
pub const EXIT_KINDS: usize = 10;

impl ExitKind {
    /// Every kind, in index order.
    pub const ALL: [ExitKind; EXIT_KINDS] = [
        ExitKind::Cpuid,
        ExitKind::Msr,
        ExitKind::Vmmcall,
        ExitKind::Vmrun,
        ExitKind::SvmInstruction,
        ExitKind::Npf,
        ExitKind::Shutdown,
        ExitKind::Other,
        ExitKind::Debug,
        ExitKind::PortIo,
    ];

    /// Short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::Cpuid => "cpuid",
            ExitKind::Msr => "msr",
            ExitKind::Vmmcall => "vmmcall",
            ExitKind::Vmrun => "vmrun",
            ExitKind::SvmInstruction => "svm-insn",
            ExitKind::Npf => "npf",
            ExitKind::Shutdown => "shutdown",
            ExitKind::Other => "other",
            ExitKind::Debug => "debug",
            ExitKind::PortIo => "port-io",
        }
    }
}

/// An exit the hv did not expect, kept for `qsctl stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitRecord {
    /// CPU index.
    pub cpu: u32,
    /// 1 if this record holds anything.
    pub valid: u32,
    /// EXITCODE (VMCB 0x070).
    pub exit_code: u64,
    /// EXITINFO1 (0x078).
    pub exit_info1: u64,
    /// EXITINFO2 (0x080).
    pub exit_info2: u64,
    /// EXITINTINFO (0x088).
    pub exit_int_info: u64,
    /// Guest RIP, RSP, RFLAGS.
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    /// Guest control registers and EFER.
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// Guest CS selector and CPL.
    pub cs: u64,
    pub cpl: u64,
}

/// Bits of [`DevicesRecord::present`]: the legacy devices a capture found.
pub mod device {
    pub const IOAPIC: u32 = 1 << 0;
    pub const PIC: u32 = 1 << 1;
    pub const PIT: u32 = 1 << 2;
    pub const HPET: u32 = 1 << 3;
    pub const RTC: u32 = 1 << 4;
    pub const COM1: u32 = 1 << 5;
}

/// A shadowed register's value as the block reports it: bit 8 set if known.
pub const SHADOW_KNOWN: u32 = 1 << 8;

/// The platform's legacy devices as the hv last captured them (every `qsctl freeze --check`
/// captures them, restores them in place and captures again), and what the hv shadows of
/// their write-only registers now.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevicesRecord {
    /// Device round trips made (capture, restore in place, capture, compare).
    pub checks: u32,
    /// Of those, how many came back different.
    pub checks_differing: u32,
    /// [`device`] bits: what the last capture found.
    pub present: u32,
    /// COM1's FIFO control register (port 0x3FA, write-only) as the hv shadows it now: the
    /// last value the guest wrote while the hv was active, with [`SHADOW_KNOWN`]; 0 if it
    /// has not written it since the hv became active.
    pub com1_fcr: u32,
    /// The CMOS index (port 0x70, write-only) likewise.
    pub rtc_index: u32,
    /// COM1's FCR as the last capture recorded it (with [`SHADOW_KNOWN`]).
    pub captured_com1_fcr: u32,
    /// From the last capture: the 8259s' interrupt masks (master in bits 7:0, slave 15:8).
    pub pic_imr: u32,
    /// The 8254's read-back status of channel 0 (bits 7:0) and channel 2 (15:8).
    pub pit_status: u32,
    /// The RTC's register A (bits 7:0) and B (15:8).
    pub rtc_ab: u32,
    /// IOAPIC redirection entries.
    pub ioapic_pins: u32,
    /// HPET general configuration (bit 0 enable, bit 1 legacy routing), its timers, and a
    /// bit per timer with its interrupt enabled.
    pub hpet_config: u32,
    pub hpet_timers: u32,
    pub hpet_enabled_timers: u32,
    pub reserved: u32,
    /// COM1's LCR (7:0), IER (15:8), MCR (23:16), and its divisor latch (DLL | DLM << 8) in
    /// bits 47:32.
    pub com1: u64,
    /// A bit per unmasked IOAPIC pin (pins 0-63).
    pub ioapic_unmasked: u64,
    /// Port writes the hv made for the guest and shadowed, since load.
    pub shadowed_writes: u64,
    /// What differed in the last round trip that differed (comma-separated, NUL-padded).
    pub what: [u8; 32],
}

/// The fixed part of the block.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatsHeader {
    /// [`STATS_MAGIC`].
    pub magic: u32,
    /// [`STATS_VERSION`].
    pub version: u32,
    /// Possible CPUs: number of [`CpuStats`] that follow.
    pub cpus: u32,
    /// CPUs in guest mode right now.
    pub active_cpus: u32,
    /// 1 if the hv's code is byte-for-byte what was built (self-check).
    pub code_intact: u32,
    /// gdb breakpoints (INT3s) the debugger could not take out of the kernel's memory when a
    /// session ended (0 unless a removal failed twice): the kernel would trap on them.
    pub breakpoints_left: u32,
    /// The hv's version, NUL-padded.
    pub hv_version: [u8; 32],
    /// Bytes the hv owns (image and working memory).
    pub mem_bytes: u64,
    /// Physical address of that memory.
    pub mem_base_pa: u64,
    /// TSC frequency in kHz.
    pub tsc_khz: u64,
    /// Completed activations (every CPU) since load.
    pub activations: u64,
    /// Completed deactivations since load.
    pub deactivations: u64,
    /// Guest accesses to hv memory refused (nested page faults in its range).
    pub hv_memory_refusals: u64,
    /// Guest-physical address of the last such access.
    pub last_refused_gpa: u64,
    /// Guest writes to EFER.SVME, VM_CR or VM_HSAVE_PA refused.
    pub msr_refusals: u64,
    /// SVM instructions executed by the guest and refused with #UD.
    pub svm_insn_refusals: u64,
    /// Exits the hv did not expect.
    pub unexpected_exits: u64,
    /// The last unexpected exit, with a VMCB dump.
    pub last_unexpected: ExitRecord,
    /// The serial link: 1 if configured, 2 if a bridge is authenticated now.
    pub link_state: u64,
    /// Link frames dropped (corrupt, truncated, oversized, replayed).
    pub link_dropped: u64,
    /// Bridges refused for a wrong key.
    pub link_wrong_keys: u64,
    /// Requests ignored because the bridge had not authenticated.
    pub link_unauthenticated: u64,
    /// Frames an authenticated bridge sent that no part of the hv consumes yet (bulk data,
    /// control messages other than attention and checkpoint requests), counted and dropped.
    pub link_unrouted: u64,
    /// The agent's replies to a bridge's checkpoint request that was no longer in flight,
    /// dropped: a rolled-back agent finishing a call it had made before the checkpoint.
    pub link_stale_replies: u64,
    /// The legacy devices (`qsctl stats`' devices line).
    pub devices: DevicesRecord,
    /// The fast link (`qsctl stats`' fast link line).
    pub net: NetRecord,
}

/// The fast link's counters: frames through the NIC, and datagrams by what became of them
/// (`quicksilver_proto::link::net::NetCounters`, field for field).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetRecord {
    /// 0: no NIC; 1: the NIC runs, no bridge; 2: a bridge is authenticated; 3: and answers
    /// go to it on the fast link (it spoke there last).
    pub state: u64,
    /// Frames received from and sent to the NIC.
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Frames the NIC did not take in time (a backend that stopped reading), dropped.
    pub tx_dropped: u64,
    /// Datagrams accepted (the handshake's included) and sent; ARP requests answered.
    pub accepted: u64,
    pub sent: u64,
    pub arp_answered: u64,
    /// Bridges refused for a wrong key.
    pub wrong_key: u64,
    /// Datagrams dropped, by reason.
    pub malformed: u64,
    pub fragmented: u64,
    pub oversized: u64,
    pub not_for_us: u64,
    pub bad_magic: u64,
    pub unauthenticated: u64,
    pub bad_tag: u64,
    pub wrong_session: u64,
    pub replayed: u64,
    pub spoofed: u64,
    /// The guest's PCI configuration-space accesses to the NIC, refused.
    pub config_refused: u64,
    /// TSC cycles spent sending datagrams (framing, the MAC, the driver), and the part of
    /// them in the driver (its copy, and the doorbell, which under QEMU includes the device
    /// model's own work): where a datagram's time goes.
    pub send_cycles: u64,
    pub nic_cycles: u64,
}

/// Per-CPU counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuStats {
    /// Exits by [`ExitKind`], since load.
    pub exits: [u64; EXIT_KINDS],
    /// TSC cycles spent in host mode handling exits, since load.
    pub cycles_in_hv: u64,
    /// TSC cycles the hv's part of the last activation took on this CPU (entry to VMRUN).
    pub last_activate_cycles: u64,
    /// TSC cycles the hv's part of the last deactivation took (#VMEXIT to native).
    pub last_deactivate_cycles: u64,
    /// 1 if this CPU is in guest mode.
    pub active: u32,
    /// 1 if this CPU has been activated at least once.
    pub seen: u32,
    /// The most of this CPU's hv stack ever used, in bytes (of `stack_size`): the stack has
    /// no guard page, and one that overflows corrupts the CPU's own captured state.
    pub stack_used: u32,
    pub stack_size: u32,
}

const _: () = assert!(core::mem::size_of::<DevicesRecord>() == 112);
const _: () = assert!(core::mem::size_of::<NetRecord>() == 168);
const _: () = assert!(core::mem::size_of::<StatsHeader>() == 128 + 128 + 48 + 112 + 168);
const _: () = assert!(core::mem::size_of::<CpuStats>() == 120);

/// Bytes in a block for `cpus` CPUs.
pub const fn stats_size(cpus: u32) -> usize {
    core::mem::size_of::<StatsHeader>() + cpus as usize * core::mem::size_of::<CpuStats>()
}

/// A parsed block.
#[cfg(any(test, feature = "std"))]
#[derive(Clone, Debug)]
pub struct Stats {
    pub header: StatsHeader,
    pub cpus: Vec<CpuStats>,
}

/// Why a block could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsError {
    /// Fewer bytes than the header says.
    Truncated,
    /// Not a stats block, or another layout version.
    BadMagic,
}

#[cfg(any(test, feature = "std"))]
impl Stats {
    /// Parses a block written by the hv.
    pub fn parse(bytes: &[u8]) -> Result<Stats, StatsError> {
        let hsize = core::mem::size_of::<StatsHeader>();
        if bytes.len() < hsize {
            return Err(StatsError::Truncated);
        }
        // SAFETY: at least size_of::<StatsHeader>() bytes; the struct is repr(C) of integers
        // and byte arrays, so every bit pattern is a valid value; the read is unaligned-safe.
        let header: StatsHeader = unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast()) };
        if header.magic != STATS_MAGIC || header.version != STATS_VERSION {
            return Err(StatsError::BadMagic);
        }
        if bytes.len() < stats_size(header.cpus) {
            return Err(StatsError::Truncated);
        }
        let csize = core::mem::size_of::<CpuStats>();
        let cpus = (0..header.cpus as usize)
            .map(|i| {
                let at = hsize + i * csize;
                // SAFETY: in bounds (checked against stats_size above); CpuStats is repr(C)
                // of integers, valid for any bits; unaligned read.
                unsafe { core::ptr::read_unaligned(bytes[at..].as_ptr().cast::<CpuStats>()) }
            })
            .collect();
        Ok(Stats { header, cpus })
    }

    /// The hv version string.
    pub fn hv_version(&self) -> &str {
        let v = &self.header.hv_version;
        let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
        core::str::from_utf8(&v[..end]).unwrap_or("?")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_block_parses_back() {
        let mut bytes = vec![0u8; stats_size(2)];
        let mut h = StatsHeader {
            magic: STATS_MAGIC,
            version: STATS_VERSION,
            cpus: 2,
            active_cpus: 1,
            code_intact: 1,
            breakpoints_left: 0,
            hv_version: [0; 32],
            mem_bytes: 1 << 20,
            mem_base_pa: 0x100_0000,
            tsc_khz: 2_600_000,
            activations: 3,
            deactivations: 2,
            hv_memory_refusals: 0,
            last_refused_gpa: 0,
            msr_refusals: 0,
            svm_insn_refusals: 0,
            unexpected_exits: 0,
            last_unexpected: ExitRecord::default(),
            link_state: 0,
            link_dropped: 0,
            link_wrong_keys: 0,
            link_unauthenticated: 0,
            link_unrouted: 0,
            link_stale_replies: 0,
            devices: DevicesRecord::default(),
            net: NetRecord::default(),
        };
        h.hv_version[..5].copy_from_slice(b"0.1.0");
        // SAFETY: test-only byte copies of repr(C) integer structs into a large enough buffer.
        unsafe {
            core::ptr::write_unaligned(bytes.as_mut_ptr().cast(), h);
            let c = CpuStats {
                exits: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
                active: 1,
                ..Default::default()
            };
            let at = core::mem::size_of::<StatsHeader>() + core::mem::size_of::<CpuStats>();
            core::ptr::write_unaligned(bytes[at..].as_mut_ptr().cast(), c);
        }
        let s = Stats::parse(&bytes).unwrap();
        assert_eq!(s.hv_version(), "0.1.0");
        assert_eq!(s.cpus.len(), 2);
        assert_eq!(s.cpus[1].exits[ExitKind::Other as usize], 8);
        assert_eq!(
            Stats::parse(&bytes[..300]).unwrap_err(),
            StatsError::Truncated
        );
        bytes[0] = 0;
        assert_eq!(Stats::parse(&bytes).unwrap_err(), StatsError::BadMagic);
    }
}
