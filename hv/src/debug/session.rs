//! The gdb session: the gdbstub state machine and the target state it drives, behind one lock.
//!
//! While CPUs are parked, the leader ([`lead`]) polls the link UART itself (GIF = 0, no
//! interrupts) and feeds gdb's bytes to the stub until gdb resumes or detaches. While they
//! run, gdb's bytes arrive through the agent's link hypercalls ([`gdb_input`]); a Ctrl-C there
//! becomes a stop once that hypercall, or the agent's stopping one, completes
//! ([`take_pending_stop`]).

use super::target::{Debugger, Devirt, HwKind};
use super::{regs, Reason};
use crate::link::{self, Routed};
use crate::rendezvous::Release;
use crate::rendezvous::MAX_CPUS as MAX;
use crate::vcpu::Parked;
use crate::vmm::Hv;
use core::fmt::Write as _;
use core::num::NonZeroUsize;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::*};
use gdbstub::common::Signal;
use gdbstub::conn::Connection;
use gdbstub::stub::state_machine::GdbStubStateMachine;
use gdbstub::stub::{DisconnectReason, GdbStubBuilder, MultiThreadStopReason};
use quicksilver_proto::link::control::{End, Message};
use quicksilver_proto::link::Channel;

/// gdb's output, framed on the link's gdb channel when the stub flushes or [`CONN_OUT`]
/// fills.
pub struct Conn {
    len: usize,
}

/// Where [`Conn`] gathers gdb's output: several datagrams' worth, which the fast link sends
/// as full datagrams (the serial link frames it by `MAX_PAYLOAD`). A static, not a field of
/// `Conn`: a session is built on the stack and moved into [`SESSION`], and the hv's 32 KiB
/// stacks have no guard page (a 4 KiB field overflowed the leader's into its own captured
/// registers).
struct ConnOut(core::cell::UnsafeCell<[u8; CONN_BUF]>);

// SAFETY: only a `Conn` touches it, a `Conn` lives only inside the session's stub, and the
// stub is driven only with `SESSION` locked: one CPU at a time, the lock ordering the
// accesses. A session being replaced writes nothing meanwhile.
unsafe impl Sync for ConnOut {}

static CONN_OUT: ConnOut = ConnOut(core::cell::UnsafeCell::new([0; CONN_BUF]));

/// Five datagrams of the fast link (1432 bytes of payload each).
const CONN_BUF: usize = 5 * 1432;

impl Connection for Conn {
    type Error = ();

    fn write(&mut self, byte: u8) -> Result<(), ()> {
        if self.len == CONN_BUF {
            self.flush()?;
        }
        // SAFETY: see `ConnOut`: this CPU holds `SESSION`'s lock; no reference outlives the
        // statement.
        unsafe { (*CONN_OUT.0.get())[self.len] = byte };
        self.len += 1;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ()> {
        if self.len > 0 {
            // SAFETY: as in `write`; `link::send` copies the bytes out before returning.
            let out = unsafe { &(&*CONN_OUT.0.get())[..self.len] };
            link::send(Channel::Gdb, out);
            self.len = 0;
        }
        Ok(())
    }
}

type Stub = GdbStubStateMachine<'static, Debugger, Conn>;

struct Session {
    target: Debugger,
    stub: Option<Stub>,
}

static SESSION: spin::Mutex<Option<Session>> = spin::Mutex::new(None);

/// The last session ended with every CPU leaving guest mode: a CPU that missed that stop
/// (it did not answer its NMI in time) leaves too when it next exits for the debugger.
pub static LEAVE_AFTER_DETACH: AtomicBool = AtomicBool::new(false);
/// DR slots the kernel had enabled when the last session began.
pub static KERNEL_SLOTS: AtomicU8 = AtomicU8::new(0);

/// A stop asked for from a hypercall, to make once it is complete ([`Pending`] as u8).
static PENDING_STOP: AtomicU8 = AtomicU8::new(Pending::Nothing as u8);

/// Why the CPU making the next hypercall must stop every CPU.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    Nothing = 0,
    /// gdb's Ctrl-C arrived.
    Interrupt = 1,
    /// The bridge asked for attention: gdb attaches.
    Attach = 2,
    /// gdb detached (or its bridge did so for it) while the kernel ran: the session ends as a
    /// detach does, with every CPU stopped and released by the devirt policy.
    End = 3,
    /// The bridge asked for attention where no stop may be made: outside any hypercall (the
    /// agent's direct call while dormant), or in the fast link's NIC interrupt. The agent
    /// makes the stopping hypercall from its timer (`Op::AgentStop`), and only that one takes
    /// it. Another hypercall that came first (the fast link's NIC interrupts every few
    /// milliseconds) would stop the CPUs from under the agent's timer, whose own hypercall
    /// then finds them native after the session and asks for attention again: a second
    /// activation with no debugger.
    AttachAtAgent = 4,
    /// gdb's Ctrl-C arrived in the fast link's NIC interrupt: `Op::AgentStop` takes it. The
    /// INTx line is level-triggered, so Linux acknowledges it only when the handler returns:
    /// a stop made there finds its vector in service, and every `monitor checkpoint` is
    /// refused until gdb continues.
    InterruptAtAgent = 5,
}
/// An attention request arrived: the next stop begins a new session.
static ATTACH_REQUESTED: AtomicU8 = AtomicU8::new(0);

/// The packet buffer, whose size the stub advertises as `PacketSize`. gdb reads memory in
/// chunks of half of it (GDB 13 honours any size: fast-link.md §6): 128 KiB makes a 1 MiB
/// read 16 round trips instead of 256, which is what a fast link needs, and costs a serial
/// link nothing (the bytes are the same; a reply takes 0.5 s at 270 KiB/s).
const PACKET_SIZE: usize = 0x20000;
static mut PACKET_BUF: [u8; PACKET_SIZE] = [0; PACKET_SIZE];

/// The link's attention request: attach gdb at a hypercall (the CPU making it stops the
/// others): the next to complete if `any_hypercall` (this one: the request came in the
/// serial link's interrupt, which Linux acknowledged first), otherwise the agent's
/// `Op::AgentStop`, once it is told (it activates first if the hv is dormant).
pub fn request_attach(any_hypercall: bool) {
    ATTACH_REQUESTED.store(1, Release);
    ATTACH_REQUEST_TSC.store(crate::arch::instr::rdtsc(), Release);
    let pending = if any_hypercall {
        Pending::Attach
    } else {
        Pending::AttachAtAgent
    };
    PENDING_STOP.store(pending as u8, Release);
}

/// The agent's stopping hypercall (`Op::AgentStop`, from its timer): a stop held for it
/// becomes this hypercall's.
pub fn agent_stop_hypercall() {
    for (held, now) in [
        (Pending::AttachAtAgent, Pending::Attach),
        (Pending::InterruptAtAgent, Pending::Interrupt),
    ] {
        let _ = PENDING_STOP.compare_exchange(held as u8, now as u8, AcqRel, Acquire);
    }
}

/// When the last attention request came: one older than [`ATTACH_FRESH_SECONDS`] is not
/// acted on (its bridge gave up waiting; a later activation must not stop the kernel for a
/// debugger that is gone).
static ATTACH_REQUEST_TSC: AtomicU64 = AtomicU64::new(0);
const ATTACH_FRESH_SECONDS: u64 = 10;

/// Bytes of gdb's protocol that arrived while CPUs run (the agent's hypercall). A Ctrl-C
/// stops every CPU when the next hypercall completes if `any_hypercall`, otherwise at the
/// agent's `Op::AgentStop`: true is returned then, and the agent must be told.
pub fn gdb_input(bytes: &[u8], any_hypercall: bool) -> bool {
    let mut guard = SESSION.lock();
    let Some(s) = guard.as_mut() else {
        return false;
    };
    let mut for_agent = false;
    for &b in bytes {
        let Some(stub) = s.stub.take() else {
            return for_agent;
        };
        let next = match stub {
            GdbStubStateMachine::Running(g) => g.incoming_data(&mut s.target, b),
            GdbStubStateMachine::Idle(g) => g.incoming_data(&mut s.target, b),
            other => Ok(other),
        };
        match next {
            Ok(GdbStubStateMachine::Disconnected(g)) => {
                // A detach (or kill) while the CPUs run: breakpoints out now, and the CPU
                // whose hypercall this is stops everyone to finish it (`lead`).
                disconnected(s, g.get_reason());
                PENDING_STOP.store(Pending::End as u8, Release);
                return false;
            }
            Ok(st) => {
                if matches!(st, GdbStubStateMachine::CtrlCInterrupt(_)) {
                    let pending = if any_hypercall {
                        Pending::Interrupt
                    } else {
                        Pending::InterruptAtAgent
                    };
                    PENDING_STOP.store(pending as u8, Release);
                    for_agent = !any_hypercall;
                }
                s.stub = Some(st);
            }
            // The session is broken: the next stop starts over with a new one.
            Err(e) => {
                let _ = writeln!(
                    crate::serial::Com1,
                    "quicksilver hv: the gdb session broke on a protocol error while the kernel ran: {e:?}"
                );
                ATTACH_REQUESTED.store(1, Release);
            }
        }
    }
    for_agent
}

/// A stop this CPU must make now that its hypercall is complete.
pub fn take_pending_stop(hv: &Hv) -> Option<Reason> {
    // Every hypercall comes here: a plain load when nothing is pending (the common case),
    // and a stop held for the agent's own hypercall stays for it.
    let pending = PENDING_STOP.load(Acquire);
    if pending == Pending::Nothing as u8
        || pending == Pending::AttachAtAgent as u8
        || pending == Pending::InterruptAtAgent as u8
        || PENDING_STOP
            .compare_exchange(pending, Pending::Nothing as u8, AcqRel, Acquire)
            .is_err()
    {
        return None;
    }
    match pending {
        x if x == Pending::Interrupt as u8 => Some(Reason::Interrupt),
        x if x == Pending::Attach as u8 => {
            let khz = hv.tsc_khz as u64;
            let age = crate::arch::instr::rdtsc() - ATTACH_REQUEST_TSC.load(Acquire);
            (age < ATTACH_FRESH_SECONDS * 1000 * khz).then_some(Reason::Attach)
        }
        x if x == Pending::End as u8 => Some(Reason::None),
        _ => None,
    }
}

/// Runs `f` on the session's debugger if gdb is attached (a checkpoint or a rollback that
/// another client leads while gdb lets the kernel run); `None` if it is not.
pub fn with_attached<R>(f: impl FnOnce(&mut Debugger) -> R) -> Option<R> {
    let mut guard = SESSION.lock();
    let s = guard.as_mut().filter(|s| s.stub.is_some())?;
    Some(f(&mut s.target))
}

/// Is a gdb session open? (Decides the debug intercepts.)
pub fn attached() -> bool {
    SESSION.lock().as_ref().is_some_and(|s| s.stub.is_some())
}

/// Is there a gdb breakpoint at `addr`?
pub fn owns_breakpoint(addr: u64) -> bool {
    SESSION
        .lock()
        .as_ref()
        .is_some_and(|s| s.target.sw_breakpoint_at(addr))
}

/// Mask of the DR slots gdb has armed.
pub fn our_slots() -> u8 {
    SESSION
        .lock()
        .as_ref()
        .map_or(0, |s| s.target.armed_slots())
}

/// Slots neither the kernel nor gdb uses (a step may borrow one).
pub fn free_slots() -> u8 {
    SESSION.lock().as_ref().map_or(0, |s| s.target.slots.free())
}

/// Is `slot` an instruction breakpoint?
pub fn slot_is_exec(slot: u8) -> bool {
    SESSION
        .lock()
        .as_ref()
        .is_some_and(|s| s.target.slots.hw[slot as usize].is_some_and(|h| h.kind == HwKind::Exec))
}

/// What to do with one DR0-3 slot on the way into the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    Untouched,
    Gdb(u64),
    Restore,
}

/// DR7 and the slots for a CPU about to run, from the guest's DR7: the kernel's slots as they
/// are, gdb's armed (or, with `kernel_only`, given back).
pub fn debug_registers(guest_dr7: u64, kernel_only: bool) -> (u64, [Slot; 4]) {
    let guard = SESSION.lock();
    let target = guard.as_ref().map(|s| &s.target);
    // Once the session is over (a detach drops it before the CPUs run), this is a leave.
    let kernel_only = kernel_only || target.is_none();
    let kernel = KERNEL_SLOTS.load(Acquire);
    let mut slots = [Slot::Untouched; 4];
    let mut dr7 = guest_dr7;
    for (n, slot) in slots.iter_mut().enumerate() {
        if kernel & (1 << n) != 0 {
            continue;
        }
        dr7 &= !super::target::dr7_fields(n);
        match (kernel_only, target.and_then(|t| t.slots.hw[n])) {
            (false, Some(h)) => {
                dr7 |= h.dr7_bits(n);
                *slot = Slot::Gdb(h.addr);
            }
            // Leaving: every slot the kernel does not use gets its value back (gdb's, or a
            // step's temporary breakpoint, may have been there).
            (true, _) => *slot = Slot::Restore,
            _ if target.is_some_and(|t| t.slots.touched & (1 << n) != 0) => *slot = Slot::Restore,
            _ => {}
        }
    }
    (dr7, slots)
}

/// Serves gdb with every CPU parked: the debugger's leader callback. Decides every parked
/// CPU's release; lends `p` to the session's target while it serves, and takes it back.
pub fn lead(hv: &'static Hv, mut p: Parked) {
    let me = p.leader();
    for i in 0..hv.cpus {
        if let Some(st) = p.get(i) {
            st.dbg.step = false;
        }
    }
    let mut guard = SESSION.lock();
    if let Some(s) = guard.as_mut().filter(|s| s.stub.is_none()) {
        // gdb left while the kernel ran (`gdb_input`): end the session as a detach would.
        s.target.parked = Some(p);
        end(hv, s);
        *guard = None;
        return;
    }
    let new = ATTACH_REQUESTED.swap(0, AcqRel) == 1 || guard.is_none();
    if new {
        if let Some(old) = guard.as_mut() {
            old.target.parked = Some(p);
            old.target.remove_all();
            p = old.target.parked.take().unwrap_or_else(|| unreachable!());
        }
        // The old stub (the packet buffer's borrower) goes before a new one borrows it.
        *guard = None;
        match start(hv, p) {
            Ok(s) => {
                let cpus = s.target.threads();
                *guard = Some(s);
                link::send_control(Message::Stopped { cpus });
            }
            Err(p) => {
                // No session could be made: nothing to serve; run on.
                p.release_all(Release::Run);
                return;
            }
        }
    } else if let Some(s) = guard.as_mut() {
        s.target.parked = Some(p);
        report(s, me);
    }
    if let Some(s) = guard.as_mut() {
        if serve(hv, s, me) {
            *guard = None;
        }
    }
}

/// Feeds gdb's bytes to the stub until gdb resumes the CPUs or the session ends; every
/// parked CPU's release is set before this returns, and the target's `parked` taken back.
/// True when the session ended.
fn serve(hv: &'static Hv, s: &mut Session, me: u32) -> bool {
    let mut buf = [0u8; link::POLL_MAX];
    loop {
        match link::poll(&mut buf) {
            None => core::hint::spin_loop(),
            Some(Routed::Attention) => {
                // A bridge that lost its gdb attaches anew: fresh session, same stop.
                s.target.remove_all();
                s.stub = None;
                let Some(p) = s.target.parked.take() else {
                    return true;
                };
                match start(hv, p) {
                    Ok(fresh) => *s = fresh,
                    Err(p) => {
                        p.release_all(Release::Run);
                        return true;
                    }
                }
                let cpus = s.target.threads();
                link::send_control(Message::Stopped { cpus });
            }
            Some(Routed::Gdb(bytes)) => {
                for &b in bytes {
                    feed(s, me, b);
                }
            }
        }
        match &s.stub {
            None => {
                end(hv, s);
                return true;
            }
            Some(GdbStubStateMachine::Running(_)) => {
                s.target.parked = None;
                return false;
            }
            Some(_) => {}
        }
    }
}

/// The session is over (detached, killed, or broken): every CPU runs per the devirt policy,
/// and the bridge is told.
fn end(_hv: &Hv, s: &mut Session) {
    let left = s.target.remove_all();
    if left > 0 {
        let _ = writeln!(
            crate::serial::Com1,
            "quicksilver hv: {left} gdb breakpoints could not be taken out of the kernel's memory at the end of the session (qsctl stats counts them)"
        );
    }
    let release = match s.target.policy {
        Devirt::Deactivate => Release::Leave,
        Devirt::Stay => Release::Run,
    };
    link::send_control(Message::Ended(if s.target.killed {
        End::Killed
    } else {
        End::Detached
    }));
    LEAVE_AFTER_DETACH.store(release == Release::Leave, Release);
    if let Some(p) = s.target.parked.take() {
        p.release_all(release);
    }
}

/// A new session: the target's state from the parked CPUs, and a stub waiting for gdb. The
/// caller dropped any earlier stub, the only other user of the packet buffer.
fn start(hv: &'static Hv, p: Parked) -> Result<Session, Parked> {
    LEAVE_AFTER_DETACH.store(false, Release);
    let mut target = Debugger::new(hv, p);
    KERNEL_SLOTS.store(target.slots.kernel, Release);
    let conn = Conn { len: 0 };
    // SAFETY: one session at a time, under the session lock, and the caller dropped the
    // previous stub (the only other borrower of the buffer) before calling.
    let buf: &'static mut [u8] = unsafe { &mut *core::ptr::addr_of_mut!(PACKET_BUF) };
    let stub = GdbStubBuilder::new(conn)
        .with_packet_buffer(buf)
        .build()
        .ok()
        .and_then(|b| b.run_state_machine(&mut target).ok());
    match stub {
        Some(stub) => Ok(Session {
            target,
            stub: Some(stub),
        }),
        None => Err(target.parked.take().unwrap_or_else(|| unreachable!())),
    }
}

/// Feeds one byte of gdb's; handles what it turns the stub into.
fn feed(s: &mut Session, me: u32, b: u8) {
    let Some(stub) = s.stub.take() else { return };
    let next = match stub {
        GdbStubStateMachine::Idle(g) => g.incoming_data(&mut s.target, b),
        GdbStubStateMachine::Running(g) => g.incoming_data(&mut s.target, b),
        GdbStubStateMachine::CtrlCInterrupt(g) => {
            // Everything is stopped already: the interrupt is the stop.
            let reason = stop_reason(&mut s.target, me);
            g.interrupt_handled(&mut s.target, Some(reason))
        }
        GdbStubStateMachine::Disconnected(g) => {
            disconnected(s, g.get_reason());
            return;
        }
    };
    s.stub = match next {
        Ok(GdbStubStateMachine::CtrlCInterrupt(g)) => {
            // gdb's Ctrl-C while we are still parked (it followed a resume in the same
            // chunk): take the resume back and report the stop.
            if let Some(p) = s.target.parked.as_ref() {
                p.release_all(Release::Stay);
            }
            let reason = stop_reason(&mut s.target, me);
            g.interrupt_handled(&mut s.target, Some(reason)).ok()
        }
        Ok(GdbStubStateMachine::Disconnected(g)) => {
            disconnected(s, g.get_reason());
            None
        }
        Ok(st) => Some(st),
        Err(e) => {
            // The stub cannot go on (gdb's `-`, a packet that does not parse): the session
            // ends like a detach, and the console says why, for whoever reads the bridge's
            // "gdb detached" without having detached.
            let _ = writeln!(
                crate::serial::Com1,
                "quicksilver hv: the gdb session ended on a protocol error: {e:?}"
            );
            crate::net::describe(&mut crate::serial::Com1);
            s.target.remove_all();
            None
        }
    };
}

/// gdb detached or asked to kill. A kill is answered like a detach (`OK`, which gdb's `vKill`
/// waits for) and reported to the bridge as such. The breakpoints come out in [`end`], with
/// every CPU stopped: only a parked CPU's page tables say where they are.
fn disconnected(s: &mut Session, reason: DisconnectReason) {
    s.target.killed = reason == DisconnectReason::Kill;
    if s.target.killed {
        link::send(Channel::Gdb, b"$OK#9a");
    }
}

/// Tells gdb why everything stopped: the leader's reason, or another CPU's if the leader
/// was only stopped by an NMI.
fn report(s: &mut Session, me: u32) {
    let reason = stop_reason(&mut s.target, me);
    let who = match reason {
        MultiThreadStopReason::SwBreak(t)
        | MultiThreadStopReason::HwBreak(t)
        | MultiThreadStopReason::Watch { tid: t, .. }
        | MultiThreadStopReason::SignalWithThread { tid: t, .. } => t.get() as u32 - 1,
        _ => me,
    };
    let Some(p) = s.target.parked.as_mut() else {
        return;
    };
    for i in 0..MAX as u32 {
        if let Some(st) = p.get(i) {
            st.dbg.reason = Reason::None;
        }
    }
    let (rip, rsp, rbp) = match p.peek(who) {
        Some(st) => (st.state.rip, st.state.rsp, st.state.gprs.rbp),
        None => (0, 0, 0),
    };
    let (rip, rsp, rbp) = (rip.to_le_bytes(), rsp.to_le_bytes(), rbp.to_le_bytes());
    let mut expedite = [
        (regs::RIP, &rip[..]),
        (regs::RSP, &rsp[..]),
        (regs::RBP, &rbp[..]),
    ]
    .into_iter();
    s.stub = match s.stub.take() {
        Some(GdbStubStateMachine::Running(g)) => g
            .report_stop_with_regs(&mut s.target, reason, &mut expedite)
            .ok(),
        Some(GdbStubStateMachine::CtrlCInterrupt(g)) => {
            g.interrupt_handled(&mut s.target, Some(reason)).ok()
        }
        other => other,
    };
    if s.stub.is_none() {
        s.target.remove_all();
    }
}

/// The stop to report: the leader's reason, or another parked CPU's if the leader was only
/// stopped by an NMI (or an attach); a Ctrl-C if nobody had one.
fn stop_reason(t: &mut Debugger, me: u32) -> MultiThreadStopReason<u64> {
    let reason_of = |t: &Debugger, i: u32| {
        t.parked
            .as_ref()
            .and_then(|p| p.peek(i))
            .map_or(Reason::None, |st| st.dbg.reason)
    };
    let quiet = |r: Reason| matches!(r, Reason::None | Reason::Attach);
    let mut who = me;
    let mut why = reason_of(t, me);
    if quiet(why) {
        match (0..MAX as u32).find(|&i| !quiet(reason_of(t, i))) {
            Some(i) => {
                who = i;
                why = reason_of(t, i);
            }
            None => why = Reason::Interrupt,
        }
    }
    if why == Reason::HwBreak {
        if let Some(st) = t.parked.as_mut().and_then(|p| p.get(who)) {
            st.dbg.resume_rf = true;
        }
    }
    let tid = NonZeroUsize::new(who as usize + 1).unwrap_or(NonZeroUsize::MIN);
    match why {
        Reason::SwBreak => MultiThreadStopReason::SwBreak(tid),
        Reason::HwBreak => MultiThreadStopReason::HwBreak(tid),
        Reason::Watch { slot } => match t.slots.hw[slot as usize & 3] {
            Some(h) => MultiThreadStopReason::Watch {
                tid,
                kind: h.watch,
                addr: h.addr,
            },
            // gdb removed the watchpoint while this CPU was stopping.
            None => MultiThreadStopReason::SignalWithThread {
                tid,
                signal: Signal::SIGTRAP,
            },
        },
        Reason::Step => MultiThreadStopReason::SignalWithThread {
            tid,
            signal: Signal::SIGTRAP,
        },
        _ => MultiThreadStopReason::SignalWithThread {
            tid,
            signal: Signal::SIGINT,
        },
    }
}
