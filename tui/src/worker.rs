//! The one owner of the control socket: it sends the app's requests one at a time and turns
//! each answer line into an event; a second connection, subscribed, brings the bridge's pushed
//! events. When the bridge goes away it says so and reconnects every second; the app never
//! waits on it.

use crate::app::{Event, Request};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::time::Duration;

/// Starts the worker; returns where to send requests.
pub fn spawn(path: PathBuf, events: Sender<Event>) -> Sender<Request> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || run(&path, &events, &rx));
    tx
}

fn run(path: &Path, events: &Sender<Event>, requests: &Receiver<Request>) {
    loop {
        match UnixStream::connect(path) {
            Ok(s) => {
                subscribe(path, events.clone());
                if events.send(Event::Connected).is_err() {
                    return;
                }
                let why = serve(s, events, requests);
                if events.send(Event::Disconnected(why)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let why = format!(
                    "cannot connect to {}: {e} (is qs-bridge running?)",
                    path.display()
                );
                if events.send(Event::Disconnected(why)).is_err() {
                    return;
                }
                // Requests made meanwhile are for a bridge that is not there.
                while requests.try_recv().is_ok() {}
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Requests and answers until the socket fails; returns why.
fn serve(s: UnixStream, events: &Sender<Event>, requests: &Receiver<Request>) -> String {
    // A rollback's answer waits for the machine over the serial link: long, but bounded.
    let _ = s.set_read_timeout(Some(Duration::from_secs(90)));
    let Ok(mut out) = s.try_clone() else {
        return "cannot use the socket".into();
    };
    let mut lines = BufReader::new(s).lines();
    loop {
        let Ok(first) = requests.recv_timeout(Duration::from_secs(5)) else {
            continue;
        };
        // Polls that piled up behind a slow answer are asked once.
        let mut batch = vec![first];
        while let Ok(r) = requests.try_recv() {
            if !batch.contains(&r) || !matches!(r, Request::Status | Request::List) {
                batch.push(r);
            }
        }
        for req in batch {
            if let Err(e) = writeln!(out, "{}", req.line()).and_then(|()| out.flush()) {
                return format!("the bridge went away ({e})");
            }
            let answer = match lines.next() {
                Some(Ok(l)) => l,
                Some(Err(e)) => return format!("the bridge went away ({e})"),
                None => return "the bridge closed the connection".into(),
            };
            let v = serde_json::from_str(&answer).unwrap_or_else(
                |e| serde_json::json!({"ok": false, "error": format!("unreadable answer ({e})")}),
            );
            if events.send(Event::Answer(req, v)).is_err() {
                return "quit".into();
            }
        }
    }
}

/// A second connection that only listens to what the bridge pushes.
fn subscribe(path: &Path, events: Sender<Event>) {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let Ok(mut s) = UnixStream::connect(&path) else {
            return;
        };
        if writeln!(s, "subscribe").is_err() {
            return;
        }
        for line in BufReader::new(s).lines() {
            let Ok(line) = line else { return };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v.get("event").is_some() && events.send(Event::Pushed(v)).is_err() {
                return;
            }
        }
    });
}
