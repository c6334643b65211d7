//! `--raw-frames tx|rx|echo N SIZE`: raw Ethernet frames through Linux's own NIC driver on
//! `eth0`, with an `AF_PACKET` socket, for `cargo xtask bench link`: the platform's own rate
//! on the same NIC model the fast link uses, the reference its figures are read against. The
//! host's end of QEMU's stream socket is the other side (it sinks, sources or pings).
//!
//! - `tx N SIZE`: send N frames of SIZE bytes (EtherType [`ETHER_TYPE`], to
//!   [`HOST_MAC`]); a frame the queue refuses (`ENOBUFS`) is sent again.
//! - `rx N SIZE`: receive until N frames came or none for 5 s; the time runs from the first
//!   frame to the last.
//! - `echo N SIZE`: send each of N frames back to where it came from.
//!
//! Prints `RAW-READY` once the socket is bound, then one line
//! `QS-RAW {"mode":..,"frames":..,"bytes":..,"seconds":..}`.

use std::time::Instant;

/// A local-experimental EtherType (IEEE 802 "Local Experimental Ethertype 2").
pub const ETHER_TYPE: u16 = 0x88B5;
/// Where the frames go: the host's end (a locally administered address).
pub const HOST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

fn last_error(what: &str) -> ! {
    eprintln!(
        "qs-workload --raw-frames: {what}: {}",
        std::io::Error::last_os_error()
    );
    std::process::exit(1);
}

pub fn run(args: &[String]) -> ! {
    let (mode, n, size) = match args {
        [mode, n, size] => (
            mode.as_str(),
            n.parse::<u64>().unwrap_or_else(|_| super::usage()),
            size.parse::<usize>().unwrap_or_else(|_| super::usage()),
        ),
        _ => super::usage(),
    };
    if !(60..=9014).contains(&size) || !["tx", "rx", "echo"].contains(&mode) {
        super::usage();
    }
    let proto = ETHER_TYPE.to_be() as libc::c_int;
    // SAFETY: plain system calls on values owned here; every pointer passed points at a live,
    // correctly sized local for the length given with it.
    let (fd, mac) = unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto);
        if fd < 0 {
            last_error("socket(AF_PACKET)");
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"eth0") {
            *d = *s as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFINDEX, &mut ifr) < 0 {
            last_error("SIOCGIFINDEX eth0");
        }
        let index = ifr.ifr_ifru.ifru_ifindex;
        if libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut ifr) < 0 {
            last_error("SIOCGIFHWADDR eth0");
        }
        let mut mac = [0u8; 6];
        for (d, s) in mac.iter_mut().zip(ifr.ifr_ifru.ifru_hwaddr.sa_data) {
            *d = s as u8;
        }
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETHER_TYPE.to_be();
        sll.sll_ifindex = index;
        if libc::bind(
            fd,
            std::ptr::addr_of!(sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        ) < 0
        {
            last_error("bind");
        }
        let big: libc::c_int = 16 << 20;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::addr_of!(big).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(timeout).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        (fd, mac)
    };
    let mut buf = vec![0xabu8; 65536];
    buf[..6].copy_from_slice(&HOST_MAC);
    buf[6..12].copy_from_slice(&mac);
    buf[12..14].copy_from_slice(&ETHER_TYPE.to_be_bytes());
    println!("RAW-READY");
    let (mut frames, mut bytes) = (0u64, 0u64);
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let t0 = Instant::now();
    while frames < n {
        match mode {
            "tx" => {
                buf[14..22].copy_from_slice(&frames.to_le_bytes());
                // SAFETY: `buf` is live and longer than `size`.
                let r = unsafe { libc::send(fd, buf.as_ptr().cast(), size, 0) };
                if r < 0 {
                    continue;
                }
                frames += 1;
                bytes += r as u64;
            }
            _ => {
                // SAFETY: `buf` is live and `buf.len()` bytes long.
                let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if r <= 0 {
                    if frames > 0 || t0.elapsed().as_secs() > 120 {
                        break;
                    }
                    continue;
                }
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                frames += 1;
                bytes += r as u64;
                if mode == "echo" {
                    let mut from = [0u8; 6];
                    from.copy_from_slice(&buf[6..12]);
                    buf.copy_within(0..6, 6);
                    buf[..6].copy_from_slice(&from);
                    // SAFETY: as above, `r` bytes of `buf` were just received.
                    unsafe { libc::send(fd, buf.as_ptr().cast(), r as usize, 0) };
                }
            }
        }
    }
    let seconds = match mode {
        "tx" => t0.elapsed().as_secs_f64(),
        _ => first.map_or(0.0, |f| (last - f).as_secs_f64()),
    };
    println!(
        "QS-RAW {{\"mode\":\"{mode}\",\"frames\":{frames},\"bytes\":{bytes},\"seconds\":{seconds:.6}}}"
    );
    std::process::exit(0);
}
