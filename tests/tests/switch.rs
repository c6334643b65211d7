//! Self-virtualization end to end: a dormant hv, then many round trips into and out of guest
//! mode on every CPU while a self-verifying workload runs, with proof on each CPU each time.

use quicksilver_tests::*;

/// The script: workload in the background, `cycles` round trips with a per-CPU proof after
/// each switch (a process pinned to each CPU sees the signature leaf; the kernel sees
/// EFER.SVME), then the workload's own verdict and the kernel log.
fn cycles_script(cycles: u32) -> String {
    format!(
        r#"set -e
qsctl status | grep -q "state: dormant"
qsctl probe --expect native
qs-workload --seconds 100000 > /tmp/workload.log 2>&1 &
WL=$!
sleep 1
i=0
while [ $i -lt {cycles} ]; do
    qsctl activate > /dev/null
    qsctl probe --expect active > /dev/null
    qsctl deactivate > /dev/null
    qsctl probe --expect native > /dev/null
    i=$((i + 1))
done
echo "CYCLES-DONE $i"
qsctl activate
qsctl status
qsctl stats
qsctl deactivate
kill -TERM $WL
wait $WL
cat /tmp/workload.log | tail -3
dmesg | grep -i -E "quicksilver|bug|warn|lockup|stall" || true
"#
    )
}

fn cycles_on(smp: u32, cycles: u32) {
    let out = run(
        guest(&format!("switch-smp{smp}"), smp),
        &cycles_script(cycles),
    );
    assert_success(&out);
    assert_console_has(&out, &format!("CYCLES-DONE {cycles}"));
    assert_console_has(
        &out,
        &format!("state: active ({smp} of {smp} online CPUs in guest mode)"),
    );
    assert_console_has(&out, "code: intact");
    assert_console_has(&out, "WORKLOAD OK");
    assert_console_has(&out, &format!("{} activations", cycles + 1));
    assert_kernel_clean(&out);
}

#[test]
fn round_trips_smp1() {
    cycles_on(1, 200);
}

#[test]
fn round_trips_smp2() {
    cycles_on(2, 200);
}

#[test]
fn round_trips_smp4() {
    cycles_on(4, 200);
}
