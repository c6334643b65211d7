//! Stopping every CPU, as a service: the debugger, `freeze`, and later the checkpoint engine
//! and fault handling are its clients (jailhouse's `suspend_cpu`/`resume_cpu` is the model).
//!
//! A CPU that has a reason to stop calls [`Rendezvous::enter`]. The first one becomes the
//! *leader*: it sends an NMI to every other CPU in guest mode (the hv intercepts NMIs; each
//! exits and joins as a *follower* through [`Rendezvous::follow`]), waits until every CPU is
//! parked in host mode (bounded: a CPU that never answers is left running), and runs its
//! client's leader callback with a [`Gathered`] token. The callback decides each parked CPU's
//! [`Release`]; the leader then lets go of every CPU not told to stay. CPUs told to stay (a
//! debugger's scheduler locking) are counted in the next stop without another NMI.
//!
//! Parked CPUs halt (`STGI; HLT` with RFLAGS.IF = 0, so only an NMI wakes them): a spinning
//! CPU would take a host core from the leader (under QEMU a vCPU thread; on silicon an SMT
//! sibling's share). The protocol:
//! - The releaser sets `go` and sends an NMI to a CPU that said it is `asleep`. The SeqCst pair
//!   (`asleep` then `go` on the parked side, `go` then `asleep` on the releaser's) means either
//!   the parked CPU sees `go` before halting or the releaser sees `asleep` and wakes it; an NMI
//!   that comes just before the HLT skips it (world_switch.S, step 6).
//! - A CPU counts as parked until it leaves, under the lock: a new stop that began before it
//!   got going keeps it (no stop NMI goes to a parked CPU), so the only NMI meant for it while
//!   parked is its wake, which it takes before leaving (in the kernel it would be an unknown
//!   NMI).
//! - The stop NMI is sent once: a second could arrive after the first was taken and reach the
//!   kernel as an unknown NMI.
//!
//! Everything shared between CPUs here is atomic or under the lock. The state machine is
//! generic over a [`Platform`] (NMIs, halting, time), so host tests run it on threads.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::*};

/// Most CPUs a rendezvous handles.
pub const MAX_CPUS: usize = 64;

/// What a parked CPU does when the leader lets go.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Release {
    /// Stay parked (the client resumed other CPUs only).
    #[default]
    Stay = 0,
    /// Run the guest again.
    Run = 1,
    /// Leave guest mode: this CPU runs natively from where it is.
    Leave = 2,
}

impl Release {
    fn from_u8(v: u8) -> Release {
        match v {
            1 => Release::Run,
            2 => Release::Leave,
            _ => Release::Stay,
        }
    }
}

/// Who led a stop (followers learn it on release, to run that client's resume step).
pub type ClientId = u8;

/// What the rendezvous needs of the machine.
pub trait Platform {
    /// A monotonic tick count, and how many ticks make a millisecond.
    fn now(&self) -> u64;
    fn ticks_per_ms(&self) -> u64;
    /// Sends CPU `cpu` an NMI.
    fn send_nmi(&self, cpu: u32);
    /// Halts this CPU until an NMI arrives; true if one was taken.
    fn sleep_until_nmi(&self, me: u32) -> bool;
    /// Takes an NMI held pending, if any; true if one was taken.
    fn take_nmi(&self, me: u32) -> bool;
    /// Is CPU `cpu` in guest mode (worth an NMI)?
    fn in_guest(&self, cpu: u32) -> bool;
    /// How many CPUs a stop must gather (those in guest mode).
    fn expected(&self) -> u32;
    /// CPUs that exist.
    fn cpus(&self) -> u32;
}

/// One CPU's flags. Written by that CPU, the leader, or the releaser; all atomics.
#[derive(Default)]
struct PerCpu {
    parked: AtomicBool,
    go: AtomicBool,
    /// Parked and about to halt (or halted): `go` needs an NMI to be seen.
    asleep: AtomicBool,
    /// The releaser sent the wake NMI and it is not taken yet.
    wake_sent: AtomicBool,
    /// The leader sent this CPU a stop NMI that it has not taken yet.
    nmi_expected: AtomicBool,
    release: AtomicU8,
}

impl PerCpu {
    const fn new() -> Self {
        PerCpu {
            parked: AtomicBool::new(false),
            go: AtomicBool::new(false),
            asleep: AtomicBool::new(false),
            wake_sent: AtomicBool::new(false),
            nmi_expected: AtomicBool::new(false),
            release: AtomicU8::new(0),
        }
    }
}

/// The stop's shared state, changed only under the lock.
struct Shared {
    /// A leader is gathering or serving.
    stopping: bool,
    /// CPUs parked (leader included).
    parked: u32,
    /// The client of the current (or last) stop.
    client: ClientId,
}

/// The rendezvous of all CPUs. One static instance in the hv; tests make their own.
pub struct Rendezvous {
    shared: spin::Mutex<Shared>,
    cpus: [PerCpu; MAX_CPUS],
    /// Ticks the last stop took to gather every CPU.
    last_gather: AtomicU64,
    /// How long a leader waits for every CPU.
    gather_timeout_ms: u64,
}

/// The leader's proof that the CPUs it names are parked, for as long as its callback runs.
pub struct Gathered<'a> {
    rdv: &'a Rendezvous,
    cpus: u32,
    leader: u32,
}

impl Gathered<'_> {
    /// The CPU leading this stop.
    pub fn leader(&self) -> u32 {
        self.leader
    }

    /// Is CPU `i` parked (stopped in host mode, touching nothing of its own)?
    pub fn is_parked(&self, i: u32) -> bool {
        i < self.cpus && self.rdv.cpus[i as usize].parked.load(Acquire)
    }

    /// The parked CPUs.
    pub fn parked(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.cpus).filter(|&i| self.is_parked(i))
    }

    /// Tells parked CPU `i` what to do when released (ignored for a CPU that is not parked).
    pub fn set_release(&self, i: u32, r: Release) {
        self.rdv.set_release(i, r);
    }

    /// What parked CPU `i` is told so far.
    pub fn release_of(&self, i: u32) -> Release {
        self.rdv.release_of(i)
    }

    /// Every parked CPU gets `r`.
    pub fn release_all(&self, r: Release) {
        for i in self.parked() {
            self.set_release(i, r);
        }
    }
}

impl Default for Rendezvous {
    fn default() -> Self {
        Self::new(2000)
    }
}

impl Rendezvous {
    pub const fn new(gather_timeout_ms: u64) -> Self {
        Rendezvous {
            shared: spin::Mutex::new(Shared {
                stopping: false,
                parked: 0,
                client: 0,
            }),
            cpus: [const { PerCpu::new() }; MAX_CPUS],
            last_gather: AtomicU64::new(0),
            gather_timeout_ms,
        }
    }

    /// Stops every CPU for `client`. If this CPU is the first, it leads: `lead` runs with
    /// every CPU it could gather parked. Returns, once this CPU is released, what it must do
    /// and which client led the stop it was released from.
    pub fn enter<P: Platform>(
        &self,
        p: &P,
        me: u32,
        client: ClientId,
        lead: impl FnOnce(&Gathered<'_>),
    ) -> (Release, ClientId) {
        let leader = {
            let mut s = self.shared.lock();
            let leader = !s.stopping;
            if leader {
                s.stopping = true;
                s.client = client;
            }
            self.park_locked(&mut s, me);
            leader
        };
        if leader {
            let t0 = p.now();
            self.stop_others(p, me);
            self.wait_for_all(p);
            self.last_gather.store(p.now().wrapping_sub(t0), Relaxed);
            let g = Gathered {
                rdv: self,
                cpus: p.cpus().min(MAX_CPUS as u32),
                leader: me,
            };
            for i in g.parked() {
                // Nobody leaves unless the client says so (scheduler locking keeps CPUs).
                g.set_release(i, Release::Stay);
            }
            lead(&g);
            self.release(p);
        }
        self.wait_for_go(p, me)
    }

    /// A CPU that took a stop NMI joins the stop. `None` if the stop is already over (the
    /// NMI was late): the CPU just runs on.
    pub fn follow<P: Platform>(&self, p: &P, me: u32) -> Option<(Release, ClientId)> {
        {
            let mut s = self.shared.lock();
            if !s.stopping {
                return None;
            }
            self.park_locked(&mut s, me);
        }
        Some(self.wait_for_go(p, me))
    }

    /// Was the NMI this CPU just took a stop NMI? (Consumes the expectation.)
    pub fn nmi_was_expected(&self, me: u32) -> bool {
        self.cpus[me as usize].nmi_expected.swap(false, AcqRel)
    }

    /// Is a stop in progress?
    pub fn stopping(&self) -> bool {
        self.shared.lock().stopping
    }

    /// Is CPU `i` parked? (A snapshot; only the leader's [`Gathered`] makes it a guarantee.)
    pub fn is_parked(&self, i: u32) -> bool {
        (i as usize) < MAX_CPUS && self.cpus[i as usize].parked.load(Acquire)
    }

    /// Tells parked CPU `i` what to do when released (ignored for a CPU that is not parked).
    /// For the leader only: the hv's `vcpu::Parked` and [`Gathered`] are how it gets here.
    pub fn set_release(&self, i: u32, r: Release) {
        if self.is_parked(i) {
            self.cpus[i as usize].release.store(r as u8, Relaxed);
        }
    }

    /// What parked CPU `i` is told so far.
    pub fn release_of(&self, i: u32) -> Release {
        match self.cpus.get(i as usize) {
            Some(c) => Release::from_u8(c.release.load(Relaxed)),
            None => Release::Stay,
        }
    }

    /// Ticks the last stop took to gather every CPU.
    pub fn last_gather_ticks(&self) -> u64 {
        self.last_gather.load(Relaxed)
    }

    fn park_locked(&self, s: &mut Shared, me: u32) {
        let c = &self.cpus[me as usize];
        if !c.parked.load(Relaxed) {
            s.parked += 1;
            c.go.store(false, Relaxed);
            c.release.store(Release::Stay as u8, Relaxed);
            c.parked.store(true, Release);
        }
    }

    /// NMIs every CPU in guest mode that is not parked.
    fn stop_others<P: Platform>(&self, p: &P, me: u32) {
        for i in 0..p.cpus().min(MAX_CPUS as u32) {
            let c = &self.cpus[i as usize];
            // A stale `in_guest` sends an NMI to a CPU that just left (only on an
            // unexpected-exit race): the kernel's handler ignores a lone unknown NMI.
            if i == me || !p.in_guest(i) || c.parked.load(Acquire) {
                continue;
            }
            c.nmi_expected.store(true, Release);
            p.send_nmi(i);
        }
    }

    /// Waits until every CPU in guest mode is parked, or the timeout passes.
    fn wait_for_all<P: Platform>(&self, p: &P) {
        let limit = p.ticks_per_ms() * self.gather_timeout_ms;
        let start = p.now();
        while self.shared.lock().parked < p.expected() && p.now().wrapping_sub(start) < limit {
            core::hint::spin_loop();
        }
    }

    /// Lets go of every parked CPU whose release is not `Stay`; the stop is over.
    fn release<P: Platform>(&self, p: &P) {
        let mut s = self.shared.lock();
        for i in 0..p.cpus().min(MAX_CPUS as u32) {
            let c = &self.cpus[i as usize];
            let leaving = c.release.load(Relaxed) != Release::Stay as u8;
            if c.parked.load(Acquire) && leaving && !c.go.load(Relaxed) {
                // It stops being parked when it leaves (wait_for_go), under this lock.
                c.go.store(true, SeqCst);
                if c.asleep.load(SeqCst) {
                    // SeqCst: ordered before the NMI's ICR write (an x2APIC WRMSR does not
                    // order stores), so that the woken CPU sees `wake_sent` and clears it.
                    c.wake_sent.store(true, SeqCst);
                    p.send_nmi(i);
                }
            }
        }
        s.stopping = false;
    }

    /// Waits, halted, until this CPU is released, then stops being parked.
    fn wait_for_go<P: Platform>(&self, p: &P, me: u32) -> (Release, ClientId) {
        let c = &self.cpus[me as usize];
        loop {
            while !c.go.load(Acquire) {
                c.asleep.store(true, SeqCst);
                if c.go.load(SeqCst) {
                    c.asleep.store(false, Relaxed);
                    break;
                }
                if p.sleep_until_nmi(me) {
                    c.wake_sent.store(false, Relaxed);
                }
                c.asleep.store(false, Relaxed);
            }
            let mut s = self.shared.lock();
            let release = Release::from_u8(c.release.load(Relaxed));
            if s.stopping || release == Release::Stay {
                // A new stop, or a release whose `go` this CPU saw late: stay parked for it.
                c.go.store(false, Relaxed);
                continue;
            }
            if c.wake_sent.load(Relaxed) {
                self.take_wake_nmi(p, me);
                c.wake_sent.store(false, Relaxed);
            }
            s.parked -= 1;
            c.parked.store(false, Release);
            return (release, s.client);
        }
    }

    /// Takes the wake NMI of a CPU that saw `go` by itself: once the releaser let go of the
    /// lock the NMI is sent; it arrives within microseconds. Gives up after 1 ms.
    fn take_wake_nmi<P: Platform>(&self, p: &P, me: u32) {
        let start = p.now();
        while !p.take_nmi(me) && p.now().wrapping_sub(start) < p.ticks_per_ms() {
            core::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    //! Fake CPUs on threads: each runs "the guest" (a loop) and takes the NMIs sent to it the
    //! way the hv's NMI exit does.
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize};
    use std::sync::{Arc, Mutex};
    use std::thread;
    use std::time::{Duration, Instant};

    const CPUS: u32 = 4;

    struct FakeMachine {
        start: Instant,
        pending: [AtomicBool; CPUS as usize],
        nmis_sent: [AtomicU32; CPUS as usize],
        /// NMIs taken while not expected: what the kernel would see as unknown NMIs.
        foreign: AtomicU32,
        in_guest: [AtomicBool; CPUS as usize],
        /// CPUs that ignore NMIs altogether (NMIs blocked for good).
        deaf: [AtomicBool; CPUS as usize],
        /// Extra delay before a CPU notices an NMI.
        slow_ms: [AtomicU32; CPUS as usize],
        /// Asks a guest CPU to stop every CPU itself (and lead, if it is first).
        lead: [AtomicBool; CPUS as usize],
        threads: Mutex<Vec<Option<thread::Thread>>>,
    }

    impl FakeMachine {
        fn new() -> Arc<Self> {
            Arc::new(FakeMachine {
                start: Instant::now(),
                pending: Default::default(),
                nmis_sent: Default::default(),
                foreign: AtomicU32::new(0),
                in_guest: std::array::from_fn(|_| AtomicBool::new(true)),
                deaf: Default::default(),
                slow_ms: Default::default(),
                lead: Default::default(),
                threads: Mutex::new(vec![None; CPUS as usize]),
            })
        }
    }

    impl Platform for FakeMachine {
        fn now(&self) -> u64 {
            self.start.elapsed().as_micros() as u64
        }
        fn ticks_per_ms(&self) -> u64 {
            1000
        }
        fn send_nmi(&self, cpu: u32) {
            self.nmis_sent[cpu as usize].fetch_add(1, SeqCst);
            self.pending[cpu as usize].store(true, SeqCst);
            if let Some(t) = &self.threads.lock().unwrap()[cpu as usize] {
                t.unpark();
            }
        }
        fn sleep_until_nmi(&self, me: u32) -> bool {
            loop {
                if self.pending[me as usize].swap(false, SeqCst) {
                    return true;
                }
                thread::park_timeout(Duration::from_millis(1));
            }
        }
        fn take_nmi(&self, me: u32) -> bool {
            self.pending[me as usize].swap(false, SeqCst)
        }
        fn in_guest(&self, cpu: u32) -> bool {
            self.in_guest[cpu as usize].load(SeqCst)
        }
        fn expected(&self) -> u32 {
            self.in_guest.iter().filter(|a| a.load(SeqCst)).count() as u32
        }
        fn cpus(&self) -> u32 {
            CPUS
        }
    }

    /// A CPU running the guest: takes NMIs and follows stops until `done`.
    fn guest_cpu(
        m: Arc<FakeMachine>,
        r: Arc<Rendezvous>,
        me: u32,
        done: Arc<AtomicBool>,
        released: Arc<AtomicUsize>,
    ) -> thread::JoinHandle<()> {
        thread::spawn(move || {
            m.threads.lock().unwrap()[me as usize] = Some(thread::current());
            while !done.load(SeqCst) {
                if m.lead[me as usize].swap(false, SeqCst) {
                    r.enter(&*m, me, 1, |g| g.release_all(Release::Run));
                    released.fetch_add(1, SeqCst);
                    continue;
                }
                if m.deaf[me as usize].load(SeqCst) || !m.pending[me as usize].load(SeqCst) {
                    thread::park_timeout(Duration::from_millis(1));
                    continue;
                }
                let slow = m.slow_ms[me as usize].load(SeqCst);
                thread::sleep(Duration::from_millis(slow as u64));
                m.take_nmi(me);
                if r.nmi_was_expected(me) {
                    if r.follow(&*m, me).is_some() {
                        released.fetch_add(1, SeqCst);
                    }
                } else {
                    m.foreign.fetch_add(1, SeqCst);
                }
            }
        })
    }

    struct Rig {
        m: Arc<FakeMachine>,
        r: Arc<Rendezvous>,
        done: Arc<AtomicBool>,
        released: Arc<AtomicUsize>,
        threads: Vec<thread::JoinHandle<()>>,
    }

    impl Rig {
        /// CPUs 1.. run as guests; CPU 0 is the test's own (the leader).
        fn new(timeout_ms: u64) -> Rig {
            let m = FakeMachine::new();
            let r = Arc::new(Rendezvous::new(timeout_ms));
            let done = Arc::new(AtomicBool::new(false));
            let released = Arc::new(AtomicUsize::new(0));
            let threads = (1..CPUS)
                .map(|i| guest_cpu(m.clone(), r.clone(), i, done.clone(), released.clone()))
                .collect();
            m.threads.lock().unwrap()[0] = Some(thread::current());
            Rig {
                m,
                r,
                done,
                released,
                threads,
            }
        }

        /// CPU 0 stops every CPU and leads (if it finds a stop under way, it joins that one
        /// and tries again); returns who was parked when it led.
        fn stop(&self, then: Release) -> Vec<u32> {
            loop {
                let mut seen = None;
                let (mine, client) = self.r.enter(&*self.m, 0, 7, |g| {
                    seen = Some(g.parked().collect());
                    g.release_all(then);
                });
                if let Some(seen) = seen {
                    assert_eq!((mine, client), (then, 7));
                    return seen;
                }
            }
        }

        fn finish(self) {
            self.done.store(true, SeqCst);
            for t in self.threads {
                t.join().unwrap();
            }
        }
    }

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(10), "timed out: {what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_stop_gathers_every_cpu_and_releases_them_all() {
        let rig = Rig::new(2000);
        for round in 1..=20 {
            assert_eq!(rig.stop(Release::Run), vec![0, 1, 2, 3]);
            wait_until("followers released", || {
                rig.released.load(SeqCst) == 3 * round
            });
        }
        for i in 1..CPUS {
            assert!(rig.m.nmis_sent[i as usize].load(SeqCst) >= 20);
        }
        assert_eq!(rig.m.foreign.load(SeqCst), 0, "no NMI reached the kernel");
        rig.finish();
    }

    #[test]
    fn a_cpu_slow_to_answer_is_waited_for() {
        let rig = Rig::new(2000);
        rig.m.slow_ms[2].store(150, SeqCst);
        let t = Instant::now();
        assert_eq!(rig.stop(Release::Run), vec![0, 1, 2, 3]);
        assert!(t.elapsed() >= Duration::from_millis(150));
        assert!(rig.r.last_gather_ticks() >= 150_000);
        rig.finish();
    }

    #[test]
    fn a_cpu_that_never_answers_is_left_running_after_the_timeout() {
        let rig = Rig::new(100);
        rig.m.deaf[3].store(true, SeqCst);
        let t = Instant::now();
        assert_eq!(rig.stop(Release::Run), vec![0, 1, 2]);
        assert!(t.elapsed() >= Duration::from_millis(100));
        assert_eq!(
            rig.m.nmis_sent[3].load(SeqCst),
            1,
            "the stop NMI is sent once"
        );
        rig.finish();
    }

    #[test]
    fn cpus_told_to_stay_are_kept_for_the_next_stop_without_another_nmi() {
        let rig = Rig::new(2000);
        let mut first = vec![];
        rig.r.enter(&*rig.m, 0, 1, |g| {
            first = g.parked().collect();
            g.release_all(Release::Run);
            g.set_release(2, Release::Stay);
        });
        assert_eq!(first, vec![0, 1, 2, 3]);
        wait_until("1 and 3 released", || rig.released.load(SeqCst) == 2);
        assert!(rig.r.is_parked(2));
        let nmis = rig.m.nmis_sent[2].load(SeqCst);
        let mut during = 0;
        rig.r.enter(&*rig.m, 0, 1, |g| {
            assert_eq!(g.parked().collect::<Vec<_>>(), vec![0, 1, 2, 3]);
            during = rig.m.nmis_sent[2].load(SeqCst);
            g.release_all(Release::Run);
        });
        assert_eq!(
            during, nmis,
            "a parked CPU gets no stop NMI (only its wake after)"
        );
        wait_until("all released", || rig.released.load(SeqCst) == 5);
        rig.finish();
    }

    #[test]
    fn a_stop_requested_while_cpus_are_still_leaving_the_last_one_keeps_them() {
        // CPU 1 leads a stop and releases; CPU 0 starts a new stop at once, while the others
        // may still be on their way out of the first (or CPU 0 joins CPU 1's and tries again).
        // Every CPU must be in CPU 0's gather, and no CPU may take an NMI it does not expect.
        let rig = Rig::new(2000);
        for _ in 0..50 {
            rig.m.lead[1].store(true, SeqCst);
            if let Some(t) = &rig.m.threads.lock().unwrap()[1] {
                t.unpark();
            }
            // Wait until CPU 1's stop is under way, then stop again from CPU 0.
            wait_until("CPU 1 leads", || rig.r.is_parked(1));
            let seen = rig.stop(Release::Run);
            assert_eq!(seen, vec![0, 1, 2, 3]);
        }
        wait_until("quiet", || !rig.r.stopping());
        assert_eq!(rig.m.foreign.load(SeqCst), 0, "no NMI reached the kernel");
        rig.finish();
    }

    #[test]
    fn a_late_nmi_for_a_stop_that_is_over_just_runs_on() {
        let m = FakeMachine::new();
        let r = Rendezvous::new(10);
        assert!(r.follow(&*m, 2).is_none());
        assert!(!r.is_parked(2));
    }
}
