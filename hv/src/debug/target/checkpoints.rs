//! gdb's `monitor checkpoint`, `monitor checkpoints` and `monitor rollback ID`: checkpoints
//! taken and restored while gdb holds every CPU (the debugger leads the stop, so it calls the
//! checkpoint engine directly instead of asking for a stop of its own).

use super::Debugger;
use core::fmt::Write;
use gdbstub::target::ext::monitor_cmd::ConsoleOutput;
use quicksilver_proto::abi::{Status, CHECKPOINT_CURRENT, CHECKPOINT_PERIODIC};

/// Writes one line (gdb shows it as is).
fn line(out: &mut ConsoleOutput<'_>, args: core::fmt::Arguments<'_>) {
    let _ = out.write_fmt(args);
    let _ = out.write_str("\n");
}

impl Debugger {
    /// `monitor checkpoint`.
    pub(super) fn monitor_checkpoint(&mut self, out: &mut ConsoleOutput<'_>) {
        let hv = self.hv;
        if self.parked.is_none() {
            line(
                out,
                format_args!("checkpoint refused: the CPUs are not stopped"),
            );
            return;
        }
        // INT3s still in the text (`breakpoint always-inserted on`) stay out of the checkpoint.
        self.lift_all(None);
        let taken = self
            .parked
            .as_mut()
            .map(|p| crate::checkpoint::take_parked(hv, p));
        self.reinsert_all(None);
        let Some(taken) = taken else { return };
        match taken {
            Ok(a) => line(
                out,
                format_args!(
                    "checkpoint {}: {} CPUs, taken in {} us while gdb holds them; holds {} KiB now",
                    a.id,
                    a.cpus,
                    a.pause_us,
                    a.bytes >> 10
                ),
            ),
            Err((Status::NotQuiescent, a)) => {
                line(
                    out,
                    format_args!(
                        "checkpoint refused: CPU {} (thread {}) is {}, where its state cannot be restored: machine not quiescent; continue and stop elsewhere",
                        a.busy_cpu,
                        a.busy_cpu + 1,
                        quicksilver_proto::abi::BusyWhat(a.busy_what)
                    ),
                );
            }
            Err((s, _)) => line(out, format_args!("checkpoint refused: {}", s.message())),
        }
    }

    /// `monitor checkpoints`.
    pub(super) fn monitor_checkpoints(&mut self, out: &mut ConsoleOutput<'_>) {
        let mut n = 0;
        crate::checkpoint::for_each_kept(self.hv, |c| {
            n += 1;
            line(
                out,
                format_args!(
                    "checkpoint {}: {:.1} s old, pause {} us, {} pages, {} KiB, parent {}{}{}",
                    c.id,
                    c.age_ns as f64 / 1e9,
                    c.pause_us,
                    c.pages,
                    c.bytes >> 10,
                    c.parent,
                    if c.flags & CHECKPOINT_PERIODIC != 0 {
                        ", periodic"
                    } else {
                        ""
                    },
                    if c.flags & CHECKPOINT_CURRENT != 0 {
                        ", current"
                    } else {
                        ""
                    },
                ),
            );
        });
        if n == 0 {
            line(out, format_args!("no checkpoint is kept"));
        }
    }

    /// `monitor rollback ID`.
    pub(super) fn monitor_rollback(&mut self, word: Option<&str>, out: &mut ConsoleOutput<'_>) {
        let Some(id) = word.and_then(|w| w.parse::<u32>().ok()) else {
            line(
                out,
                format_args!("usage: monitor rollback ID (monitor checkpoints lists them)"),
            );
            return;
        };
        // gdb takes its breakpoints out while the CPUs are stopped (unless `breakpoint
        // always-inserted` is on); one still in memory or in a debug register could be put
        // back or lost by the rollback without gdb knowing.
        if self.sw.iter().flatten().count() != 0 || self.slots.armed() != 0 {
            line(
                out,
                format_args!(
                    "rollback refused: gdb's breakpoints are inserted now (breakpoint always-inserted on?): set it off, then roll back"
                ),
            );
            return;
        }
        let hv = self.hv;
        let Some(p) = self.parked.as_mut() else {
            line(
                out,
                format_args!("rollback refused: the CPUs are not stopped"),
            );
            return;
        };
        match crate::checkpoint::rollback_parked(hv, p, id) {
            Ok(n) => line(
                out,
                format_args!(
                    "rolled back to checkpoint {} (taken {:.3} s ago): {} pages put back, {} newer checkpoints dropped; every CPU is at the checkpoint now (gdb shows its registers after flushregs or the next stop)",
                    n.id,
                    n.age_ns as f64 / 1e9,
                    n.pages,
                    n.dropped
                ),
            ),
            Err(s) => line(out, format_args!("rollback refused: {}", s.message())),
        }
    }
}
