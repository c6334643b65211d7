//! A checkpoint of the running machine, exported while it runs: `qsctl export` writes
//! Quicksilver's own file and an ELF core onto disks the test hands the guest. On the host the
//! file opens intact (every checksum), names the kernel, the boot and every CPU, and a second
//! export of the same checkpoint is the same memory; `gdb vmlinux CORE` prints `jiffies` as gdb
//! read it live at the instant of the checkpoint, and `crash` lists the machine's processes. The
//! bridge's export of the same checkpoint over the link, to the operator's side, is the same
//! checkpoint page for page and CPU for CPU; with the fast link's NIC too, its bytes then
//! coming over the fast link rather than the serial one.

use qs_testkit::artifacts::Artifacts;
use qs_testkit::machine::Machine;
use qs_testkit::qemu::FastLinkNic;
use quicksilver_checkpoint::qsc::read::Archive;
use quicksilver_tests::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest: the disk driver, the workload; after the host's word, `EXPORTS`.
fn guest(exports: &str) -> String {
    format!(
        r#"
for m in $(cat /lib/quicksilver/disk-modules); do insmod $m || echo "INSMOD-FAILED $m"; done
sleep 1
ls /dev/vd*
start_workload
cat /proc/sys/kernel/random/boot_id | sed 's/^/BOOT-ID /'
echo GUEST-READY
wait_host
{exports}
qsctl checkpoint --delete all
stop_workload
"#
    )
}

/// Sparse disk images for the guest (`/dev/vda`, `/dev/vdb`, ... in order), removed when
/// dropped unless QS_KEEP_EXPORTS is set (to try crash or qs-checkpoint on them by hand).
struct Disks(Vec<PathBuf>);

impl Disks {
    fn new(a: &Artifacts, name: &str, n: usize) -> Disks {
        let dir = a.dir.join("run");
        std::fs::create_dir_all(&dir).unwrap();
        Disks(
            (0..n)
                .map(|i| {
                    let p = dir.join(format!("{name}-{}-{i}.img", std::process::id()));
                    std::fs::File::create(&p)
                        .unwrap()
                        .set_len(640 << 20)
                        .unwrap();
                    p
                })
                .collect(),
        )
    }

    fn qemu_args(&self) -> Vec<String> {
        self.0
            .iter()
            .enumerate()
            .flat_map(|(i, p)| {
                [
                    "-drive".into(),
                    format!("file={},if=none,format=raw,id=disk{i}", p.display()),
                    "-device".into(),
                    // Slots from 8 on: 4 is the fast link's NIC.
                    format!("virtio-blk-pci,drive=disk{i},addr={:#x}", 8 + i),
                ]
            })
            .collect()
    }

    /// Disk `i` cut to the `bytes` the guest wrote to it.
    fn file(&self, i: usize, bytes: u64) -> &Path {
        let f = std::fs::File::options()
            .write(true)
            .open(&self.0[i])
            .unwrap();
        f.set_len(bytes).unwrap();
        &self.0[i]
    }
}

impl Drop for Disks {
    fn drop(&mut self) {
        if std::env::var_os("QS_KEEP_EXPORTS").is_none() {
            for p in &self.0 {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// The byte count `qsctl export` printed for `dev`.
fn exported_bytes(out: &str, dev: &str) -> u64 {
    out.lines()
        .find(|l| l.contains(&format!("exported to {dev} ")))
        .and_then(|l| l.split(" bytes (").next()?.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no export line for {dev}:\n{out}"))
}

/// Boots `a`'s kernel with `disks`, lets gdb stop every CPU and take checkpoint 1 there, and
/// returns jiffies at that instant (as gdb reads it live) and how the run ended. With
/// `over_link`, the bridge exports checkpoint 1 there first (`.qsc`), while the machine runs;
/// with `fast`, the machine has the fast link's NIC and the export's bulk data must go over it.
fn checkpoint_then_export(
    a: &Artifacts,
    name: &str,
    disks: &Disks,
    exports: &str,
    over_link: Option<&Path>,
    fast: Option<FastLinkNic>,
) -> (String, RunOutput) {
    let mut config = Machine::config(name, 2, &guest(exports), "GUEST-READY");
    config.fast_link = fast;
    // An export over the serial link takes minutes under QEMU.
    config.timeout = std::time::Duration::from_secs(1200);
    config.memory = Some("256M".into());
    // The workload writes on while the export runs: room for its pages' old contents.
    config.cmdline.push("quicksilver.ckpt_mem=96M".into());
    // Freed pages zeroed (as hardened kernels do): fewer pages for the export over the slow
    // serial link to carry.
    config.cmdline.push("init_on_free=1".into());
    config.qemu_args = disks.qemu_args();
    let mut m = Machine::start(a, &config).unwrap_or_else(|e| panic!("{e}"));
    // gdb stops every CPU; the checkpoint is taken there (where every CPU can be restored),
    // and jiffies read while they are still stopped is its value at that instant.
    let mut gdb = m.attach();
    quicksilver_tests::session::monitor_checkpoint(&m, &mut gdb, 1);
    let live = m.run(&mut gdb, "print jiffies");
    let jiffies = live
        .split("= ")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_else(|| m.fail(&gdb, "print jiffies", &live))
        .to_string();
    let out = m.run(&mut gdb, "detach");
    if !out.contains("detached") {
        m.fail(&gdb, "detach", &out);
    }
    gdb.quit();
    if let Some(path) = over_link {
        // As a script does it: qs-tui --run, which prints the reply and then the progress.
        let run = |command: &str| {
            let out = Command::new(&a.tui)
                .args(["--socket"])
                .arg(m.control_path().unwrap())
                .args(["--run", command])
                .output()
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).to_string(),
            )
        };
        let status = || {
            let v = control::Client::connect(m.control_path().unwrap()).ask("status");
            let fast = v["fast_link"]["rx_bytes"].as_u64().unwrap_or(0);
            let all = v["link_bytes"].as_u64().unwrap_or(0);
            (fast, all - fast, v)
        };
        let (fast_before, serial_before, _) = status();
        let (ok, out) = run(&format!("export 1 {} qsc", path.display()));
        let last: Value = serde_json::from_str(out.lines().last().unwrap_or("null")).unwrap();
        println!("over the link: {last}");
        assert!(ok && last["state"] == "done", "{out}\n{}", m.bridge_log());
        assert!(out.lines().count() > 2, "the progress came as lines: {out}");
        if fast.is_some() {
            // The export's bytes came over the fast link; the serial link carried next to
            // nothing meanwhile (the console, and nothing the fast link should have).
            let (fast_after, serial_after, v) = status();
            let (over_fast, over_serial) = (fast_after - fast_before, serial_after - serial_before);
            // What the export says it moved over the links (compressed pages, framing).
            let moved = last["link_bytes"].as_u64().unwrap_or(u64::MAX);
            println!(
                "the export moved {moved} bytes: {over_fast} came in over the fast link, {over_serial} over serial; fast link: {}",
                v["fast_link"]
            );
            assert_eq!(v["fast_link"]["state"], "up", "{v}");
            assert!(
                over_fast >= moved && over_serial * 50 < over_fast,
                "the export's {moved} bytes did not come over the fast link: {over_fast} bytes \
                 in over it, {over_serial} over serial\n{v}"
            );
        }
        // A relative path is refused by name: the bridge's folder is not the operator's.
        let (ok, out) = run("export 1 core.qsc");
        assert!(!ok && out.contains("relative"), "{out}");
    }
    m.send("go");
    let out = m.finish();
    assert_success(&out);
    println!("{}", out.script_output());
    assert_kernel_clean(&out);
    (jiffies, out)
}

#[test]
fn a_checkpoint_exported_while_the_machine_runs_opens_intact_and_gdb_reads_its_jiffies() {
    exported_while_running("export", None);
}

/// The same, with the fast link's NIC: the bridge's export goes over it.
#[test]
fn a_checkpoint_exported_over_the_fast_link_is_the_same_checkpoint() {
    exported_while_running("export-fast", Some(FastLinkNic::VirtioNet));
}

fn exported_while_running(name: &str, fast: Option<FastLinkNic>) {
    let a = artifacts();
    let disks = Disks::new(&a, name, 3);
    let over_link = a
        .dir
        .join("run")
        .join(format!("{name}-link-{}.qsc", std::process::id()));
    let (jiffies, out) = checkpoint_then_export(
        &a,
        name,
        &disks,
        r#"qsctl export 1 /dev/vda; echo "export-rc=$?"
qsctl export 1 /dev/vdb --elf; echo "export-elf-rc=$?"
qsctl export 1 /dev/vdc; echo "export-again-rc=$?"
qsctl export 7 /dev/vda; echo "missing-rc=$?""#,
        Some(&over_link),
        fast,
    );
    let o = out.script_output();
    assert!(
        o.contains("export-rc=0")
            && o.contains("export-elf-rc=0")
            && o.contains("export-again-rc=0"),
        "{o}"
    );
    assert!(
        o.contains("no checkpoint 7 is kept") && o.contains("missing-rc=1"),
        "{o}"
    );
    // The .qsc: every checksum, the machine's identity, its CPUs.
    let qsc = disks.file(0, exported_bytes(&o, "/dev/vda"));
    let f = Archive::open_path(qsc).unwrap_or_else(|e| panic!("{}: {e}", qsc.display()));
    let e = &f.checkpoints()[0];
    let meta = &e.section.meta;
    assert_eq!(meta.id, 1);
    assert_eq!(e.cpus.len(), 2);
    assert_eq!(
        e.cpus.iter().map(|c| c.apic_id).collect::<Vec<_>>(),
        [0, 1],
        "APIC IDs"
    );
    // The platform's devices, as the hv captured them (its record, version 1).
    assert_eq!(e.devices.len(), 1, "{:?}", e.devices);
    assert_eq!(e.devices[0].state.version, 1);
    assert!(
        e.devices[0].state.bytes.len() > 1000,
        "{}",
        e.devices[0].state.bytes.len()
    );
    assert!(meta.kernel_release.contains("deb"), "{meta:?}");
    let boot = o
        .lines()
        .find_map(|l| l.strip_prefix("BOOT-ID "))
        .unwrap_or_default();
    assert_eq!(meta.boot_id, boot.trim());
    let vmcoreinfo = String::from_utf8_lossy(&meta.vmcoreinfo);
    assert!(
        vmcoreinfo.contains("OSRELEASE=") && vmcoreinfo.contains("KERNELOFFSET="),
        "{vmcoreinfo}"
    );
    // The same checkpoint exported again, after the machine ran on (and wrote the first
    // export): the same memory, page for page.
    let again = disks.file(2, exported_bytes(&o, "/dev/vdc"));
    let g = Archive::open_path(again).unwrap_or_else(|e| panic!("{}: {e}", again.display()));
    let d = quicksilver_checkpoint::diff::memory(&f, 0, &g, 0, 32).unwrap();
    assert_eq!(d.total, 0, "two exports of one checkpoint differ: {d:?}");
    // The export over the link, to the operator's side, before the machine ran on: the same
    // checkpoint as the guest's own export, page for page, CPU for CPU.
    let l =
        Archive::open_path(&over_link).unwrap_or_else(|e| panic!("{}: {e}", over_link.display()));
    let d = quicksilver_checkpoint::diff::memory(&f, 0, &l, 0, 32).unwrap();
    assert_eq!(
        d.total, 0,
        "the link's export and the guest's differ: {d:?}"
    );
    let lc = &l.checkpoints()[0];
    assert_eq!(lc.cpus, e.cpus, "the CPUs as read over the link");
    assert_eq!(lc.devices, e.devices, "the devices as read over the link");
    let lm = &lc.section.meta;
    assert_eq!(
        (
            &lm.boot_id,
            &lm.kernel_release,
            &lm.hostname,
            &lm.vmcoreinfo,
            &lm.build_id,
            &lm.ram,
            lm.page_offset
        ),
        (
            &meta.boot_id,
            &meta.kernel_release,
            &meta.hostname,
            &meta.vmcoreinfo,
            &meta.build_id,
            &meta.ram,
            meta.page_offset
        ),
        "the machine's facts as read over the link"
    );
    if std::env::var_os("QS_KEEP_EXPORTS").is_none() {
        let _ = std::fs::remove_file(&over_link);
    }
    // The ELF core: gdb reads jiffies from it as it was at the checkpoint.
    let core = disks.file(1, exported_bytes(&o, "/dev/vdb"));
    let gdb = Command::new("gdb")
        .args(["-nx", "-batch", "-ex", "print jiffies"])
        .arg(&a.vmlinux)
        .arg(core)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&gdb.stdout).to_string() + &String::from_utf8_lossy(&gdb.stderr);
    println!("{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("$1 = ") && l.contains(&jiffies)),
        "gdb on the core prints jiffies = {jiffies} (live at the checkpoint):\n{text}"
    );
}

/// crash 8.0 (Debian 12's) reads kernels up to 6.3: this runs on Debian 12's kernel. Its `ps`
/// builds the task table from the PID xarray and reads `struct pid` without the flexible
/// `numbers[]` that Debian 12's current kernels have (a stable backport), so it keeps only the
/// tasks on the run queues; `list` walks every task from `init_task`, which is what a user of
/// this crash does.
#[test]
fn crash_opens_an_exported_core_and_lists_the_machines_processes() {
    let id: qs_testkit::KernelId = "6.1-generic".parse().expect("a supported kernel");
    let a = Artifacts::locate_id(id)
        .unwrap_or_else(|e| panic!("{e}: run `cargo xtask test` (it builds every kernel first)"));
    let disks = Disks::new(&a, "export-crash", 1);
    let (_, out) = checkpoint_then_export(
        &a,
        "export-crash",
        &disks,
        r#"qsctl export 1 /dev/vda --elf; echo "export-elf-rc=$?"
qsctl checkpoints; qsctl stats | head -30"#,
        None,
        None,
    );
    let o = out.script_output();
    assert!(o.contains("export-elf-rc=0"), "{o}");
    let core = disks.file(0, exported_bytes(&o, "/dev/vda"));
    let mut crash = Command::new("crash")
        .args(["-s", "--no_panic", "--kaslr=auto"])
        .arg(&a.vmlinux)
        .arg(core)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("crash is installed (cargo xtask setup)");
    use std::io::Write;
    crash
        .stdin
        .take()
        .unwrap()
        .write_all(b"sys\nps\nlist task_struct.tasks -s task_struct.comm,pid -h init_task\nq\n")
        .unwrap();
    let r = crash.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&r.stdout).to_string() + &String::from_utf8_lossy(&r.stderr);
    println!("{text}");
    assert!(
        text.contains("RELEASE: 6.1."),
        "crash's sys names the kernel:\n{text}"
    );
    assert!(
        text.contains("NODENAME: qs-guest") && text.contains("CPUS: 2"),
        "crash's sys names the machine:\n{text}"
    );
    // What ran on each CPU at the checkpoint (`>`): the workload or an idle task, wherever
    // gdb's stop found them.
    assert_eq!(
        text.lines()
            .filter(|l| l.trim_start().starts_with('>'))
            .count(),
        2,
        "crash's ps shows the task running on each of the 2 CPUs:\n{text}"
    );
    for comm in ["\"init\\000", "\"kthreadd\\000", "\"qs-workload\\000"] {
        assert!(
            text.contains(comm),
            "crash walks the task list to {comm}:\n{text}"
        );
    }
}
