//! `qs-workload`: a guest workload that checks its own results, so that a test can tell
//! whether the kernel kept working correctly while Quicksilver slid under it and back out.
//!
//! ```text
//! qs-workload [--seconds N] [--threads N] [--exec PATH]
//! qs-workload --fixed-work            (benchmarks: fixed work on every CPU, timed)
//! qs-workload --hold-kvm-vm [SECONDS] (tests: make kvm_amd own SVM)
//! qs-workload --getpid-loop SECONDS   (gdb tests: the getpid system call, in a loop)
//! qs-workload --outb PORT VALUE       (device tests: one byte to an I/O port, as root)
//! qs-workload --copy-twice MIB        (benchmarks: MIB MiB copied twice, timed)
//! qs-workload --raw-frames tx|rx|echo N SIZE
//!                                     (benchmarks: raw frames through Linux's NIC driver)
//! qs-workload --ledger FILE           (checkpoint tests: a count held in memory, a tmpfs
//!                                      file and a parent/child pipeline, checked each step)
//! ```
//!
//! Each activity runs in `--threads` threads (default 1) until `--seconds` pass (default:
//! until SIGTERM or SIGINT):
//!
//! - **fork/exec**: fork, then either exec `/bin/true` or check in the child that copy-on-write
//!   memory still holds what the parent wrote (and that the child's writes stay private);
//!   wait and require exit status 0.
//! - **memory**: fill a fresh multi-MiB buffer with a seeded pattern, read it back against a
//!   checksum computed without memory, mutate a stride, verify every word; and verify a
//!   long-lived buffer each round (pages that stay put while the hypervisor comes and goes).
//! - **timers**: sleep 1-5 ms, require that CLOCK_MONOTONIC advanced by at least that much
//!   and never went backwards.
//!
//! Every ~2 s a line `workload: alive t=<s> ...` goes to stderr. At the end the last line on
//! stdout is `WORKLOAD OK forks=.. execs=.. mem_verifies=.. sleeps=..` (exit 0), or, at the first
//! inconsistency, `WORKLOAD FAIL <what>` (exit 1).

mod ledger;
mod raw_frames;

use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Set when the run should end (time is up, a signal came, or something failed).
static STOP: AtomicBool = AtomicBool::new(false);
/// The first inconsistency found.
static FAILURE: Mutex<Option<String>> = Mutex::new(None);

static FORKS: AtomicU64 = AtomicU64::new(0);
static EXECS: AtomicU64 = AtomicU64::new(0);
static MEM_VERIFIES: AtomicU64 = AtomicU64::new(0);
static SLEEPS: AtomicU64 = AtomicU64::new(0);

/// Bytes of the buffer each memory round allocates afresh.
const CHURN_BYTES: usize = 6 << 20;
/// Bytes of each memory thread's long-lived buffer.
const LONG_LIVED_BYTES: usize = 1 << 20;
/// Bytes of the buffer fork children check.
const COW_BYTES: usize = 64 << 10;

struct Options {
    seconds: Option<u64>,
    threads: usize,
    exec: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: qs-workload [--seconds N] [--threads N] [--exec PATH]\n       \
         qs-workload --fixed-work\n       qs-workload --hold-kvm-vm [SECONDS]\n       \
         qs-workload --getpid-loop SECONDS\n       qs-workload --outb PORT VALUE\n       \
         qs-workload --ledger FILE\n       qs-workload --raw-frames tx|rx|echo N SIZE"
    );
    std::process::exit(2);
}

fn parse_args() -> Options {
    let mut options = Options {
        seconds: None,
        threads: 1,
        exec: "/bin/true".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--seconds" => options.seconds = Some(value().parse().unwrap_or_else(|_| usage())),
            "--threads" => options.threads = value().parse().unwrap_or_else(|_| usage()),
            "--exec" => options.exec = value(),
            _ => usage(),
        }
    }
    if options.threads == 0 {
        usage();
    }
    options
}

fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Records the first failure and ends the run.
fn fail(what: String) {
    let mut first = FAILURE.lock().unwrap_or_else(|e| e.into_inner());
    if first.is_none() {
        *first = Some(what);
    }
    STOP.store(true, Ordering::Relaxed);
}

fn counters() -> String {
    format!(
        "forks={} execs={} mem_verifies={} sleeps={}",
        FORKS.load(Ordering::Relaxed),
        EXECS.load(Ordering::Relaxed),
        MEM_VERIFIES.load(Ordering::Relaxed),
        SLEEPS.load(Ordering::Relaxed)
    )
}

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler is an
        // extern "C" fn that only does an atomic store, which is async-signal-safe. SA_RESTART
        // keeps waitpid from failing with EINTR.
        let ok = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut()) == 0
        };
        assert!(ok, "sigaction: {}", std::io::Error::last_os_error());
    }
}

/// SplitMix64: a cheap, well-mixed function of (seed, index), so that any word of a pattern
/// can be recomputed without keeping a copy.
fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An order-sensitive checksum step.
fn fold(sum: u64, word: u64) -> u64 {
    sum.rotate_left(5) ^ word
}

fn fill(buf: &mut [u64], seed: u64) {
    for (i, w) in buf.iter_mut().enumerate() {
        *w = mix(seed, i as u64);
    }
}

/// The checksum of `buf`'s memory against the one the pattern should give.
fn check_pattern(buf: &[u64], seed: u64, what: &str) -> Result<(), String> {
    let from_memory = buf.iter().fold(0, |s, &w| fold(s, w));
    let expected = (0..buf.len() as u64).fold(0, |s, i| fold(s, mix(seed, i)));
    if from_memory == expected {
        return Ok(());
    }
    // Say where: the first word that differs.
    let (i, found) = buf
        .iter()
        .enumerate()
        .find(|&(i, &w)| w != mix(seed, i as u64))
        .map_or((0, 0), |(i, &w)| (i, w));
    Err(format!(
        "{what}: checksum {from_memory:#018x} != {expected:#018x}; first bad word {i} (byte {:#x}) = {found:#018x}, expected {:#018x}",
        i * 8,
        mix(seed, i as u64)
    ))
}

fn memory_thread(id: u64) {
    let long_seed = mix(0x51_u64 << 32, id);
    let mut long_lived = vec![0u64; LONG_LIVED_BYTES / 8];
    fill(&mut long_lived, long_seed);
    let mut round = 0u64;
    while !stopped() {
        let seed = mix(id, round);
        // A fresh allocation each round: glibc maps buffers this large with mmap, so every
        // round faults in new pages and unmaps them again.
        let mut buf = vec![0u64; CHURN_BYTES / 8];
        fill(&mut buf, seed);
        let result = check_pattern(&buf, seed, &format!("memory thread {id} round {round} fill")).and_then(|()| {
            // Mutate every 7th word (from a moving start) with a second pattern, then check
            // every word against what it must now hold.
            let seed2 = !seed;
            let start = (round % 7) as usize;
            for i in (start..buf.len()).step_by(7) {
                buf[i] ^= mix(seed2, i as u64);
            }
            let mut next_mutated = start;
            for (i, &w) in buf.iter().enumerate() {
                let mut expected = mix(seed, i as u64);
                if i == next_mutated {
                    expected ^= mix(seed2, i as u64);
                    next_mutated += 7;
                }
                if w != expected {
                    return Err(format!(
                        "memory thread {id} round {round} after mutation: word {i} = {w:#018x}, expected {expected:#018x}"
                    ));
                }
            }
            check_pattern(&long_lived, long_seed, &format!("memory thread {id} long-lived buffer"))
        });
        if let Err(what) = result {
            fail(what);
            return;
        }
        MEM_VERIFIES.fetch_add(1, Ordering::Relaxed);
        round += 1;
    }
}

fn fork_thread(id: u64, exec: &CString) {
    let argv = [exec.as_ptr(), std::ptr::null()];
    let seed = mix(0xF0_u64 << 32, id);
    let mut cow = vec![0u64; COW_BYTES / 8];
    fill(&mut cow, seed);
    let mut n = 0u64;
    while !stopped() {
        // Alternate: exec children, then children that check copy-on-write memory.
        let do_exec = n & 1 == 0;
        // SAFETY: after fork in this multi-threaded process the child runs only
        // async-signal-safe code: execv and _exit, or plain reads and writes of memory prepared
        // before the fork (no allocation, no locks), then _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = if do_exec {
                // SAFETY: argv is a NULL-terminated array of pointers to NUL-terminated strings
                // that live until exec replaces the process image.
                unsafe { libc::execv(exec.as_ptr(), argv.as_ptr()) };
                127
            } else {
                child_check(&mut cow, seed)
            };
            // SAFETY: _exit ends the child without running the parent's atexit handlers or
            // destructors, which must not run twice.
            unsafe { libc::_exit(code) };
        }
        if pid < 0 {
            fail(format!("fork: {}", std::io::Error::last_os_error()));
            return;
        }
        FORKS.fetch_add(1, Ordering::Relaxed);
        let mut status = 0;
        // SAFETY: pid is our child; status is a valid place for the result.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        let what = if do_exec {
            format!("exec {}", exec.to_string_lossy())
        } else {
            "fork child".to_string()
        };
        if waited != pid {
            fail(format!(
                "waitpid for {what} (pid {pid}): {}",
                std::io::Error::last_os_error()
            ));
            return;
        }
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            let how = if libc::WIFSIGNALED(status) {
                format!("was killed by signal {}", libc::WTERMSIG(status))
            } else {
                format!("exited with {}", libc::WEXITSTATUS(status))
            };
            let meaning = match (do_exec, libc::WEXITSTATUS(status)) {
                (true, 127) => " (exec failed)",
                (false, 3) => " (copy-on-write memory differed in the child)",
                _ => "",
            };
            fail(format!("{what} {how}{meaning}"));
            return;
        }
        if do_exec {
            EXECS.fetch_add(1, Ordering::Relaxed);
        } else if let Err(what) =
            check_pattern(&cow, seed, "fork parent after the child wrote its copy")
        {
            fail(what);
            return;
        }
        n += 1;
    }
}

/// In a fork child: the inherited buffer must hold the parent's pattern; then overwrite it
/// (which must stay private to the child). Returns the exit code.
fn child_check(cow: &mut [u64], seed: u64) -> i32 {
    for (i, w) in cow.iter_mut().enumerate() {
        if *w != mix(seed, i as u64) {
            return 3;
        }
        *w = !*w;
    }
    0
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn timer_thread(id: u64) {
    let mut last = now_ns();
    let mut n = 0u64;
    while !stopped() {
        let wanted_ns = (1 + mix(id, n) % 5) * 1_000_000;
        let before = now_ns();
        if before < last {
            fail(format!(
                "CLOCK_MONOTONIC went backwards by {} ns between two sleeps",
                last - before
            ));
            return;
        }
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: wanted_ns as libc::c_long,
        };
        // SAFETY: ts is a valid timespec; no remainder is asked for.
        let interrupted = unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) } != 0;
        let after = now_ns();
        if after < before {
            fail(format!(
                "CLOCK_MONOTONIC went backwards by {} ns across a sleep",
                before - after
            ));
            return;
        }
        // A signal (the one that stops us) cuts a sleep short: only check complete sleeps.
        if !interrupted {
            if after - before < wanted_ns {
                fail(format!(
                    "slept {} ms but CLOCK_MONOTONIC advanced only {} ns",
                    wanted_ns / 1_000_000,
                    after - before
                ));
                return;
            }
            SLEEPS.fetch_add(1, Ordering::Relaxed);
        }
        last = after;
        n += 1;
    }
}

/// `--hold-kvm-vm SECONDS`: create a KVM virtual machine (which makes kvm_amd set EFER.SVME on
/// every CPU) and keep it for SECONDS. Prints `KVM-VM created` or `KVM-VM refused: <error>`.
/// The tests use it to make another hypervisor own SVM, with the real kvm_amd.
fn hold_kvm_vm(seconds: u64) -> ! {
    const KVM_CREATE_VM: libc::c_ulong = 0xAE01; // _IO(KVMIO, 0x01)
    let kvm = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(f) => f,
        Err(e) => {
            println!("KVM-VM refused: cannot open /dev/kvm: {e}");
            std::process::exit(1);
        }
    };
    // SAFETY: KVM_CREATE_VM takes an integer machine type (0) and returns a new fd or -1.
    let vm = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&kvm), KVM_CREATE_VM, 0) };
    if vm < 0 {
        println!("KVM-VM refused: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    println!("KVM-VM created");
    std::thread::sleep(Duration::from_secs(seconds));
    std::process::exit(0);
}

/// `--fixed-work`: a fixed amount of work on every CPU (one thread each) — memory fill and
/// check, system calls, page faults — timed with CLOCK_MONOTONIC. Prints `QS-WORK-MS <ms>`.
/// The benchmarks compare its time natively, dormant and active.
fn fixed_work() -> ! {
    // SAFETY: sysconf has no memory-safety preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as u64;
    let start = Instant::now();
    let threads: Vec<_> = (0..cpus)
        .map(|id| {
            std::thread::spawn(move || {
                let mut sum = 0u64;
                for round in 0..24u64 {
                    let seed = mix(id, round);
                    let mut buf = vec![0u64; (1 << 20) / 8];
                    fill(&mut buf, seed);
                    sum = sum.wrapping_add(buf.iter().fold(0u64, |a, &w| a.wrapping_add(w)));
                    for _ in 0..200 {
                        // SAFETY: getppid has no preconditions.
                        sum = sum.wrapping_add(unsafe { libc::getppid() } as u64);
                    }
                }
                sum
            })
        })
        .collect();
    let sum = threads
        .into_iter()
        .fold(0u64, |a, t| a.wrapping_add(t.join().unwrap_or(0)));
    println!(
        "QS-WORK-MS {:.3} (check {sum:#x})",
        start.elapsed().as_secs_f64() * 1000.0
    );
    std::process::exit(0);
}

/// `--getpid-loop SECONDS`: the getpid system call in a tight loop for SECONDS (0: until
/// SIGTERM or SIGINT), each answer checked against the pid the process started with, so that a
/// breakpoint or a single step in the kernel's handler that disturbed the call is noticed.
/// Prints `GETPID-LOOP OK calls=N` (exit 0) or `GETPID-LOOP FAIL ...` (exit 1).
fn getpid_loop(seconds: u64) -> ! {
    install_signal_handlers();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as libc::c_long;
    let start = Instant::now();
    let mut calls = 0u64;
    while !stopped() && (seconds == 0 || start.elapsed() < Duration::from_secs(seconds)) {
        for _ in 0..1000 {
            // The raw system call: glibc's getpid wrapper does not cache today, but the test
            // needs the kernel entered every time.
            // SAFETY: SYS_getpid takes no arguments and has no side effects.
            let got = unsafe { libc::syscall(libc::SYS_getpid) };
            if got != pid {
                println!("GETPID-LOOP FAIL call {calls}: getpid returned {got}, expected {pid}");
                std::process::exit(1);
            }
            calls += 1;
        }
    }
    println!("GETPID-LOOP OK calls={calls}");
    std::process::exit(0);
}

/// `--outb PORT VALUE`: writes one byte to an I/O port from user space, as a program that
/// changes a device setting would (e.g. the console UART's FIFO trigger level at 0x3FA; busybox
/// has no `setserial`). Needs root: `ioperm` opens the one port in this process's TSS I/O
/// bitmap, so the CPU's permission check passes and a hypervisor's port intercept, if any,
/// is what sees the OUT.
fn outb(args: &[String]) -> ! {
    let number = |s: &str| match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    };
    let (Some(port), Some(value)) = (
        args.first()
            .and_then(|s| number(s))
            .filter(|&p| p <= 0xFFFF),
        args.get(1).and_then(|s| number(s)).filter(|&v| v <= 0xFF),
    ) else {
        usage()
    };
    // SAFETY: ioperm changes only this process's I/O permission bitmap.
    if unsafe { libc::ioperm(port as libc::c_ulong, 1, 1) } != 0 {
        eprintln!(
            "qs-workload: ioperm({port:#x}) failed: {} (run as root)",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    // SAFETY: the port was opened to this process just above; the byte goes to the device,
    // which is the point; no memory is touched.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") port as u16, in("al") value as u8,
                        options(nomem, nostack))
    };
    println!("outb {port:#x} {value:#04x}");
    std::process::exit(0);
}

/// `--copy-twice MIB`: copies MIB MiB from one buffer to another twice (both touched first),
/// timed: what a rollback of that much memory is compared with.
fn copy_twice(mib: usize) -> ! {
    let words = (mib << 20) / 8;
    let src: Vec<u64> = (0..words as u64).map(|i| mix(7, i)).collect();
    let mut dst = vec![1u64; words];
    let start = Instant::now();
    dst.copy_from_slice(&src);
    let first = dst[words / 2];
    dst.copy_from_slice(&src);
    let us = start.elapsed().as_micros();
    println!(
        "QS-COPY-US {us} ({mib} MiB twice, check {:#x})",
        first ^ dst[words - 1]
    );
    std::process::exit(0);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--outb") {
        outb(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some("--copy-twice") {
        copy_twice(
            args.get(2)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| usage()),
        );
    }
    if args.get(1).map(String::as_str) == Some("--raw-frames") {
        raw_frames::run(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some("--ledger") {
        ledger::run(args.get(2).map_or_else(|| usage(), String::as_str));
    }
    if args.get(1).map(String::as_str) == Some("--getpid-loop") {
        getpid_loop(
            args.get(2)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| usage()),
        );
    }
    if args.get(1).map(String::as_str) == Some("--fixed-work") {
        fixed_work();
    }
    if args.get(1).map(String::as_str) == Some("--hold-kvm-vm") {
        hold_kvm_vm(args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3600));
    }
    let options = parse_args();
    install_signal_handlers();
    let exec = CString::new(options.exec.clone()).unwrap_or_else(|_| usage());
    let start = Instant::now();
    let threads: Vec<_> = (0..options.threads as u64)
        .flat_map(|id| {
            let exec = exec.clone();
            [
                std::thread::spawn(move || memory_thread(id)),
                std::thread::spawn(move || fork_thread(id, &exec)),
                std::thread::spawn(move || timer_thread(id)),
            ]
        })
        .collect();
    eprintln!(
        "workload: started, {} thread(s) per activity, {}",
        options.threads,
        options
            .seconds
            .map_or("until SIGTERM".into(), |s| format!("{s} s"))
    );

    let mut next_report = Duration::from_secs(2);
    while !stopped() {
        std::thread::sleep(Duration::from_millis(50));
        let t = start.elapsed();
        if options.seconds.is_some_and(|s| t >= Duration::from_secs(s)) {
            STOP.store(true, Ordering::Relaxed);
        }
        if t >= next_report {
            eprintln!("workload: alive t={} {}", t.as_secs(), counters());
            next_report += Duration::from_secs(2);
        }
    }
    // A failure ends the run at once, without waiting for the other threads.
    let failed = || FAILURE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(what) = failed() {
        println!("WORKLOAD FAIL {what}");
        std::process::exit(1);
    }
    for t in threads {
        let _ = t.join();
    }
    if let Some(what) = failed() {
        println!("WORKLOAD FAIL {what}");
        std::process::exit(1);
    }
    println!("WORKLOAD OK {}", counters());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_word_is_found_and_located() {
        let mut buf = vec![0u64; 1000];
        fill(&mut buf, 42);
        assert!(check_pattern(&buf, 42, "t").is_ok());
        buf[321] ^= 1 << 17;
        let err = check_pattern(&buf, 42, "t").unwrap_err();
        assert!(err.contains("first bad word 321"), "{err}");
    }

    #[test]
    fn a_child_sees_the_parent_pattern_and_flips_it() {
        let mut buf = vec![0u64; 16];
        fill(&mut buf, 7);
        assert_eq!(child_check(&mut buf, 7), 0);
        assert_eq!(child_check(&mut buf, 7), 3, "flipped words no longer match");
    }
}
