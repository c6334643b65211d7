//! `--ledger FILE`: a workload that can tell whether it was put back exactly. A parent and a
//! child process count steps together; at every step the count `n` is held in four places,
//! which must agree:
//!
//! - the parent's memory: a 256 KiB buffer filled with a pattern of `n` (64 pages, every one
//!   rewritten each step), checked word by word against `n - 1` before it is rewritten;
//! - a file in tmpfs (`FILE`), which holds `n - 1` when step `n` begins;
//! - the pipeline: the parent sends `n` to the child, which checks it follows the last one it
//!   saw and sends it back;
//! - the child's memory (its last count).
//!
//! A rollback puts all four back to one earlier step, so the run goes on without a mismatch;
//! a rollback that restored some pages and not others, or memory but not the file or the
//! pipe, is a mismatch: `LEDGER FAIL <what>` and exit 1. Every ~100 steps `ledger n=<n>` is
//! printed (the console is the world, which is not rolled back: a test sees the count go back
//! after each rollback). SIGTERM ends it with `LEDGER OK n=<n>`.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::time::Duration;

const WORDS: usize = 256 << 10 >> 3;

fn pattern(n: u64, i: usize) -> u64 {
    super::mix(n, i as u64)
}

fn fail(what: String) -> ! {
    println!("LEDGER FAIL {what}");
    std::process::exit(1);
}

fn pipe() -> (std::fs::File, std::fs::File) {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into the array it is given.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        fail(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors are fresh and owned by nothing else.
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}

fn read_u64(f: &mut std::fs::File, what: &str) -> u64 {
    let mut b = [0u8; 8];
    if let Err(e) = f.read_exact(&mut b) {
        fail(format!("{what}: {e}"));
    }
    u64::from_le_bytes(b)
}

/// The child: each count must follow the last one; it is sent back.
fn child(mut from: std::fs::File, mut to: std::fs::File) -> ! {
    let mut last = 0u64;
    loop {
        let mut b = [0u8; 8];
        if from.read_exact(&mut b).is_err() {
            // The parent is gone (it ended, or failed and said why).
            std::process::exit(0);
        }
        let n = u64::from_le_bytes(b);
        if n != last + 1 {
            fail(format!("the child got {n} after {last}"));
        }
        last = n;
        if let Err(e) = to.write_all(&n.to_le_bytes()) {
            fail(format!("child write: {e}"));
        }
    }
}

pub fn run(file: &str) -> ! {
    super::install_signal_handlers();
    let (down_r, down_w) = pipe();
    let (up_r, up_w) = pipe();
    // SAFETY: fork in a single-threaded process (nothing else was started).
    match unsafe { libc::fork() } {
        -1 => fail(format!("fork: {}", std::io::Error::last_os_error())),
        0 => {
            drop((down_w, up_r));
            child(down_r, up_w)
        }
        _ => drop((down_r, up_w)),
    }
    let (mut to_child, mut from_child) = (down_w, up_r);
    let mut buf = vec![0u64; WORDS];
    let mut n = 0u64;
    if let Err(e) = fs::write(file, "0\n") {
        fail(format!("{file}: {e}"));
    }
    while !super::stopped() {
        // Everything holds step n; make it step n + 1.
        if let Some(i) = (0..WORDS).find(|&i| buf[i] != if n == 0 { 0 } else { pattern(n, i) }) {
            fail(format!("memory word {i} does not hold step {n}'s pattern"));
        }
        let held = fs::read_to_string(file).unwrap_or_default();
        if held.trim() != n.to_string() {
            fail(format!("{file} holds {:?} at step {n}", held.trim()));
        }
        n += 1;
        for (i, w) in buf.iter_mut().enumerate() {
            *w = pattern(n, i);
        }
        if let Err(e) = fs::write(file, format!("{n}\n")) {
            fail(format!("{file}: {e}"));
        }
        if let Err(e) = to_child.write_all(&n.to_le_bytes()) {
            fail(format!("parent write: {e}"));
        }
        let back = read_u64(&mut from_child, "parent read");
        if back != n {
            fail(format!("the child sent back {back} for {n}"));
        }
        if n.is_multiple_of(100) {
            println!("ledger n={n}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("LEDGER OK n={n}");
    std::process::exit(0);
}
