//! Stopping every CPU as a service (the rendezvous), with a client that is not the debugger:
//! `qsctl freeze MS --check` holds every CPU of a running kernel, captures each CPU's whole
//! state (registers, segments, MSRs, XSAVE, the local APIC), writes it back, captures it again
//! and compares, while a self-verifying workload runs. The consistent cut a checkpoint needs.

use quicksilver_tests::*;

const FREEZES: u32 = 10;

fn freeze_script() -> String {
    format!(
        r#"qsctl freeze 50; echo "dormant-rc=$?"
qsctl activate
qs-workload --seconds 100000 > /tmp/workload.log 2>&1 &
WL=$!
sleep 1
i=0
while [ $i -lt {FREEZES} ]; do
    qsctl freeze 100 --check
    i=$((i + 1))
done
qsctl freeze 20000; echo "too-long-rc=$?"
qsctl bench-freeze 25
qsctl probe --expect active > /dev/null && echo "STILL-ACTIVE"
qsctl deactivate
kill -TERM $WL
wait $WL
tail -3 /tmp/workload.log
"#
    )
}

fn freezes_on(smp: u32) {
    let out = run(guest(&format!("freeze-smp{smp}"), smp), &freeze_script());
    assert_success(&out);
    let o = out.script_output();
    assert!(
        o.contains("freeze refused: the hypervisor is not active") && o.contains("dormant-rc=1"),
        "a freeze while dormant is refused with the cause and the fix:\n{o}"
    );
    let held = format!("froze {smp} CPUs for ");
    assert_eq!(
        o.matches(&held).count(),
        FREEZES as usize,
        "every freeze held every CPU:\n{o}"
    );
    let identical = format!("state check: {smp} of {smp} CPUs came back identical");
    assert_eq!(
        o.matches(&identical).count(),
        FREEZES as usize,
        "every CPU's whole state came back as captured, every time:\n{o}"
    );
    assert!(
        o.contains("too-long-rc=1") && o.contains("at most 10000 ms"),
        "{o}"
    );
    assert_console_has(&out, "STILL-ACTIVE");
    assert_console_has(&out, "WORKLOAD OK");
    assert_kernel_clean(&out);
}

#[test]
fn freezes_hold_every_cpu_and_their_whole_state_comes_back_identical_on_4_cpus() {
    freezes_on(4);
}

#[test]
fn a_freeze_on_one_cpu_leads_alone() {
    freezes_on(1);
}
