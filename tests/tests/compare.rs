//! `compare A B` tells the kernel's own patching of its text from other writes to it, as an
//! operator hunting a corruption or a rootkit needs: with the bridge holding the kernel's
//! `vmlinux`, turning scheduler statistics on between two checkpoints (a static key: the kernel
//! rewrites its jump labels) shows the text changed only at jump labels, nothing flagged; a byte
//! written into a function by other means (gdb through the hv, as a rootkit or a stray write
//! would) between the next two is flagged, named by function and offset, its old and new bytes
//! given. The rest of RAM is told apart by the kernel's own records (struct pages, the module
//! area's page tables).

use quicksilver_tests::control::Client;
use quicksilver_tests::*;
use serde_json::Value;
use std::time::Duration;

const GUEST: &str = r#"
start_workload
echo GUEST-READY
while true; do
    wait_host
    case "$host_line" in
    schedstats)
        echo 1 > /proc/sys/kernel/sched_schedstats
        echo "SCHEDSTATS=$(cat /proc/sys/kernel/sched_schedstats)" ;;
    done) break ;;
    esac
done
stop_workload
"#;

/// A function nothing calls here (sysrq's `c`), and a byte inside it that is no patch site: in
/// 6.12's build, a byte of the immediate of its `mov $message, %rdi`, after ENDBR64, the
/// fentry call and a call. The byte is read before it is changed.
const VICTIM: &str = "sysrq_handle_crash";

/// A checkpoint's id, from the reply that took it.
fn id(v: Value) -> u64 {
    assert_eq!(v["ok"], true, "{v}");
    v["id"].as_u64().unwrap()
}

fn text_region(v: &Value) -> Value {
    v["regions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["region"] == "kernel text")
        .cloned()
        .unwrap_or_else(|| panic!("no kernel text in {v:#}"))
}

#[test]
fn compare_tells_the_kernels_own_text_patching_from_a_foreign_write() {
    // One CPU: QEMU's TCG now and then misses one vCPU's write to code another vCPU runs
    // (README, Limits), and turning schedstats on rewrites a hundred jump labels under the
    // scheduler's feet (with 2 CPUs: an INT3 oops in 1 of 9 runs).
    let mut m = Machine::boot("compare-text", 1, GUEST, "GUEST-READY");
    let path = m
        .control_path()
        .expect("the bridge's control socket")
        .to_path_buf();
    let mut c = Client::connect(&path);
    let one = id(take_checkpoint(&mut c));
    m.send("schedstats");
    m.wait_for("SCHEDSTATS=1", Duration::from_secs(30));
    let two = id(take_checkpoint(&mut c));

    let v = c.ask(&format!("compare {one} {two}"));
    println!("{v:#}");
    assert_eq!(
        (v["ok"].as_bool(), v["symbols"].as_bool()),
        (Some(true), Some(true)),
        "{v}"
    );
    let text = text_region(&v);
    assert_eq!(text["flagged"], false, "only jump labels changed:\n{v:#}");
    let patches = v["patches"].as_array().expect("the text's changes");
    assert!(!patches.is_empty(), "{v:#}");
    assert!(
        patches
            .iter()
            .all(|p| p["kind"] == "jump label" && p["expected"] == true),
        "{v:#}"
    );
    assert_eq!(v["unexpected"], 0, "{v:#}");
    // The rest of RAM by what the kernel used it for, from its own struct pages and page
    // tables: the workload's anonymous memory and page tables, the kernel's slab. (A page of
    // the agent module's is among them in most runs, not all: not asserted.)
    let pages = |region: &str| {
        v["regions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["region"] == region)
            .map_or(0, |r| r["pages"].as_u64().unwrap_or(0))
    };
    for region in [
        "process memory (anonymous)",
        "slab (kernel objects)",
        "page tables",
    ] {
        assert!(pages(region) > 0, "no {region}:\n{v:#}");
    }
    assert!(
        pages("other RAM") * 100 <= v["pages"].as_u64().unwrap(),
        "at most 1% not told apart:\n{v:#}"
    );

    // A foreign write: one byte of the victim's text, through gdb and the hv.
    let mut gdb = m.attach();
    let at = format!("((unsigned char *){VICTIM} + 0x11)");
    let old = m.run(&mut gdb, &format!("output/x *{at}"));
    let old = u8::from_str_radix(old.trim().trim_start_matches("0x"), 16)
        .unwrap_or_else(|_| m.fail(&gdb, "read the victim's byte", &old));
    let new = old ^ 0x01;
    m.run(&mut gdb, &format!("set var *{at} = {new}"));
    let back = m.run(&mut gdb, &format!("output/x *{at}"));
    assert_eq!(back.trim(), format!("{new:#x}"), "the byte was written");
    let out = m.run(&mut gdb, "detach");
    assert!(out.contains("detached"), "{out}");
    drop(gdb);
    m.await_sessions_ended(1);
    let three = id(take_checkpoint(&mut c));

    let v = c.ask(&format!("compare {two} {three}"));
    println!("{v:#}");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(text_region(&v)["flagged"], true, "{v:#}");
    let foreign: Vec<&Value> = v["patches"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["expected"] == false)
        .collect();
    assert_eq!(foreign.len(), 1, "{v:#}");
    assert_eq!(foreign[0]["at"], format!("{VICTIM}+0x11"), "{v:#}");
    assert_eq!(
        (foreign[0]["old"].as_str(), foreign[0]["new"].as_str()),
        (Some(&*format!("{old:02x}")), Some(&*format!("{new:02x}"))),
        "{v:#}"
    );
    assert_eq!(v["unexpected"], 1, "{v:#}");

    m.send("done");
    let out = m.finish();
    assert_success(&out);
    assert_kernel_clean(&out);
}
