//! The fast link's NIC changes hands (issue 13): the agent loaded with `net=` takes the NIC
//! from Linux's own driver and hands it to the hv; `rmmod` gives it back, and Linux's driver
//! drives it again.

use qs_testkit::qemu::{FastLinkNic, FAST_LINK_BDF};
use quicksilver_tests::fast_link::{self, PARAMS};
use quicksilver_tests::scenarios::KO;
use quicksilver_tests::*;

/// The guest's view of the NIC, one line per step: who drives the PCI function and which
/// network interfaces Linux has.
const PRELUDE: &str = r#"
dev=/sys/bus/pci/devices/$NIC
driver() { if [ -e $dev/driver ]; then basename "$(readlink $dev/driver)"; else echo none; fi; }
ifaces() { ls /sys/class/net | grep -v '^lo$' | tr '\n' ' '; }
show() { echo "$1 driver=$(driver) ifaces=$(ifaces)"; }
"#;

#[test]
fn the_agent_takes_the_nic_from_linuxs_driver_and_rmmod_gives_it_back() {
    handover(
        "net-handover",
        FastLinkNic::VirtioNet,
        "virtio-net",
        "virtio-pci",
    );
}

#[test]
fn an_82574l_is_taken_from_e1000e_and_given_back_the_same_way() {
    handover(
        "net-handover-e1000e",
        FastLinkNic::E1000e,
        "82574L",
        "e1000e",
    );
}

/// Boots with `nic` as the fast link's NIC and Linux's driver `driver` loaded, loads the agent
/// with `net=` (the agent names the NIC `kind`), activates, unloads, and checks that Linux's
/// driver drives the NIC again.
fn handover(name: &str, nic: FastLinkNic, kind: &str, driver: &str) {
    let a = artifacts();
    let (link, net) = fast_link::sockets(&a, name);
    let script = format!(
        r#"NIC={FAST_LINK_BDF}
{PRELUDE}
{PARAMS}
show BOOTED
for m in $(cat /lib/quicksilver/net-modules); do insmod $m || echo "INSMOD-FAILED $m"; done
sleep 1
show LINUX
insmod {KO} image=/lib/quicksilver/hv.img $params; echo "insmod-rc=$?"
show TAKEN
qsctl status | grep "fast link"
qsctl activate
rmmod quicksilver; echo "rmmod-rc=$?"
sleep 1
show GIVEN
ip link set eth0 up; echo "up-rc=$?"
ip addr add 10.13.0.3/24 dev eth0
# e1000e's watchdog reports the carrier a moment after the interface comes up.
for i in 1 2 3 4 5 6 7 8 9 10; do [ "$(cat /sys/class/net/eth0/operstate)" = up ] && break; sleep 0.5; done
# Nothing answers on the other side: the ARP request is traffic enough.
ping -c 1 -W 2 10.13.0.1 > /dev/null 2>&1
echo "ETH0 flags=$(cat /sys/class/net/eth0/flags) operstate=$(cat /sys/class/net/eth0/operstate) tx_packets=$(cat /sys/class/net/eth0/statistics/tx_packets)"
ip link show eth0
"#
    );
    let qemu = guest_on(&a, name, 2)
        .link(&link, GDB_KEY)
        .fast_link(&net, nic)
        .noload();
    let out = run(qemu, &script);
    let _ = std::fs::remove_file(&link);
    let _ = std::fs::remove_file(&net);
    assert_success(&out);
    let o = out.script_output();
    let line = |step: &str| fast_link::step_line(&o, step);
    // Linux's own driver has the NIC before the agent loads.
    assert!(
        line("LINUX").contains(&format!("driver={driver}")) && line("LINUX").contains("eth0"),
        "{o}"
    );
    assert!(o.contains("insmod-rc=0"), "the agent did not load:\n{o}");
    assert_console_has(
        &out,
        &format!(
            "quicksilver: fast link: {FAST_LINK_BDF} ({kind}) taken from {driver}, 10.13.0.2:50000"
        ),
    );
    // The stub holds it, and Linux has no interface for it.
    assert!(
        line("TAKEN").contains("driver=quicksilver-net") && !line("TAKEN").contains("eth0"),
        "{o}"
    );
    fast_link::assert_held(&o);
    assert!(o.contains("rmmod-rc=0"), "{o}");
    assert_console_has(
        &out,
        &format!("quicksilver: fast link: {FAST_LINK_BDF} given back to {driver}"),
    );
    // Linux's driver drives it again: the interface is back and comes up.
    assert!(
        line("GIVEN").contains(&format!("driver={driver}")) && line("GIVEN").contains("eth0"),
        "{o}"
    );
    assert!(o.contains("up-rc=0"), "{o}");
    let eth0 = line("ETH0");
    let flags = eth0
        .split("flags=0x")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| u32::from_str_radix(s, 16).ok())
        .unwrap_or_else(|| panic!("no flags in {eth0:?}"));
    assert!(flags & 1 != 0, "eth0 is not up (IFF_UP): {eth0}\n{o}");
    // And sends: the ARP requests went out through Linux's driver.
    let tx: u64 = eth0
        .split("tx_packets=")
        .nth(1)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    assert!(tx > 0, "eth0 sent nothing: {eth0}\n{o}");
    assert_kernel_clean(&out);
}

#[test]
fn a_net_the_fast_link_cannot_use_is_refused_with_cause_and_fix_and_the_nic_stays_linuxs() {
    let a = artifacts();
    let name = "net-refusals";
    let (link, net) = fast_link::sockets(&a, name);
    let other = fast_link::socket(&a, name, ".e1000");
    // 00:01.1 is the PIIX3's IDE function (I/O BARs only); 00:05.0 an 82540EM (e1000), a NIC
    // the hv does not drive.
    let script = format!(
        r#"NIC={FAST_LINK_BDF}
{PRELUDE}
{PARAMS}
for m in $(cat /lib/quicksilver/net-modules); do insmod $m || echo "INSMOD-FAILED $m"; done
try() {{ insmod {KO} image=/lib/quicksilver/hv.img "$@"; echo "rc=$? for $*"; }}
try $params net=zz:1
try $params net=0000:00:07.0
try $params net=00:01.1
try $params net=00:05.0
echo "E1000 override=$(cat /sys/bus/pci/devices/0000:00:05.0/driver_override)"
try net=$NIC
show STILL
try $params net=00:04.0
show TAKEN
rmmod quicksilver
show GIVEN
"#
    );
    let qemu = guest_on(&a, name, 2)
        .link(&link, GDB_KEY)
        .fast_link_nic(&net, FastLinkNic::VirtioNet)
        .args([
            "-netdev".to_string(),
            format!(
                "stream,id=other,server=on,addr.type=unix,addr.path={}",
                other.display()
            ),
            "-device".into(),
            "e1000,netdev=other,addr=0x5,romfile=".into(),
        ])
        .noload();
    let out = run(qemu, &script);
    for sock in [&link, &net, &other] {
        let _ = std::fs::remove_file(sock);
    }
    assert_success(&out);
    let o = out.script_output();
    for (param, said) in [
        (
            "net=zz:1",
            "refusing to load: net=zz:1 is not a PCI address: give the NIC's as lspci -D prints it (net=0000:00:04.0)",
        ),
        (
            "net=0000:00:07.0",
            "refusing to load: no PCI device at net=0000:00:07.0: lspci -D lists this machine's; give the NIC's",
        ),
        (
            "net=00:01.1",
            "refusing to load: 0000:00:01.1 (8086:7010) has no memory BAR",
        ),
        (
            "net=00:05.0",
            "refusing to load: the hv refused 0000:00:05.0 for the fast link: the NIC given for the fast link (net=) is not one the hv drives",
        ),
        (
            "for net=0000:00:04.0",
            "refusing to load: net=0000:00:04.0 needs the link",
        ),
    ] {
        assert!(
            o.lines()
                .any(|l| l.starts_with("rc=") && !l.starts_with("rc=0") && l.ends_with(param)),
            "insmod with {param} was not refused:\n{o}"
        );
        assert_console_has(&out, &format!("quicksilver: {said}"));
    }
    // The refused NIC went back as it was: no override left behind.
    assert!(o.contains("E1000 override=(null)"), "{o}");
    assert_console_has(
        &out,
        "quicksilver: fast link: 0000:00:05.0 given back; no driver is loaded for it",
    );
    // The refusals left the fast link's NIC to Linux, and a good net= still takes it.
    let line = |step: &str| fast_link::step_line(&o, step);
    assert!(line("STILL").contains("driver=virtio-pci"), "{o}");
    assert!(line("TAKEN").contains("driver=quicksilver-net"), "{o}");
    assert!(line("GIVEN").contains("driver=virtio-pci"), "{o}");
    assert_kernel_clean(&out);
}
