//! `qs-bridge`: the operator's end of the serial link.
//!
//! - [`Link`]: frames over a Unix socket, TCP or a serial port; a reader thread decodes and
//!   drops (and counts) anything corrupt, truncated, oversized or replayed;
//! - [`authenticate`]: the hello and the challenge/response, with clear refusals;
//! - [`serve_gdb`]: one GDB client at a time on TCP. A client asks the machine for attention;
//!   its bytes go on the `gdb` channel only once the machine says every CPU is stopped
//!   (before that the machine would lose them); a client that vanishes mid-session is
//!   detached on its behalf. The `console` channel goes to a writer.
//! - [`serve_control`]: the control socket (for `qs-tui`): one request a line, one JSON reply
//!   a line ([`control_reply`]).

use anyhow::{bail, Context, Result};
use quicksilver_proto::link::{self, auth, control, Channel, Decoder, DropCounts, Session};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Where the link is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkAddr {
    /// A Unix socket (QEMU's `-chardev socket,path=...`).
    Unix(String),
    /// A TCP address (a serial-over-IP console server).
    Tcp(String),
    /// A serial device, at a baud rate.
    Serial(String),
}

impl LinkAddr {
    /// Parses `unix:PATH`, `tcp:HOST:PORT` or `/dev/ttyXXX`.
    pub fn parse(s: &str) -> Result<LinkAddr> {
        if let Some(p) = s.strip_prefix("unix:") {
            Ok(LinkAddr::Unix(p.to_string()))
        } else if let Some(a) = s.strip_prefix("tcp:") {
            Ok(LinkAddr::Tcp(a.to_string()))
        } else if s.starts_with('/') {
            Ok(LinkAddr::Serial(s.to_string()))
        } else {
            bail!(
                "--link {s:?}: give unix:PATH, tcp:HOST:PORT or a serial device such as /dev/ttyS1"
            )
        }
    }
}

/// Something that arrived on the link.
#[derive(Debug)]
pub enum Inbound {
    /// A sound, new frame.
    Frame { channel: Channel, payload: Vec<u8> },
    /// The link closed or failed.
    Closed(String),
}

type Writer = Box<dyn Write + Send>;

/// The framed link.
pub struct Link {
    writer: Mutex<Writer>,
    seq: AtomicU32,
    inbound: Mutex<Receiver<Inbound>>,
    drops: Arc<Mutex<DropCounts>>,
}

fn open_serial(path: &str, baud: u32) -> Result<(Box<dyn Read + Send>, Writer)> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| {
            format!("cannot open the link {path}: check the device and its permissions")
        })?;
    let speed = match baud {
        9600 => libc::B9600,
        19200 => libc::B19200,
        38400 => libc::B38400,
        57600 => libc::B57600,
        115200 => libc::B115200,
        230400 => libc::B230400,
        460800 => libc::B460800,
        921600 => libc::B921600,
        other => {
            bail!("--baud {other}: use 9600, 19200, 38400, 57600, 115200, 230400, 460800 or 921600")
        }
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: termios is plain data filled by tcgetattr on an open descriptor of ours; the
    // calls only read and write that struct and the descriptor's line settings.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) != 0 {
            bail!(
                "{path} is not a serial port: {}",
                std::io::Error::last_os_error()
            );
        }
        libc::cfmakeraw(&mut t);
        libc::cfsetispeed(&mut t, speed);
        libc::cfsetospeed(&mut t, speed);
        if libc::tcsetattr(fd, libc::TCSANOW, &t) != 0 {
            bail!(
                "cannot configure {path}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let r = f.try_clone()?;
    Ok((Box::new(r), Box::new(f)))
}

impl Link {
    /// Opens the link and starts its reader.
    pub fn open(addr: &LinkAddr, baud: u32) -> Result<Link> {
        let (reader, writer): (Box<dyn Read + Send>, Writer) = match addr {
            LinkAddr::Unix(p) => {
                let s = std::os::unix::net::UnixStream::connect(p).with_context(|| {
                    format!("link not reachable at unix:{p}: is the machine (QEMU) running with its link port there?")
                })?;
                (Box::new(s.try_clone()?), Box::new(s))
            }
            LinkAddr::Tcp(a) => {
                let s = TcpStream::connect(a).with_context(|| {
                    format!("link not reachable at tcp:{a}: is the console server up?")
                })?;
                s.set_nodelay(true)?;
                (Box::new(s.try_clone()?), Box::new(s))
            }
            LinkAddr::Serial(p) => open_serial(p, baud)?,
        };
        Ok(Link::over(reader, writer))
    }

    /// A link over any byte stream (used by `open`, and by tests over a socket pair).
    pub fn over(mut reader: Box<dyn Read + Send>, writer: Writer) -> Link {
        let (tx, rx) = mpsc::channel();
        let drops = Arc::new(Mutex::new(DropCounts::default()));
        let counts = drops.clone();
        std::thread::spawn(move || {
            let mut decoder = Decoder::default();
            let mut session = Session::default();
            let mut buf = [0u8; 4096];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => {
                        let _ = tx.send(Inbound::Closed("the link closed".into()));
                        return;
                    }
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.send(Inbound::Closed(format!("the link failed: {e}")));
                        return;
                    }
                };
                for &b in &buf[..n] {
                    let msg = match decoder.push(b) {
                        Some(Ok(f)) => match session.accept(f.seq) {
                            Ok(()) => Some(Inbound::Frame {
                                channel: f.channel,
                                payload: f.payload.to_vec(),
                            }),
                            Err(_) => None,
                        },
                        _ => None,
                    };
                    let mut c = decoder.drops;
                    c.replayed = session.replayed;
                    *counts.lock().expect("drop counts") = c;
                    if let Some(m) = msg {
                        if tx.send(m).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Link {
            writer: Mutex::new(writer),
            seq: AtomicU32::new(1),
            inbound: Mutex::new(rx),
            drops,
        }
    }

    /// Sends `payload` on `channel`, split into frames of at most [`link::MAX_PAYLOAD`].
    pub fn send(&self, channel: Channel, payload: &[u8]) -> Result<()> {
        let mut w = self.writer.lock().expect("link writer");
        let mut out = [0u8; link::MAX_WIRE];
        for chunk in payload
            .chunks(link::MAX_PAYLOAD)
            .chain(payload.is_empty().then_some(&[][..]))
        {
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let n = link::encode(channel, seq, chunk, &mut out).expect("chunks fit a frame");
            w.write_all(&out[..n]).context("writing to the link")?;
        }
        w.flush().context("writing to the link")
    }

    /// Writes raw bytes onto the line, outside any frame: a lone 0x00 resynchronizes the
    /// machine's decoder; the tests use it to inject noise.
    pub fn write_raw(&self, bytes: &[u8]) -> Result<()> {
        let mut w = self.writer.lock().expect("link writer");
        w.write_all(bytes).context("writing to the link")?;
        w.flush().context("writing to the link")
    }

    /// Sends a control message.
    pub fn send_control(&self, m: control::Message) -> Result<()> {
        let mut buf = [0u8; 33];
        let n = m.encode(&mut buf);
        self.send(Channel::Control, &buf[..n])
    }

    /// The next inbound item, waiting at most `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Inbound> {
        match self
            .inbound
            .lock()
            .expect("link reader")
            .recv_timeout(timeout)
        {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                Some(Inbound::Closed("the link reader stopped".into()))
            }
        }
    }

    /// Frames dropped so far, by reason.
    pub fn drops(&self) -> DropCounts {
        *self.drops.lock().expect("drop counts")
    }
}

/// How long a challenge must stay the newest before it is answered, after several hellos.
const CHALLENGE_SETTLE: Duration = Duration::from_millis(300);

/// Says hello and proves the key. Console output that arrives meanwhile goes to `console`.
pub fn authenticate(
    link: &Link,
    key: &[u8],
    timeout: Duration,
    console: &mut dyn Write,
) -> Result<()> {
    authenticate_until(link, key, timeout, Instant::now(), console)
}

/// [`authenticate`], saying hello again every `timeout` without an answer until `retry_until`
/// (for a machine still booting, whose agent has not taken the port yet).
pub fn authenticate_until(
    link: &Link,
    key: &[u8],
    timeout: Duration,
    retry_until: Instant,
    console: &mut dyn Write,
) -> Result<()> {
    use control::{Message, Role};
    if key.is_empty() {
        bail!("the key file is empty: the demo writes one (target/qs/demo.key); give it with --key FILE");
    }
    let hello = || {
        link.send_control(Message::Hello {
            version: link::LINK_VERSION,
            role: Role::Bridge,
        })
    };
    hello()?;
    let mut hellos = 1u32;
    let mut deadline = Instant::now() + timeout;
    // After several hellos, the machine may answer each (they queued up while its agent was
    // not listening yet): only the last challenge is live, so answer a challenge only when no
    // newer one follows within CHALLENGE_SETTLE.
    let mut pending: Option<([u8; auth::LEN], Instant)> = None;
    let mut said_waiting = false;
    loop {
        let until = pending.map_or(deadline, |(_, at)| at);
        let Some(inbound) = link.recv(until.saturating_duration_since(Instant::now())) else {
            if let Some((nonce, _)) = pending.take() {
                link.send_control(Message::Response {
                    mac: auth::respond(key, &nonce),
                })?;
                deadline = Instant::now() + timeout;
                continue;
            }
            if Instant::now() < retry_until {
                if !said_waiting {
                    eprintln!("qs-bridge: no answer yet; saying hello again every {timeout:?} (the machine may still be booting)");
                    said_waiting = true;
                }
                hello()?;
                hellos += 1;
                deadline = Instant::now() + timeout;
                continue;
            }
            bail!(
                "no answer on the link after {timeout:?}: is the agent loaded on the machine, with the link on this port?"
            );
        };
        let payload = match inbound {
            Inbound::Closed(why) => bail!("{why} during the handshake"),
            Inbound::Frame {
                channel: Channel::Console,
                payload,
            } => {
                console.write_all(&payload)?;
                continue;
            }
            Inbound::Frame {
                channel: Channel::Control,
                payload,
            } => payload,
            Inbound::Frame { .. } => continue,
        };
        match Message::decode(&payload) {
            Ok(Message::Hello {
                version,
                role: Role::Machine,
            }) if version != link::LINK_VERSION => {
                bail!("the machine speaks link version {version}, this qs-bridge {}: use matching releases", link::LINK_VERSION)
            }
            Ok(Message::Hello { .. }) => {}
            Ok(Message::Challenge { nonce }) if hellos > 1 => {
                pending = Some((nonce, Instant::now() + CHALLENGE_SETTLE));
            }
            Ok(Message::Challenge { nonce }) => {
                link.send_control(Message::Response {
                    mac: auth::respond(key, &nonce),
                })?;
            }
            Ok(Message::AuthOk) => return Ok(()),
            Ok(Message::Refused(r)) => bail!("{}", r.message()),
            Ok(other) => bail!("unexpected {other:?} from the machine during the handshake"),
            Err(_) => bail!("an undecodable control message from the machine during the handshake"),
        }
    }
}

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
    fn wait(&self, timeout: Duration, done: impl Fn(&Status) -> bool) -> (Status, bool) {
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
    fn update_and_close_client(&self, how: std::net::Shutdown, f: impl FnOnce(&mut Status)) {
        let client = self.client.lock().expect("client");
        self.update(f);
        if let Some(s) = client.as_ref() {
            let _ = s.shutdown(how);
        }
    }
}

/// The detach packet the bridge sends for a gdb that vanished mid-session (with the ack of
/// whatever the machine sent last), so that the machine resumes.
pub const DETACH: &[u8] = b"+$D#44";

/// How long the bridge waits for the machine's `Ended` after gdb's connection closed
/// without gdb having asked to detach or kill, before detaching on its behalf.
const DETACH_GRACE: Duration = Duration::from_secs(1);

/// Serves GDB clients on `listener`, one at a time, until the link closes. Each new client
/// asks the machine for attention (activate, stop every CPU); its bytes go on the `gdb`
/// channel once the machine says every CPU is stopped (up to `stop_timeout`), and the
/// machine's come back. A second client while one is attached is told so and closed. A
/// client that vanishes mid-session is detached on its behalf. `console` gets the `console`
/// channel; `state` is kept up to date for the control socket.
pub fn serve_gdb(
    link: Arc<Link>,
    listener: TcpListener,
    mut console: Box<dyn Write + Send>,
    state: Arc<State>,
    stop_timeout: Duration,
) -> Result<()> {
    {
        let (link, state) = (link.clone(), state.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                // A gdb that detached and at once connects again can be faster than its old
                // connection's end: give the old one a moment to be gone before refusing.
                let _ = state.wait(Duration::from_secs(2), |st| !st.gdb_client);
                if state.update(|st| std::mem::replace(&mut st.gdb_client, true)) {
                    eprintln!("qs-bridge: refused a second GDB client: one is attached already");
                    let _ =
                        stream.write_all(b"qs-bridge: another gdb is attached to this machine\n");
                    continue;
                }
                let (link, state) = (link.clone(), state.clone());
                std::thread::spawn(move || {
                    serve_client(stream, &link, &state, stop_timeout);
                    // Free the place before closing, so that a gdb told "closed" may come back.
                    let client = state.client.lock().expect("client").take();
                    state.update(|st| st.gdb_client = false);
                    if let Some(s) = client {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                });
            }
        });
    }
    loop {
        match link.recv(Duration::from_secs(3600)) {
            None => continue,
            Some(Inbound::Closed(why)) => {
                state.update_and_close_client(std::net::Shutdown::Both, |st| {
                    st.link = LinkState::Lost
                });
                bail!("{why}: the machine keeps running; restart qs-bridge to reconnect");
            }
            Some(Inbound::Frame {
                channel: Channel::Gdb,
                payload,
            }) => {
                if let Some(s) = state.client.lock().expect("client").as_mut() {
                    let _ = s.write_all(&payload);
                }
            }
            Some(Inbound::Frame {
                channel: Channel::Console,
                payload,
            }) => {
                console.write_all(&payload)?;
                console.flush()?;
                state.update(|st| st.console_bytes += payload.len() as u64);
            }
            Some(Inbound::Frame {
                channel: Channel::Control,
                payload,
            }) => on_control(&payload, &link, &state)?,
            Some(Inbound::Frame { .. }) => {}
        }
    }
}

/// A control message from the machine while serving.
fn on_control(payload: &[u8], link: &Link, state: &State) -> Result<()> {
    use control::{End, Message};
    match Message::decode(payload) {
        Ok(Message::Stopped { cpus }) => {
            let waited = state.update(|st| {
                let waited = st.session == SessionState::Waiting && st.gdb_client;
                st.session = SessionState::Stopped;
                st.cpus = Some(cpus);
                waited
            });
            if !waited {
                // The client gave up (or was never there): nobody will detach, so do it now.
                eprintln!(
                    "qs-bridge: the machine stopped ({cpus} CPUs) but no gdb waits for it any more: detaching so that the kernel runs on"
                );
                link.send(Channel::Gdb, DETACH)?;
            }
        }
        Ok(Message::Ended(end)) => {
            match end {
                End::Detached => {
                    eprintln!("qs-bridge: gdb detached; the kernel runs natively again")
                }
                End::Killed => eprintln!(
                    "qs-bridge: gdb asked to kill the machine: Quicksilver never kills it; detached instead, the kernel keeps running"
                ),
            }
            // gdb closes by itself after a detach or kill; make sure it does not linger on a
            // session that is over. What was written to it still reaches it first.
            state.update_and_close_client(std::net::Shutdown::Write, |st| {
                st.session = SessionState::Ended
            });
        }
        Ok(other) => eprintln!("qs-bridge: ignored an unexpected {other:?} from the machine"),
        Err(_) => eprintln!("qs-bridge: ignored an undecodable control message from the machine"),
    }
    Ok(())
}

/// One gdb client: attention, wait for every CPU to stop, then copy its bytes to the link
/// until it disconnects; detach on its behalf if it vanished mid-session. The caller closes
/// the connection.
fn serve_client(stream: TcpStream, link: &Link, state: &State, stop_timeout: Duration) {
    let _ = stream.set_nodelay(true);
    // A gdb that stops reading must not stall the link's reader forever.
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    *state.client.lock().expect("client") = Some(writer);
    state.update(|st| {
        st.session = SessionState::Waiting;
        st.cpus = None;
        st.sessions += 1;
    });
    eprintln!("qs-bridge: gdb connected; asking the machine for attention");
    if let Err(e) = link.send_control(control::Message::Attention) {
        eprintln!("qs-bridge: cannot ask for attention: {e:#}");
        return;
    }
    // gdb's first bytes wait in the socket meanwhile: the machine would lose them.
    let (st, stopped) = state.wait(stop_timeout, |st| {
        st.session != SessionState::Waiting || st.link == LinkState::Lost
    });
    if st.session != SessionState::Stopped {
        match (st.link, stopped) {
            // The link reader says why, and the bridge exits.
            (LinkState::Lost, _) => {}
            (_, false) => {
                state.update(|st| st.session = SessionState::None);
                eprintln!(
                    "qs-bridge: the machine did not stop within {} s: is the agent loaded with link_port= and the same key, and is the hv loaded? See `qsctl stats` on the machine. Closing gdb's connection",
                    stop_timeout.as_secs_f64()
                );
            }
            (_, true) => eprintln!(
                "qs-bridge: the machine ended the session before gdb was served; closing gdb's connection: connect again"
            ),
        }
        return;
    }
    eprintln!(
        "qs-bridge: every CPU stopped ({} CPUs); gdb is served",
        st.cpus.unwrap_or(0)
    );
    let asked_to_end = pump_client(stream, link, state);
    if state.status().session != SessionState::Stopped {
        return;
    }
    // gdb's detach or kill is on its way; otherwise give the machine a moment anyway.
    let grace = if asked_to_end {
        stop_timeout
    } else {
        DETACH_GRACE
    };
    let (_, ended) = state.wait(grace, |st| {
        st.session != SessionState::Stopped || st.link == LinkState::Lost
    });
    if !ended {
        eprintln!(
            "qs-bridge: gdb's connection closed mid-session (gdb crashed or was killed?): sent a detach on its behalf so that the kernel runs on"
        );
        if let Err(e) = link.send(Channel::Gdb, DETACH) {
            eprintln!("qs-bridge: the detach could not be sent: {e:#}");
        }
    }
}

/// Copies one client's bytes to the link until it disconnects (answering what
/// [`GdbFilter`] answers itself); returns whether gdb sent a detach or kill packet (`D`, `k`,
/// `vKill`) meanwhile.
fn pump_client(mut reader: TcpStream, link: &Link, state: &State) -> bool {
    let mut buf = [0u8; link::MAX_PAYLOAD];
    let mut filter = GdbFilter::default();
    let mut out = Vec::new();
    'read: loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                filter.push(&buf[..n], &mut out);
                for o in out.drain(..) {
                    match o {
                        ToSend::Machine(bytes) => {
                            if link.send(Channel::Gdb, &bytes).is_err() {
                                break 'read;
                            }
                        }
                        ToSend::Gdb(bytes) => {
                            if let Some(s) = state.client.lock().expect("client").as_mut() {
                                let _ = s.write_all(&bytes);
                            }
                        }
                    }
                }
            }
        }
    }
    filter.ended
}

/// Where [`GdbFilter`] sends a piece of gdb's stream, or its own answer.
#[derive(Debug, PartialEq, Eq)]
enum ToSend {
    Machine(Vec<u8>),
    Gdb(Vec<u8>),
}

/// gdb's byte stream, packet by packet (across reads). Everything goes on to the machine as
/// it came, except reads of the target description: the bridge answers those from its own
/// copy (`quicksilver_proto::gdb::TARGET_XML`, the hv's), which keeps 5.6 KB off the serial
/// link at every attach. Until gdb asks for `QStartNoAckMode` (which the hv's stub grants:
/// the gdbstub crate's default, and gdb asks before it reads the description), the bridge
/// acks the packet it answers and takes gdb's ack of its answer (a `-` gets the answer again);
/// after it, neither side acks. Also notes gdb's detach and kill packets.
#[derive(Default)]
struct GdbFilter {
    /// The packet being collected, from `$` to the end of its checksum.
    packet: Vec<u8>,
    /// Checksum characters still to come once `#` was seen.
    checksum_left: Option<u8>,
    /// The bridge's last answer, until gdb acks it.
    answer: Option<Vec<u8>>,
    /// gdb asked for no acks.
    no_ack: bool,
    /// gdb sent `D`, `k` or `vKill`.
    ended: bool,
}

impl GdbFilter {
    const TARGET_XML_READ: &'static [u8] = b"qXfer:features:read:target.xml:";

    fn push(&mut self, bytes: &[u8], out: &mut Vec<ToSend>) {
        let mut machine = Vec::new();
        for &b in bytes {
            if !self.packet.is_empty() {
                self.packet.push(b);
                match &mut self.checksum_left {
                    Some(left) => {
                        *left -= 1;
                        if *left == 0 {
                            self.checksum_left = None;
                            let packet = std::mem::take(&mut self.packet);
                            self.packet_done(packet, &mut machine, out);
                        }
                    }
                    None if b == b'#' => self.checksum_left = Some(2),
                    None => {}
                }
                continue;
            }
            match b {
                b'$' => self.packet.push(b),
                b'+' if self.answer.is_some() => self.answer = None,
                b'-' if self.answer.is_some() => {
                    flush(&mut machine, out);
                    out.push(ToSend::Gdb(self.answer.clone().unwrap_or_default()));
                }
                // Acks of the machine's packets, Ctrl-C (0x03).
                _ => machine.push(b),
            }
        }
        flush(&mut machine, out);
    }

    fn packet_done(&mut self, packet: Vec<u8>, machine: &mut Vec<u8>, out: &mut Vec<ToSend>) {
        let body = &packet[1..packet.len() - 3];
        if let Some(answer) = body
            .strip_prefix(Self::TARGET_XML_READ)
            .and_then(|range| xfer_answer(range, quicksilver_proto::gdb::TARGET_XML.as_bytes()))
        {
            flush(machine, out);
            if self.no_ack {
                out.push(ToSend::Gdb(answer));
            } else {
                out.push(ToSend::Gdb([b"+".as_slice(), &answer].concat()));
                self.answer = Some(answer);
            }
            return;
        }
        if body == b"QStartNoAckMode" {
            self.no_ack = true;
        }
        if body == b"D" || body.starts_with(b"D;") || body == b"k" || body.starts_with(b"vKill") {
            self.ended = true;
        }
        machine.extend_from_slice(&packet);
    }
}

/// Moves collected machine-bound bytes into `out`, keeping the stream's order.
fn flush(machine: &mut Vec<u8>, out: &mut Vec<ToSend>) {
    if !machine.is_empty() {
        out.push(ToSend::Machine(std::mem::take(machine)));
    }
}

/// The answer packet to a `qXfer:...:read` of `doc` for the `OFFSET,LENGTH` (hex) in `range`:
/// `m` and a part when more follows, `l` and the rest at the end, binary-escaped, at most
/// LENGTH bytes of data. None if `range` does not parse.
fn xfer_answer(range: &[u8], doc: &[u8]) -> Option<Vec<u8>> {
    let (offset, length) = std::str::from_utf8(range).ok()?.split_once(',')?;
    let offset = usize::from_str_radix(offset, 16).ok()?;
    let length = usize::from_str_radix(length, 16).ok()?;
    let rest = doc.get(offset.min(doc.len())..).unwrap_or_default();
    let mut data = Vec::new();
    let mut taken = 0;
    for &c in rest {
        let escaped: &[u8] = match c {
            b'#' | b'$' | b'}' | b'*' => &[b'}', c ^ 0x20],
            _ => std::slice::from_ref(&c),
        };
        if data.len() + escaped.len() > length {
            break;
        }
        data.extend_from_slice(escaped);
        taken += 1;
    }
    let kind = if taken < rest.len() { b'm' } else { b'l' };
    let sum = data.iter().fold(kind, |s, &c| s.wrapping_add(c));
    let mut packet = vec![b'$', kind];
    packet.extend_from_slice(&data);
    packet.extend_from_slice(format!("#{sum:02x}").as_bytes());
    Some(packet)
}

/// Opens the control socket at `path`: a stale socket file is replaced; anything else there
/// is refused.
pub fn bind_control(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt as _;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "--control {}: another qs-bridge serves that socket: stop it or give another path",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
        }
        Ok(_) => bail!(
            "--control {}: that path exists and is not a socket: give a path for a new socket (it would be overwritten otherwise)",
            path.display()
        ),
        Err(_) => {}
    }
    UnixListener::bind(path).with_context(|| {
        format!(
            "cannot create the control socket {}: does its folder exist and can we write there?",
            path.display()
        )
    })
}

/// Serves the control socket: each request is one line, each reply one JSON line. Commands:
/// `status`, `help`. Every client gets its own thread.
pub fn serve_control(listener: UnixListener, state: Arc<State>) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let state = state.clone();
            std::thread::spawn(move || {
                let Ok(mut out) = stream.try_clone() else {
                    return;
                };
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    let command = line.trim();
                    if command.is_empty() {
                        continue;
                    }
                    let reply = control_reply(command, &state);
                    if writeln!(out, "{reply}").and_then(|()| out.flush()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// The JSON reply to one control command.
pub fn control_reply(command: &str, state: &State) -> serde_json::Value {
    match command {
        "status" => state.status().to_json(),
        "help" => serde_json::json!({ "commands": ["status", "help"] }),
        other => serde_json::json!({ "error": format!("unknown command '{other}': try help") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` to a fresh filter; returns what it sent where, and whether gdb ended.
    fn filter(chunks: &[&[u8]]) -> (Vec<ToSend>, bool) {
        let mut f = GdbFilter::default();
        let mut out = Vec::new();
        for c in chunks {
            f.push(c, &mut out);
        }
        (out, f.ended)
    }

    #[test]
    fn detach_and_kill_packets_are_spotted_across_reads() {
        assert!(filter(&[b"+$D#44"]).1);
        assert!(filter(&[b"$g#67+$", b"k#6b"]).1);
        assert!(filter(&[b"$vK", b"ill;a410#33"]).1);
        assert!(!filter(&[b"$qSupported:multiprocess+#c6", b"$m ffff,4#00"]).1);
        assert!(!filter(&[b"$g#67", b"D"]).1, "a D outside a packet start");
    }

    #[test]
    fn everything_but_target_description_reads_goes_to_the_machine_unchanged() {
        let stream: &[&[u8]] = &[
            b"+$qSupp",
            b"orted:xmlRegisters=i386#6a",
            b"\x03+$g#67",
            b"+",
        ];
        let (out, _) = filter(stream);
        let sent: Vec<u8> = out
            .iter()
            .flat_map(|o| match o {
                ToSend::Machine(b) => b.clone(),
                ToSend::Gdb(b) => panic!("answered {b:?} itself"),
            })
            .collect();
        assert_eq!(sent, stream.concat());
    }

    #[test]
    fn the_target_description_is_answered_here_in_parts_that_gdb_can_join() {
        let doc = quicksilver_proto::gdb::TARGET_XML.as_bytes();
        let mut joined = Vec::new();
        let mut f = GdbFilter::default();
        let mut offset = 0;
        loop {
            let mut out = Vec::new();
            let request = format!("qXfer:features:read:target.xml:{offset:x},3fb");
            let sum = request.bytes().fold(0u8, |s, c| s.wrapping_add(c));
            f.push(format!("${request}#{sum:02x}").as_bytes(), &mut out);
            let [ToSend::Gdb(reply)] = &out[..] else {
                panic!("not answered here: {out:?}")
            };
            let reply = reply.clone();
            out.clear();
            // Our ack of gdb's packet, then `$`, m or l, data, `#xx` with a valid checksum.
            assert_eq!(&reply[..2], b"+$");
            let packet = &reply[2..];
            let (body, sum) = packet.split_at(packet.len() - 3);
            let want = body.iter().fold(0u8, |s, &c| s.wrapping_add(c));
            assert_eq!(sum, format!("#{want:02x}").as_bytes());
            assert!(body.len() - 1 <= 0x3fb);
            joined.extend_from_slice(&body[1..]);
            offset = joined.len();
            // gdb's ack of the answer is the bridge's, not the machine's.
            f.push(b"+", &mut out);
            assert!(out.is_empty(), "the ack went on: {out:?}");
            if body[0] == b'l' {
                break;
            }
            assert_eq!(body[0], b'm');
        }
        assert_eq!(joined, doc);
    }

    #[test]
    fn a_nacked_answer_is_sent_again_and_bad_ranges_go_to_the_machine() {
        let (out, _) = filter(&[b"$qXfer:features:read:target.xml:0,10#00", b"-"]);
        assert_eq!(out.len(), 2);
        let (ToSend::Gdb(first), ToSend::Gdb(again)) = (&out[0], &out[1]) else {
            panic!("{out:?}")
        };
        assert_eq!(
            &first[1..],
            &again[..],
            "the same answer, without a second ack"
        );
        let (out, _) = filter(&[b"$qXfer:features:read:target.xml:zz#00"]);
        assert!(matches!(&out[..], [ToSend::Machine(_)]));
    }

    #[test]
    fn after_no_ack_mode_the_answer_comes_without_an_ack() {
        let (out, _) = filter(&[
            b"$QStartNoAckMode#b0",
            b"$qXfer:features:read:target.xml:0,10#00",
        ]);
        let [ToSend::Machine(asked), ToSend::Gdb(answer)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(asked, b"$QStartNoAckMode#b0", "the machine grants it");
        assert_eq!(answer[0], b'$', "no ack before the answer");
    }

    #[test]
    fn escaped_bytes_count_against_the_length() {
        // `#` takes two bytes (`}` and # ^ 0x20), so 3 bytes hold "a#" and "b" is left.
        let sum = [b'm', b'a', b'}', 0x03]
            .iter()
            .fold(0u8, |s, &c| s.wrapping_add(c));
        let mut want = b"$ma}\x03".to_vec();
        want.extend_from_slice(format!("#{sum:02x}").as_bytes());
        assert_eq!(xfer_answer(b"0,3", b"a#b"), Some(want));
        assert_eq!(xfer_answer(b"3,10", b"a#b").as_deref(), Some(&b"$l#6c"[..]));
    }

    #[test]
    fn control_commands_answer_json() {
        let state = State::new();
        state.update(|st| {
            st.link = LinkState::Authenticated;
            st.cpus = Some(4);
        });
        let v = control_reply("status", &state);
        assert_eq!(v["link"], "authenticated");
        assert_eq!(v["gdb_client"], false);
        assert_eq!(v["session"], "none");
        assert_eq!(v["cpus"], 4);
        assert_eq!(v["sessions"], 0);
        assert_eq!(v["console_bytes"], 0);
        assert_eq!(control_reply("help", &state)["commands"][0], "status");
        let e = control_reply("bogus", &state)["error"].to_string();
        assert!(e.contains("unknown command 'bogus': try help"), "{e}");
    }

    #[test]
    fn link_addresses_parse_or_say_what_to_give() {
        assert_eq!(
            LinkAddr::parse("unix:/tmp/l").unwrap(),
            LinkAddr::Unix("/tmp/l".into())
        );
        assert_eq!(
            LinkAddr::parse("tcp:h:1").unwrap(),
            LinkAddr::Tcp("h:1".into())
        );
        assert_eq!(
            LinkAddr::parse("/dev/ttyS1").unwrap(),
            LinkAddr::Serial("/dev/ttyS1".into())
        );
        let e = LinkAddr::parse("ttyS1").unwrap_err().to_string();
        assert!(e.contains("unix:PATH"), "{e}");
    }
}
