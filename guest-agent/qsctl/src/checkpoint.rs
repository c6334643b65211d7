//! `qsctl checkpoint`, `qsctl checkpoints`, `qsctl rollback ID`: checkpoints of the whole
//! machine, and putting it back at one.

use crate::{ioctl, open, status_error};
use anyhow::{bail, Context, Result};
use quicksilver_proto::abi::{self, Status};

/// `qsctl checkpoint`: takes one and says what it cost. A second return (after a rollback to
/// this checkpoint) says so instead.
pub fn take() -> Result<()> {
    let dev = open()?;
    let a = ioctl::checkpoint(&dev, 0).context("checkpoint request failed")?;
    match Status::from_i64(a.status) {
        Some(Status::Ok) => {
            println!(
                "checkpoint {}: {} CPUs stopped {} us (gathering them {} us); holds {} KiB now, and grows as pages are written ({} pages were written since the previous one)",
                a.id,
                a.cpus,
                a.pause_us,
                a.gather_us,
                a.bytes >> 10,
                a.pages_before
            );
            Ok(())
        }
        Some(Status::RolledBack) => {
            println!(
                "rolled back to checkpoint {}: this command, like every process, continues from the instant it was taken",
                a.id
            );
            Ok(())
        }
        Some(Status::NotQuiescent) => Err(status_error(a.status).context(format!(
            "checkpoint refused: CPU {} was {}",
            a.busy_cpu,
            abi::BusyWhat(a.busy_what)
        ))),
        _ => Err(status_error(a.status).context("checkpoint refused")),
    }
}

/// `qsctl checkpoint --delete ID|all`.
pub fn delete(which: &str) -> Result<()> {
    let id = match which {
        "all" => abi::CHECKPOINT_ALL,
        n => parse_id(n)?,
    };
    let dev = open()?;
    let d = ioctl::checkpoint_delete(&dev, id).context("delete request failed")?;
    if d.status != 0 {
        return Err(status_error(d.status).context(format!("cannot delete checkpoint {which}")));
    }
    println!("deleted {} checkpoint(s)", d.deleted);
    Ok(())
}

/// `qsctl checkpoint --every 100ms|off [--keep N]`: the periodic ring.
pub fn periodic(every: &str, keep: Option<&str>) -> Result<()> {
    let every_ms = match every {
        "off" | "0" => 0,
        s => {
            let digits = s.strip_suffix("ms").unwrap_or(s);
            match digits.parse::<u32>() {
                Ok(ms) if ms >= abi::PERIODIC_MIN_MS => ms,
                _ => bail!(
                    "--every {s:?}: give milliseconds, at least {} (--every 100ms), or off",
                    abi::PERIODIC_MIN_MS
                ),
            }
        }
    };
    let keep = match keep {
        None => 20,
        Some(k) => match k.parse::<u32>() {
            Ok(n) if (1..=abi::MAX_CHECKPOINTS).contains(&n) => n,
            _ => bail!(
                "--keep {k:?}: give how many periodic checkpoints to keep, 1 to {}",
                abi::MAX_CHECKPOINTS
            ),
        },
    };
    let dev = open()?;
    let p = ioctl::checkpoint_periodic(&dev, every_ms, keep).context("periodic request failed")?;
    if p.status != 0 {
        return Err(status_error(p.status).context("periodic checkpoints refused"));
    }
    if every_ms == 0 {
        println!("periodic checkpoints stopped (the ring's checkpoints stay until deleted)");
    } else {
        println!("a checkpoint every {every_ms} ms, the last {keep} kept");
    }
    Ok(())
}

pub fn parse_id(s: &str) -> Result<u32> {
    match s.parse::<u32>() {
        Ok(id) if id != 0 && id != abi::CHECKPOINT_ALL => Ok(id),
        _ => bail!("{s:?} is not a checkpoint id: give the number qsctl checkpoints lists"),
    }
}

/// `qsctl rollback ID`. Returns only when refused: otherwise every process, this one too,
/// continues from the checkpoint.
pub fn rollback(id: &str) -> Result<()> {
    let id = parse_id(id)?;
    let dev = open()?;
    let a = ioctl::rollback(&dev, id).context("rollback request failed")?;
    if a.status == Status::CheckpointTooOld as i64 {
        return Err(status_error(a.status).context(format!(
            "rollback to {id} refused: it is {} s old",
            a.age_ns / 1_000_000_000
        )));
    }
    Err(status_error(a.status).context(format!("rollback to {id} refused")))
}

/// `qsctl checkpoints`: the table.
pub fn list() -> Result<()> {
    let dev = open()?;
    let (l, infos) = ioctl::checkpoints(&dev).context("list request failed")?;
    if l.status != 0 {
        return Err(status_error(l.status));
    }
    println!(
        "{:>4} {:>10} {:>9} {:>8} {:>10} {:>6}  kind",
        "id", "age", "pause", "pages", "bytes", "parent"
    );
    for c in &infos {
        let mut kind = String::from(if c.flags & abi::CHECKPOINT_PERIODIC != 0 {
            "periodic"
        } else {
            "manual"
        });
        if c.flags & abi::CHECKPOINT_CURRENT != 0 {
            kind.push_str(", current");
        }
        println!(
            "{:>4} {:>9.1}s {:>7}us {:>8} {:>9}K {:>6}  {kind}",
            c.id,
            c.age_ns as f64 / 1e9,
            c.pause_us,
            c.pages,
            c.bytes >> 10,
            if c.parent == 0 {
                "-".to_string()
            } else {
                c.parent.to_string()
            },
        );
    }
    if l.every_ms != 0 {
        println!("periodic: every {} ms, keeping {}", l.every_ms, l.keep);
    }
    println!(
        "{} of at most {} kept; checkpoint memory {} of {} KiB used (ckpt_mem=); {} dropped when it ran out; {} rollbacks",
        l.count,
        l.max,
        l.used_bytes >> 10,
        l.capacity_bytes >> 10,
        l.dropped_for_memory,
        l.rollbacks
    );
    let last = ioctl::last_rollback(&dev).context("last rollback request failed")?;
    if last.generation != 0 {
        println!(
            "last rollback: number {}, to checkpoint {}, then {:.1} s old; {} us stopped; {} pages restored; {} newer dropped",
            last.generation,
            last.id,
            last.age_ns as f64 / 1e9,
            last.pause_us,
            last.pages,
            last.dropped
        );
    }
    Ok(())
}
