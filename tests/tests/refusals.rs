//! Every refusal a user can hit, each with its one clear line and nothing lost: bad images,
//! no SVM, another hypervisor owning SVM, double activate, deactivate while dormant, hotplug
//! while active, rmmod while active, and the guest reaching for the hv's memory.

use quicksilver_tests::scenarios::KO;
use quicksilver_tests::*;

#[test]
fn bad_images_are_refused_and_a_good_one_still_loads() {
    scenarios::bad_images(&artifacts(), "bad-images");
}

#[test]
fn a_cpu_without_svm_is_refused() {
    scenarios::no_svm(&artifacts(), "no-svm");
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
    let (refused, count) = hv_memory_refusals(&o);
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
    scenarios::kvm_owns_svm(&artifacts(), "kvm-owns-svm");
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

#[test]
fn a_link_port_without_a_uart_is_refused_and_leaves_nothing_behind() {
    // No second serial port in this guest: nothing answers at 0x2f8. The refusal must release
    // the I/O region it claimed (its name lives in the module: /proc/ioports read it after
    // the unload and oopsed), so a second try says the same and the agent still loads.
    let script = format!(
        r#"insmod {KO} image=/lib/quicksilver/hv.img link_port=0x2f8; echo "first-rc=$?"
cat /proc/ioports > /dev/null; echo "ioports-rc=$?"
insmod {KO} image=/lib/quicksilver/hv.img link_port=0x2f8; echo "second-rc=$?"
insmod {KO} image=/lib/quicksilver/hv.img && qsctl status
"#
    );
    let out = run(guest("no-uart", 1).noload(), &script);
    assert_success(&out);
    let o = out.script_output();
    for needle in [
        "first-rc=19",
        "ioports-rc=0",
        "second-rc=19",
        "state: dormant",
    ] {
        assert!(o.contains(needle), "{needle}:\n{o}");
    }
    assert_eq!(
        o.matches("refusing to load: no 16550 UART answers at the link port 0x2f8")
            .count()
            .min(2),
        2,
        "{o}"
    );
    assert!(!o.contains("owned by another driver"), "{o}");
    assert_kernel_clean(&out);
}
