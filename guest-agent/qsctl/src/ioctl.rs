//! The agent's ioctl ABI (mirror of `guest-agent/linux/qs_abi.h`).

use std::fs::File;
use std::os::fd::AsRawFd;

/// Result of switching every online CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SwitchResult {
    pub status: i64,
    pub elapsed_ns: u64,
    pub cpus: u32,
    pub failed_cpu: i32,
}

/// Statistics request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StatsRequest {
    pub buf: u64,
    pub len: u64,
    pub status: i64,
}

/// One CPU, seen from the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Probe {
    pub cpu: u32,
    pub signature: u32,
    pub efer: u64,
}

/// 8 bytes of the hv's memory, read or written by the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Peek {
    pub offset: u64,
    pub value: u64,
}

const _: () = assert!(std::mem::size_of::<SwitchResult>() == 24);
const _: () = assert!(std::mem::size_of::<StatsRequest>() == 24);
const _: () = assert!(std::mem::size_of::<Probe>() == 16);

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((b'Q' as u64) << 8) | nr
}
const WRITE: u64 = 1;
const READ: u64 = 2;

pub const ACTIVATE: u64 = ioc(READ, 1, std::mem::size_of::<SwitchResult>());
pub const DEACTIVATE: u64 = ioc(READ, 2, std::mem::size_of::<SwitchResult>());
pub const STATS: u64 = ioc(READ | WRITE, 3, std::mem::size_of::<StatsRequest>());
pub const PROBE: u64 = ioc(READ | WRITE, 4, std::mem::size_of::<Probe>());
pub const PEEK: u64 = ioc(READ | WRITE, 5, std::mem::size_of::<Peek>());
pub const POKE: u64 = ioc(WRITE, 6, std::mem::size_of::<Peek>());
pub const PEEK_PHYS: u64 = ioc(READ | WRITE, 7, std::mem::size_of::<Peek>());

/// Issues `request` with `arg` on the agent's device.
pub fn call<T>(dev: &File, request: u64, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: every request number above is paired by its callers with the struct whose size
    // is encoded in it, and `arg` is a valid, exclusive pointer to such a struct.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), request as _, arg as *mut T) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_numbers_match_the_c_header() {
        // _IOR('Q', 1, 24 bytes) and _IOWR('Q', 3, 24 bytes) as the kernel's macros encode them.
        assert_eq!(super::ACTIVATE, 0x8018_5101);
        assert_eq!(super::STATS, 0xC018_5103);
        assert_eq!(super::POKE, 0x4010_5106);
    }
}
