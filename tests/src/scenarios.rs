//! What a user does that must work on every supported kernel: the whole suite runs these on
//! the default kernel (`switch.rs`, `refusals.rs`), the matrix (`matrix.rs`) on the others.
//! Each boots its own guest of the given build and asserts what a user would check.

use crate::{
    assert_console_has, assert_kernel_clean, assert_success, guest_on, run, Artifacts, RunOutput,
};
use qs_testkit::artifacts::Series;

/// Where the initramfs puts the agent.
pub const KO: &str = "/lib/quicksilver/quicksilver.ko";

/// The round-trip script: workload in the background, `cycles` round trips with a per-CPU
/// proof after each switch (a process pinned to each CPU sees the signature leaf; the kernel
/// sees EFER.SVME), then the workload's own verdict and the kernel log.
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

/// `cycles` activate/deactivate round trips on `smp` CPUs under the self-verifying workload.
pub fn round_trips(a: &Artifacts, name: &str, smp: u32, cycles: u32) {
    let out = run(guest_on(a, name, smp), &cycles_script(cycles));
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

/// Corrupt, truncated and foreign images are refused with the reason; a good one then loads.
pub fn bad_images(a: &Artifacts, name: &str) {
    let good = std::fs::read(&a.hv_image).expect("hv image built");
    let mut flipped = good.clone();
    // One bit in the code (which starts on the image's second page).
    flipped[0x1000 + 300] ^= 0x08;
    let short = good[..good.len() - 100].to_vec();
    let mut foreign = good.clone();
    foreign[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
    let script = format!(
        r#"for img in flipped short foreign; do
    if insmod {KO} image=/lib/quicksilver/$img.img; then echo "LOADED-$img"; rmmod quicksilver; else echo "REFUSED-$img"; fi
done
dmesg | grep "quicksilver: refusing"
qsctl status; echo "status-rc=$?"
insmod {KO} image=/lib/quicksilver/hv.img && echo LOADED-good
qsctl status
"#
    );
    let q = guest_on(a, name, 1)
        .noload()
        .file("/lib/quicksilver/flipped.img", 0o644, flipped)
        .file("/lib/quicksilver/short.img", 0o644, short)
        .file("/lib/quicksilver/foreign.img", 0o644, foreign);
    let out = run(q, &script);
    assert_success(&out);
    for (img, why) in [
        ("flipped", "checksum mismatch: the file is corrupt"),
        ("short", "size mismatch"),
        ("foreign", "bad magic: not a Quicksilver hv image"),
    ] {
        assert_console_has(&out, &format!("REFUSED-{img}"));
        assert_console_has(
            &out,
            &format!("bad hv image /lib/quicksilver/{img}.img: {why}"),
        );
    }
    assert_console_has(&out, "status-rc=1");
    assert_console_has(&out, "load the agent first");
    assert_console_has(&out, "LOADED-good");
    assert_console_has(&out, "state: dormant");
    assert_kernel_clean(&out);
}

/// A CPU without SVM: the agent refuses to load, with the reason.
pub fn no_svm(a: &Artifacts, name: &str) {
    let q = guest_on(a, name, 1).cpu("qemu64,-svm");
    let out = run(
        q,
        "dmesg | grep quicksilver\nqsctl activate; echo \"activate-rc=$?\"\n",
    );
    assert_success(&out);
    assert_console_has(&out, "QS-LOAD-FAILED");
    assert_console_has(&out, "refusing to load: this CPU has no AMD SVM");
    assert_console_has(&out, "activate-rc=1");
    assert_kernel_clean(&out);
}

/// KVM owning SVM: activation is refused with the reason; once KVM lets go, the hv activates
/// and KVM in turn cannot start under it. When KVM owns SVM differs: 6.1's kvm_amd sets
/// EFER.SVME while a VM exists, 6.12's from the module's load (`kvm.enable_virt_at_load`,
/// new in 6.10) until its unload.
pub fn kvm_owns_svm(a: &Artifacts, name: &str) {
    match a.kernel.id.series {
        Series::V6_1 => kvm_vm_owns_svm(a, name),
        Series::V6_12 => kvm_module_owns_svm(a, name),
    }
}

/// 6.1: a VM held by kvm_amd owns SVM; after it ends, the hv activates and a VM cannot start.
fn kvm_vm_owns_svm(a: &Artifacts, name: &str) {
    let script = r#"for m in $(cat /lib/quicksilver/kvm-modules); do insmod $m || echo "INSMOD-FAILED $m"; done
qs-workload --hold-kvm-vm 600 > /tmp/kvm.log 2>&1 &
H=$!
sleep 3
cat /tmp/kvm.log
qsctl probe
qsctl activate; echo "activate-with-kvm-rc=$?"
kill $H; wait $H
qsctl activate; echo "activate-after-rc=$?"
qs-workload --hold-kvm-vm 1; echo "vm-under-hv-rc=$?"
qsctl probe --expect active; echo "still-active-rc=$?"
qsctl deactivate
qsctl stats
"#;
    // Under the hv, kvm_amd sees EFER.SVME set and refuses a VM by itself.
    assert_kvm_story(
        &run(guest_on(a, name, 2), script),
        &["KVM-VM refused", "vm-under-hv-rc=1"],
    );
}

/// 6.12: kvm_amd loaded owns SVM (a VM runs natively meanwhile); after its unload the hv
/// activates, and kvm_amd cannot load under it.
fn kvm_module_owns_svm(a: &Artifacts, name: &str) {
    let script = r#"for m in $(cat /lib/quicksilver/kvm-modules); do insmod $m || echo "INSMOD-FAILED $m"; done
qsctl probe
qsctl activate; echo "activate-with-kvm-rc=$?"
qs-workload --hold-kvm-vm 1; echo "vm-native-rc=$?"
rmmod kvm_amd; echo "rmmod-rc=$?"
qsctl activate; echo "activate-after-rc=$?"
insmod $(tail -1 /lib/quicksilver/kvm-modules); echo "kvm-under-hv-rc=$?"
qsctl probe --expect active; echo "still-active-rc=$?"
qsctl deactivate
qsctl stats
"#;
    // Under the hv, kvm_amd sees EFER.SVME set and refuses to load by itself.
    let out = run(guest_on(a, name, 2), script);
    assert_kvm_story(
        &out,
        &[
            "vm-native-rc=0",
            "rmmod-rc=0",
            "kvm: enabling virtualization on CPU",
        ],
    );
    let o = out.script_output();
    assert!(!o.contains("kvm-under-hv-rc=0"), "{o}");
}

/// What both stories show: the KVM modules loaded and ran a VM, activation was refused with
/// the reason while KVM owned SVM and succeeded once it let go, the hv stayed active when KVM
/// tried again (with `also` on the console), and the kernel is clean.
fn assert_kvm_story(out: &RunOutput, also: &[&str]) {
    assert_success(out);
    let o = out.script_output();
    assert!(!o.contains("INSMOD-FAILED"), "{o}");
    assert!(o.contains("KVM-VM created"), "{o}");
    assert!(o.contains("activate-with-kvm-rc=1"), "{o}");
    assert!(
        o.contains("EFER.SVME is already set: another hypervisor (kvm_amd?) owns SVM"),
        "{o}"
    );
    assert_console_has(out, "quicksilver: activate refused on CPU");
    assert!(o.contains("activate-after-rc=0"), "{o}");
    for needle in also {
        assert!(o.contains(needle), "{needle:?} missing:\n{o}");
    }
    assert!(o.contains("still-active-rc=0"), "{o}");
    assert_kernel_clean(out);
}

/// The agent built for another kernel (`foreign`, a `.ko`) is refused by this one with its
/// own line, and nothing is loaded; this kernel's own agent then loads.
pub fn a_module_for_another_kernel(a: &Artifacts, name: &str, foreign: &Artifacts) {
    let ko = std::fs::read(&foreign.agent).expect("the other kernel's agent built");
    let script = format!(
        r#"if insmod /lib/quicksilver/foreign.ko image=/lib/quicksilver/hv.img; then echo LOADED-foreign; else echo REFUSED-foreign; fi
dmesg | grep quicksilver
qsctl status; echo "status-rc=$?"
insmod {KO} image=/lib/quicksilver/hv.img && echo LOADED-own
qsctl status
"#
    );
    let q = guest_on(a, name, 1)
        .noload()
        .file("/lib/quicksilver/foreign.ko", 0o644, ko);
    let out = run(q, &script);
    assert_success(&out);
    assert_console_has(&out, "REFUSED-foreign");
    assert_console_has(&out, "status-rc=1");
    // The kernel's module loader names the mismatch before any of the agent runs: 6.12 by
    // the size of `struct module`, 6.1 by the symbol versions (modversions) or the version
    // magic.
    let o = out.script_output();
    assert!(
        [
            "quicksilver: .gnu.linkonce.this_module section size must match",
            "quicksilver: disagrees about version of symbol",
            "quicksilver: version magic",
        ]
        .iter()
        .any(|line| o.contains(line)),
        "{name}: no line from the kernel about the wrong build:\n{o}"
    );
    assert_console_has(&out, "LOADED-own");
    assert_console_has(&out, "state: dormant");
    assert_kernel_clean(&out);
}
