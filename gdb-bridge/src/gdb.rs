//! Serving gdb: the demultiplexer that takes every frame from the link and routes it by
//! channel (gdb bytes to the client, console to its writer, control messages to the session,
//! bulk to its consumer), and one gdb client at a time on TCP. A client asks the machine for
//! attention; its bytes go on the `gdb` channel only once the machine says every CPU is
//! stopped (before that the machine would lose them); a client that vanishes mid-session is
//! detached on its behalf.

use crate::link::{Inbound, Link};
use crate::rsp::{GdbFilter, ToSend};
use crate::state::{LinkState, SessionState, State};
use anyhow::{bail, Result};
use quicksilver_proto::link::{self, checkpoint, control, Channel};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

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
                    let client = state.take_client();
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
            }) => state.to_client(&payload),
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
            Some(Inbound::Frame {
                channel: Channel::Bulk,
                payload,
            }) => on_bulk(&payload, &state),
        }
    }
}

/// A bulk frame from the machine: for the read (an export) waiting for it. One that is no
/// bulk message is dropped, counted in the status (the control socket shows it), and said
/// once.
fn on_bulk(payload: &[u8], state: &State) {
    if state.checkpoints.deliver_bulk(payload) {
        return;
    }
    let first = state.update(|st| {
        st.bulk_dropped_frames += 1;
        st.bulk_dropped_bytes += payload.len() as u64;
        st.bulk_dropped_frames == 1
    });
    if first {
        eprintln!(
            "qs-bridge: the machine sent bulk data that is no read's answer: dropping it; the control socket's status counts it (bulk_dropped_frames, bulk_dropped_bytes)"
        );
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
                state.update(|st| st.end_asked = true);
                link.send(Channel::Gdb, DETACH)?;
            }
        }
        Ok(Message::Ended(end)) => {
            match end {
                End::Detached if state.status().end_asked => {
                    eprintln!("qs-bridge: gdb detached; the kernel runs natively again")
                }
                End::Detached => eprintln!(
                    "qs-bridge: the machine ended the session though gdb did not detach: gdb's bytes broke the protocol on the way (the machine's console says how); the kernel runs natively again: connect again"
                ),
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
        // The answer to the serial ping that moved the machine back after the fast link fell.
        Ok(Message::Pong { .. }) => {}
        Ok(other) => eprintln!("qs-bridge: ignored an unexpected {other:?} from the machine"),
        Err(_) => match checkpoint::Message::decode(payload) {
            Ok(checkpoint::Message::Event(e)) => state.checkpoints.publish(&e),
            Ok(m) => state.checkpoints.deliver(m),
            Err(_) => {
                eprintln!("qs-bridge: ignored an undecodable control message from the machine")
            }
        },
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
    state.set_client(writer);
    state.update(|st| {
        st.session = SessionState::Waiting;
        st.cpus = None;
        st.sessions += 1;
        st.end_asked = false;
    });
    eprintln!("qs-bridge: gdb connected; asking the machine for attention");
    let asked = std::time::Instant::now();
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
        "qs-bridge: every CPU stopped ({} CPUs); gdb is served (attention to stop: {:.1} ms)",
        st.cpus.unwrap_or(0),
        asked.elapsed().as_secs_f64() * 1e3
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
        state.update(|st| st.end_asked = true);
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
                filter.push_answering_link(&buf[..n], &mut out, &|| link.report());
                if filter.ended {
                    // Before the detach goes: the machine's answer may come at once.
                    state.update(|st| st.end_asked = true);
                }
                for o in out.drain(..) {
                    match o {
                        ToSend::Machine(bytes) => {
                            if link.send(Channel::Gdb, &bytes).is_err() {
                                break 'read;
                            }
                        }
                        ToSend::Gdb(bytes) => state.to_client(&bytes),
                    }
                }
            }
        }
    }
    filter.ended
}
