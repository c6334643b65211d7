//! qs-tui in a real terminal (tmux) against a running machine, as an operator uses it: it
//! connects to the bridge's control socket, `c` takes a checkpoint, `e` exports it over the
//! link with a progress bar (the bridge is killed halfway: the TUI says so, reconnects to the
//! new one and has it continue; the file opens intact), `r` opens the dialog and `y` rolls the
//! machine back (the guest's ledger, which counts in memory, in tmpfs and through a pipe, goes
//! back and stays consistent), `q` quits with the terminal restored.

use qs_testkit::machine::Machine;
use quicksilver_checkpoint::qsc::read::Archive;
use quicksilver_tests::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const GUEST: &str = r#"
qs-workload --ledger /tmp/ledger &
LP=$!
echo GUEST-READY
wait_host
sleep 3
kill -TERM $LP; wait $LP; echo "ledger-rc=$?"
qsctl checkpoint --delete all
"#;

/// qs-tui, as `cargo xtask test` builds it (target/qs/qs-tui).
fn qs_tui() -> PathBuf {
    let p = artifacts().tui;
    assert!(
        p.exists(),
        "{} is not built: run `cargo xtask test` (it builds everything first)",
        p.display()
    );
    p
}

/// A tmux server of the test's own, with one window of a shell.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(name: &str) -> Tmux {
        let t = Tmux {
            socket: format!("qs-{name}-{}", std::process::id()),
        };
        t.run(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            "110",
            "-y",
            "30",
            "sh",
        ]);
        t
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux is installed (cargo xtask setup)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        self.run(&["send-keys", "-t", "t", keys]);
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "t"])
    }

    /// Waits until the screen shows `what`; panics with the screen if it does not in `secs`.
    fn wait_for(&self, what: &str, secs: u64) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.screen();
            if s.contains(what) {
                return s;
            }
            if t0.elapsed() > Duration::from_secs(secs) {
                panic!("qs-tui's screen never showed {what:?}:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Escape, then waits until `what` has left the screen: a key sent right after an Escape
    /// reads as Alt plus that key (the terminal's escape prefix), and is lost.
    fn escape_from(&self, what: &str) {
        self.keys("Escape");
        let t0 = Instant::now();
        while self.screen().contains(what) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "Escape did not close what showed {what:?}:\n{}",
                self.screen()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

#[test]
fn an_operator_takes_a_checkpoint_and_rolls_the_machine_back_from_the_terminal() {
    let a = artifacts();
    let mut config = Machine::config("tui", 2, GUEST, "GUEST-READY");
    // The export crosses the serial link: minutes under QEMU.
    config.timeout = Duration::from_secs(1200);
    config.memory = Some("256M".into());
    // Freed pages zeroed (as hardened kernels do): fewer pages for the export to carry over
    // the slow serial link.
    config.cmdline.push("init_on_free=1".into());
    let mut m = Machine::start(&a, &config).unwrap_or_else(|e| panic!("{e}"));
    let control = m
        .control_path()
        .expect("the bridge's control socket")
        .to_owned();
    // The operator's folder, where the export lands.
    let here = a
        .dir
        .join("run")
        .join(format!("tui-{}", std::process::id()));
    std::fs::create_dir_all(&here).unwrap();
    let tmux = Tmux::start("tui");
    tmux.keys(&format!(
        "cd {} && {} --socket {}; echo TUI-EXIT=$?",
        here.display(),
        qs_tui().display(),
        control.display()
    ));
    tmux.keys("Enter");
    tmux.wait_for("link authenticated", 60);
    tmux.keys("c");
    tmux.wait_for("Checkpoints (1)", 120);
    // Export it here, over the link, as .qsc (the dialog's default path).
    tmux.keys("e");
    let s = tmux.wait_for("Enter: export", 10);
    assert!(s.contains("checkpoint-1.qsc"), "{s}");
    tmux.keys("Enter");
    let s = tmux.wait_for("% pages:", 120);
    println!("{s}");
    assert!(s.contains("Export of checkpoint 1 to"), "{s}");
    // The bridge dies halfway (as when its machine reboots or it is killed); a new one comes
    // up on the same socket, and the TUI has it continue from what was staged.
    std::thread::sleep(Duration::from_secs(10));
    m.restart_bridge();
    let s = tmux.wait_for("done: ", 900);
    println!("{s}");
    let file = here.join("checkpoint-1.qsc");
    let f = Archive::open_path(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let c = &f.checkpoints()[0];
    assert_eq!(
        (c.section.meta.id, c.cpus.len()),
        (1, 2),
        "{:?}",
        c.section.meta
    );
    assert!(
        m.bridge_log().contains("continuing checkpoint 1"),
        "the new bridge continued the export:\n{}",
        m.bridge_log()
    );
    // Its details: where each CPU was, named as its address says (the bridge has the vmlinux):
    // the kernel's image by function, a module's space as outside vmlinux, user space as such.
    tmux.keys("Enter");
    let s = tmux.wait_for("CPU 1  0x", 60);
    println!("{s}");
    for cpu in 0..2 {
        let line = s
            .lines()
            .find_map(|l| l.split(&format!("CPU {cpu}  0x")).nth(1))
            .unwrap_or_else(|| panic!("no line for CPU {cpu}:\n{s}"));
        let rip = u64::from_str_radix(line.split_whitespace().next().unwrap(), 16).unwrap();
        let says = match rip {
            0xffff_ffff_8000_0000..0xffff_ffff_c000_0000 => "+0x",
            0xffff_ffff_c000_0000.. => "outside vmlinux",
            ..0x8000_0000_0000 => "user space",
            _ => "",
        };
        assert!(line.contains(says), "CPU {cpu} at {rip:#x}:\n{s}");
    }
    tmux.escape_from("CPU 1  0x");
    // A second checkpoint, then what changed between the two: by region of the kernel's
    // memory (the bridge has the vmlinux), and the rest.
    tmux.keys("c");
    tmux.wait_for("Checkpoints (2)", 120);
    tmux.keys("k");
    tmux.keys("m");
    tmux.keys("j");
    tmux.keys("=");
    let s = tmux.wait_for("process memory (anonymous)", 120);
    println!("{s}");
    assert!(
        s.contains("Compare: checkpoint 1 with checkpoint 2")
            && (s.contains("kernel data") || s.contains("kernel bss"))
            && s.contains("slab (kernel objects)"),
        "{s}"
    );
    tmux.keys("2");
    tmux.keys("k");
    // The ledger counts on (it prints every ~100 steps); then back to the checkpoint,
    // through the dialog.
    std::thread::sleep(Duration::from_secs(5));
    tmux.keys("r");
    let s = tmux.wait_for("Roll back?", 10);
    assert!(s.contains("Every process on the machine returns"), "{s}");
    tmux.keys("y");
    tmux.keys("4");
    let s = tmux.wait_for("rolled back to checkpoint 1", 120);
    println!("{s}");
    assert!(
        s.contains("reconnecting") && s.contains("asking it to continue"),
        "the event log says the bridge went and the export was continued:\n{s}"
    );
    let _ = std::fs::remove_dir_all(&here);
    tmux.keys("q");
    let s = tmux.wait_for("TUI-EXIT=0", 10);
    assert!(
        !s.contains("Checkpoints ("),
        "the terminal is back to the shell, the TUI's screen gone:\n{s}"
    );
    m.send("go");
    let out = m.finish();
    assert_success(&out);
    let o = out.script_output();
    assert!(o.contains("LEDGER OK") && o.contains("ledger-rc=0"), "{o}");
    // The ledger's count, as the console (the world) saw it, went back once.
    let counts: Vec<u64> = o
        .lines()
        .filter_map(|l| l.strip_prefix("ledger n=")?.trim().parse().ok())
        .collect();
    assert!(
        counts.windows(2).any(|w| w[1] < w[0]),
        "the ledger went back at the rollback: {counts:?}"
    );
    assert_console_has(&out, "quicksilver: rolled back to checkpoint 1");
    assert_kernel_clean(&out);
}
