//! The link while dormant, end to end: QEMU's second UART on a Unix socket, the agent
//! watching it, `qs-bridge`'s code on the other end. An authenticated bridge's attention
//! activates the hv on every CPU; a wrong key activates nothing.

use quicksilver_proto::link::{control::Message, Channel};
use quicksilver_tests::*;
use std::sync::Arc;
use std::time::Duration;

/// Guest script: report whether the link's attention activated the hv (the agent logs it),
/// then the state once the bridge's gdb session is over.
const WATCH: &str = r#"i=0
while [ $i -lt 150 ]; do
    if dmesg | grep -q "at the link's request"; then echo "LINK-ACTIVATED"; break; fi
    sleep 0.2; i=$((i + 1))
done
sleep 1
qsctl status | head -1
qsctl stats | grep "^link:"
qsctl probe
qsctl deactivate || true
dmesg | grep quicksilver
echo "cmdline: $(cat /proc/cmdline)"
echo "params: $(cat /sys/module/quicksilver/parameters/* 2>/dev/null | tr '\n' ' ')"
"#;

fn guest_with_link(name: &str, sock: &std::path::Path) -> Qemu {
    guest(name, 2).link(sock, "the-demo-key")
}

fn sock(name: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("qs-link-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

#[test]
fn an_authenticated_bridge_activates_the_hv() {
    let s = sock("ok");
    let mut running = guest_with_link("link-attention", &s)
        .spawn_script(WATCH)
        .expect("boot");
    running
        .wait_for("QS-BOOTED", Duration::from_secs(120))
        .expect("boot");
    let link = Arc::new(
        qs_bridge::Link::open(&qs_bridge::LinkAddr::Unix(s.display().to_string()), 115200).unwrap(),
    );
    let mut console: Vec<u8> = Vec::new();
    qs_bridge::authenticate(
        &link,
        b"the-demo-key",
        Duration::from_secs(20),
        &mut console,
    )
    .expect("the right key is accepted");
    link.send_control(Message::Attention).unwrap();
    // Every CPU stops for the debugger; a detach lets them run natively again.
    let mut stopped = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while stopped.is_none() && std::time::Instant::now() < deadline {
        if let Some(qs_bridge::Inbound::Frame {
            channel: Channel::Control,
            payload,
        }) = link.recv(Duration::from_secs(1))
        {
            if let Ok(Message::Stopped { cpus }) = Message::decode(&payload) {
                stopped = Some(cpus);
            }
        }
    }
    assert_eq!(stopped, Some(2), "the machine reports both CPUs stopped");
    link.send(Channel::Gdb, b"$D#44").unwrap();
    let out = running.wait().expect("guest ran");
    assert_success(&out);
    assert_console_has(&out, "LINK-ACTIVATED");
    assert_console_has(&out, "state: dormant");
    assert_console_has(
        &out,
        "quicksilver: took ttyS1 (port 0x2f8) from the serial driver for the link",
    );
    assert_console_has(&out, "quicksilver: link on port 0x2f8 IRQ 3");
    assert_console_has(&out, "activated on 2 CPUs at the link's request");
    assert_console_has(&out, "cpu 1: signature none");
    assert_console_has(
        &out,
        "link: bridge authenticated; 0 frames dropped, 0 wrong keys",
    );
    assert_eq!(
        link.drops().total(),
        0,
        "no frame from the machine was dropped"
    );
    assert!(
        out.console.contains("cmdline: ") && out.console.contains("params: "),
        "{}",
        out.console
    );
    assert!(
        !out.console.contains("the-demo-key"),
        "the key is not on the kernel command line, in a module parameter or in the log:\n{}",
        out.console
    );
    assert_kernel_clean(&out);
}

/// The key comes from a file only root may read; one that others can read is refused, with
/// the commands that fix it, and the agent loads once the mode is fixed.
#[test]
fn a_key_file_others_can_read_is_refused_with_the_fix() {
    let script = r#"insmod_agent() {
    insmod /lib/quicksilver/quicksilver.ko image=/lib/quicksilver/hv.img link_port=0x2f8 key_file=/root/link.key
}
echo "a-secret-key" > /root/link.key
chmod 644 /root/link.key
insmod_agent; echo "open-key-rc=$?"
chmod 600 /root/link.key
insmod_agent; echo "closed-key-rc=$?"
qsctl status | head -1
dmesg | grep "quicksilver: link on port"
"#;
    let s = sock("key-file");
    let out = run(guest("link-key-file", 1).noload().link_socket(&s), script);
    assert_success(&out);
    let o = out.script_output();
    assert!(o.contains("open-key-rc=1"), "{o}");
    assert_console_has(
        &out,
        "the key file /root/link.key can be read by others than root (mode 0644, uid 0): chown root /root/link.key; chmod 600 /root/link.key",
    );
    assert!(o.contains("closed-key-rc=0"), "{o}");
    assert!(o.contains("state: dormant"), "{o}");
    assert!(
        !out.console.contains("a-secret-key"),
        "the key is not logged:\n{o}"
    );
    assert_kernel_clean(&out);
}

#[test]
fn a_wrong_key_or_noise_activates_nothing() {
    let s = sock("wrong");
    let mut running = guest_with_link("link-wrong-key", &s)
        .spawn_script(WATCH)
        .expect("boot");
    running
        .wait_for("QS-BOOTED", Duration::from_secs(120))
        .expect("boot");
    let link =
        qs_bridge::Link::open(&qs_bridge::LinkAddr::Unix(s.display().to_string()), 115200).unwrap();
    let mut console: Vec<u8> = Vec::new();
    let err = qs_bridge::authenticate(&link, b"a-wrong-key", Duration::from_secs(20), &mut console)
        .expect_err("a wrong key is refused");
    assert!(
        err.to_string().contains("the machine refused our key"),
        "{err}"
    );
    // An attention request without authentication, and garbage, change nothing.
    link.send_control(Message::Attention).unwrap();
    link.send(Channel::Gdb, b"$c#63").unwrap();
    // Garbage longer than any frame, then a frame with a bad CRC.
    link.write_raw(&[0x55; 3000]).unwrap();
    link.write_raw(&[0, 0x05, 0x02, 0x11, 0x22, 0x33, 0])
        .unwrap();
    let out = running.wait().expect("guest ran");
    assert_success(&out);
    let o = out.script_output();
    assert!(!o.contains("LINK-ACTIVATED"), "{o}");
    assert!(o.contains("state: dormant"), "{o}");
    assert!(o.contains("link: waiting for a bridge;"), "{o}");
    assert!(
        o.contains(" 1 wrong keys, 2 unauthenticated requests ignored"),
        "{o}"
    );
    assert!(
        o.contains(" 2 frames dropped"),
        "the garbage and the bad frame were counted: {o}"
    );
    assert_kernel_clean(&out);
}
