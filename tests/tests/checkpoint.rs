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
sleep 1; echo "SLEPT"
"#;

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
    assert!(
        o.contains("state: dormant"),
        "the hv went dormant with the last checkpoint:\n{o}"
    );
    assert!(o.contains("SLEPT"), "{o}");
    assert_kernel_clean(&out);
}
