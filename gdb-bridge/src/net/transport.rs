//! How the fast link's datagrams reach the machine: an ordinary UDP socket (the OS does ARP
//! and IP), or QEMU's `-netdev stream` Unix socket, on which the bridge is a host of the
//! machine's Ethernet itself: its own MAC and IP, ARP for the machine's address, Ethernet,
//! IPv4 and UDP headers built and checked with `proto`'s code (fast-link.md section 3.1: each
//! frame is a 4-byte big-endian length, then the frame).

use anyhow::{Context, Result};
use quicksilver_proto::link::net::{self, Arp, Drop, Host, Packet, MAX_FRAME};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// The bridge's MAC on a `stream` Ethernet: locally administered ("QS" in it).
pub const BRIDGE_MAC: [u8; 6] = [0x02, 0x51, 0x53, 0x00, 0x00, 0x01];
/// The bridge's UDP port on a `stream` Ethernet.
pub const BRIDGE_PORT: u16 = 50001;

/// What one read brought.
pub enum Received {
    /// A UDP payload from the machine.
    Datagram(Vec<u8>),
    /// A frame that is nothing for the link (dropped and counted by the caller).
    Dropped(Drop),
    /// Something handled here (ARP).
    Nothing,
}

/// An open transport.
pub enum Transport {
    Udp(UdpSocket),
    Stream(Stream),
}

/// The bridge as a host on QEMU's `stream` Ethernet.
pub struct Stream {
    reader: Mutex<UnixStream>,
    writer: Mutex<UnixStream>,
    us: Host,
    peer_ip: [u8; 4],
    peer_port: u16,
    /// The machine's MAC, once its ARP reply came.
    peer_mac: Mutex<Option<[u8; 6]>>,
    ip_id: AtomicU16,
}

impl Transport {
    /// A UDP socket sending to `addr` (HOST:PORT).
    pub fn udp(addr: &str) -> Result<Transport> {
        let s = UdpSocket::bind("0.0.0.0:0").context("cannot open a UDP socket")?;
        s.connect(addr).with_context(|| {
            format!("--net udp:{addr}: not an address to send to (give HOST:PORT)")
        })?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(Transport::Udp(s))
    }

    /// Connects to QEMU's `-netdev stream,server=on,addr.type=unix` socket at `path`.
    pub fn stream(path: &str, ip: Ipv4Addr, peer: SocketAddrV4) -> Result<Transport> {
        let s = UnixStream::connect(path).with_context(|| {
            format!("the fast link is not reachable at stream:{path}: is QEMU running with -netdev stream,server=on,addr.type=unix,addr.path={path}?")
        })?;
        Ok(Transport::Stream(Stream {
            reader: Mutex::new(s.try_clone()?),
            writer: Mutex::new(s),
            us: Host {
                mac: BRIDGE_MAC,
                ip: ip.octets(),
                port: BRIDGE_PORT,
            },
            peer_ip: peer.ip().octets(),
            peer_port: peer.port(),
            peer_mac: Mutex::new(None),
            ip_id: AtomicU16::new(0),
        }))
    }

    /// Whether datagrams can go out (on a `stream` Ethernet: the machine's MAC is known).
    pub fn ready(&self) -> bool {
        match self {
            Transport::Udp(_) => true,
            Transport::Stream(s) => s.peer_mac.lock().expect("peer mac").is_some(),
        }
    }

    /// Asks for the machine's MAC (ARP) where the bridge must.
    pub fn resolve(&self) -> io::Result<()> {
        match self {
            Transport::Udp(_) => Ok(()),
            Transport::Stream(s) => {
                let mut f = [0u8; MAX_FRAME];
                let n = net::build_arp(
                    &mut f,
                    &Arp {
                        op: 1,
                        sender_mac: s.us.mac,
                        sender_ip: s.us.ip,
                        target_mac: [0; 6],
                        target_ip: s.peer_ip,
                    },
                );
                s.write_frame(&f[..n])
            }
        }
    }

    /// Sends one datagram (a UDP payload) to the machine.
    pub fn send(&self, datagram: &[u8]) -> io::Result<()> {
        match self {
            Transport::Udp(u) => u.send(datagram).map(|_| ()),
            Transport::Stream(s) => {
                let Some(mac) = *s.peer_mac.lock().expect("peer mac") else {
                    return Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "the machine's MAC is not known yet (no ARP reply)",
                    ));
                };
                let peer = Host {
                    mac,
                    ip: s.peer_ip,
                    port: s.peer_port,
                };
                let mut f = [0u8; MAX_FRAME];
                let id = s.ip_id.fetch_add(1, Ordering::Relaxed);
                let n = net::build_udp(&mut f, s.us, peer, id, datagram);
                s.write_frame(&f[..n])
            }
        }
    }

    /// Waits (a while) for the next thing from the machine. An error is a closed or failed
    /// socket; a quiet line is `Nothing`.
    pub fn recv(&self) -> io::Result<Received> {
        match self {
            Transport::Udp(u) => {
                let mut buf = [0u8; 65536];
                match u.recv(&mut buf) {
                    Ok(n) => Ok(Received::Datagram(buf[..n].to_vec())),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        Ok(Received::Nothing)
                    }
                    // Linux reports an ICMP port unreachable on the next call: nobody listens
                    // there yet, which the liveness check sees anyway.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        std::thread::sleep(Duration::from_millis(50));
                        Ok(Received::Nothing)
                    }
                    Err(e) => Err(e),
                }
            }
            Transport::Stream(s) => s.recv(),
        }
    }

    /// Ends the connection (the reader then sees it closed).
    pub fn shutdown(&self) {
        if let Transport::Stream(s) = self {
            let _ = s
                .writer
                .lock()
                .expect("writer")
                .shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Stream {
    fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        let mut w = self.writer.lock().expect("writer");
        let mut buf = Vec::with_capacity(4 + frame.len());
        buf.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        buf.extend_from_slice(frame);
        w.write_all(&buf)
    }

    fn recv(&self) -> io::Result<Received> {
        let mut r = self.reader.lock().expect("reader");
        let mut len = [0u8; 4];
        r.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        // QEMU's own limit is NET_BUFSIZE (69 KiB); anything near it is nothing of ours,
        // but its bytes must be read to stay in step.
        if len > 70 * 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a frame of {len} bytes on the stream: not QEMU's framing"),
            ));
        }
        let mut frame = vec![0u8; len];
        r.read_exact(&mut frame)?;
        drop(r);
        Ok(self.take(&frame))
    }

    fn take(&self, frame: &[u8]) -> Received {
        let udp = match net::parse_frame(frame, Some(self.us.mac)) {
            Err(d) => return Received::Dropped(d),
            Ok(Packet::Arp(a)) => return self.arp(&a),
            Ok(Packet::Udp(u)) => u,
        };
        if udp.dst.ip != self.us.ip || udp.dst.port != self.us.port {
            return Received::Dropped(Drop::NotForUs);
        }
        let from_peer = udp.src.ip == self.peer_ip
            && udp.src.port == self.peer_port
            && Some(udp.src.mac) == *self.peer_mac.lock().expect("peer mac");
        if !from_peer {
            return Received::Dropped(Drop::Spoofed);
        }
        Received::Datagram(udp.payload.to_vec())
    }

    /// The machine's ARP reply gives its MAC; a request for our address is answered (a
    /// machine may ask, though it learns our MAC from our datagrams).
    fn arp(&self, a: &Arp) -> Received {
        match a.op {
            2 if a.sender_ip == self.peer_ip && a.target_ip == self.us.ip => {
                *self.peer_mac.lock().expect("peer mac") = Some(a.sender_mac);
                Received::Nothing
            }
            1 if a.target_ip == self.us.ip => {
                let mut f = [0u8; MAX_FRAME];
                let n = net::build_arp(
                    &mut f,
                    &Arp {
                        op: 2,
                        sender_mac: self.us.mac,
                        sender_ip: self.us.ip,
                        target_mac: a.sender_mac,
                        target_ip: a.sender_ip,
                    },
                );
                let _ = self.write_frame(&f[..n]);
                Received::Nothing
            }
            _ => Received::Dropped(Drop::NotForUs),
        }
    }
}
