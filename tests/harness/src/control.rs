//! A client of the bridge's control socket, as `qs-tui` and scripts are: one request a line,
//! one JSON reply a line, events between them once subscribed.

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// One connection to the control socket.
pub struct Client(BufReader<UnixStream>);

impl Client {
    /// Connects to the socket at `path`.
    pub fn connect(path: &std::path::Path) -> Client {
        let s = UnixStream::connect(path).expect("the bridge's control socket");
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        Client(BufReader::new(s))
    }

    /// The next line, as JSON.
    pub fn line(&mut self) -> Value {
        let mut line = String::new();
        self.0.read_line(&mut line).expect("a line from the bridge");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
    }

    /// Sends `command`; its reply.
    pub fn ask(&mut self, command: &str) -> Value {
        writeln!(self.0.get_mut(), "{command}").unwrap();
        self.line()
    }

    /// The next event line (`event` key), skipping none: a subscriber that sends nothing
    /// gets only events.
    pub fn event(&mut self) -> Value {
        let v = self.line();
        assert!(v.get("event").is_some(), "an event, not {v}");
        v
    }
}
