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
