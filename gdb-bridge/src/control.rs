//! The control socket (for `qs-tui`): one request a line, one JSON reply a line
//! ([`control_reply`]); `status` is the [`State`]'s status.

use crate::state::State;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

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
    use crate::state::LinkState;

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
        assert_eq!(v["bulk_dropped_frames"], 0);
        assert_eq!(v["bulk_dropped_bytes"], 0);
        assert_eq!(control_reply("help", &state)["commands"][0], "status");
        let e = control_reply("bogus", &state)["error"].to_string();
        assert!(e.contains("unknown command 'bogus': try help"), "{e}");
    }
}
