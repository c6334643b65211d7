//! What a checkpoint of a live machine is, independent of where it is kept: the machine's
//! identity, every CPU's whole state, the platform devices' state, and RAM as it was at that
//! instant (in a file: a full image, or the pages that differ from an earlier checkpoint).
//!
//! The CPU record is vendor-neutral and carries what a restore and a debugger need: the
//! registers in the instruction set's encoding order, the eight segments with their hidden
//! parts, the control, debug and system registers, and two blobs whose layout is the hv's
//! (the XSAVE area and the local APIC's registers, each with its own version).

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// Bytes in a page of guest memory (the only page size checkpoints use).
pub const PAGE: usize = 4096;

/// One range of guest-physical RAM, `[start, end)`, page-aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRange {
    pub start: u64,
    pub end: u64,
}

impl RamRange {
    pub fn contains(&self, gpa: u64) -> bool {
        (self.start..self.end).contains(&gpa)
    }
    pub fn pages(&self) -> u64 {
        (self.end - self.start) / PAGE as u64
    }
}

/// Which machine and which kernel a checkpoint is of, and when it was taken.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The engine's id (`qsctl checkpoints`), and the checkpoint it was taken after (0: none).
    pub id: u32,
    pub parent: u32,
    /// Taken by the periodic ring rather than asked for.
    pub periodic: bool,
    /// The world's time when it was taken: nanoseconds since the Unix epoch.
    pub taken_unix_ns: u64,
    /// Microseconds every CPU was stopped to take it.
    pub pause_us: u64,
    /// The machine's name, the kernel's release (`uname -r`), its GNU build id, and the boot
    /// it came from (`/proc/sys/kernel/random/boot_id`): a checkpoint is only ever restored
    /// into, or read against the `vmlinux` of, the same kernel.
    pub hostname: String,
    pub kernel_release: String,
    pub build_id: Vec<u8>,
    pub boot_id: String,
    /// Guest RAM, ascending and disjoint.
    pub ram: Vec<RamRange>,
    /// Where the kernel maps all of RAM (`page_offset_base`, randomized with KASLR), or 0 if
    /// unknown: an ELF core gives each RAM range this virtual address.
    pub page_offset: u64,
    /// The kernel's own VMCOREINFO note text (`OSRELEASE=...`, `KERNELOFFSET=...`), which
    /// kdump's tools need to read a core of this kernel; empty if it could not be had.
    pub vmcoreinfo: Vec<u8>,
}

/// A segment register with its hidden part (AMD APM vol. 2, 4.5): the VMCB's layout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub selector: u16,
    pub attrib: u16,
    pub limit: u32,
    pub base: u64,
}

/// GDTR or IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TablePointer {
    pub base: u64,
    pub limit: u16,
}

/// Indices into [`CpuRecord::gprs`]: the instruction set's encoding order (ModRM.reg).
pub mod gpr {
    pub const RAX: usize = 0;
    pub const RCX: usize = 1;
    pub const RDX: usize = 2;
    pub const RBX: usize = 3;
    pub const RSP: usize = 4;
    pub const RBP: usize = 5;
    pub const RSI: usize = 6;
    pub const RDI: usize = 7;
    pub const R8: usize = 8;
    pub const R15: usize = 15;
}

/// Indices into [`CpuRecord::segments`].
pub mod seg {
    pub const ES: usize = 0;
    pub const CS: usize = 1;
    pub const SS: usize = 2;
    pub const DS: usize = 3;
    pub const FS: usize = 4;
    pub const GS: usize = 5;
    pub const LDTR: usize = 6;
    pub const TR: usize = 7;
}

/// An event whose delivery was cut short, to be delivered again (EXITINTINFO's fields).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingEvent {
    pub valid: bool,
    pub kind: u8,
    pub vector: u8,
    pub error_code: Option<u32>,
}

/// One CPU's whole state at the checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuRecord {
    /// The CPU's index in the machine (Linux's CPU number) and its local APIC ID.
    pub index: u32,
    pub apic_id: u32,
    pub gprs: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub segments: [Segment; 8],
    pub gdtr: TablePointer,
    pub idtr: TablePointer,
    pub cpl: u8,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub xcr0: u64,
    pub efer: u64,
    /// DR0-DR3, DR6, DR7.
    pub dr: [u64; 6],
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub pat: u64,
    pub tsc_aux: u64,
    pub pending: PendingEvent,
    pub interrupt_shadow: bool,
    /// The XSAVE area (standard format), and the local APIC's registers, as the hv keeps them.
    pub xsave: Blob,
    pub lapic: Blob,
}

/// Bytes whose layout another component defines, with that layout's version.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    pub version: u32,
    pub bytes: Vec<u8>,
}

/// A platform device's state (the IOAPIC, the 8259s, the 8254, the HPET, the RTC, a UART).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub name: String,
    pub state: Blob,
}
