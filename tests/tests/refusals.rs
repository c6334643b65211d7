//! Every refusal a user can hit, each with its one clear line and nothing lost: bad images,
//! no SVM, another hypervisor owning SVM, double activate, deactivate while dormant, hotplug
//! while active, rmmod while active, and the guest reaching for the hv's memory.

use quicksilver_tests::*;

const KO: &str = "/lib/quicksilver/quicksilver.ko";

#[test]
fn bad_images_are_refused_and_a_good_one_still_loads() {
    let good = std::fs::read(artifacts().hv_image).expect("hv image built");
    let mut flipped = good.clone();
    flipped[300] ^= 0x08; // one bit in the code
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
    let q = guest("bad-images", 1)
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

#[test]
fn a_cpu_without_svm_is_refused() {
    let q = guest("no-svm", 1).cpu("qemu64,-svm");
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

#[test]
fn double_switches_hotplug_and_hv_memory_are_refused() {
    let script = r#"qsctl deactivate; echo "deactivate-dormant-rc=$?"
qsctl peek 0
qsctl poke 256 0x4141; echo "poke-dormant-rc=$?"
qsctl activate
qsctl activate; echo "double-rc=$?"
echo "ACTIVE-PEEK"; qsctl peek 0
qsctl poke 256 0xdeadbeef
qsctl poke-store 4096 0xfeedface
echo 0 > /sys/devices/system/cpu/cpu1/online; echo "offline-active-rc=$?"
qsctl stats
qsctl deactivate
echo "NATIVE-PEEK"; qsctl peek 0
echo "NATIVE-STORE-PEEK"; qsctl peek-store 4096
qsctl status
echo 0 > /sys/devices/system/cpu/cpu1/online; echo "offline-native-rc=$?"
echo 1 > /sys/devices/system/cpu/cpu1/online; echo "online-native-rc=$?"
qsctl activate && qsctl probe --expect active && qsctl deactivate
"#;
    let out = run(guest("double-hotplug-memory", 2), script);
    assert_success(&out);
    let o = out.script_output();
    assert!(o.contains("deactivate-dormant-rc=1"), "{o}");
    assert!(o.contains("the hypervisor is not active (dormant)"), "{o}");
    assert!(o.contains("poke-dormant-rc=1"), "{o}");
    assert!(o.contains("double-rc=1"), "{o}");
    assert!(o.contains("the hypervisor is already active"), "{o}");
    // The kernel reads the hv's header magic while dormant, zeros while active.
    let after = |marker: &str| {
        o.split(marker)
            .nth(1)
            .and_then(|s| s.lines().nth(1))
            .unwrap_or("")
    };
    assert!(
        after("ACTIVE-PEEK").starts_with("0x0000000000000000"),
        "{o}"
    );
    assert!(after("NATIVE-PEEK").contains("QSHVIMG"), "{o}");
    // The store (the hv's second region) is hidden the same way: the kernel's write while
    // active landed in scratch, and the store still holds what it held (zeros).
    assert!(
        after("NATIVE-STORE-PEEK").starts_with("0x0000000000000000"),
        "{o}"
    );
    assert!(o.contains("offline-active-rc=1"), "{o}");
    assert!(
        o.contains("offline-native-rc=0") && o.contains("online-native-rc=0"),
        "{o}"
    );
    // The kernel's write went to scratch: refused, counted, and the hv's code is intact.
    // A missing stats line is a failure too, not a pass.
    let refused = o
        .lines()
        .find(|l| l.contains("accesses to hv memory"))
        .unwrap_or_else(|| {
            panic!("`qsctl stats` printed no \"refused: N accesses to hv memory\" line:\n{o}")
        });
    let count = refused
        .split("refused: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no count in the refusals line: {refused}"));
    assert!(
        count >= 2,
        "the writes to the hv's block and its store were not both refused: {refused}"
    );
    assert!(
        o.contains("code: intact (checksum matches the image)"),
        "{o}"
    );
    assert_console_has(
        &out,
        "refusing to offline CPU 1 while the hypervisor is active",
    );
    assert_kernel_clean(&out);
}

#[test]
fn kvm_owning_svm_is_refused_and_cannot_start_under_us() {
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
    let out = run(guest("kvm-owns-svm", 2), script);
    assert_success(&out);
    let o = out.script_output();
    assert!(!o.contains("INSMOD-FAILED"), "{o}");
    assert!(o.contains("KVM-VM created"), "{o}");
    assert!(o.contains("activate-with-kvm-rc=1"), "{o}");
    assert!(
        o.contains("EFER.SVME is already set: another hypervisor (kvm_amd?) owns SVM"),
        "{o}"
    );
    assert_console_has(&out, "quicksilver: activate refused on CPU");
    assert!(o.contains("activate-after-rc=0"), "{o}");
    // Under the hv, kvm_amd sees EFER.SVME set and refuses by itself.
    assert!(o.contains("KVM-VM refused"), "{o}");
    assert!(o.contains("vm-under-hv-rc=1"), "{o}");
    assert!(o.contains("still-active-rc=0"), "{o}");
    assert_kernel_clean(&out);
}

#[test]
fn rmmod_while_active_deactivates_first() {
    let script = format!(
        r#"set -e
qsctl activate
qsctl probe --expect active
rmmod quicksilver
dmesg | grep "quicksilver: deactivated"
insmod {KO} image=/lib/quicksilver/hv.img
qsctl probe --expect native
qsctl status
"#
    );
    let out = run(guest("rmmod-active", 2), &script);
    assert_success(&out);
    assert_console_has(&out, "quicksilver: deactivated 2 CPUs before unloading");
    assert_console_has(&out, "state: dormant");
    assert_kernel_clean(&out);
}

#[test]
fn an_unexpected_exit_lets_that_cpu_go_native_and_the_kernel_runs_on() {
    // A read of a physical address above everything the hv's nested tables map (512 GiB) is an
    // exit the hv does not handle: CPU 1 must step out, run the read natively, and the
    // kernel must not notice; the others stay active until deactivated.
    let script = r#"set -e
qsctl activate
taskset -c 1 qsctl peek-phys 0x8000000000
qsctl probe
qsctl stats
qsctl deactivate
qsctl probe --expect native
qsctl activate
qsctl probe --expect active
qsctl deactivate
"#;
    let out = run(guest("unexpected-exit", 2), script);
    assert_success(&out);
    let o = out.script_output();
    assert!(o.contains("cpu 0: signature Quicksilver"), "{o}");
    assert!(
        o.contains("cpu 1: signature none (kernel: none), EFER 0xd01 SVME=0"),
        "{o}"
    );
    assert!(o.contains("unexpected exits: 1"), "{o}");
    assert!(o.contains("last unexpected exit: cpu 1 code 0x400"), "{o}");
    assert!(o.contains("info2 0x8000000000"), "{o}");
    assert!(o.contains("native on 1 CPUs"), "{o}");
    assert_console_has(
        &out,
        "1 CPUs had already left guest mode after an unexpected exit",
    );
    assert_kernel_clean(&out);
}
