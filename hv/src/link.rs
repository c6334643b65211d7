//! The hv's end of the serial link: the protocol endpoint from `quicksilver-proto` behind a
//! lock, fed by the agent (its UART interrupt handler forwards received bytes, by direct call
//! while dormant and by hypercall while active), answering through the UART itself with
//! polled port I/O, which works the same in the kernel's context and in host mode.

use crate::arch::instr;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering::*};
use quicksilver_proto::abi::Status;
use quicksilver_proto::link::auth;
use quicksilver_proto::link::endpoint::{Endpoint, Event, State};

struct Link {
    port: u16,
    endpoint: Endpoint,
}

struct Locked {
    busy: AtomicBool,
    link: UnsafeCell<Option<Link>>,
}

// SAFETY: `link` is only accessed while `busy` is held (see `with`).
unsafe impl Sync for Locked {}

static LINK: Locked = Locked {
    busy: AtomicBool::new(false),
    link: UnsafeCell::new(None),
};

fn with<R>(f: impl FnOnce(&mut Option<Link>) -> R) -> R {
    while LINK
        .busy
        .compare_exchange(false, true, Acquire, Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    // SAFETY: the lock above gives exclusive access until the store below.
    let r = f(unsafe { &mut *LINK.link.get() });
    LINK.busy.store(false, Release);
    r
}

/// Writes bytes to the 16550 UART at `port`, polling its transmitter (bounded, so that a
/// dead UART cannot hang the caller).
fn uart_write(port: u16, bytes: &[u8]) {
    for &b in bytes {
        for _ in 0..100_000 {
            // SAFETY: reading the line status register of the link's UART, which the agent
            // handed to the hv (LinkConfig), has no side effect.
            if unsafe { instr::inb(port + 5) } & 0x20 != 0 {
                break;
            }
        }
        // SAFETY: the transmit holding register of the link's UART, which the hv owns for
        // writing.
        unsafe { instr::outb(port, b) };
    }
}

/// A fresh challenge: RDRAND where the CPU has it, mixed with the TSC either way.
fn nonce() -> [u8; auth::LEN] {
    let has_rdrand = instr::cpuid(1, 0)[2] & (1 << 30) != 0;
    let mut out = [0u8; auth::LEN];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut v = instr::rdtsc().rotate_left(17 * i as u32) ^ 0x9E37_79B9_7F4A_7C15;
        if has_rdrand {
            for _ in 0..10 {
                let (r, ok): (u64, u8);
                // SAFETY: RDRAND exists (CPUID.1:ECX[30]) and only writes its operand and CF.
                unsafe {
                    core::arch::asm!("rdrand {}", "setc {}", out(reg) r, out(reg_byte) ok,
                                     options(nomem, nostack))
                };
                if ok == 1 {
                    v ^= r;
                    break;
                }
            }
        }
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// The link's counters for the statistics block: (state, dropped, wrong keys,
/// unauthenticated requests); state 0 = off, 1 = configured, 2 = a bridge is authenticated.
pub fn counters() -> [u64; 4] {
    with(|l| match l {
        None => [0; 4],
        Some(link) => {
            let e = &link.endpoint;
            let state = if e.state() == State::Authenticated {
                2
            } else {
                1
            };
            [
                state,
                e.drops().total(),
                e.counters.wrong_key,
                e.counters.unauthenticated,
            ]
        }
    })
}

/// `LinkConfig`: port (u16 LE), then the key.
pub fn configure(buf: &[u8]) -> Status {
    let Some((port, key)) = buf.split_first_chunk::<2>() else {
        return Status::BadArgument;
    };
    let port = u16::from_le_bytes(*port);
    if port == 0 {
        return Status::BadArgument;
    }
    with(|l| {
        *l = Some(Link {
            port,
            endpoint: Endpoint::new(key),
        })
    });
    Status::Ok
}

/// `LinkRx`: feeds received bytes; returns 1 if attention was asked for.
pub fn receive(bytes: &[u8]) -> i64 {
    with(|l| {
        let Some(link) = l.as_mut() else {
            return Status::NotInitialized as i64;
        };
        let port = link.port;
        let mut attention = 0;
        for &b in bytes {
            let mut tx = |w: &[u8]| uart_write(port, w);
            match link.endpoint.push(b, &mut nonce, &mut tx) {
                Some(Event::Attention) => attention = 1,
                // The gdbstub comes next: until then gdb's bytes are not answered.
                Some(Event::Gdb(_)) | None => {}
            }
        }
        attention
    })
}
