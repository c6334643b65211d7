//! What the fast link's tests (`net_*`) share: their sockets in the run directory, the guest's
//! way to the agent's parameters, what the guest says of the NIC, and the test's end of QEMU's
//! stream socket when it stands in for the bridge's Ethernet.

use crate::Artifacts;
use qs_testkit::qemu::FAST_LINK_BDF;
use quicksilver_proto::link::net::{build_arp, Arp, MAX_FRAME};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// The hv's fast link address (the agent's defaults).
pub const HV_IP: [u8; 4] = [10, 13, 0, 2];
/// The hv's fast link port (the agent's default).
pub const HV_PORT: u16 = 50000;

/// Shell (busybox) that collects the agent's `quicksilver.*=` parameters from the kernel
/// command line into `$params`, as /init passes them: for a script that loads the agent itself
/// (`qs.noload` kept /init from loading it, so that the NIC's own driver comes first).
pub const PARAMS: &str = r#"params=
for w in $(cat /proc/cmdline); do
    case "$w" in quicksilver.*=*) params="$params ${w#quicksilver.}" ;; esac
done"#;

/// `<run>/<name>-<pid><kind>.sock` in the artifacts' run directory, which is created: `kind`
/// is `""` for the link, `".net"` for the fast link's NIC.
pub fn socket(a: &Artifacts, name: &str, kind: &str) -> PathBuf {
    let run_dir = a.dir.join("run");
    let _ = std::fs::create_dir_all(&run_dir);
    run_dir.join(format!("{name}-{}{kind}.sock", std::process::id()))
}

/// The link's socket and the fast link NIC's, for the test `name`.
pub fn sockets(a: &Artifacts, name: &str) -> (PathBuf, PathBuf) {
    (socket(a, name, ""), socket(a, name, ".net"))
}

/// The line of the script's output `o` that starts with `step` and a space.
pub fn step_line(o: &str, step: &str) -> String {
    o.lines()
        .find(|l| l.starts_with(&format!("{step} ")))
        .unwrap_or_else(|| panic!("no {step} line in the script's output:\n{o}"))
        .to_string()
}

/// Panics unless `qsctl status` (in the script's output `o`) says the agent's stub holds the
/// fast link's NIC at the default address.
pub fn assert_held(o: &str) {
    assert!(
        o.contains(&format!(
            "fast link: NIC {FAST_LINK_BDF} (held by quicksilver-net), 10.13.0.2:50000"
        )),
        "qsctl status does not show the fast link held:\n{o}"
    );
}

/// An ARP request from `mac` at `ip` for the hv's address, as a whole Ethernet frame.
pub fn arp_request(mac: [u8; 6], ip: [u8; 4]) -> Vec<u8> {
    let mut f = [0u8; MAX_FRAME];
    let n = build_arp(
        &mut f,
        &Arp {
            op: 1,
            sender_mac: mac,
            sender_ip: ip,
            target_mac: [0; 6],
            target_ip: HV_IP,
        },
    );
    f[..n].to_vec()
}

/// Writes `frame` into QEMU's stream socket `s`, after its 4-byte big-endian length.
pub fn send_frame(s: &mut UnixStream, frame: &[u8]) -> std::io::Result<()> {
    s.write_all(&(frame.len() as u32).to_be_bytes())
        .and_then(|()| s.write_all(frame))
}

/// The next frame from QEMU's stream socket `s`, or `None` if none began within `timeout`.
/// A frame that has begun is read whole (5 s more at the most).
pub fn recv_frame(s: &mut UnixStream, timeout: Duration) -> std::io::Result<Option<Vec<u8>>> {
    s.set_read_timeout(Some(timeout))?;
    let mut len = [0u8; 4];
    match s.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    }
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut f)?;
    Ok(Some(f))
}
