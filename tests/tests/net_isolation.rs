//! The fast link's NIC is out of the guest's reach while the hv owns it (issue 13), shown
//! from the guest as the hv-memory isolation test shows it: the kernel touches the NIC's
//! registers through the agent's own mapping of its BAR (`qsctl peek-nic`/`poke-nic`), as a
//! driver would. Dormant it reads the device; active it reads zeros, and a write that would
//! reset the device is refused and counted; deactivated, the device was not reset. Its PCI
//! configuration space likewise: active, the kernel reads it as a function that is not there
//! and its write of the command register (memory decoding and bus mastering off) is refused
//! and counted; deactivated, both are still on.

use qs_testkit::qemu::{FastLinkNic, FAST_LINK_BDF};
use quicksilver_tests::fast_link::{self, PARAMS};
use quicksilver_tests::scenarios::KO;
use quicksilver_tests::*;

/// virtio 1.x's common configuration (`struct virtio_pci_common_cfg`): offsets of the fields
/// read and written here, and `device_status`'s DRIVER_OK bit.
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const DRIVER_OK: u64 = 0x04;

#[test]
fn the_guest_cannot_reach_the_nics_registers_while_the_hv_is_active() {
    let a = artifacts();
    let name = "net-isolation";
    let (link, net) = fast_link::sockets(&a, name);
    // The common configuration's place comes from the device's virtio capabilities (vendor
    // capability 0x09, cfg_type 1: BAR at +4, offset at +8), as Linux's virtio-pci finds it.
    let script = format!(
        r#"NIC={FAST_LINK_BDF}
{PARAMS}
cfg=/sys/bus/pci/devices/$NIC/config
byte() {{ od -An -tu1 -j$1 -N1 $cfg | tr -d ' '; }}
p=$(byte 52)
while [ "$p" -ne 0 ]; do
    if [ "$(byte $p)" -eq 9 ] && [ "$(byte $((p + 3)))" -eq 1 ]; then
        bar=$(byte $((p + 4)))
        off=$(od -An -tu4 -j$((p + 8)) -N4 $cfg | tr -d ' ')
    fi
    p=$(byte $((p + 1)))
done
echo "COMMON-CFG bar=$bar offset=$off"
echo "BAR-START $(sed -n "$((bar + 1))p" /sys/bus/pci/devices/$NIC/resource | cut -d' ' -f1)"
for m in $(cat /lib/quicksilver/net-modules); do insmod $m || echo "INSMOD-FAILED $m"; done
insmod {KO} image=/lib/quicksilver/hv.img $params; echo "insmod-rc=$?"
numq() {{ echo "$1 num_queues $(qsctl peek-nic $bar $((off + {NUM_QUEUES})) --width 2)"; }}
status() {{ echo "$1 device_status $(qsctl peek-nic $bar $((off + {DEVICE_STATUS})) --width 1)"; }}
numq DORMANT
status DORMANT
qsctl poke-nic $bar $((off + {DEVICE_STATUS})) 0 --width 1; echo "poke-dormant-rc=$?"
qsctl activate
qsctl poke-nic $bar $((off + {DEVICE_STATUS})) 0 --width 1; echo "poke-active-rc=$?"
numq ACTIVE
status ACTIVE
qsctl stats | grep "accesses to hv memory"
echo "CFG-ACTIVE $(od -An -tx4 -N4 $cfg | tr -d ' ')"
printf '\000\000' | dd of=$cfg bs=1 seek=4 count=2 conv=notrunc 2>/dev/null; echo "cfg-write-rc=$?"
qsctl stats | grep "^fast link:"
qsctl deactivate
numq NATIVE
status NATIVE
echo "CFG-NATIVE $(od -An -tx4 -N4 $cfg | tr -d ' ') command=$(od -An -tx2 -j4 -N2 $cfg | tr -d ' ')"
qsctl status | grep "fast link"
rmmod quicksilver; echo "rmmod-rc=$?"
"#
    );
    let qemu = guest_on(&a, name, 2)
        .link(&link, GDB_KEY)
        .fast_link(&net, FastLinkNic::VirtioNet)
        .noload();
    let out = run(qemu, &script);
    let _ = std::fs::remove_file(&link);
    let _ = std::fs::remove_file(&net);
    assert_success(&out);
    let o = out.script_output();
    // QEMU's layout (hw/virtio/virtio-pci.c: modern_mem_bar_idx = 4, common.offset = 0),
    // found the way a driver finds it.
    assert!(o.contains("COMMON-CFG bar=4 offset=0"), "{o}");
    let bar_start = o
        .lines()
        .find_map(|l| l.strip_prefix("BAR-START 0x"))
        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
        .filter(|&s| s != 0)
        .unwrap_or_else(|| panic!("no BAR-START line with the BAR's address:\n{o}"));
    assert!(o.contains("insmod-rc=0"), "the agent did not load:\n{o}");
    let value = |step: &str, field: &str| -> u64 {
        let prefix = format!("{step} {field} 0x");
        o.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .unwrap_or_else(|| panic!("no {step} {field} value in the script's output:\n{o}"))
    };
    // Dormant, the kernel reads the device the hv drives: its queues, and DRIVER_OK (the hv's
    // driver set it up).
    assert!(value("DORMANT", "num_queues") != 0, "{o}");
    assert!(value("DORMANT", "device_status") & DRIVER_OK != 0, "{o}");
    // Writing it while dormant would reach the device: the agent refuses.
    assert!(o.contains("poke-dormant-rc=1"), "{o}");
    // Active, the registers are not there for the kernel: the write landed in scratch, the
    // reads see zeros, and the hv counted the refusal at the register written.
    assert!(o.contains("poke-active-rc=0"), "{o}");
    assert_eq!(value("ACTIVE", "num_queues"), 0, "{o}");
    assert_eq!(value("ACTIVE", "device_status"), 0, "{o}");
    let (refused, count) = hv_memory_refusals(&o);
    assert!(count >= 1, "the write was not refused: {refused}");
    assert!(
        refused.contains(&format!("(last at {:#x})", bar_start + DEVICE_STATUS)),
        "the refusal was not counted at device_status ({:#x}): {refused}",
        bar_start + DEVICE_STATUS
    );
    // Native again, the device is as the hv left it: not reset (DRIVER_OK still set), and the
    // fast link still the hv's.
    assert!(value("NATIVE", "num_queues") != 0, "{o}");
    assert!(
        value("NATIVE", "device_status") & DRIVER_OK != 0,
        "the kernel's write reset the device:\n{o}"
    );
    // Its configuration space: active, the kernel reads no function there (all ones) and
    // its write of the command register is refused and counted; native again, the IDs read
    // back and memory decoding and bus mastering (bits 1 and 2) are still on.
    assert!(o.contains("CFG-ACTIVE ffffffff"), "{o}");
    let refused_cfg = o
        .lines()
        .find(|l| l.starts_with("fast link:"))
        .and_then(|l| l.split("; ").last())
        .and_then(|l| l.strip_suffix(" configuration-space accesses to the NIC refused"))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no refused configuration-space accesses count:\n{o}"));
    assert!(
        refused_cfg >= 2,
        "the read and the write were not both refused: {refused_cfg}\n{o}"
    );
    let native = o
        .lines()
        .find_map(|l| l.strip_prefix("CFG-NATIVE "))
        .unwrap_or_else(|| panic!("no CFG-NATIVE line:\n{o}"));
    assert!(native.starts_with("10001af4 "), "{native}\n{o}");
    let command = native
        .split("command=")
        .nth(1)
        .and_then(|c| u16::from_str_radix(c.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no command register in {native:?}"));
    assert_eq!(
        command & 0x6,
        0x6,
        "the kernel's write reached the command register: {native}\n{o}"
    );
    fast_link::assert_held(&o);
    assert!(o.contains("rmmod-rc=0"), "{o}");
    assert_kernel_clean(&out);
}
