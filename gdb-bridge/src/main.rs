//! `qs-bridge --link unix:PATH|tcp:HOST:PORT|/dev/ttyXXX [--baud N] --key FILE --gdb ADDR:PORT
//! [--net stream:PATH|udp:HOST:PORT [--net-ip IP] [--net-peer IP:PORT]] [--console FILE]
//! [--control SOCKET] [--timeout S]`
//!
//! Owns the link to a Quicksilver machine: authenticates with the key the agent was loaded
//! with, then serves GDB's remote protocol on TCP (a client stops every CPU; its bytes flow
//! once the machine says so) and copies the machine's console to stdout (or `--console FILE`).
//! `--control` serves a Unix socket, one JSON line per request: `status`, the checkpoint
//! commands (`checkpoint`, `checkpoints`, `rollback ID`, `delete ID|all`), `subscribe` (events
//! pushed as they happen) and `help`. `--net` adds the fast link (the machine's NIC): after
//! the serial handshake, gdb's bytes, checkpoint requests and bulk data go over it while it
//! answers, and back over the serial link when it does not.

use anyhow::{Context, Result};
use clap::Parser;
use qs_bridge::{
    authenticate_until, bind_control, serve_control, serve_gdb, Link, LinkAddr, LinkState, NetAddr,
    NetOptions, State,
};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "qs-bridge",
    version,
    about = "Serve GDB for a live kernel over Quicksilver's serial link"
)]
struct Args {
    /// The link: unix:PATH, tcp:HOST:PORT or a serial device.
    #[arg(long)]
    link: String,
    /// The fast link, beside the serial one: stream:PATH (QEMU's -netdev
    /// stream,server=on,addr.type=unix,addr.path=PATH; the bridge is then a host on that
    /// Ethernet) or udp:HOST:PORT (the machine's net_ip= and net_port=).
    #[arg(long, value_name = "stream:PATH|udp:HOST:PORT")]
    net: Option<String>,
    /// The bridge's IPv4 address on a stream: Ethernet.
    #[arg(long, value_name = "IP", default_value = "10.13.0.1")]
    net_ip: std::net::Ipv4Addr,
    /// The machine's IPv4 address and UDP port on a stream: Ethernet (the agent's net_ip=
    /// and net_port=).
    #[arg(long, value_name = "IP:PORT", default_value = "10.13.0.2:50000")]
    net_peer: std::net::SocketAddrV4,
    /// Baud rate of a serial device.
    #[arg(long, default_value_t = 115200)]
    baud: u32,
    /// File holding the link key (the same key as the file the agent's key_file= names).
    #[arg(long)]
    key: std::path::PathBuf,
    /// Where GDB connects.
    #[arg(long, default_value = "127.0.0.1:1234")]
    gdb: String,
    /// Where the machine's console goes (default: stdout).
    #[arg(long)]
    console: Option<std::path::PathBuf>,
    /// A Unix socket for the terminal UI: `status`, `checkpoint`, `checkpoints`, `rollback ID`,
    /// `delete ID|all`, `subscribe`, `help`; one JSON line per request.
    #[arg(long, value_name = "SOCKET")]
    control: Option<std::path::PathBuf>,
    /// The running kernel's vmlinux (with symbols): the control socket's `cpus ID` then names
    /// the function each CPU was in.
    #[arg(long, value_name = "FILE")]
    vmlinux: Option<std::path::PathBuf>,
    /// Seconds to wait for the machine's answer (the handshake, every CPU stopping).
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// Keep trying for up to this many seconds while the link is not there or the machine
    /// does not answer (still booting, agent not loaded yet): connect again, say hello again.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    retry: u64,
}

fn run(args: Args) -> Result<()> {
    let key = std::fs::read(&args.key).with_context(|| {
        format!(
            "cannot read the key file {}: give --key FILE",
            args.key.display()
        )
    })?;
    let key = key.trim_ascii_end().to_vec();
    let addr = LinkAddr::parse(&args.link)?;
    let net = args.net.as_deref().map(NetAddr::parse).transpose()?;
    let mut console: Box<dyn Write + Send> = match &args.console {
        Some(p) => Box::new(
            std::fs::File::create(p)
                .with_context(|| format!("cannot write the console log {}", p.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let state = State::new();
    if let Some(v) = &args.vmlinux {
        let _ = state.symbols.set(qs_bridge::inspect::Symbols::load(v)?);
    }
    let _control = match &args.control {
        Some(path) => {
            serve_control(bind_control(path)?, state.clone());
            Some(RemoveOnDrop(path.clone()))
        }
        None => None,
    };
    let retry_until = Instant::now() + Duration::from_secs(args.retry);
    let link = loop {
        match Link::open(&addr, args.baud) {
            Ok(link) => break Arc::new(link),
            Err(_) if Instant::now() < retry_until => {
                std::thread::sleep(Duration::from_millis(250))
            }
            Err(e) => return Err(e),
        }
    };
    state.update(|st| st.link = LinkState::Authenticating);
    authenticate_until(
        &link,
        &key,
        Duration::from_secs(args.timeout),
        retry_until,
        &mut *console,
    )?;
    state.update(|st| st.link = LinkState::Authenticated);
    if let Some(net) = net {
        let opts = NetOptions {
            ip: args.net_ip,
            peer: args.net_peer,
        };
        let described = net.describe();
        let fast = link.start_fast(net, opts, &key);
        let _ = state.fast.set(fast.clone());
        if !fast.wait_up(Duration::from_secs(args.timeout)) {
            eprintln!(
                "qs-bridge: the fast link ({described}) did not come up within {} s: is the agent loaded with net= and the hv active? The serial link serves meanwhile; the control socket's status says why (fast_link.why), and the bridge keeps trying",
                args.timeout
            );
        }
    }
    state.checkpoints.set_link(link.clone());
    let listener = std::net::TcpListener::bind(&args.gdb)
        .with_context(|| format!("cannot listen for gdb on {}: is the port in use?", args.gdb))?;
    eprintln!(
        "qs-bridge: authenticated; for gdb: gdb <vmlinux> -ex 'target remote {}'",
        args.gdb
    );
    serve_gdb(
        link,
        listener,
        console,
        state,
        Duration::from_secs(args.timeout),
    )
}

/// Removes the control socket we made when `run` ends (a socket left behind by a kill is
/// replaced at the next start).
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("qs-bridge: {e:#}");
        std::process::exit(1);
    }
}
