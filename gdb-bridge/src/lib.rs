//! `qs-bridge`: the operator's end of the serial link.
//!
//! - [`Link`]: frames over a Unix socket, TCP or a serial port; a reader thread decodes and
//!   drops (and counts) anything corrupt, truncated, oversized or replayed;
//! - [`authenticate`]: the hello and the challenge/response, with clear refusals;
//! - [`serve_gdb`]: one GDB client at a time on TCP, its bytes on the `gdb` channel; the
//!   `console` channel goes to a writer.

use anyhow::{bail, Context, Result};
use quicksilver_proto::link::{self, auth, control, Channel, Decoder, DropCounts, Session};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
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

/// Says hello and proves the key. Console output that arrives meanwhile goes to `console`.
pub fn authenticate(
    link: &Link,
    key: &[u8],
    timeout: Duration,
    console: &mut dyn Write,
) -> Result<()> {
    use control::{Message, Role};
    if key.is_empty() {
        bail!("the key file is empty: the demo writes one (target/qs/link.key); give it with --key FILE");
    }
    link.send_control(Message::Hello {
        version: link::LINK_VERSION,
        role: Role::Bridge,
    })?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(inbound) = link.recv(left) else {
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

/// Serves GDB clients on `listener`, one at a time, until the link closes. Each new client
/// asks the machine for attention (activate, stop every CPU); its bytes go on the `gdb`
/// channel and the machine's come back. A second client while one is attached is told so and
/// closed. `console` gets the `console` channel.
pub fn serve_gdb(
    link: Arc<Link>,
    listener: TcpListener,
    mut console: Box<dyn Write + Send>,
) -> Result<()> {
    let attached = Arc::new(AtomicBool::new(false));
    let current: Arc<Mutex<Option<TcpStream>>> = Arc::new(Mutex::new(None));
    {
        let (link, attached, current) = (link.clone(), attached.clone(), current.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                if attached.swap(true, Ordering::AcqRel) {
                    eprintln!("qs-bridge: refused a second GDB client: one is attached already");
                    let _ =
                        stream.write_all(b"qs-bridge: another gdb is attached to this machine\n");
                    continue;
                }
                let _ = stream.set_nodelay(true);
                eprintln!("qs-bridge: gdb attached; asking the machine for attention");
                let Ok(reader) = stream.try_clone() else {
                    continue;
                };
                *current.lock().expect("client") = Some(stream);
                if link.send_control(control::Message::Attention).is_err() {
                    return;
                }
                let (link, attached, current) = (link.clone(), attached.clone(), current.clone());
                std::thread::spawn(move || pump_client(reader, &link, &attached, &current));
            }
        });
    }
    loop {
        match link.recv(Duration::from_secs(3600)) {
            None => continue,
            Some(Inbound::Closed(why)) => {
                if let Some(s) = current.lock().expect("client").take() {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                bail!("{why}: the machine keeps running; restart qs-bridge to reconnect");
            }
            Some(Inbound::Frame {
                channel: Channel::Gdb,
                payload,
            }) => {
                if let Some(s) = current.lock().expect("client").as_mut() {
                    let _ = s.write_all(&payload);
                }
            }
            Some(Inbound::Frame {
                channel: Channel::Console,
                payload,
            }) => {
                console.write_all(&payload)?;
                console.flush()?;
            }
            Some(Inbound::Frame { .. }) => {}
        }
    }
}

/// Copies one client's bytes to the link until it disconnects.
fn pump_client(
    mut reader: TcpStream,
    link: &Link,
    attached: &AtomicBool,
    current: &Mutex<Option<TcpStream>>,
) {
    let mut buf = [0u8; link::MAX_PAYLOAD];
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if link.send(Channel::Gdb, &buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    *current.lock().expect("client") = None;
    attached.store(false, Ordering::Release);
    eprintln!("qs-bridge: gdb detached");
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
