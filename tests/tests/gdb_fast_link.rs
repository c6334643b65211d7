//! The gdb sessions of `gdb.rs` (real GNU gdb against a live Linux in QEMU, through
//! `qs-bridge`), with the same assertions, over the fast link: the machine has a second NIC
//! the hv drives, the agent is loaded with `net=`, the bridge serves it with `--net`, and
//! every gdb that connects checks with `monitor link` that the fast link carries its session.
//! Half of the sessions run on a virtio-net NIC, half on an Intel 82574L (QEMU's `e1000e`),
//! so that both of the hv's drivers carry every kind of traffic.

use qs_testkit::qemu::FastLinkNic;
use quicksilver_tests::session::{
    assert_clean_end, check_syscall_argument, detach, detach_and_finish, GETPID,
    WORKLOAD_AND_GETPID,
};
use quicksilver_tests::*;
use std::time::Duration;

/// Boots a test's machine with the fast link's NIC: the 82574L for the sessions that stop
/// and resume most (breakpoints, watchpoints, interrupts, cycles), virtio-net for the rest.
fn boot(name: &str, smp: u32, script: &str, ready: &str) -> Machine {
    let nic = match name {
        "gdb-watch" | "gdb-interrupt" | "gdb-cycles" | "gdb-kill" | "gdb-long-session" => {
            FastLinkNic::E1000e
        }
        _ => FastLinkNic::VirtioNet,
    };
    Machine::boot_over(&format!("{name}-fast"), smp, script, ready, Some(nic))
}

/// The agent's timer makes the hypercall that takes the stop, and the NIC's interrupt handler
/// makes `NetPoll` hypercalls from the same helper: a second CPU can be stopped in the agent
/// when a frame (the bridge's ping) came in at the moment of the stop.
const AGENT_CPUS_AT_MOST: usize = 2;

include!("gdb/sessions.rs");
