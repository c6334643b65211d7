//! The framed link to the machine: where it is ([`LinkAddr`]), opening it over a Unix socket,
//! TCP or a serial port (raw mode, set through termios), and [`Link`]: a writer that splits
//! payloads into frames, and a reader thread that decodes frames and drops (and counts)
//! anything corrupt, truncated, oversized or replayed before it reaches a consumer.
//!
//! With `--net`, the link also owns the fast link ([`crate::net`]) and routes: gdb's bytes,
//! checkpoint requests and bulk data go over the fast link while it is up, everything else
//! (attention, the handshake) over the serial line; what the fast link receives joins the
//! serial link's inbound queue, so that its consumers need not know which link carried it.

use crate::net::{Fallback, Hooks, NetAddr, NetLink, NetOptions, NetState};
use crate::rate::Rate;
use anyhow::{bail, Context, Result};
use quicksilver_proto::link::{self, control, Channel, Decoder, DropCounts, Session};
use rustix::termios;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

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
    /// As the user gave it.
    pub fn describe(&self) -> String {
        match self {
            LinkAddr::Unix(p) => format!("unix:{p}"),
            LinkAddr::Tcp(a) => format!("tcp:{a}"),
            LinkAddr::Serial(p) => p.clone(),
        }
    }

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
    /// Where the fast link's payloads join the inbound queue.
    inbound_tx: Mutex<Sender<Inbound>>,
    drops: Arc<Mutex<DropCounts>>,
    /// Bytes read from the serial link, frames or not.
    wire: Arc<Rate>,
    /// Where the serial link is, for `monitor link`.
    describe: Mutex<String>,
    /// The fast link, with `--net`.
    fast: OnceLock<Arc<NetLink>>,
}

fn open_serial(path: &str, baud: u32) -> Result<(Box<dyn Read + Send>, Writer)> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| {
            format!("cannot open the link {path}: check the device and its permissions")
        })?;
    if ![9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600].contains(&baud) {
        bail!("--baud {baud}: use 9600, 19200, 38400, 57600, 115200, 230400, 460800 or 921600");
    }
    // Raw mode: no echo, no line editing, no translation of CR/LF or of the frame's bytes.
    let mut t = termios::tcgetattr(&f)
        .map_err(std::io::Error::from)
        .with_context(|| format!("{path} is not a serial port"))?;
    t.make_raw();
    t.set_speed(baud)
        .map_err(std::io::Error::from)
        .with_context(|| format!("cannot set {path} to {baud} baud"))?;
    termios::tcsetattr(&f, termios::OptionalActions::Now, &t)
        .map_err(std::io::Error::from)
        .with_context(|| format!("cannot configure {path}"))?;
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
        let link = Link::over(reader, writer);
        *link.describe.lock().expect("describe") = match addr {
            LinkAddr::Serial(p) => format!("{p} at {baud} baud"),
            other => other.describe(),
        };
        Ok(link)
    }

    /// A link over any byte stream (used by `open`, and by tests over a socket pair).
    pub fn over(mut reader: Box<dyn Read + Send>, writer: Writer) -> Link {
        let (tx, rx) = mpsc::channel();
        let inbound_tx = Mutex::new(tx.clone());
        let drops = Arc::new(Mutex::new(DropCounts::default()));
        let counts = drops.clone();
        let wire_bytes = Arc::new(Rate::default());
        let wire = wire_bytes.clone();
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
                    Ok(n) => {
                        wire.add(n as u64);
                        n
                    }
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
            inbound_tx,
            drops,
            wire: wire_bytes,
            describe: Mutex::new("a byte stream".into()),
            fast: OnceLock::new(),
        }
    }

    /// Starts the fast link (once the serial link is authenticated): from the moment its
    /// handshake succeeds it carries gdb's bytes, checkpoint requests and bulk data.
    pub fn start_fast(
        self: &Arc<Self>,
        addr: NetAddr,
        opts: NetOptions,
        key: &[u8],
    ) -> Arc<NetLink> {
        let to_queue = self.inbound_tx.lock().expect("inbound").clone();
        let serial: Weak<Link> = Arc::downgrade(self);
        let hooks = Hooks {
            deliver: Box::new(move |channel, payload| {
                let _ = to_queue.send(Inbound::Frame { channel, payload });
            }),
            fallback: Box::new(move |f: Fallback| {
                if let Some(link) = serial.upgrade() {
                    link.fall_back(f);
                }
            }),
        };
        let fast = NetLink::start(addr, opts, key, hooks);
        let _ = self.fast.set(fast.clone());
        fast
    }

    /// The fast link, if `--net` gave one.
    pub fn fast(&self) -> Option<&Arc<NetLink>> {
        self.fast.get()
    }

    /// The fast link went down: a ping on the serial line makes the machine answer here
    /// again, and gdb's read whose answer was lost is asked again (a write or a resume is
    /// not: asking twice could do it twice; gdb hears of those from the stop reply).
    fn fall_back(&self, f: Fallback) {
        let _ = self.send_control(control::Message::Ping { n: 0 });
        if let Some(body) = f.unanswered_read {
            let _ = self.send_serial(Channel::Gdb, &crate::rsp::packet(&body));
        }
    }

    /// Bytes read so far from both links, frames or not.
    pub fn wire_bytes(&self) -> u64 {
        self.wire.total() + self.fast().map_or(0, |f| f.rx_bytes())
    }

    /// Lines for gdb's `monitor link`: which link carries the session, and each link's
    /// address, round trip and recent rate.
    pub fn report(&self) -> String {
        let serial = self.describe.lock().expect("describe").clone();
        let carrier = match self.fast() {
            Some(f) if f.state() == NetState::Up => "the fast link",
            _ => "the serial link",
        };
        let mut s = format!("the session is carried by {carrier}\n");
        if let Some(f) = self.fast() {
            s += &f.report();
        }
        s += &format!(
            "serial link {serial}: in {} B/s, {} bytes in all; {} frames dropped\n",
            self.wire.per_second(),
            self.wire.total(),
            self.drops().total()
        );
        s
    }

    /// Sends `payload` on `channel`: over the fast link while it is up (gdb, control and
    /// bulk), else split into frames of at most [`link::MAX_PAYLOAD`] on the serial link.
    pub fn send(&self, channel: Channel, payload: &[u8]) -> Result<()> {
        if channel != Channel::Console {
            if let Some(f) = self.fast() {
                if f.send(channel, payload) {
                    return Ok(());
                }
            }
        }
        self.send_serial(channel, payload)
    }

    /// Sends `payload` on `channel` on the serial link.
    pub fn send_serial(&self, channel: Channel, payload: &[u8]) -> Result<()> {
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

    /// Sends a control message on the serial link (attention and the handshake belong there).
    pub fn send_control(&self, m: control::Message) -> Result<()> {
        let mut buf = [0u8; 33];
        let n = m.encode(&mut buf);
        self.send_serial(Channel::Control, &buf[..n])
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

#[cfg(test)]
mod tests {
    use super::*;

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
