//! The agent's device, `/dev/quicksilver`: its ioctl requests and their argument structs,
//! which `qsctl` issues and the Linux module (`guest-agent/linux`) serves.
//!
//! A [`Request<T>`] carries its argument type: its number encodes `size_of::<T>()` the way
//! Linux's `_IOR`/`_IOW`/`_IOWR` do, so a request number and the wrong struct cannot meet in
//! code that goes through it.

use core::marker::PhantomData;

/// Path of the agent's device.
pub const DEVICE: &str = "/dev/quicksilver";

/// The ioctl type byte of every request (`_IOC_TYPE`).
pub const MAGIC: u8 = b'Q';

/// Which way the argument travels, from the caller's side (Linux's `_IOC_WRITE` / `_IOC_READ`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// `_IOW`: the kernel reads the argument.
    Write = 1,
    /// `_IOR`: the kernel writes the argument.
    Read = 2,
    /// `_IOWR`: both.
    ReadWrite = 3,
}

impl Dir {
    /// The C macro that encodes a request with this direction.
    pub const fn c_macro(self) -> &'static str {
        match self {
            Dir::Write => "_IOW",
            Dir::Read => "_IOR",
            Dir::ReadWrite => "_IOWR",
        }
    }
}

/// One request on the agent's device, with its argument type `T`.
pub struct Request<T> {
    /// `_IOC_NR`: the request's number among the agent's.
    pub nr: u8,
    /// Which way `T` travels.
    pub dir: Dir,
    arg: PhantomData<fn() -> T>,
}

// Derives would ask `T: Clone`; a request is copyable whatever its argument.
impl<T> Clone for Request<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Request<T> {}

impl<T> Request<T> {
    const fn new(nr: u8, dir: Dir) -> Self {
        // _IOC_SIZEBITS is 14 on x86.
        assert!(core::mem::size_of::<T>() < (1 << 14));
        Request {
            nr,
            dir,
            arg: PhantomData,
        }
    }

    /// The number `ioctl(2)` takes: `_IOC(dir, MAGIC, nr, sizeof(T))` as x86 Linux encodes it.
    pub const fn number(self) -> u32 {
        ((self.dir as u32) << 30)
            | ((core::mem::size_of::<T>() as u32) << 16)
            | ((MAGIC as u32) << 8)
            | self.nr as u32
    }
}

/// One request, described for the C header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestInfo {
    /// The Rust constant's name (`ACTIVATE`); C spells it `QS_IOC_ACTIVATE`.
    pub name: &'static str,
    /// `_IOC_NR`.
    pub nr: u8,
    /// Which way the argument travels.
    pub dir: Dir,
    /// The argument's C tag (`struct <arg>`).
    pub arg: &'static str,
    /// [`Request::number`], which the C header asserts its macro gives too.
    pub number: u32,
    /// The request's documentation.
    pub doc: &'static str,
}

macro_rules! requests {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident = $dir:ident($nr:literal, $arg:ty);
    )+) => {
        $(
            $(#[doc = $doc])*
            pub const $name: Request<$arg> = Request::new($nr, Dir::$dir);
        )+

        /// Every request, for the C header.
        pub const REQUESTS: &[RequestInfo] = &[$(
            RequestInfo {
                name: stringify!($name),
                nr: $nr,
                dir: Dir::$dir,
                arg: <$arg as $crate::c_abi::CStruct>::C_NAME,
                number: $name.number(),
                doc: concat!($($doc, "\n",)*),
            }
        ),+];
    };
}

requests! {
    /// Switch every online CPU into guest mode.
    ACTIVATE = Read(1, SwitchResult);
    /// Switch every CPU back to native.
    DEACTIVATE = Read(2, SwitchResult);
    /// The hv's statistics block ([`crate::stats`]) into a buffer of the caller's.
    STATS = ReadWrite(3, StatsRequest);
    /// What a CPU looks like from the kernel's side.
    PROBE = ReadWrite(4, Probe);
    /// The kernel reads 8 bytes of the hv's memory (the isolation test).
    PEEK = ReadWrite(5, Peek);
    /// The kernel writes 8 bytes of the hv's memory (the isolation test; refused while dormant).
    POKE = Write(6, Peek);
    /// The kernel reads 8 bytes at a physical address outside RAM (ioremap): a device or a hole,
    /// e.g. above what the hv's nested tables map (the unexpected-exit test).
    PEEK_PHYS = ReadWrite(7, Peek);
    /// What the agent gave the hv besides its block (the store).
    AGENT_INFO = Read(8, AgentInfo);
    /// Every CPU stopped for a while, then resumed (`qsctl freeze`); the hv must be active.
    FREEZE = ReadWrite(9, crate::abi::FreezeArgs);
    /// The platform's floor under a round trip: two calls of an empty function on every online
    /// CPU, timed as ACTIVATE and DEACTIVATE time their one call each (`qsctl bench-switch`).
    /// The hv is not involved: this is the IPI delivery and wake-up the agent cannot avoid.
    IPI_FLOOR = Read(10, SwitchResult);
    /// Take a checkpoint of the whole machine (`qsctl checkpoint`); activates the hv if it
    /// is dormant, and retries for a while when a CPU is not at a restorable point.
    CHECKPOINT = ReadWrite(11, crate::abi::CheckpointArgs);
    /// Put the whole machine back at a checkpoint (`qsctl rollback ID`). Returns only when
    /// refused: on success every process continues from the checkpoint.
    ROLLBACK = ReadWrite(12, crate::abi::RollbackArgs);
    /// The checkpoints kept, into a buffer of the caller's ([`crate::abi::CheckpointList`]
    /// then entries).
    CHECKPOINTS = ReadWrite(13, BufferRequest);
    /// Delete a checkpoint or all; once none is kept the agent lets the hv go dormant.
    CHECKPOINT_DELETE = ReadWrite(14, crate::abi::CheckpointDelete);
    /// The last rollback the agent was told of (zero before any).
    LAST_ROLLBACK = Read(15, crate::abi::RollbackNotice);
    /// Start, change or stop the periodic ring (`qsctl checkpoint --every MS --keep N`);
    /// activates the hv if it is dormant.
    CHECKPOINT_PERIODIC = ReadWrite(16, crate::abi::CheckpointPeriodic);
    /// Pages of a kept checkpoint's memory as they were when it was taken (`qsctl export`).
    CHECKPOINT_READ = ReadWrite(17, ReadRequest);
    /// One CPU's state in a kept checkpoint: the buffer holds a [`crate::abi::CheckpointCpu`]
    /// (its `id` and `cpu` set) and room for its XSAVE area and local APIC record.
    CHECKPOINT_CPU = ReadWrite(18, BufferRequest);
    /// What an export needs of the kernel besides the checkpoint: an [`ExportInfo`], then
    /// `ram_ranges` pairs of u64 (start, end) of the RAM the hv keeps checkpoints of.
    EXPORT_INFO = ReadWrite(19, BufferRequest);
    /// The platform devices' state in a kept checkpoint: the buffer holds a
    /// [`crate::abi::CheckpointDevices`] (its `id` set) and room for the record.
    CHECKPOINT_DEVICES = ReadWrite(20, BufferRequest);
    /// The kernel reads a register of the fast link's NIC through the agent's own mapping of
    /// its BAR, as a driver would (the isolation test: zeros while the hv is active).
    PEEK_NIC = ReadWrite(21, NicPeek);
    /// The kernel writes a register of the fast link's NIC the same way (the isolation test:
    /// refused while dormant, when the write would reach the device the hv drives).
    POKE_NIC = Write(22, NicPeek);
}

crate::abi_struct! {
    /// CHECKPOINT_READ: `pages` pages of checkpoint `id` from `first_gpa` into `buf`.
    #[c_name = "qs_read_request"]
    pub struct ReadRequest {
        /// The caller's buffer (a user pointer) of `pages` * 4096 bytes.
        pub buf: u64,
        /// The checkpoint.
        pub id: u32,
        /// Pages (at most `READ_MAX_PAGES`), all in one RAM range.
        pub pages: u32,
        /// The first page's physical address.
        pub first_gpa: u64,
        /// Out: the hv's `Status`.
        pub status: i64,
    }
}

/// [`ReadRequest::pages`] at most: 1 MiB.
pub const READ_MAX_PAGES: u32 = 255;

crate::abi_struct! {
    /// EXPORT_INFO's answer, before the RAM ranges.
    #[c_name = "qs_export_info"]
    pub struct ExportInfo {
        /// Where the kernel maps all of RAM (`page_offset_base`).
        pub page_offset: u64,
        /// RAM ranges that follow.
        pub ram_ranges: u32,
        /// CPUs the hv was loaded for (`nr_cpu_ids`).
        pub cpus: u32,
    }
}

crate::abi_struct! {
    /// ACTIVATE / DEACTIVATE: the result of one switch of every online CPU.
    #[c_name = "qs_switch_result"]
    pub struct SwitchResult {
        /// `Status` of the first CPU that failed, or `Ok`.
        pub status: i64,
        /// From the request to every CPU switched, IPIs included.
        pub elapsed_ns: u64,
        /// CPUs switched.
        pub cpus: u32,
        /// The first CPU that failed; -1 if none.
        pub failed_cpu: i32,
    }
}

crate::abi_struct! {
    /// STATS: where to copy the statistics block, and the hv's answer.
    #[c_name = "qs_stats_request"]
    pub struct StatsRequest {
        /// The caller's buffer (a user pointer).
        pub buf: u64,
        /// Its length in bytes (at most 256 KiB).
        pub len: u64,
        /// Out: the hv's `Status`.
        pub status: i64,
    }
}

crate::abi_struct! {
    /// A request whose answer goes into a buffer of the caller's.
    #[c_name = "qs_buffer_request"]
    pub struct BufferRequest {
        /// The caller's buffer (a user pointer).
        pub buf: u64,
        /// Its length in bytes (at most 64 KiB).
        pub len: u64,
        /// Out: the hv's `Status`.
        pub status: i64,
    }
}

crate::abi_struct! {
    /// PROBE: one CPU, seen from the kernel.
    #[c_name = "qs_probe"]
    pub struct Probe {
        /// In: the CPU's index.
        pub cpu: u32,
        /// Out: 1 if CPUID 0x40000000 says Quicksilver on that CPU.
        pub signature: u32,
        /// Out: EFER as RDMSR reads it on that CPU.
        pub efer: u64,
    }
}

crate::abi_struct! {
    /// PEEK / POKE / PEEK_PHYS: 8 bytes read or written by the kernel.
    #[c_name = "qs_peek"]
    pub struct Peek {
        /// In: the offset into the hv's block (8-aligned), or for PEEK_PHYS the physical address.
        pub offset: u64,
        /// Out for PEEK and PEEK_PHYS, in for POKE.
        pub value: u64,
    }
}

crate::abi_struct! {
    /// PEEK_NIC / POKE_NIC: one register of the fast link's NIC, read or written by the kernel.
    #[c_name = "qs_nic_peek"]
    pub struct NicPeek {
        /// In: the memory BAR (0-5).
        pub bar: u32,
        /// In: the access's width in bytes (1, 2, 4 or 8).
        pub width: u32,
        /// In: the offset into the BAR (a multiple of the width).
        pub offset: u64,
        /// Out for PEEK_NIC, in for POKE_NIC.
        pub value: u64,
    }
}

crate::abi_struct! {
    /// AGENT_INFO: what the agent gave the hv at init besides its block.
    #[c_name = "qs_agent_info"]
    pub struct AgentInfo {
        /// Bytes in the store (the module's `store_mem`, rounded up to whole chunks); 0 if none.
        pub store_bytes: u64,
        /// Chunks of `STORE_CHUNK_SIZE` bytes it is made of.
        pub store_chunks: u32,
        /// Zero.
        pub _reserved: u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_are_the_ones_linux_macros_give() {
        // _IOR('Q', 1, 24 bytes), _IOWR('Q', 3, 24 bytes), _IOW('Q', 6, 16 bytes), as
        // <asm-generic/ioctl.h> encodes them on x86.
        assert_eq!(ACTIVATE.number(), 0x8018_5101);
        assert_eq!(STATS.number(), 0xC018_5103);
        assert_eq!(POKE.number(), 0x4010_5106);
        assert_eq!(AGENT_INFO.number(), 0x8010_5108);
    }

    #[test]
    fn every_request_is_listed_once_with_its_number() {
        let mut nrs: Vec<u8> = REQUESTS.iter().map(|r| r.nr).collect();
        nrs.sort_unstable();
        nrs.dedup();
        assert_eq!(nrs.len(), REQUESTS.len(), "two requests share a number");
        let stats = REQUESTS.iter().find(|r| r.name == "STATS").unwrap();
        assert_eq!(
            (stats.arg, stats.number),
            ("qs_stats_request", STATS.number())
        );
    }
}
