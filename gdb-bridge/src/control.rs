//! The control socket (for `qs-tui`): one request a line, one JSON reply a line
//! ([`control_reply`]); `status` is the [`State`]'s status; the checkpoint commands go to the
//! machine ([`crate::checkpoints`]); `subscribe` makes a client one that events are pushed to,
//! as JSON lines with an `event` key, between its replies.

use crate::checkpoints::Command;
use crate::state::State;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

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

/// Serves the control socket: each request is one line, each reply one JSON line (see
/// [`HELP`]). Every client gets its own thread; its writer is shared with the link's thread,
/// which pushes events to it once it subscribed.
pub fn serve_control(listener: UnixListener, state: Arc<State>) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let state = state.clone();
            std::thread::spawn(move || {
                let Ok(out) = stream.try_clone() else {
                    return;
                };
                let out = Arc::new(Mutex::new(out));
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    let command = line.trim();
                    if command.is_empty() {
                        continue;
                    }
                    let reply = if command == "subscribe" {
                        state.checkpoints.subscribe(out.clone());
                        serde_json::json!({ "ok": true, "subscribed": true })
                    } else {
                        control_reply(command, &state)
                    };
                    let mut w = out.lock().expect("control client");
                    if writeln!(w, "{reply}").and_then(|()| w.flush()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// The commands, for `help`.
pub const HELP: &[(&str, &str)] = &[
    ("status", "where the link and the debugger session stand, and counts; fast_link: the fast link's address, state (connecting|up|down), why, rtt_median_us, rates, and datagrams dropped by reason (null without --net)"),
    (
        "checkpoint",
        "take a checkpoint of the whole machine: {ok, id, pause_us, cpus, pages, bytes}",
    ),
    (
        "checkpoints",
        "list them: {ok, count, checkpoints: [{id, parent, age_ms, pause_us, pages, bytes, cpus, periodic, current}]}",
    ),
    (
        "rollback ID",
        "put the whole machine back at checkpoint ID: {ok, id, age_ms, pause_us, pages, dropped}",
    ),
    ("delete ID|all", "delete a checkpoint, or every one: {ok, deleted}"),
    (
        "periodic MS [KEEP] | periodic off",
        "the periodic ring: a checkpoint every MS ms, the last KEEP (20) kept; activates a dormant hv: {ok, every_ms, keep}; checkpoints says the setting (periodic: {every_ms, keep})",
    ),
    (
        "export ID PATH [qsc|elf]",
        "write checkpoint ID into PATH on this machine (an absolute path without spaces; .qsc by default, elf for crash and gdb), read over the link while the machine runs; answers at once {ok, export: {...}}; progress in export-status and the subscribers' export events; asked again after the link or the bridge died, it continues where it stopped",
    ),
    ("export-status", "the export of the moment or the last one: {ok, export: {id, path, format, state: running|done|failed|cancelled, phase, done_bytes, total_bytes, link_bytes, link_bytes_per_s, ram_bytes_per_s, eta_s, retries, file_bytes, error} | null}"),
    ("export-cancel", "stop the running export (what it staged is removed)"),
    (
        "compare A B|now",
        "what changed between checkpoints A and B, or since A: {ok, a, b, pages, runs, truncated, symbols, regions: [{region, pages, flagged, names}], values: [{name, address, size, old, new}]}; regions and names need qs-bridge --vmlinux",
    ),
    (
        "stats",
        "the hv's statistics, read over the link (about 700 bytes for 2 CPUs): {ok, hv_version, active_cpus, activations, unexpected_exits, link_dropped, cpus: [{cpu, active, exits: {cpuid, msr, vmmcall, vmrun, svm-insn, npf, shutdown, other, debug, port-io}, ms_in_hv}]}",
    ),
    (
        "cpus ID",
        "where each CPU of checkpoint ID was: {ok, id, kernel_offset, symbols, cpus: [{cpu, apic_id, rip, rsp, cr3, cpl, interrupts, symbol}]}; symbol needs qs-bridge --vmlinux",
    ),
    (
        "link-test [PAGES]",
        "the machine sends PAGES pages (256: 1 MiB) that do not compress, as an export's: {ok, payload_bytes, wire_bytes, seconds, payload_bytes_per_s, wire_bytes_per_s}; on a real serial line a page takes a third of a second",
    ),
    (
        "subscribe",
        "from now on this client also gets an event line whenever a checkpoint is taken (by anyone; the periodic ring's are only counted, in periodic_taken), the machine is rolled back, or checkpoints are deleted: {event: checkpoint|rollback|delete, id, ...}",
    ),
    ("help", "this list"),
];

/// `export ID PATH [qsc|elf]`'s arguments.
fn parse_export<'a>(
    mut words: impl Iterator<Item = &'a str>,
) -> Result<(u32, std::path::PathBuf, crate::export::Format), String> {
    use crate::export::Format;
    const USAGE: &str = "export ID PATH [qsc|elf]: PATH absolute, without spaces";
    let id = match words.next().map(str::parse::<u32>) {
        Some(Ok(id)) if id != 0 => id,
        _ => return Err(format!("{USAGE}: ID is the number checkpoints lists")),
    };
    let path = std::path::PathBuf::from(words.next().ok_or(USAGE)?);
    if !path.is_absolute() {
        return Err(format!(
            "{USAGE}: '{}' is relative, and the bridge's folder is not yours: give the whole path",
            path.display()
        ));
    }
    let format = match words.next() {
        None | Some("qsc") => Format::Qsc,
        Some("elf") => Format::Elf,
        Some(other) => return Err(format!("{USAGE}: '{other}' is no format")),
    };
    if let Some(x) = words.next() {
        return Err(format!("{USAGE}: '{x}' is one word too many"));
    }
    Ok((id, path, format))
}

/// The JSON reply to one control command. A refusal is `{"ok":false,"error":...}` naming the
/// cause and what to do; while gdb holds every CPU, checkpoint commands other than the list
/// are refused (gdb's `monitor checkpoint`, `monitor checkpoints`, `monitor rollback ID` do
/// the same things then).
pub fn control_reply(command: &str, state: &Arc<State>) -> serde_json::Value {
    if let Some(cmd) = Command::parse(command) {
        return match cmd {
            Ok(cmd) => state.checkpoints.run(cmd),
            Err(e) => crate::checkpoints::error(e),
        };
    }
    let mut words = command.split_whitespace();
    let verb = words.next();
    if verb == Some("link-test") {
        return match words.next().map(str::parse::<u32>) {
            None => crate::export::link_test(&state.checkpoints, 256),
            Some(Ok(n)) if (1..=65536).contains(&n) => {
                crate::export::link_test(&state.checkpoints, n)
            }
            _ => crate::checkpoints::error(
                "link-test [PAGES]: PAGES from 1 to 65536 (256 by default: 1 MiB)",
            ),
        };
    }
    if verb == Some("compare") {
        let a = words.next().map(str::parse::<u32>);
        let b = match words.next() {
            Some("now") | None => Some(None),
            Some(b) => b.parse::<u32>().ok().filter(|&b| b != 0).map(Some),
        };
        return match (a, b) {
            (Some(Ok(a)), Some(b)) if a != 0 => {
                crate::compare::compare(&state.checkpoints, state.symbols.get(), a, b)
            }
            _ => crate::checkpoints::error(
                "compare A B|now: two ids checkpoints lists, or one and now",
            ),
        };
    }
    if verb == Some("cpus") {
        return match words.next().map(str::parse::<u32>) {
            Some(Ok(id)) if id != 0 => {
                crate::inspect::cpus(&state.checkpoints, state.symbols.get(), id)
            }
            _ => crate::checkpoints::error("cpus ID: ID is the number checkpoints lists"),
        };
    }
    if verb == Some("export") {
        return match parse_export(words) {
            Ok((id, path, format)) => state.exports.start(state, id, path, format),
            Err(e) => crate::checkpoints::error(e),
        };
    }
    match command {
        "status" => {
            let mut v = state.status().to_json();
            v["link_bytes"] = serde_json::json!(state.checkpoints.wire_bytes());
            v["fast_link"] = state
                .fast
                .get()
                .map_or(serde_json::Value::Null, |f| f.status_json());
            v
        }
        "export-status" => state.exports.status(),
        "stats" => crate::inspect::stats(&state.checkpoints),
        "export-cancel" => state.exports.cancel(),
        "help" => serde_json::json!({
            "commands": HELP.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
            "help": HELP.iter().map(|(c, h)| serde_json::json!({ "command": c, "does": h })).collect::<Vec<_>>(),
        }),
        other => crate::checkpoints::error(format!("unknown command '{other}': try help")),
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
        let help = control_reply("help", &state);
        assert_eq!(help["commands"][0], "status");
        for c in [
            "checkpoint",
            "checkpoints",
            "rollback ID",
            "delete ID|all",
            "subscribe",
        ] {
            assert!(
                help["commands"].as_array().unwrap().iter().any(|v| v == c),
                "{c}"
            );
        }
        let e = control_reply("rollback abc", &state);
        assert_eq!(e["ok"], false);
        assert!(e["error"]
            .to_string()
            .contains("'abc' is not a checkpoint id"));
        let e = control_reply("bogus", &state)["error"].to_string();
        assert!(e.contains("unknown command 'bogus': try help"), "{e}");
    }
}
