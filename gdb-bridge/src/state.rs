//! The bridge's shared state: where the link and the debugger session stand, what arrived
//! (console bytes, bulk frames no consumer took), and the gdb client of the moment. The link's
//! demultiplexer, the gdb client's thread and the control socket all read and change it here.

use std::io::Write;
use std::net::TcpStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Where the link stands, for the control socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LinkState {
    /// Opening the link.
    #[default]
    Connecting,
    /// Saying hello and proving the key.
    Authenticating,
    /// The machine accepted the key: gdb is served.
    Authenticated,
    /// The link closed or failed; the bridge is exiting.
    Lost,
}

impl LinkState {
    fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Authenticating => "authenticating",
            LinkState::Authenticated => "authenticated",
            LinkState::Lost => "lost",
        }
    }
}

/// Where the debugger session stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SessionState {
    /// No session yet.
    #[default]
    None,
    /// Attention sent; waiting for the machine's `Stopped`.
    Waiting,
    /// Every CPU is stopped and the machine serves the gdb channel.
    Stopped,
    /// The machine said the session is over: every CPU runs again.
    Ended,
}

impl SessionState {
    fn as_str(self) -> &'static str {
        match self {
            SessionState::None => "none",
            SessionState::Waiting => "waiting",
            SessionState::Stopped => "stopped",
            SessionState::Ended => "ended",
        }
    }
}

/// What the bridge is doing: the control socket's `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// The link.
    pub link: LinkState,
    /// A gdb client is connected.
    pub gdb_client: bool,
    /// The current (or last) debugger session.
    pub session: SessionState,
    /// CPUs stopped in the current session (from the machine's `Stopped`).
    pub cpus: Option<u32>,
    /// Sessions started (gdb clients that asked for attention).
    pub sessions: u64,
    /// Bytes received on the console channel.
    pub console_bytes: u64,
    /// Frames received on the bulk channel that are no read's answer, dropped. Counted so
    /// that a machine that sends them is seen.
    pub bulk_dropped_frames: u64,
    /// Payload bytes in those frames.
    pub bulk_dropped_bytes: u64,
    /// A detach or kill went to the machine in the current session (gdb's, or the bridge's
    /// on behalf of a gdb that vanished): an end the machine reports is that one, not the
    /// machine's own.
    pub end_asked: bool,
}

impl Status {
    /// The status as one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "link": self.link.as_str(),
            "gdb_client": self.gdb_client,
            "session": self.session.as_str(),
            "cpus": self.cpus,
            "sessions": self.sessions,
            "console_bytes": self.console_bytes,
            "bulk_dropped_frames": self.bulk_dropped_frames,
            "bulk_dropped_bytes": self.bulk_dropped_bytes,
        })
    }
}

/// The bridge's state, shared by the link reader, the gdb client's thread and the control
/// socket's threads.
#[derive(Default)]
pub struct State {
    status: Mutex<Status>,
    changed: Condvar,
    /// The gdb client, for writing the machine's gdb bytes to it.
    client: Mutex<Option<TcpStream>>,
    /// The control socket's checkpoint commands waiting for the machine, and its subscribers.
    pub checkpoints: crate::checkpoints::Checkpoints,
    /// The export over the link of the moment, or the last one.
    pub exports: crate::export::Exports,
    /// The fast link (`--net`), for the status.
    pub fast: std::sync::OnceLock<Arc<crate::net::NetLink>>,
    /// The kernel's symbols (`--vmlinux`), for `cpus ID`.
    pub symbols: std::sync::OnceLock<crate::inspect::Symbols>,
}

impl State {
    /// A fresh state (link connecting, no session).
    pub fn new() -> Arc<State> {
        Arc::new(State::default())
    }

    /// A copy of the status.
    pub fn status(&self) -> Status {
        self.status.lock().expect("status").clone()
    }

    /// Changes the status and wakes whoever waits on it; returns what `f` returns.
    pub fn update<R>(&self, f: impl FnOnce(&mut Status) -> R) -> R {
        let r = f(&mut self.status.lock().expect("status"));
        self.changed.notify_all();
        r
    }

    /// Waits until `done` holds or `timeout` passes; returns the status then and whether
    /// `done` held.
    pub(crate) fn wait(&self, timeout: Duration, done: impl Fn(&Status) -> bool) -> (Status, bool) {
        let deadline = Instant::now() + timeout;
        let mut st = self.status.lock().expect("status");
        loop {
            if done(&st) {
                return (st.clone(), true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (st.clone(), false);
            }
            st = self.changed.wait_timeout(st, left).expect("status").0;
        }
    }

    /// Changes the status as [`State::update`] does and ends our side of the connection of
    /// the gdb client of that moment (after what was written to it). Both happen under the
    /// client lock: the ending session's thread frees the client's place only once the status
    /// says so, and a new client may take the place at once; without the lock, this would
    /// close the new client instead (a gdb that reconnected at once was told "Remote
    /// connection closed").
    pub(crate) fn update_and_close_client(
        &self,
        how: std::net::Shutdown,
        f: impl FnOnce(&mut Status),
    ) {
        let client = self.client.lock().expect("client");
        self.update(f);
        if let Some(s) = client.as_ref() {
            let _ = s.shutdown(how);
        }
    }

    /// Makes `client` the gdb client that [`State::to_client`] writes to.
    pub(crate) fn set_client(&self, client: TcpStream) {
        *self.client.lock().expect("client") = Some(client);
    }

    /// Takes the gdb client out: nothing is written to it any more.
    pub(crate) fn take_client(&self) -> Option<TcpStream> {
        self.client.lock().expect("client").take()
    }

    /// Writes `bytes` to the gdb client, if there is one. A client that cannot take them is
    /// gone or stuck; its own thread sees that on its side of the connection.
    pub(crate) fn to_client(&self, bytes: &[u8]) {
        if let Some(s) = self.client.lock().expect("client").as_mut() {
            let _ = s.write_all(bytes);
        }
    }
}

/// What an export's thread keeps: the checkpoints it reads through.
impl AsRef<crate::checkpoints::Checkpoints> for State {
    fn as_ref(&self) -> &crate::checkpoints::Checkpoints {
        &self.checkpoints
    }
}
