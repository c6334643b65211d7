//! gdb's `vCont`: what each parked CPU does when the stub resumes. Each CPU's word is its
//! release (`rendezvous::Release`: stay parked, or run) and, for a run, whether it is a single
//! step (`PerCpu::step`, which `run` turns into TF). With scheduler locking only the CPUs gdb
//! named run; otherwise "the rest continue".

use super::{Debugger, Error};
use crate::rendezvous::Release;
use gdbstub::common::{Signal, Tid};
use gdbstub::target::ext::base::multithread::{
    MultiThreadResume, MultiThreadSchedulerLocking, MultiThreadSchedulerLockingOps,
    MultiThreadSingleStep, MultiThreadSingleStepOps,
};

impl Debugger {
    /// Tells parked CPU `i` gdb's resume action (`Stay` keeps it parked).
    fn set_action(&mut self, i: u32, r: Release, step: bool) {
        if let Some(p) = self.parked.as_mut() {
            p.set_release(i, r);
            if let Some(st) = p.get(i) {
                st.dbg.step = step;
            }
        }
    }
}

impl MultiThreadResume for Debugger {
    fn resume(&mut self) -> Result<(), Error> {
        if self.scheduler_lock {
            return Ok(());
        }
        // gdb's "the rest continue": every CPU it said nothing about.
        for i in 0..self.hv.cpus {
            let stays = self
                .parked
                .as_ref()
                .is_some_and(|p| p.is_parked(i) && p.release_of(i) == Release::Stay);
            if stays {
                self.set_action(i, Release::Run, false);
            }
        }
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), Error> {
        self.scheduler_lock = false;
        for i in 0..self.hv.cpus {
            self.set_action(i, Release::Stay, false);
        }
        Ok(())
    }

    fn set_resume_action_continue(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), Error> {
        let i = self.parked_cpu(tid).ok_or(Error::NoSuchCpu)?;
        self.set_action(i, Release::Run, false);
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadSingleStep for Debugger {
    fn set_resume_action_step(&mut self, tid: Tid, _signal: Option<Signal>) -> Result<(), Error> {
        let i = self.parked_cpu(tid).ok_or(Error::NoSuchCpu)?;
        self.set_action(i, Release::Run, true);
        Ok(())
    }
}

impl MultiThreadSchedulerLocking for Debugger {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), Error> {
        self.scheduler_lock = true;
        Ok(())
    }
}
