//! Checkpoints of a live machine and rollbacks to them, driven from `qsctl` inside the guest
//! as a user would: every process continues from the checkpoint (the shell that typed the
//! command included), memory and files in tmpfs are back, the kernel says so in one line and
//! nothing else complains.

use std::time::Duration;

use quicksilver_tests::*;

/// The script's shell takes a checkpoint; the first time it returns, the shell changes a file
/// and a variable and rolls back; the second time (`rolled back`), it checks they are as they
/// were.
const ROUND_TRIP: &str = r#"
echo "state-at-checkpoint" > /tmp/file
V=before
out=$(qsctl checkpoint 2>&1); rc=$?
echo "$out"
case "$out" in
*"rolled back to checkpoint 1"*)
    echo "SECOND-RETURN V=$V file=$(cat /tmp/file)"
    ;;
*)
    echo "FIRST-RETURN rc=$rc"
    echo "changed" > /tmp/file
    V=after
    qsctl checkpoints
    qsctl rollback 1; echo "rollback returned rc=$?"
    ;;
esac
qsctl checkpoints
qsctl rollback 9; echo "missing-rc=$?"
qsctl deactivate; echo "deactivate-rc=$?"
qsctl checkpoint --delete all
qsctl status
qsctl deactivate; echo "deactivate2-rc=$?"
qsctl status
sleep 1; echo "SLEPT"
"#;

/// What the kernel must not say after a rollback (besides `assert_kernel_clean`'s words).
const CLOCK_COMPLAINTS: &[&str] = &[
    "clocksource tsc unstable",
    "Marking clocksource 'tsc' as unstable",
    "Marking TSC unstable",
    "Long readout interval",
    "hung_task",
    "blocked for more than",
    // The agent's notice handler: it tolerates 100 ms (see `qs_nmi_action`), so a report is
    // a real stall. The kernel's own NMI handlers report from 1 ms of wall time, which on
    // this machine the emulator gives by descheduling a vCPU thread (4 on 2 cores; measured
    // 2-30 ms): not the hv's, which never stops a CPU inside an NMI handler (`exit::nmi`,
    // and `checkpoint_gdb`'s refusal there).
    "NMI handler (qs_nmi",
    // The agent lost a rollback's notice (its clock correction with it).
    "came and went before the kernel could act",
];

fn assert_clock_quiet(out: &RunOutput) {
    for line in out.console.lines() {
        if let Some(bad) = CLOCK_COMPLAINTS.iter().find(|b| line.contains(*b)) {
            panic!(
                "{}: the kernel log has {bad:?}:\n  {line}\n(full log: {:?})",
                out.name, out.log
            );
        }
    }
}

#[test]
fn a_rollback_puts_every_process_and_tmpfs_back_at_the_checkpoint() {
    let machine = guest("checkpoint-round-trip", 2).timeout(Duration::from_secs(300));
    let out = run(machine, ROUND_TRIP);
    let o = out.script_output();
    println!("{o}");
    assert_success(&out);
    assert!(o.contains("FIRST-RETURN rc=0"), "{o}");
    assert!(
        o.contains("SECOND-RETURN V=before file=state-at-checkpoint"),
        "the shell and tmpfs are back as they were at the checkpoint:\n{o}"
    );
    assert!(
        !o.contains("rollback returned"),
        "a rollback does not return:\n{o}"
    );
    assert_console_has(&out, "rolled back to checkpoint 1, taken");
    assert!(
        o.contains("missing-rc=1") && o.contains("no checkpoint has that id"),
        "{o}"
    );
    assert!(
        o.contains("deactivate-rc=1") && o.contains("checkpoints are kept"),
        "{o}"
    );
    assert!(o.contains("deleted 1 checkpoint(s)"), "{o}");
    // The kernel's clock runs behind the TSC by the time rolled back: no silent jump.
    assert_console_has(&out, "no checkpoint is kept; the hv stays active");
    assert!(o.contains("deactivate2-rc=0"), "{o}");
    assert_console_has(&out, "going native: the kernel's clock jumps forward");
    assert!(o.contains("state: dormant"), "{o}");
    assert!(o.contains("SLEPT"), "{o}");
    assert_kernel_clean(&out);
    assert_clock_quiet(&out);
}

/// Reads `qsctl checkpoints`' rollback count (the hv's: not rolled back), keeps at most 8
/// checkpoints, and picks a random kept one.
const HELPERS: &str = r#"
rollbacks() { qsctl checkpoints | sed -n 's/.*; \([0-9]*\) rollbacks$/\1/p'; }
# The last rollback the kernel has been told of (its line is in the log by then).
told() { qsctl checkpoints | sed -n 's/^last rollback: number \([0-9]*\),.*/\1/p'; }
settle() { n=0; while [ "$(told)" != "$(rollbacks)" ] && [ $n -lt 200 ]; do usleep 20000; n=$((n + 1)); done; }
kept_ids() { qsctl checkpoints | awk '$1 ~ /^[0-9]+$/ && $2 ~ /s$/ {print $1}'; }
rand() { echo $(( $(od -An -N2 -tu2 /dev/urandom) % $1 )); }
"#;

/// 100 rollbacks to random checkpoints of random ages (up to about a second), on 4 CPUs, under
/// the ledger (a count kept in memory, in tmpfs and through a pipe, checked every step) and the
/// self-verifying workload: every rollback puts all of it back exactly, and it runs on.
///
/// It runs alone (`.config/nextest.toml`): 4 vCPUs on this machine's 2 cores sharing them
/// with another test's QEMU get starved long enough for the kernel to report a late clock
/// watchdog ("Long readout interval"), which this test counts against the rollbacks.
#[test]
fn a_hundred_rollbacks_on_four_cpus_under_a_workload_leave_every_process_and_cpu_sound() {
    hundred_rollbacks(4);
}

fn hundred_rollbacks(smp: u32) {
    let machine = guest(&format!("checkpoint-100-smp{smp}"), smp).timeout(Duration::from_secs(900));
    let script = format!(
        r#"{HELPERS}
qs-workload --ledger /tmp/ledger &
LP=$!
qs-workload > /tmp/workload.log 2>&1 &
WP=$!
sleep 1
while [ "$(rollbacks)" -lt 100 ]; do
    qsctl checkpoint > /tmp/last-checkpoint 2>&1 || cat /tmp/last-checkpoint
    set -- $(kept_ids)
    if [ $# -gt 8 ]; then qsctl checkpoint --delete $1 > /dev/null; shift; fi
    usleep $(( ($(rand 400) + 20) * 1000 ))
    if [ $(rand 2) = 0 ]; then
        eval id=\${{$(( $(rand $#) + 1 ))}}
        # Not before the kernel was told of the last one (its line, its reseed). (The
        # checkpoint may have gone meanwhile: dropped for memory.)
        settle
        qsctl rollback $id 2>/tmp/err || grep -q "no checkpoint has that id" /tmp/err || echo "ROLLBACK-REFUSED $id"
    fi
done
echo "ROLLBACKS-DONE $(rollbacks)"
qsctl checkpoints | tail -2
qsctl stats | grep -E "^(switches|unexpected|last unexpected)|active" | head -12
kill -TERM $LP $WP
wait $LP; echo "ledger-rc=$?"
wait $WP; echo "workload-rc=$?"
tail -1 /tmp/workload.log
qsctl checkpoint --delete all
n=0
while [ $n -lt $(nproc) ]; do
    timeout 5 taskset -c $n usleep 50000 && echo "cpu$n: timer-ok" || echo "cpu$n: timer LOST"
    n=$((n + 1))
done
"#
    );
    let out = run(machine, &script);
    assert_success(&out);
    let o = out.script_output();
    // The loop's test runs before each checkpoint, so a rollback to one taken after the
    // 100th's test makes a few more.
    let done: usize = o
        .lines()
        .find_map(|l| l.strip_prefix("ROLLBACKS-DONE ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ROLLBACKS-DONE:\n{o}"));
    assert!((100..110).contains(&done), "{o}");
    assert!(!o.contains("ROLLBACK-REFUSED"), "{o}");
    assert!(o.contains("LEDGER OK") && o.contains("ledger-rc=0"), "{o}");
    assert!(
        o.contains("WORKLOAD OK") && o.contains("workload-rc=0"),
        "{o}"
    );
    assert_eq!(
        o.matches(": timer-ok").count(),
        smp as usize,
        "every CPU's timer fires:\n{o}"
    );
    // One line per rollback, which names it. (A rollback to a checkpoint taken while the
    // previous one's line was being written can print that line twice: the world keeps both.)
    let mut said: Vec<u64> = out
        .console
        .lines()
        .filter(|l| l.contains("quicksilver: rolled back to checkpoint"))
        .filter_map(|l| {
            l.split("(rollback ")
                .nth(1)?
                .split(')')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    said.sort_unstable();
    said.dedup();
    assert_eq!(
        said,
        (1..=done as u64).collect::<Vec<_>>(),
        "the kernel says so for every rollback"
    );
    // The ledger's count, as the console (the world) saw it, went back at rollbacks.
    let counts: Vec<u64> = o
        .lines()
        .filter_map(|l| l.strip_prefix("ledger n=")?.trim().parse().ok())
        .collect();
    let back = counts.windows(2).filter(|w| w[1] < w[0]).count();
    assert!(back >= 10, "the ledger went back {back} times:\n{o}");
    assert_kernel_clean(&out);
    assert_clock_quiet(&out);
}

/// Twice back to the same checkpoint: the kernel's random generator gives different bytes
/// each time, the wall clock is the world's again (the RTC, which is not rolled back, agrees),
/// and a sleep takes its time.
#[test]
fn after_a_rollback_urandom_differs_the_wall_clock_is_right_and_sleep_takes_its_time() {
    let machine = guest("checkpoint-time", 2).timeout(Duration::from_secs(300));
    let script = format!(
        r#"{HELPERS}
qsctl checkpoint > /dev/null
r=$(rollbacks)
echo "RANDOM r=$r $(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
echo "CLOCK r=$r skew=$(( $(date +%s) - $(cat /sys/class/rtc/rtc0/since_epoch) ))"
if [ "$r" -lt 2 ]; then
    sleep 3
    qsctl rollback 1
fi
t0=$(cat /sys/class/rtc/rtc0/since_epoch); sleep 2; t1=$(cat /sys/class/rtc/rtc0/since_epoch)
echo "SLEPT $((t1 - t0))"
"#
    );
    let out = run(machine, &script);
    assert_success(&out);
    let o = out.script_output();
    let randoms: Vec<&str> = (0..3)
        .map(|r| {
            let key = format!("RANDOM r={r} ");
            o.lines()
                .find_map(|l| l.strip_prefix(&key))
                .unwrap_or_else(|| panic!("no {key:?}:\n{o}"))
        })
        .collect();
    assert!(
        randoms[1] != randoms[2] && randoms[0] != randoms[1],
        "the same checkpoint twice gives different random bytes: {randoms:?}"
    );
    for r in 1..3 {
        let key = format!("CLOCK r={r} skew=");
        let skew: i64 = o
            .lines()
            .find_map(|l| l.strip_prefix(&key)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key:?}:\n{o}"));
        assert!(
            skew.abs() <= 1,
            "after rollback {r} the wall clock is {skew} s off the RTC (the checkpoint was 3 s old):\n{o}"
        );
    }
    assert!(o.contains("SLEPT 2") || o.contains("SLEPT 3"), "{o}");
    assert_kernel_clean(&out);
    assert_clock_quiet(&out);
}

/// A checkpoint taken with the console UART's FIFO set one way, rolled back to after a program
/// set it another: the hv writes the checkpoint's value back, and the console works.
#[test]
fn a_rollback_puts_the_console_uarts_fifo_setting_back_and_the_console_works() {
    let machine = guest("checkpoint-fcr", 2).timeout(Duration::from_secs(300));
    let script = r#"
qsctl activate > /dev/null
qs-workload --outb 0x3fa 0x41
out=$(qsctl checkpoint 2>&1)
case "$out" in
*"rolled back"*)
    qsctl stats | grep "^devices:"
    echo "CONSOLE-AFTER $(seq 1 300 | wc -l)"
    ;;
*)
    qs-workload --outb 0x3fa 0x81
    qsctl rollback 1
    ;;
esac
"#;
    let out = run(machine, script);
    assert_success(&out);
    let o = out.script_output();
    assert!(
        o.contains("shadowed now: com1 fcr 0x41"),
        "the checkpoint's FIFO setting is back in the UART:\n{o}"
    );
    assert!(o.contains("CONSOLE-AFTER 300"), "{o}");
    assert_kernel_clean(&out);
}

/// What a user can get wrong, or run out of: each a clear error, nothing kept is lost.
#[test]
fn refusals_name_the_cause_and_lose_nothing() {
    let machine = guest("checkpoint-refusals", 2)
        .cmdline("quicksilver.ckpt_mem=8M")
        .timeout(Duration::from_secs(300));
    let script = format!(
        r#"{HELPERS}
qsctl rollback 1; echo "dormant-rc=$?"
qs-workload --ledger /tmp/ledger &
LP=$!
qsctl checkpoint > /dev/null
qsctl checkpoint > /dev/null
qsctl checkpoint --delete 1
qsctl rollback 1; echo "deleted-rc=$?"
qsctl rollback 77; echo "missing-rc=$?"
qsctl rollback x; echo "bad-id-rc=$?"
# Fill the checkpoint memory, 64 KiB at a time, until less than a reserve (1/32, at least 64
# pages) is free; then ask for a checkpoint. (If the memory ran out meanwhile, the oldest went:
# take a fresh one and go on.)
qsctl checkpoint > /dev/null
i=0
stopped=
while [ $i -lt 400 ]; do
    free=$(qsctl checkpoints | sed -n 's/.*memory \([0-9]*\) of \([0-9]*\) KiB.*/\2 \1/p' | awk '{{print $1 - $2}}')
    # The ledger stops writing 1 MiB before the end: what is left must outlast the refusal
    # and the rollback below. (Stopped only at the refusal, on a loaded emulator it ran on
    # while this script's CPU waited, and its writes alone used the rest and dropped the
    # last checkpoint before the rollback.)
    if [ -z "$stopped" ] && [ "$free" -lt 1024 ]; then kill -STOP $LP; stopped=1; fi
    if [ "$free" -lt 200 ]; then
        out=$(qsctl checkpoint 2>&1)
        case "$out" in
        *"rolled back"*) echo "BACK-AT $i"; break ;;
        *ckpt_mem*) echo "REFUSED: $out"; break ;;
        esac
    fi
    [ -z "$(kept_ids)" ] && qsctl checkpoint > /dev/null
    dd if=/dev/urandom of=/tmp/f$i bs=64K count=1 2>/dev/null
    i=$((i + 1))
done
if [ "$(rollbacks)" = 0 ]; then
    set -- $(kept_ids)
    eval newest=\${{$#}}
    echo "NEWEST $newest"
    qsctl rollback $newest
fi
qsctl checkpoints | tail -2
kill -CONT $LP
kill -TERM $LP; wait $LP; echo "ledger-rc=$?"
"#
    );
    let out = run(machine, &script);
    assert_success(&out);
    let o = out.script_output();
    assert!(
        o.contains("dormant-rc=1") && o.contains("no checkpoint has that id"),
        "{o}"
    );
    assert!(o.contains("deleted 1 checkpoint(s)"), "{o}");
    assert!(
        o.contains("deleted-rc=1") && o.contains("missing-rc=1"),
        "{o}"
    );
    assert!(
        o.contains("bad-id-rc=1") && o.contains("is not a checkpoint id"),
        "{o}"
    );
    assert!(
        o.contains("REFUSED: qsctl: checkpoint refused: the checkpoint memory is full")
            && o.contains("ckpt_mem="),
        "a checkpoint the user asks for is refused, naming the parameter:\n{o}"
    );
    assert!(
        o.contains("last rollback: number 1, to checkpoint"),
        "a kept checkpoint still restores after the refusal:\n{o}"
    );
    assert!(o.contains("LEDGER OK") && o.contains("ledger-rc=0"), "{o}");
    assert_kernel_clean(&out);
}

/// The periodic ring: a checkpoint every 100 ms, the last 5 kept; a rollback to the oldest
/// of the ring under the ledger; `--every off` stops it and the ring stays.
#[test]
fn the_periodic_ring_keeps_its_last_checkpoints_and_a_rollback_to_one_is_exact() {
    let machine = guest("checkpoint-ring", 2).timeout(Duration::from_secs(300));
    let script = format!(
        r#"{HELPERS}
qs-workload --ledger /tmp/ledger &
LP=$!
qsctl checkpoint --every 5ms; echo "too-often-rc=$?"
qsctl checkpoint --every 100ms --keep 5
sleep 3
qsctl checkpoints
qsctl checkpoint --every off
set -- $(kept_ids)
echo "KEPT $#"
if [ "$(rollbacks)" = 0 ]; then qsctl rollback $1; fi
sleep 1
qsctl checkpoints | grep -c periodic | sed 's/^/PERIODIC-ROWS /'
qsctl checkpoints | tail -3
kill -TERM $LP; wait $LP; echo "ledger-rc=$?"
# Rings started and deleted under a workload that writes all the time: a CPU whose TLB still
# holds a page's read-only translation when logging ends must not be taken for unexpected.
qs-workload > /tmp/workload.log 2>&1 &
WP=$!
for i in 1 2 3 4 5 6 7 8; do
    qsctl checkpoint --every 10ms --keep 3 > /dev/null
    usleep 300000
    qsctl checkpoint --every off > /dev/null
    qsctl checkpoint --delete all > /dev/null
done
qsctl stats | grep "^unexpected exits"
qsctl checkpoint | sed 's/^checkpoint [0-9]*:.*/CHECKPOINT-AFTER-RINGS/'
qsctl checkpoint --delete all > /dev/null
kill -TERM $WP; wait $WP; echo "workload-rc=$?"
tail -1 /tmp/workload.log
"#
    );
    let out = run(machine, &script);
    assert_success(&out);
    let o = out.script_output();
    assert!(
        o.contains("too-often-rc=1") && o.contains("at least 10"),
        "{o}"
    );
    assert!(
        o.contains("a checkpoint every 100 ms, the last 5 kept"),
        "{o}"
    );
    assert!(o.contains("KEPT 5"), "the ring keeps its last 5:\n{o}");
    assert!(o.contains("periodic: every 100 ms, keeping 5"), "{o}");
    assert!(o.contains("periodic checkpoints stopped"), "{o}");
    // Back at the ring's oldest: its 4 newer ones are gone, and the ring stays off.
    assert_console_has(&out, "4 newer checkpoints dropped");
    assert!(o.contains("PERIODIC-ROWS 1"), "{o}");
    assert!(o.contains("LEDGER OK") && o.contains("ledger-rc=0"), "{o}");
    assert!(
        o.contains("unexpected exits: 0") && o.contains("CHECKPOINT-AFTER-RINGS"),
        "every CPU stays in guest mode through rings ended and deleted:\n{o}"
    );
    assert!(
        o.contains("WORKLOAD OK") && o.contains("workload-rc=0"),
        "{o}"
    );
    assert_kernel_clean(&out);
    assert_clock_quiet(&out);
}
