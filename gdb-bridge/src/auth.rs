//! Authentication: the hello (both ends name their link version) and the challenge/response
//! that proves the bridge holds the key the agent was loaded with
//! (`quicksilver_proto::link::auth`), with refusals that say what to fix.

use crate::link::{Inbound, Link};
use anyhow::{bail, Result};
use quicksilver_proto::link::{self, auth, control, Channel};
use std::io::Write;
use std::time::{Duration, Instant};

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
