//! What gdb asks of the target, answered from the parked CPUs, one protocol extension per
//! file (as gdbstub's own examples lay a target out):
//!
//! - this file: the [`Debugger`] (the session's target state), the base and thread
//!   operations gdbstub calls first, and the KASLR offset (`qOffsets`);
//! - [`registers`]: a CPU's [`CpuState`](crate::cpu_state::CpuState) as gdb's `g`/`G`;
//! - [`memory`]: guest-virtual memory through a CPU's page tables (the hv's identity map
//!   reaches guest-physical memory), never the hv's own;
//! - [`breakpoints`]: INT3 patching, and the DR0-3 slots the kernel does not use
//!   ([`Slots`], DR7 per AMD APM vol. 2, 13.1.1.5);
//! - [`resume`]: what gdb's `vCont` makes each CPU do (continue, step, stay);
//! - [`monitor`]: the `monitor` commands.

pub mod breakpoints;
pub mod checkpoints;
pub mod memory;
pub mod monitor;
pub mod registers;
pub mod resume;

pub use breakpoints::{dr7_bits, dr7_fields, HwKind, HwSlot, Slots, MAX_SW};
pub use memory::{is_int3, read_virt};
pub use registers::{registers_from_state, registers_into_state};

use super::regs::{X86Regs, X86_64Sys};
use crate::vcpu::Parked;
use crate::vmm::Hv;
use core::fmt::Write;
use core::num::NonZeroUsize;
use gdbstub::common::Tid;
use gdbstub::target::ext::base::multithread::{MultiThreadBase, MultiThreadResumeOps};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::BreakpointsOps;
use gdbstub::target::ext::monitor_cmd::MonitorCmdOps;
use gdbstub::target::ext::section_offsets::{Offsets, SectionOffsets, SectionOffsetsOps};
use gdbstub::target::ext::thread_extra_info::{ThreadExtraInfo, ThreadExtraInfoOps};
use gdbstub::target::{Target, TargetError, TargetResult};

/// The errno gdb gets for memory it cannot reach ("Bad address"; gdb's remote protocol,
/// "Errno Values", uses the POSIX numbers).
pub const EFAULT: u8 = 14;

/// A fatal error of the target: gdbstub ends the session with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// gdb named a thread whose CPU is not parked (it is running, or does not exist).
    NoSuchCpu,
}

/// What detach does with the hv.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Devirt {
    /// Every CPU leaves guest mode: the kernel runs on bare metal again (the default).
    Deactivate,
    /// The hv stays active (no debug intercepts) until the agent deactivates it.
    Stay,
}

/// The target state of a session.
pub struct Debugger {
    hv: &'static Hv,
    /// The leader's access to the parked CPUs, lent by `session::lead` while it serves gdb
    /// (and taken back before the CPUs are released).
    pub parked: Option<Parked>,
    /// gdb's software breakpoints: address and the byte the INT3 replaced.
    sw: [Option<(u64, u8)>; MAX_SW],
    /// gdb's hardware breakpoints and watchpoints in DR0-3.
    pub slots: Slots,
    scheduler_lock: bool,
    pub policy: Devirt,
    pub killed: bool,
}

/// The CPU of a GDB thread (threads are numbered from 1, CPUs from 0).
fn cpu_index(tid: Tid) -> u32 {
    tid.get() as u32 - 1
}

impl Debugger {
    /// A new session's target, with every parked CPU's debug state reset: the kernel's DR0-3
    /// are recorded (put back at detach), its enabled slots left alone.
    pub fn new(hv: &'static Hv, mut p: Parked) -> Debugger {
        let mut kernel = 0u8;
        for i in 0..hv.cpus {
            let Some(st) = p.get(i) else { continue };
            st.dbg.kernel_dr = st.state.dr;
            st.dbg.reason = super::Reason::None;
            kernel |= breakpoints::enabled_slots(st.state.dr7);
        }
        Debugger {
            hv,
            parked: Some(p),
            sw: [None; MAX_SW],
            slots: Slots::new(kernel),
            scheduler_lock: false,
            policy: Devirt::Deactivate,
            killed: false,
        }
    }

    /// Number of CPUs gdb sees (the parked ones).
    pub fn threads(&self) -> u32 {
        self.parked
            .as_ref()
            .map_or(0, |p| p.parked().count() as u32)
    }

    /// The CPU of `tid`, if it is parked.
    fn parked_cpu(&self, tid: Tid) -> Option<u32> {
        let i = cpu_index(tid);
        self.parked.as_ref()?.is_parked(i).then_some(i)
    }

    /// The CR3 memory accesses go through: the thread's CPU's, or the first parked one's.
    fn cr3(&self, tid: Option<Tid>) -> Option<u64> {
        let p = self.parked.as_ref()?;
        let i = tid
            .and_then(|t| self.parked_cpu(t))
            .or_else(|| p.parked().next())?;
        Some(p.peek(i)?.state.cr3)
    }
}

impl Target for Debugger {
    type Arch = X86_64Sys;
    type Error = Error;

    fn base_ops(&mut self) -> BaseOps<'_, X86_64Sys, Error> {
        BaseOps::MultiThread(self)
    }
    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }
    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }
    fn support_section_offsets(&mut self) -> Option<SectionOffsetsOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadBase for Debugger {
    fn read_registers(&mut self, r: &mut X86Regs, tid: Tid) -> TargetResult<(), Self> {
        let i = self.parked_cpu(tid).ok_or(TargetError::NonFatal)?;
        let st = self
            .parked
            .as_ref()
            .and_then(|p| p.peek(i))
            .ok_or(TargetError::NonFatal)?;
        registers_from_state(&st.state, r);
        Ok(())
    }

    fn write_registers(&mut self, r: &X86Regs, tid: Tid) -> TargetResult<(), Self> {
        let i = self.parked_cpu(tid).ok_or(TargetError::NonFatal)?;
        let st = self
            .parked
            .as_mut()
            .and_then(|p| p.get(i))
            .ok_or(TargetError::NonFatal)?;
        let changed = registers_into_state(r, &mut st.state).ok_or(TargetError::NonFatal)?;
        st.dirty |= changed;
        Ok(())
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        let cr3 = self.cr3(Some(tid)).ok_or(TargetError::NonFatal)?;
        match read_virt(self.hv, cr3, start, data) {
            0 if !data.is_empty() => Err(TargetError::Errno(EFAULT)),
            n => Ok(n),
        }
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        let cr3 = self.cr3(Some(tid)).ok_or(TargetError::NonFatal)?;
        if memory::write_virt(self.hv, cr3, start, data) {
            Ok(())
        } else {
            Err(TargetError::Errno(EFAULT))
        }
    }

    fn list_active_threads(&mut self, active: &mut dyn FnMut(Tid)) -> Result<(), Error> {
        for i in self.parked.iter().flat_map(|p| p.parked()) {
            if let Some(t) = NonZeroUsize::new(i as usize + 1) {
                active(t);
            }
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }

    fn support_thread_extra_info(&mut self) -> Option<ThreadExtraInfoOps<'_, Self>> {
        Some(self)
    }
}

impl ThreadExtraInfo for Debugger {
    fn thread_extra_info(&self, tid: Tid, buf: &mut [u8]) -> Result<usize, Error> {
        let mut w = Buf { buf, len: 0 };
        let _ = write!(w, "CPU {}", cpu_index(tid));
        Ok(w.len)
    }
}

/// A `fmt::Write` into a byte slice (cut at its end).
struct Buf<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Write for Buf<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl SectionOffsets for Debugger {
    /// The KASLR offset for gdb: the runtime address of the kernel's first segment (`_text`),
    /// so that `gdb vmlinux` needs no manual relocation.
    fn get_section_offsets(&mut self) -> Result<Offsets<u64>, Error> {
        Ok(match self.hv.kernel_text {
            0 => Offsets::Sections {
                text: 0,
                data: 0,
                bss: None,
            },
            text => Offsets::Segments {
                text_seg: text,
                data_seg: None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_names_are_cut_to_gdbs_buffer() {
        let mut small = [0u8; 4];
        let mut w = Buf {
            buf: &mut small,
            len: 0,
        };
        let _ = write!(w, "CPU {}", 12);
        assert_eq!(w.len, 4);
        assert_eq!(&small, b"CPU ");
    }
}
