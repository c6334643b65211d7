//! The fast link behind an IOMMU (issue 13): on `-M q35` with QEMU's AMD IOMMU, Linux's
//! amd_iommu driver gives the NIC a translating DMA domain, so the hv's physical addresses
//! reach memory only because the agent mapped the hv's DMA window into that domain. The
//! 82574L (e1000e) is the NIC: QEMU's model does every DMA through the IOMMU (virtio-net only
//! with iommu_platform=on). The test answers the question with traffic: an ARP request sent to
//! the hv's address arrives by DMA into the hv's receive buffers and the reply leaves by DMA
//! from its transmit buffers.

use qs_testkit::qemu::{FastLinkNic, FAST_LINK_BDF};
use quicksilver_proto::link::net::{parse_frame, Arp, Packet};
use quicksilver_tests::fast_link::{self, HV_IP, PARAMS};
use quicksilver_tests::scenarios::KO;
use quicksilver_tests::*;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const BRIDGE_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x13, 0x00, 0x01];
const BRIDGE_IP: [u8; 4] = [10, 13, 0, 1];

#[test]
fn behind_an_amd_iommu_the_hv_receives_and_sends_through_its_mapped_dma_window() {
    let a = artifacts();
    let name = "net-iommu";
    let (link, net) = fast_link::sockets(&a, name);
    let script = format!(
        r#"NIC={FAST_LINK_BDF}
{PARAMS}
echo "IOMMU-DOMAIN $(cat /sys/bus/pci/devices/$NIC/iommu_group/type)"
for m in $(cat /lib/quicksilver/net-modules); do insmod $m || echo "INSMOD-FAILED $m"; done
sleep 1
insmod {KO} image=/lib/quicksilver/hv.img $params; echo "insmod-rc=$?"
qsctl status | grep "fast link"
echo "SEND-ARP-NOW"
# The test sends an ARP request and waits for the hv's reply meanwhile.
sleep 10
rmmod quicksilver; echo "rmmod-rc=$?"
"#
    );
    // The IOMMU before the NIC, so that the NIC's DMA goes through it.
    let qemu = guest_on(&a, name, 2)
        .args(["-M", "q35", "-device", "amd-iommu"].map(String::from))
        .link(&link, GDB_KEY)
        .fast_link(&net, FastLinkNic::E1000e)
        .noload();
    let mut running = qemu.spawn_script(&script).unwrap_or_else(|e| panic!("{e}"));
    running
        .wait_for("SEND-ARP-NOW", Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}"));
    let reply = arp_exchange(&net, Duration::from_secs(8));
    let out = running.wait().unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_file(&link);
    let _ = std::fs::remove_file(&net);
    assert_success(&out);
    let o = out.script_output();
    // Linux translates the NIC's DMA (a DMA domain, not passthrough)...
    assert!(o.contains("IOMMU-DOMAIN DMA"), "{o}");
    assert!(o.contains("insmod-rc=0"), "the agent did not load:\n{o}");
    // ...so the agent mapped the hv's window into it, and the hv took the NIC.
    assert_console_has(&out, "quicksilver: fast link: the hv's DMA window (");
    assert_console_has(
        &out,
        &format!("mapped into the IOMMU domain of {FAST_LINK_BDF}"),
    );
    fast_link::assert_held(&o);
    // The request reached the hv and its answer left: DMA both ways through the IOMMU.
    // (Without the agent's mapping no reply comes: QEMU's IOMMU drops the NIC's DMA, though
    // it reports no fault the kernel would log.)
    let reply = reply.unwrap_or_else(|e| panic!("{e}\n{o}"));
    assert_eq!(
        (reply.op, reply.sender_ip, reply.target_mac),
        (2, HV_IP, BRIDGE_MAC),
        "{o}"
    );
    assert!(o.contains("rmmod-rc=0"), "{o}");
    assert_kernel_clean(&out);
}

/// Sends an ARP request for the hv's address into QEMU's stream socket at `path` (frames
/// after a 4-byte big-endian length) and returns the reply.
fn arp_exchange(path: &std::path::Path, timeout: Duration) -> Result<Arp, String> {
    let mut s = UnixStream::connect(path).map_err(|e| format!("connect {path:?}: {e}"))?;
    fast_link::send_frame(&mut s, &fast_link::arp_request(BRIDGE_MAC, BRIDGE_IP))
        .map_err(|e| format!("sending the ARP request: {e}"))?;
    let give_up = Instant::now() + timeout;
    loop {
        let left = give_up.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no ARP reply from the hv within {timeout:?}"));
        }
        let Some(f) = fast_link::recv_frame(&mut s, left)
            .map_err(|e| format!("no ARP reply from the hv within {timeout:?}: {e}"))?
        else {
            continue;
        };
        if let Ok(Packet::Arp(a)) = parse_frame(&f, Some(BRIDGE_MAC)) {
            if a.op == 2 {
                return Ok(a);
            }
        }
    }
}
