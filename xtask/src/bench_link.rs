//! `cargo xtask bench link`: what the links carry, each way, and how fast a small message
//! goes there and back, for the fast link (issue 13: the hv's own polled NIC, datagrams over
//! QEMU's stream socket), the serial link, and, as the platform's reference on the same NIC
//! model in the same run, Linux's own driver. One boot each, one after another:
//!
//! - **Linux's driver** (`virtio_net`, `e1000e`; the agent not loaded): a guest program sends
//!   and receives raw 1514-byte frames with `AF_PACKET` (`qs-workload --raw-frames`) while this
//!   program sinks or sources them on QEMU's stream socket; then 64-byte frames echoed, timed
//!   here one at a time. Guest → host is measured here (first to last frame that arrived),
//!   host → guest in the guest (the same), the round trip here (median).
//! - **The fast link and the serial link** (`qs-bridge`, the agent loaded with the link, with
//!   `net=` for the fast link):
//!   - machine → operator: the control socket's `link-test` ([`FAST_PAGES`] or
//!     [`SERIAL_PAGES`] pages that do not compress, read 64 at a time as an export's are;
//!     payload per second, and bytes on the wire);
//!   - operator → machine: no bulk message goes that way, so gdb writes 1 MiB
//!     (`restore FILE binary ADDR` of the 1 MiB it just read from `_sdata`, the kernel's
//!     data: the same bytes back, `X` or `M` packets as the stub offers) — the path a
//!     debugger's writes take. Not the kernel's text: rewriting a megabyte of code, even
//!     with the same bytes, makes QEMU's TCG throw away its translations of it, and the
//!     serial-link machine oopsed once right after such a write (#UD inside an ftrace NOP),
//!     most likely TCG's stale-code bug (README, Limits): the same write-back, read again
//!     over either link, gave the same bytes and a clean kernel in every other run;
//!     gdb reading that 1 MiB (`dump binary memory`) is the other way through the same path;
//!   - round trip: gdb's `maint packet qC` ([`ROUND_TRIPS`], each timed in gdb's Python; the
//!     median): gdb → bridge → link → the hv's stub and back, with every CPU stopped; and the
//!     bridge's own pings of the fast link (`status`'s `rtt_median_us`, the machine running:
//!     the agent's interrupt handler has the hv poll the NIC).
//!
//! Results: `target/bench/link.json` and a Markdown table (`target/bench/link.md`) for
//! BENCHMARKS.md. The NICs measured are `QS_BENCH_NICS` (`virtio-net,e1000e` by default).

use crate::bench::round;
use anyhow::{bail, Context, Result};
use qs_testkit::control::Client;
use qs_testkit::qemu::FastLinkNic;
use qs_testkit::{Artifacts, Gdb, Machine};
use serde::Serialize;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Frames each way through Linux's driver, and their size (a full 1500-byte MTU frame).
pub const LINUX_FRAMES: u64 = 20_000;
pub const LINUX_FRAME: usize = 1514;
/// Small frames echoed through Linux's driver (64 bytes).
pub const LINUX_PINGS: u64 = 1000;
/// Pages `link-test` reads over the fast link (16 MiB) and over the serial link (1 MiB).
pub const FAST_PAGES: u32 = 4096;
pub const SERIAL_PAGES: u32 = 256;
/// Bytes gdb reads and writes back.
pub const GDB_BYTES: u64 = 1 << 20;
/// `maint packet qC` round trips timed.
pub const ROUND_TRIPS: usize = 200;
/// Guest CPUs.
pub const SMP: u32 = 2;
const MIB: f64 = (1u64 << 20) as f64;
/// The EtherType `qs-workload --raw-frames` uses.
const ETHER_TYPE: [u8; 2] = [0x88, 0xb5];

/// Linux's own driver on one NIC model.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LinuxDriver {
    pub nic: String,
    /// Guest → host, measured here: MiB/s of frames (1514 bytes, 1500 of payload), frames
    /// that arrived of those sent.
    pub tx_mib_s: Option<f64>,
    pub tx_frames: u64,
    /// Host → guest, measured in the guest.
    pub rx_mib_s: Option<f64>,
    pub rx_frames: u64,
    /// 64-byte frame there and back: median, 90th percentile, fastest (µs).
    pub rtt_median_us: Option<f64>,
    pub rtt_p90_us: Option<f64>,
    pub rtt_min_us: Option<f64>,
    /// SHA-256 in the same guest under TCG (busybox's `sha256sum` of 16 MiB, MiB/s): a proxy
    /// for what the fast link's per-datagram HMAC-SHA256 costs the hv, whose `sha2` is
    /// portable code too.
    pub guest_sha256_mib_s: Option<f64>,
    pub error: Option<String>,
}

/// One of Quicksilver's links.
#[derive(Clone, Debug, Default, Serialize)]
pub struct QsLink {
    /// `fast link, virtio-net`, `serial link`.
    pub link: String,
    /// `link-test`: payload and wire MiB/s machine → operator, pages read.
    pub read_fill_mib_s: Option<f64>,
    pub read_fill_wire_mib_s: Option<f64>,
    pub read_fill_pages: u32,
    /// gdb: 1 MiB of `_sdata` read (`m`) and written back (`X`/`M`), MiB/s.
    pub gdb_read_mib_s: Option<f64>,
    pub gdb_write_mib_s: Option<f64>,
    /// gdb's `maint packet qC` round trips, every CPU stopped (µs).
    pub qc_median_us: Option<f64>,
    pub qc_p90_us: Option<f64>,
    pub qc_min_us: Option<f64>,
    /// The bridge's pings of the fast link, the machine running (µs; fast link only).
    pub ping_median_us: Option<f64>,
    /// Datagrams that crossed the fast link during `link-test`, gdb's read and gdb's write
    /// (machine → operator, operator → machine), from `status`: where the time per datagram
    /// goes is the question these answer.
    pub read_fill_datagrams: Option<[u64; 2]>,
    pub gdb_read_datagrams: Option<[u64; 2]>,
    pub gdb_write_datagrams: Option<[u64; 2]>,
    /// µs of `link-test` per datagram from the machine.
    pub read_fill_us_per_datagram: Option<f64>,
    /// Of those, the hv's own sending (`stats`): all of it, and its NIC driver's part.
    pub read_fill_hv_us_per_datagram: Option<[f64; 2]>,
    /// What `monitor link` said in the session (which link carried it).
    pub monitor_link: String,
    pub error: Option<String>,
}

/// Quartiles of `v` in µs: (median, 90th percentile, minimum).
fn spread_us(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    (at(0.5), at(0.9), v[0])
}

/// One Ethernet frame as QEMU's stream netdev carries it: 4-byte big-endian length, then the
/// frame (no FCS).
fn stream_frame(dst: &[u8; 6], size: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(4 + size);
    f.extend_from_slice(&(size as u32).to_be_bytes());
    f.extend_from_slice(dst);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&ETHER_TYPE);
    f.resize(4 + size, 0xcd);
    f
}

/// Reads QEMU's stream socket: every frame of [`ETHER_TYPE`] as (arrival, length, source MAC).
fn frame_reader(mut s: UnixStream, tx: mpsc::Sender<(Instant, usize, [u8; 6])>) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let n = match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let now = Instant::now();
        buf.extend_from_slice(&chunk[..n]);
        let mut off = 0;
        while buf.len() - off >= 4 {
            let len = u32::from_be_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
            if buf.len() - off < 4 + len {
                break;
            }
            let f = &buf[off + 4..off + 4 + len];
            if len >= 14 && f[12..14] == ETHER_TYPE {
                let mut src = [0u8; 6];
                src.copy_from_slice(&f[6..12]);
                if tx.send((now, len, src)).is_err() {
                    return;
                }
            }
            off += 4 + len;
        }
        buf.drain(..off);
    }
}

/// The `QS-RAW {json}` line after the `nth` (0-based) one on `console`.
fn raw_result(console: &str, nth: usize) -> Result<serde_json::Value> {
    let line = console
        .lines()
        .filter_map(|l| l.split_once("QS-RAW ").map(|(_, j)| j))
        .nth(nth)
        .context("no QS-RAW line")?;
    serde_json::from_str(line.trim()).with_context(|| format!("QS-RAW {line}"))
}

/// "SHA256 16 MiB from 5.12 to 6.12" (the guest's uptime around `sha256sum`): MiB/s.
fn sha_rate(console: &str) -> Option<f64> {
    let l = console
        .lines()
        .find_map(|l| l.split("SHA256 16 MiB from ").nth(1))?;
    let w: Vec<&str> = l.split_whitespace().collect();
    let (t0, t1): (f64, f64) = (w.first()?.parse().ok()?, w.get(2)?.parse().ok()?);
    (t1 > t0).then(|| 16.0 / (t1 - t0))
}

/// Linux's driver for `nic`: frames each way and the echo, measured into `f`.
fn linux_into(a: &Artifacts, nic: FastLinkNic, f: &mut LinuxDriver) -> Result<()> {
    let name = format!("bench-link-linux-{}", nic.device());
    let sock = a
        .dir
        .join("run")
        .join(format!("{name}-{}.net.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let script = format!(
        r#"set -e
for m in $(cat /lib/quicksilver/net-modules); do insmod $m; done
ip link set eth0 up
i=0; while [ "$(cat /sys/class/net/eth0/operstate)" != up ] && [ $i -lt 60 ]; do sleep 0.5; i=$((i+1)); done
echo "NET-$(cat /sys/class/net/eth0/operstate)"
head -c 16777216 /dev/zero > /tmp/z
t0=$(cut -d' ' -f1 /proc/uptime); sha256sum /tmp/z > /dev/null; t1=$(cut -d' ' -f1 /proc/uptime)
echo "SHA256 16 MiB from $t0 to $t1"; rm /tmp/z
sleep 1
echo PHASE-TX
qs-workload --raw-frames tx {LINUX_FRAMES} {LINUX_FRAME}
echo PHASE-RX
qs-workload --raw-frames rx {LINUX_FRAMES} {LINUX_FRAME}
echo PHASE-ECHO
qs-workload --raw-frames echo {LINUX_PINGS} 64
"#
    );
    let mut running = a
        .qemu(&name)
        .smp(SMP)
        .noload()
        .timeout(Duration::from_secs(900))
        .fast_link_nic(&sock, nic)
        .spawn_script(&script)?;
    // QEMU listens from its start.
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("connecting to {}", sock.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let mut w = s.try_clone()?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || frame_reader(s, tx));
    running.wait_for("NET-up", Duration::from_secs(300))?;
    running.wait_for("SHA256 16 MiB", Duration::from_secs(120))?;

    // Guest → host.
    running.wait_for("RAW-READY", Duration::from_secs(60))?;
    let (mut first, mut last, mut frames, mut bytes) = (None, None, 0u64, 0u64);
    while frames < LINUX_FRAMES {
        let Ok((at, len, _)) = rx.recv_timeout(Duration::from_secs(10)) else {
            break;
        };
        first.get_or_insert(at);
        last = Some(at);
        frames += 1;
        bytes += len as u64;
    }
    f.tx_frames = frames;
    if let (Some(t0), Some(t1)) = (first, last) {
        f.tx_mib_s = Some(bytes as f64 / MIB / (t1 - t0).as_secs_f64().max(1e-9));
    }

    // Host → guest, as fast as QEMU takes them from the socket.
    running.wait_for("PHASE-RX", Duration::from_secs(120))?;
    running.wait_for("RAW-READY", Duration::from_secs(60))?;
    let guest: [u8; 6] = [0xff; 6];
    let one = stream_frame(&guest, LINUX_FRAME);
    let batch = one.repeat(64);
    let mut sent = 0;
    while sent < LINUX_FRAMES {
        w.write_all(&batch)?;
        sent += 64;
    }
    running.wait_for("PHASE-ECHO", Duration::from_secs(300))?;
    let r = raw_result(&running.console(), 1)?;
    f.rx_frames = r["frames"].as_u64().unwrap_or(0);
    let secs = r["seconds"].as_f64().unwrap_or(0.0);
    if secs > 0.0 {
        f.rx_mib_s = Some(r["bytes"].as_f64().unwrap_or(0.0) / MIB / secs);
    }

    // 64-byte frames there and back, one at a time.
    running.wait_for("RAW-READY", Duration::from_secs(60))?;
    while rx.try_recv().is_ok() {}
    let ping = stream_frame(&guest, 64);
    let mut rtts = Vec::new();
    for _ in 0..LINUX_PINGS {
        let t0 = Instant::now();
        w.write_all(&ping)?;
        loop {
            let (at, _, src) = rx
                .recv_timeout(Duration::from_secs(10))
                .context("a 64-byte frame was not echoed within 10 s")?;
            if src != [2, 0, 0, 0, 0, 1] {
                rtts.push((at - t0).as_secs_f64() * 1e6);
                break;
            }
        }
    }
    f.guest_sha256_mib_s = sha_rate(&running.console());
    let (median, p90, min) = spread_us(&mut rtts);
    (f.rtt_median_us, f.rtt_p90_us, f.rtt_min_us) = (Some(median), Some(p90), Some(min));
    drop(w);
    running.wait()?.ensure_success()?;
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

/// Guest script of the link boots: the machine idles until the host says it is done.
const QS_SCRIPT: &str = r#"echo LINK-READY
read -r line
echo "host said: $line"
"#;

/// Runs gdb's Python `what` timed; the seconds.
fn timed(gdb: &mut Gdb, what: &str) -> Result<f64> {
    let out = gdb.run_timeout(
        &format!(
            "python import time; t0 = time.perf_counter(); {what}; print('QS-BENCH-SECONDS %.9f' % (time.perf_counter() - t0))"
        ),
        Duration::from_secs(600),
    )?;
    if out.contains("Error") || out.contains("Traceback") {
        bail!("{what}:\n{out}");
    }
    let secs = out
        .split("QS-BENCH-SECONDS ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{what}: no time in gdb's output:\n{out}"))?;
    Ok(secs)
}

/// Quicksilver's link (`fast`: the fast link on that NIC; `None`: the serial link), measured
/// into `f`.
fn qs_into(a: &Artifacts, fast: Option<FastLinkNic>, f: &mut QsLink) -> Result<()> {
    let name = match fast {
        Some(nic) => format!("bench-link-fast-{}", nic.device()),
        None => "bench-link-serial".into(),
    };
    let mut config = Machine::config(&name, SMP, QS_SCRIPT, "LINK-READY");
    config.stub = qs_testkit::Stub::Quicksilver;
    config.fast_link = fast;
    config.timeout = Duration::from_secs(1800);
    config.boot_timeout = Duration::from_secs(300);
    let mut m = Machine::start(a, &config)?;
    if let Err(e) = measure_qs(&mut m, fast, f) {
        // A machine that went silent says where its CPUs were (QEMU's monitor).
        return Err(e.context(format!(
            "qs-bridge said:\n{}\nthe CPUs are at:\n{}",
            m.bridge_log(),
            m.cpu_states()
        )));
    }
    m.try_finish()?.ensure_success()?;
    Ok(())
}

/// The measurements of [`qs_into`] on its booted machine `m`.
fn measure_qs(m: &mut Machine, fast: Option<FastLinkNic>, f: &mut QsLink) -> Result<()> {
    let mut c = Client::connect(m.control_path().context("no control socket")?);
    let pages = if fast.is_some() {
        FAST_PAGES
    } else {
        SERIAL_PAGES
    };
    // The hv active, as in a debugging session or an export.
    let r = c.ask("checkpoint");
    if r["ok"] != true {
        bail!("checkpoint: {r}");
    }
    let before = datagrams(&mut c);
    let hv_before = hv_sending(&mut c);
    let r = c.ask(&format!("link-test {pages}"));
    f.read_fill_datagrams = crossed(before, datagrams(&mut c));
    if let (Some([from, _]), Some(secs)) = (f.read_fill_datagrams, r["seconds"].as_f64()) {
        f.read_fill_us_per_datagram = Some(secs * 1e6 / from.max(1) as f64);
    }
    if let (Some(b), Some(a)) = (hv_before, hv_sending(&mut c)) {
        let n = (a[0] - b[0]).max(1.0);
        f.read_fill_hv_us_per_datagram = Some([(a[1] - b[1]) / n, (a[2] - b[2]) / n]);
    }
    if r["ok"] != true {
        bail!("link-test: {r}");
    }
    let mib_s = |k: &str| r[k].as_f64().map(|v| v / MIB);
    f.read_fill_pages = pages;
    f.read_fill_mib_s = mib_s("payload_bytes_per_s");
    f.read_fill_wire_mib_s = mib_s("wire_bytes_per_s");
    if fast.is_some() {
        // Pings every 200 ms; the bridge keeps the last few.
        std::thread::sleep(Duration::from_secs(3));
        let s = c.ask("status");
        f.ping_median_us = s["fast_link"]["rtt_median_us"].as_f64();
    }
    let r = c.ask("delete all");
    if r["ok"] != true {
        bail!("delete all: {r}");
    }

    let mut gdb = m.try_gdb()?;
    gdb.run("set code-cache off")?;
    gdb.run("set stack-cache off")?;
    let out = gdb.run_timeout(
        &format!("target remote {}", m.addr()),
        Duration::from_secs(120),
    )?;
    if !out.contains("Remote debugging using") {
        bail!("gdb did not attach:\n{out}");
    }
    f.monitor_link = gdb.run("monitor link")?.trim().to_string();
    if fast.is_some() && !f.monitor_link.contains("carried by the fast link") {
        bail!(
            "the fast link does not carry the session:\n{}",
            f.monitor_link
        );
    }
    let text =
        gdb.run("python print('QS-TEXT %d' % int(gdb.parse_and_eval('(unsigned long)&_sdata')))")?;
    let text: u64 = text
        .split("QS-TEXT ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("_sdata: {text}"))?;
    let dump = std::env::temp_dir().join(format!("qs-bench-link-{}.bin", std::process::id()));
    let before = datagrams(&mut c);
    let secs = timed(
        &mut gdb,
        &format!(
            "gdb.execute('dump binary memory {} {text:#x} {:#x}', to_string=True)",
            dump.display(),
            text + GDB_BYTES
        ),
    )?;
    let len = std::fs::metadata(&dump).map(|m| m.len()).unwrap_or(0);
    if len != GDB_BYTES {
        bail!("dump wrote {len} bytes, not {GDB_BYTES}");
    }
    f.gdb_read_mib_s = Some(GDB_BYTES as f64 / MIB / secs);
    f.gdb_read_datagrams = crossed(before, datagrams(&mut c));
    let before = datagrams(&mut c);
    // The same bytes back where they came from: nothing runs to change them meanwhile.
    let secs = timed(
        &mut gdb,
        &format!(
            "gdb.execute('restore {} binary {text:#x}', to_string=True)",
            dump.display()
        ),
    )?;
    f.gdb_write_mib_s = Some(GDB_BYTES as f64 / MIB / secs);
    // What was written must be what is there: read it again and compare.
    let again = dump.with_extension("again");
    timed(
        &mut gdb,
        &format!(
            "gdb.execute('dump binary memory {} {text:#x} {:#x}', to_string=True)",
            again.display(),
            text + GDB_BYTES
        ),
    )?;
    let same = std::fs::read(&dump)? == std::fs::read(&again)?;
    let _ = (std::fs::remove_file(&dump), std::fs::remove_file(&again));
    if !same {
        bail!("gdb wrote 1 MiB of the kernel's data back and read different bytes: the write corrupted the kernel's memory");
    }
    f.gdb_write_datagrams = crossed(before, datagrams(&mut c));
    let out = gdb.run_timeout(
        &format!(
            "python import time; rtts = [(lambda t0: (gdb.execute('maint packet qC', to_string=True), time.perf_counter() - t0)[1])(time.perf_counter()) for i in range({ROUND_TRIPS})]; print('QS-RTTS ' + ' '.join('%.9f' % r for r in rtts))"
        ),
        Duration::from_secs(300),
    )
    .context("maint packet qC")?;
    let mut rtts: Vec<f64> = out
        .split("QS-RTTS ")
        .nth(1)
        .context("no QS-RTTS line")?
        .split_whitespace()
        .filter_map(|s| s.parse::<f64>().ok())
        .map(|s| s * 1e6)
        .collect();
    if rtts.len() != ROUND_TRIPS {
        bail!("{} round trips timed of {ROUND_TRIPS}:\n{out}", rtts.len());
    }
    let (median, p90, min) = spread_us(&mut rtts);
    (f.qc_median_us, f.qc_p90_us, f.qc_min_us) = (Some(median), Some(p90), Some(min));
    gdb.run_timeout("detach", Duration::from_secs(60))?;
    gdb.quit();
    m.try_send("bench-done")?;
    Ok(())
}

/// The fast link's datagrams so far, from the machine and to it (`None` without it).
fn datagrams(c: &mut Client) -> Option<[u64; 2]> {
    let s = c.ask("status");
    let n = &s["fast_link"];
    Some([n["datagrams_in"].as_u64()?, n["datagrams_out"].as_u64()?])
}

/// The hv's own account of its fast link sending (the bridge's `stats`): datagrams sent, µs
/// spent sending them, µs of that in the NIC's driver.
fn hv_sending(c: &mut Client) -> Option<[f64; 3]> {
    let s = c.ask("stats");
    let n = &s["fast_link"];
    Some([
        n["datagrams_sent"].as_u64()? as f64,
        n["send_us"].as_f64()?,
        n["nic_us"].as_f64()?,
    ])
}

/// What crossed between `before` and `after` (the pings' few datagrams included).
fn crossed(before: Option<[u64; 2]>, after: Option<[u64; 2]>) -> Option<[u64; 2]> {
    let (b, a) = (before?, after?);
    Some([a[0].saturating_sub(b[0]), a[1].saturating_sub(b[1])])
}

/// `link.json`.
#[derive(Serialize)]
struct Report<'a> {
    benchmark: &'static str,
    smp: u32,
    targets: Targets,
    linux: &'a [LinuxDriver],
    quicksilver: &'a [QsLink],
}

/// The issue's targets under TCG.
#[derive(Serialize)]
struct Targets {
    bulk_mib_s_min: f64,
    rtt_us_max: f64,
    linux_tcg_bulk_mib_s: [f64; 2],
    linux_tcg_rtt_us: [f64; 2],
}

/// The NICs `QS_BENCH_NICS` names (`virtio-net,e1000e` by default).
fn nics() -> Result<Vec<FastLinkNic>> {
    let list = std::env::var("QS_BENCH_NICS").unwrap_or_else(|_| "virtio-net,e1000e".into());
    list.split(',')
        .map(|n| match n.trim() {
            "virtio-net" => Ok(FastLinkNic::VirtioNet),
            "e1000e" => Ok(FastLinkNic::E1000e),
            other => bail!("QS_BENCH_NICS: {other:?} is neither virtio-net nor e1000e"),
        })
        .collect()
}

fn short(nic: FastLinkNic) -> &'static str {
    match nic {
        FastLinkNic::VirtioNet => "virtio-net",
        FastLinkNic::E1000e => "e1000e (82574L)",
    }
}

/// Every measurement; writes the JSON and the table, then fails if any could not be made.
pub fn link(a: &Artifacts) -> Result<()> {
    let mut linux = Vec::new();
    let mut qs = Vec::new();
    for nic in nics()? {
        eprintln!("xtask bench: link, Linux's driver on {}", nic.device());
        let mut f = LinuxDriver {
            nic: short(nic).into(),
            ..LinuxDriver::default()
        };
        if let Err(e) = linux_into(a, nic, &mut f) {
            f.error = Some(format!("{e:#}"));
        }
        eprintln!("xtask bench: {f:?}");
        linux.push(f);
        eprintln!("xtask bench: link, the fast link on {}", nic.device());
        let mut f = QsLink {
            link: format!("fast link, {}", short(nic)),
            ..QsLink::default()
        };
        if let Err(e) = qs_into(a, Some(nic), &mut f) {
            f.error = Some(format!("{e:#}"));
        }
        eprintln!("xtask bench: {f:?}");
        qs.push(f);
    }
    eprintln!("xtask bench: link, the serial link");
    let mut f = QsLink {
        link: "serial link".into(),
        ..QsLink::default()
    };
    if let Err(e) = qs_into(a, None, &mut f) {
        f.error = Some(format!("{e:#}"));
    }
    eprintln!("xtask bench: {f:?}");
    qs.push(f);

    let r1 = |v: Option<f64>| v.map(|v| round(v, 1));
    for l in &mut linux {
        (l.tx_mib_s, l.rx_mib_s) = (r1(l.tx_mib_s), r1(l.rx_mib_s));
        (l.rtt_median_us, l.rtt_p90_us, l.rtt_min_us) =
            (r1(l.rtt_median_us), r1(l.rtt_p90_us), r1(l.rtt_min_us));
    }
    let r3 = |v: Option<f64>| v.map(|v| round(v, 3));
    for q in &mut qs {
        (q.read_fill_mib_s, q.read_fill_wire_mib_s) =
            (r3(q.read_fill_mib_s), r3(q.read_fill_wire_mib_s));
        (q.gdb_read_mib_s, q.gdb_write_mib_s) = (r3(q.gdb_read_mib_s), r3(q.gdb_write_mib_s));
        (q.qc_median_us, q.qc_p90_us, q.qc_min_us) =
            (r1(q.qc_median_us), r1(q.qc_p90_us), r1(q.qc_min_us));
    }
    let md = table(&linux, &qs);
    let report = Report {
        benchmark: "link",
        smp: SMP,
        targets: Targets {
            bulk_mib_s_min: 100.0,
            rtt_us_max: 150.0,
            linux_tcg_bulk_mib_s: [55.0, 100.0],
            linux_tcg_rtt_us: [310.0, 370.0],
        },
        linux: &linux,
        quicksilver: &qs,
    };
    crate::bench::write_report("link", &report, &md)?;
    let errors: Vec<String> = linux
        .iter()
        .filter_map(|l| {
            l.error
                .as_ref()
                .map(|e| format!("Linux's driver on {}: {e}", l.nic))
        })
        .chain(
            qs.iter()
                .filter_map(|q| q.error.as_ref().map(|e| format!("{}: {e}", q.link))),
        )
        .collect();
    if !errors.is_empty() {
        bail!("not every figure was measured:\n{}", errors.join("\n"));
    }
    Ok(())
}

/// The Markdown table: one row per link, the Linux driver's figures on the same NIC beside
/// the fast link's, and the ratios.
fn table(linux: &[LinuxDriver], qs: &[QsLink]) -> String {
    let cell = |v: Option<f64>, p: usize| v.map_or("—".into(), |v| format!("{v:.p$}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.3}", a / b),
        _ => "—".into(),
    };
    let mut md = String::from(
        "| link | machine → operator MiB/s (`link-test`) | gdb 1 MiB read MiB/s | operator → machine: gdb 1 MiB write MiB/s | round trip µs (`maint packet qC`, median / p90 / min) | fast link's ping µs (running) | datagrams from / to the machine: `link-test`; gdb read; gdb write (µs per `link-test` datagram) | of which the hv's sending, µs per datagram: all / in the NIC's driver |\n|---|---|---|---|---|---|---|---|\n",
    );
    for q in qs {
        let _ = writeln!(
            md,
            "| {} | {} ({} on the wire) | {} | {} | {} / {} / {} | {} | {} | {} |",
            q.link,
            cell(q.read_fill_mib_s, 3),
            cell(q.read_fill_wire_mib_s, 3),
            cell(q.gdb_read_mib_s, 3),
            cell(q.gdb_write_mib_s, 3),
            cell(q.qc_median_us, 0),
            cell(q.qc_p90_us, 0),
            cell(q.qc_min_us, 0),
            cell(q.ping_median_us, 0),
            match (
                q.read_fill_datagrams,
                q.gdb_read_datagrams,
                q.gdb_write_datagrams
            ) {
                (Some(a), Some(b), Some(c)) => format!(
                    "{}/{}; {}/{}; {}/{} ({} µs)",
                    a[0],
                    a[1],
                    b[0],
                    b[1],
                    c[0],
                    c[1],
                    cell(q.read_fill_us_per_datagram, 0)
                ),
                _ => "—".into(),
            },
            match q.read_fill_hv_us_per_datagram {
                Some([all, nic]) => format!("{all:.1} / {nic:.1}"),
                None => "—".into(),
            },
        );
    }
    md.push_str(
        "\n| NIC | Linux's driver: guest → host MiB/s | host → guest MiB/s | 64-byte round trip µs (median / p90 / min) | fast link / Linux, machine → operator | fast link / Linux, operator → machine (gdb write) | fast link / Linux, round trip (qC) | fast link bulk / 100 MiB/s target | fast link round trip / 150 µs target | SHA-256 in the guest MiB/s |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (l, q) in linux.iter().zip(qs) {
        let _ = writeln!(
            md,
            "| {} | {} ({} frames) | {} ({} frames) | {} / {} / {} | {} | {} | {} | {} | {} | {} |",
            l.nic,
            cell(l.tx_mib_s, 1),
            l.tx_frames,
            cell(l.rx_mib_s, 1),
            l.rx_frames,
            cell(l.rtt_median_us, 0),
            cell(l.rtt_p90_us, 0),
            cell(l.rtt_min_us, 0),
            ratio(q.read_fill_mib_s, l.tx_mib_s),
            ratio(q.gdb_write_mib_s, l.rx_mib_s),
            ratio(q.qc_median_us, l.rtt_median_us),
            ratio(q.read_fill_mib_s, Some(100.0)),
            ratio(q.qc_median_us, Some(150.0)),
            cell(l.guest_sha256_mib_s, 1),
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_frames_carry_their_length_and_the_benchmarks_ethertype() {
        let f = stream_frame(&[0xff; 6], 64);
        assert_eq!(f.len(), 68);
        assert_eq!(&f[..4], &64u32.to_be_bytes());
        assert_eq!(&f[4 + 12..4 + 14], &ETHER_TYPE);
        let (tx, rx) = mpsc::channel();
        let (a, mut b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || frame_reader(a, tx));
        let mut other = stream_frame(&[0xff; 6], 60);
        other[4 + 12] = 0x08; // IPv4: not counted
        b.write_all(&[f.clone(), other, f].concat()).unwrap();
        drop(b);
        let got: Vec<_> = rx.iter().map(|(_, len, src)| (len, src)).collect();
        assert_eq!(got, [(64, [2, 0, 0, 0, 0, 1]); 2]);
    }

    #[test]
    fn the_raw_frames_results_are_read_in_order_and_spreads_sorted() {
        let c = "QS-RAW {\"mode\":\"tx\",\"frames\":3,\"bytes\":10,\"seconds\":1.0}\n[ 1.2] x QS-RAW {\"mode\":\"rx\",\"frames\":2,\"bytes\":20,\"seconds\":2.0}\n";
        assert_eq!(raw_result(c, 1).unwrap()["bytes"], 20);
        assert!(raw_result(c, 2).is_err());
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(spread_us(&mut v), (3.0, 5.0, 1.0));
        assert_eq!(sha_rate("x SHA256 16 MiB from 5.00 to 7.00\n"), Some(8.0));
    }
}
