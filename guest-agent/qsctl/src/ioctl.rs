//! The agent's ioctls (`quicksilver_proto::ioctl`), one safe function per request.
//!
//! Each request number comes from proto with its argument type attached, and each function
//! here builds that argument itself: no caller can pair a number with the wrong struct, or
//! hand the kernel a pointer it did not make (`stats` takes a slice, not an address).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use quicksilver_proto::abi::{
    self, CheckpointArgs, CheckpointCpu, CheckpointDelete, CheckpointDevices, CheckpointInfo,
    CheckpointList, CheckpointPeriodic, FreezeArgs, RollbackArgs, RollbackNotice,
};
use quicksilver_proto::ioctl::{
    self, AgentInfo, BufferRequest, ExportInfo, NicPeek, Peek, Probe, ReadRequest, Request,
    StatsRequest, SwitchResult,
};

/// Issues `req` with `arg` on the agent's device.
///
/// # Safety
/// The agent's handler for `req` reads and writes `*arg` (whose type and size `req` encodes)
/// and whatever memory the pointers inside `*arg` designate: those must be valid for it, for
/// the duration of the call.
unsafe fn ioctl<T>(dev: &File, req: Request<T>, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is an exclusive reference to a `T`, the type whose size `req` encodes, so
    // the kernel's copy in or out of it stays inside it; the caller vouches for the pointers
    // it holds. `as _`: the request's C type differs between libcs (glibc unsigned long,
    // musl int); the number fits either.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), req.number() as _, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Switches every online CPU into guest mode.
pub fn activate(dev: &File) -> io::Result<SwitchResult> {
    let mut r = SwitchResult::default();
    // SAFETY: a SwitchResult holds no pointer.
    unsafe { ioctl(dev, ioctl::ACTIVATE, &mut r) }?;
    Ok(r)
}

/// Switches every CPU back to native.
pub fn deactivate(dev: &File) -> io::Result<SwitchResult> {
    let mut r = SwitchResult::default();
    // SAFETY: a SwitchResult holds no pointer.
    unsafe { ioctl(dev, ioctl::DEACTIVATE, &mut r) }?;
    Ok(r)
}

/// Two calls of an empty function on every online CPU, timed like a round trip (the floor).
pub fn ipi_floor(dev: &File) -> io::Result<SwitchResult> {
    let mut r = SwitchResult::default();
    // SAFETY: a SwitchResult holds no pointer.
    unsafe { ioctl(dev, ioctl::IPI_FLOOR, &mut r) }?;
    Ok(r)
}

/// Copies the hv's statistics block into `buf`; returns the hv's status (0 for success).
pub fn stats(dev: &File, buf: &mut [u8]) -> io::Result<i64> {
    let mut req = StatsRequest {
        buf: buf.as_mut_ptr() as u64,
        len: buf.len() as u64,
        status: 0,
    };
    // SAFETY: `req.buf` points at `buf`, writable for `req.len` bytes until we return, and the
    // agent writes at most `len` bytes there.
    unsafe { ioctl(dev, ioctl::STATS, &mut req) }?;
    Ok(req.status)
}

/// CPU `cpu` as the kernel sees it (CPUID signature, EFER).
pub fn probe(dev: &File, cpu: u32) -> io::Result<Probe> {
    let mut p = Probe {
        cpu,
        ..Default::default()
    };
    // SAFETY: a Probe holds no pointer.
    unsafe { ioctl(dev, ioctl::PROBE, &mut p) }?;
    Ok(p)
}

/// The kernel reads 8 bytes at `offset` in the hv's memory.
pub fn peek(dev: &File, offset: u64) -> io::Result<u64> {
    let mut p = Peek { offset, value: 0 };
    // SAFETY: a Peek holds no pointer (the offset is into the hv's block, checked by the agent).
    unsafe { ioctl(dev, ioctl::PEEK, &mut p) }?;
    Ok(p.value)
}

/// The kernel writes `value` at `offset` in the hv's memory (refused while dormant).
pub fn poke(dev: &File, offset: u64, value: u64) -> io::Result<()> {
    let mut p = Peek { offset, value };
    // SAFETY: a Peek holds no pointer (the offset is into the hv's block, checked by the agent).
    unsafe { ioctl(dev, ioctl::POKE, &mut p) }
}

/// The kernel reads 8 bytes at physical address `address` (device memory or a hole only).
pub fn peek_phys(dev: &File, address: u64) -> io::Result<u64> {
    let mut p = Peek {
        offset: address,
        value: 0,
    };
    // SAFETY: a Peek holds no pointer in our address space (the agent maps `address` itself).
    unsafe { ioctl(dev, ioctl::PEEK_PHYS, &mut p) }?;
    Ok(p.value)
}

/// The kernel reads `width` bytes at `offset` in memory BAR `bar` of the fast link's NIC.
pub fn peek_nic(dev: &File, bar: u32, offset: u64, width: u32) -> io::Result<u64> {
    let mut p = NicPeek {
        bar,
        width,
        offset,
        value: 0,
    };
    // SAFETY: a NicPeek holds no pointer (the agent checks the BAR, offset and width against
    // its own mapping of the NIC).
    unsafe { ioctl(dev, ioctl::PEEK_NIC, &mut p) }?;
    Ok(p.value)
}

/// The kernel writes `width` bytes of `value` there (refused while dormant).
pub fn poke_nic(dev: &File, bar: u32, offset: u64, width: u32, value: u64) -> io::Result<()> {
    let mut p = NicPeek {
        bar,
        width,
        offset,
        value,
    };
    // SAFETY: as for `peek_nic`.
    unsafe { ioctl(dev, ioctl::POKE_NIC, &mut p) }
}

/// What the agent gave the hv besides its block (the store).
pub fn agent_info(dev: &File) -> io::Result<AgentInfo> {
    let mut info = AgentInfo::default();
    // SAFETY: an AgentInfo holds no pointer.
    unsafe { ioctl(dev, ioctl::AGENT_INFO, &mut info) }?;
    Ok(info)
}

/// Every CPU stopped for `ms` milliseconds, then resumed (`flags`: `abi::FREEZE_CHECK`).
pub fn freeze(dev: &File, ms: u32, flags: u32) -> io::Result<FreezeArgs> {
    let mut f = FreezeArgs {
        ms,
        flags,
        ..Default::default()
    };
    // SAFETY: a FreezeArgs holds no pointer.
    unsafe { ioctl(dev, ioctl::FREEZE, &mut f) }?;
    Ok(f)
}

/// Takes a checkpoint (`flags`: `abi::CHECKPOINT_PERIODIC` or 0). Its `status` says how it
/// went: `RolledBack` when this call returns a second time, after a rollback to it.
pub fn checkpoint(dev: &File, flags: u32) -> io::Result<CheckpointArgs> {
    let mut a = CheckpointArgs {
        flags,
        ..Default::default()
    };
    // SAFETY: a CheckpointArgs holds no pointer.
    unsafe { ioctl(dev, ioctl::CHECKPOINT, &mut a) }?;
    Ok(a)
}

/// Puts the machine back at checkpoint `id`. Returns only when refused.
pub fn rollback(dev: &File, id: u32) -> io::Result<RollbackArgs> {
    let mut a = RollbackArgs {
        id,
        ..Default::default()
    };
    // SAFETY: a RollbackArgs holds no pointer.
    unsafe { ioctl(dev, ioctl::ROLLBACK, &mut a) }?;
    Ok(a)
}

/// The checkpoints kept: the list's header and its entries.
pub fn checkpoints(dev: &File) -> io::Result<(CheckpointList, Vec<CheckpointInfo>)> {
    let head = std::mem::size_of::<CheckpointList>();
    let each = std::mem::size_of::<CheckpointInfo>();
    let mut buf = vec![0u8; head + each * abi::MAX_CHECKPOINTS as usize];
    let mut req = BufferRequest {
        buf: buf.as_mut_ptr() as u64,
        len: buf.len() as u64,
        status: 0,
    };
    // SAFETY: `req.buf` points at `buf`, writable for `req.len` bytes until we return, and the
    // agent writes at most `len` bytes there.
    unsafe { ioctl(dev, ioctl::CHECKPOINTS, &mut req) }?;
    // SAFETY: the buffer holds a CheckpointList at its start (plain integers, any bit pattern
    // valid); read_unaligned needs no alignment.
    let mut list = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<CheckpointList>()) };
    list.status = req.status;
    let n = (list.count as usize).min(abi::MAX_CHECKPOINTS as usize);
    let infos = (0..n)
        .map(|i| {
            // SAFETY: entry i lies inside the buffer (n is at most the room made for); plain
            // integers as above.
            unsafe {
                std::ptr::read_unaligned(buf[head + i * each..].as_ptr().cast::<CheckpointInfo>())
            }
        })
        .collect();
    Ok((list, infos))
}

/// Deletes checkpoint `id` (or `abi::CHECKPOINT_ALL`).
pub fn checkpoint_delete(dev: &File, id: u32) -> io::Result<CheckpointDelete> {
    let mut d = CheckpointDelete {
        id,
        ..Default::default()
    };
    // SAFETY: a CheckpointDelete holds no pointer.
    unsafe { ioctl(dev, ioctl::CHECKPOINT_DELETE, &mut d) }?;
    Ok(d)
}

/// The last rollback the agent handled (all zero before any).
pub fn last_rollback(dev: &File) -> io::Result<RollbackNotice> {
    let mut n = RollbackNotice::default();
    // SAFETY: a RollbackNotice holds no pointer.
    unsafe { ioctl(dev, ioctl::LAST_ROLLBACK, &mut n) }?;
    Ok(n)
}

/// Sets the periodic ring: a checkpoint every `every_ms` (0: stop), keeping `keep`.
pub fn checkpoint_periodic(dev: &File, every_ms: u32, keep: u32) -> io::Result<CheckpointPeriodic> {
    let mut p = CheckpointPeriodic {
        every_ms,
        keep,
        ..Default::default()
    };
    // SAFETY: a CheckpointPeriodic holds no pointer.
    unsafe { ioctl(dev, ioctl::CHECKPOINT_PERIODIC, &mut p) }?;
    Ok(p)
}

/// Pages of checkpoint `id` from `first_gpa` into `buf` (whole pages, at most
/// `READ_MAX_PAGES`); returns the hv's status.
pub fn checkpoint_read(dev: &File, id: u32, first_gpa: u64, buf: &mut [u8]) -> io::Result<i64> {
    let mut req = ReadRequest {
        buf: buf.as_mut_ptr() as u64,
        id,
        pages: (buf.len() / 4096) as u32,
        first_gpa,
        status: 0,
    };
    // SAFETY: `req.buf` points at `buf`, writable for `pages` whole pages until we return, and
    // the agent writes at most that many there.
    unsafe { ioctl(dev, ioctl::CHECKPOINT_READ, &mut req) }?;
    Ok(req.status)
}

/// A request the hv answers in a buffer (`BufferRequest`): `head` at its start, room for
/// `len` bytes in all; the hv's status and the buffer as it wrote it.
fn buffer_request<T: Copy>(
    dev: &File,
    req: Request<BufferRequest>,
    head: T,
    len: usize,
) -> io::Result<(i64, Vec<u8>)> {
    let mut buf = vec![0u8; len.max(std::mem::size_of::<T>())];
    // SAFETY: the buffer holds at least a `T`; write_unaligned needs no alignment.
    unsafe { std::ptr::write_unaligned(buf.as_mut_ptr().cast::<T>(), head) };
    let mut r = BufferRequest {
        buf: buf.as_mut_ptr() as u64,
        len: buf.len() as u64,
        status: 0,
    };
    // SAFETY: `r.buf` points at `buf`, readable and writable for `r.len` bytes until we
    // return, and the agent reads and writes at most `len` bytes there.
    unsafe { ioctl(dev, req, &mut r) }?;
    Ok((r.status, buf))
}

/// CPU `cpu` of checkpoint `id`, as the hv wrote it (a `CheckpointCpu`, then its XSAVE area
/// and local APIC record: `assemble::cpu_record_from_bytes` reads it), and the hv's status.
pub fn checkpoint_cpu(dev: &File, id: u32, cpu: u32) -> io::Result<(i64, Vec<u8>)> {
    let head = CheckpointCpu {
        id,
        cpu,
        ..Default::default()
    };
    buffer_request(dev, ioctl::CHECKPOINT_CPU, head, 16 << 10)
}

/// The platform devices' record of checkpoint `id`: the hv's answer as it wrote it (an
/// `abi::CheckpointDevices`, then the record), and its status.
pub fn checkpoint_devices(dev: &File, id: u32) -> io::Result<(i64, Vec<u8>)> {
    let head = CheckpointDevices {
        id,
        ..Default::default()
    };
    buffer_request(dev, ioctl::CHECKPOINT_DEVICES, head, 16 << 10)
}

/// What an export needs of the kernel: where it maps RAM, and the RAM ranges the hv keeps.
pub fn export_info(dev: &File) -> io::Result<(ExportInfo, Vec<(u64, u64)>)> {
    let head = std::mem::size_of::<ExportInfo>();
    let mut buf = vec![0u8; head + 16 * abi::MAX_RAM_RANGES as usize];
    let mut req = BufferRequest {
        buf: buf.as_mut_ptr() as u64,
        len: buf.len() as u64,
        status: 0,
    };
    // SAFETY: as in `checkpoints`.
    unsafe { ioctl(dev, ioctl::EXPORT_INFO, &mut req) }?;
    // SAFETY: the buffer holds an ExportInfo at its start (plain integers).
    let info = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<ExportInfo>()) };
    let n = (info.ram_ranges as usize).min(abi::MAX_RAM_RANGES as usize);
    let word = |i: usize| {
        let at = head + 8 * i;
        u64::from_le_bytes(buf[at..at + 8].try_into().unwrap_or_default())
    };
    Ok((
        info,
        (0..n).map(|i| (word(2 * i), word(2 * i + 1))).collect(),
    ))
}
