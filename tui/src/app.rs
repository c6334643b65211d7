//! The TUI's state and the one place it changes: [`App::update`] takes an [`Event`] and
//! returns the requests to send to the bridge. Drawing (`ui`) only reads it; the worker
//! (`worker`) only turns requests into socket lines and answers into events. So every key and
//! every answer is testable without a terminal or a socket.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use serde_json::Value;
use std::collections::VecDeque;

/// The numbered panes, as the keys `1`-`4` select them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pane {
    Machine,
    Checkpoints,
    Compare,
    Activity,
}

impl Pane {
    pub const ALL: [Pane; 4] = [
        Pane::Machine,
        Pane::Checkpoints,
        Pane::Compare,
        Pane::Activity,
    ];
    pub fn title(self) -> &'static str {
        match self {
            Pane::Machine => "Machine",
            Pane::Checkpoints => "Checkpoints",
            Pane::Compare => "Compare",
            Pane::Activity => "Activity",
        }
    }
}

/// A line to the bridge's control socket (its `help` lists them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Status,
    List,
    Take,
    Rollback(u32),
    Delete(u32),
    /// Checkpoint `id` into `path` on this machine, over the link.
    Export {
        id: u32,
        path: String,
        elf: bool,
    },
    ExportStatus,
    ExportCancel,
    /// Where each CPU of checkpoint `id` was (for its details).
    Cpus(u32),
    /// What changed between checkpoints `a` and `b`, or since `a` (`None`).
    Compare {
        a: u32,
        b: Option<u32>,
    },
    /// The hv's statistics (each CPU's mode, exits by reason), read over the link.
    Stats,
    /// The periodic ring: every `every_ms` ms (0: off), the last `keep` kept.
    Periodic {
        every_ms: u32,
        keep: u32,
    },
}

impl Request {
    pub fn line(&self) -> String {
        match self {
            Request::Status => "status".into(),
            Request::List => "checkpoints".into(),
            Request::Take => "checkpoint".into(),
            Request::Rollback(id) => format!("rollback {id}"),
            Request::Delete(id) => format!("delete {id}"),
            Request::Export { id, path, elf } => {
                format!("export {id} {path} {}", if *elf { "elf" } else { "qsc" })
            }
            Request::ExportStatus => "export-status".into(),
            Request::ExportCancel => "export-cancel".into(),
            Request::Cpus(id) => format!("cpus {id}"),
            Request::Compare { a, b: Some(b) } => format!("compare {a} {b}"),
            Request::Compare { a, b: None } => format!("compare {a} now"),
            Request::Stats => "stats".into(),
            Request::Periodic { every_ms: 0, .. } => "periodic off".into(),
            Request::Periodic { every_ms, keep } => format!("periodic {every_ms} {keep}"),
        }
    }
}

/// What reaches the app.
#[derive(Clone, Debug)]
pub enum Event {
    Key(KeyEvent),
    /// Once a second: what is polled.
    Tick,
    /// The bridge answered a request.
    Answer(Request, Value),
    /// The bridge pushed an event (a checkpoint, a rollback, a delete, by anyone).
    Pushed(Value),
    /// The socket is up, or down and why.
    Connected,
    Disconnected(String),
}

/// One checkpoint kept, as `checkpoints` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub id: u32,
    pub parent: u32,
    pub age_ms: u64,
    pub pause_us: u64,
    pub pages: u64,
    pub bytes: u64,
    pub cpus: u32,
    pub periodic: bool,
    pub current: bool,
}

impl Checkpoint {
    fn from_json(v: &Value) -> Option<Checkpoint> {
        let n = |k: &str| v.get(k).and_then(Value::as_u64);
        Some(Checkpoint {
            id: n("id")? as u32,
            parent: n("parent").unwrap_or(0) as u32,
            age_ms: n("age_ms").unwrap_or(0),
            pause_us: n("pause_us").unwrap_or(0),
            pages: n("pages").unwrap_or(0),
            bytes: n("bytes").unwrap_or(0),
            cpus: n("cpus").unwrap_or(0) as u32,
            periodic: v.get("periodic").and_then(Value::as_bool).unwrap_or(false),
            current: v.get("current").and_then(Value::as_bool).unwrap_or(false),
        })
    }
}

/// A destructive action waiting for the user's deliberate yes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dialog {
    Rollback(Checkpoint),
    Delete(Checkpoint),
    /// Where to export a checkpoint (a path on this machine being typed) and in which format.
    Export {
        id: u32,
        path: String,
        elf: bool,
    },
    /// The periodic ring's setting being typed: "MS KEEP" or "off".
    Periodic(String),
}

/// The whole state.
#[derive(Debug)]
pub struct App {
    pub pane: Pane,
    pub connected: bool,
    /// Why the socket is down, while it is.
    pub down_reason: Option<String>,
    /// The bridge's `status` answer.
    pub status: Option<Value>,
    pub checkpoints: Vec<Checkpoint>,
    /// The hv's statistics, the last answer.
    pub stats: Option<Value>,
    /// The hv's exits per second, all CPUs, one a `stats` (every [`STATS_EVERY`] s).
    pub exit_rate: VecDeque<u64>,
    /// The exits counted at the last `stats`, and when (seconds since start).
    pub last_exits: Option<(u64, u64)>,
    /// Bytes per second the link carried to the bridge, one a status (a second), newest last.
    pub link_rate: VecDeque<u64>,
    /// The bridge's count of link bytes at the last status.
    pub last_link_bytes: Option<u64>,
    /// From the last list: the periodic ring (interval in ms, 0 = off; how many it keeps).
    pub periodic: Option<(u64, u64)>,
    /// From the last list: checkpoint memory (size, used) and CPUs in guest mode.
    pub memory: Option<(u64, u64)>,
    pub active_cpus: Option<u64>,
    /// The selected row of the (filtered) table.
    pub selected: usize,
    pub filter: String,
    pub editing_filter: bool,
    pub dialog: Option<Dialog>,
    pub help: bool,
    /// The checkpoint whose details are shown (Enter).
    pub details: Option<Checkpoint>,
    /// Its CPUs, once the bridge has read them (`cpus ID`), or why not.
    pub details_cpus: Option<Value>,
    /// The checkpoint marked (`m`) as the first of a comparison.
    pub marked: Option<u32>,
    /// The comparison asked for, and its answer once it came.
    pub compare: Option<(Request, Option<Value>)>,
    /// What happened, newest last: (seconds since start, text).
    pub log: VecDeque<(u64, String)>,
    /// Seconds since start (ticks).
    pub now: u64,
    /// A request in flight, shown in the help bar.
    pub busy: Option<String>,
    /// The export over the link of the moment, or the last one (the bridge's `export-status`).
    pub export: Option<Value>,
    /// The export this TUI asked for, while it runs: asked again if the bridge comes back
    /// without it (a new bridge continues from what the old one staged).
    pub export_asked: Option<Request>,
    /// Where relative export paths are (the TUI's folder; the bridge's may be another).
    pub dir: std::path::PathBuf,
    pub quit: bool,
}

/// Seconds between two `stats` (about 700 bytes over the link for 2 CPUs: 140 bytes a second,
/// 1.2% of a real 115200-baud line).
pub const STATS_EVERY: u64 = 5;
/// Seconds of link rate the Activity pane keeps.
pub const RATE_SAMPLES: usize = 300;
/// Lines the event log keeps.
const LOG_LINES: usize = 500;
/// Seconds between two lists when no event says the list changed: the list crosses the serial
/// link (about 60 bytes per checkpoint), the status does not.
pub const LIST_EVERY: u64 = 10;

impl Default for App {
    fn default() -> Self {
        App {
            pane: Pane::Checkpoints,
            connected: false,
            down_reason: None,
            status: None,
            checkpoints: Vec::new(),
            periodic: None,
            memory: None,
            active_cpus: None,
            link_rate: VecDeque::new(),
            last_link_bytes: None,
            stats: None,
            exit_rate: VecDeque::new(),
            last_exits: None,
            selected: 0,
            filter: String::new(),
            editing_filter: false,
            dialog: None,
            help: false,
            details: None,
            details_cpus: None,
            marked: None,
            compare: None,
            log: VecDeque::new(),
            now: 0,
            busy: None,
            export: None,
            export_asked: None,
            dir: std::path::PathBuf::new(),
            quit: false,
        }
    }
}

impl App {
    /// The checkpoints the filter lets through (it matches the id, `periodic` or `manual`).
    pub fn visible(&self) -> Vec<&Checkpoint> {
        let f = self.filter.trim();
        self.checkpoints
            .iter()
            .filter(|c| {
                f.is_empty()
                    || c.id.to_string() == f
                    || (f == "periodic" && c.periodic)
                    || (f == "manual" && !c.periodic)
                    || (f == "current" && c.current)
            })
            .collect()
    }

    pub fn selected_checkpoint(&self) -> Option<Checkpoint> {
        self.visible().get(self.selected).map(|c| (*c).clone())
    }

    fn note(&mut self, text: impl Into<String>) {
        self.log.push_back((self.now, text.into()));
        while self.log.len() > LOG_LINES {
            self.log.pop_front();
        }
    }

    /// Applies `ev`; returns what to ask the bridge.
    pub fn update(&mut self, ev: Event) -> Vec<Request> {
        match ev {
            Event::Key(k) => self.key(k),
            Event::Tick => {
                self.now += 1;
                let mut r = vec![Request::Status];
                if self.connected && self.now.is_multiple_of(LIST_EVERY) {
                    r.push(Request::List);
                }
                // Not while an export has the link: every byte counts then.
                if self.connected && self.now.is_multiple_of(STATS_EVERY) && !self.exporting() {
                    r.push(Request::Stats);
                }
                r
            }
            Event::Connected => {
                self.connected = true;
                self.down_reason = None;
                self.note("connected to qs-bridge");
                vec![
                    Request::Status,
                    Request::List,
                    Request::ExportStatus,
                    Request::Stats,
                ]
            }
            Event::Disconnected(why) => {
                // A new bridge counts from zero.
                self.last_link_bytes = None;
                self.last_exits = None;
                if self.connected || self.down_reason.as_deref() != Some(&why) {
                    self.note(format!("qs-bridge: {why}; reconnecting"));
                }
                self.connected = false;
                self.down_reason = Some(why);
                self.busy = None;
                Vec::new()
            }
            Event::Answer(req, v) => self.answer(req, v),
            Event::Pushed(v) if v.get("event").and_then(Value::as_str) == Some("export") => {
                self.export_progress(v);
                Vec::new()
            }
            Event::Pushed(v) => {
                let what = v.get("event").and_then(Value::as_str).unwrap_or("?");
                let id = v.get("id").map(|i| i.to_string()).unwrap_or_default();
                self.note(match what {
                    "checkpoint" => format!("checkpoint {id} taken"),
                    "rollback" => format!("the machine was rolled back to checkpoint {id}"),
                    "delete" => format!("checkpoint(s) {id} deleted"),
                    other => format!("event {other} {id}"),
                });
                vec![Request::List]
            }
        }
    }

    /// The export's progress, from an event or `export-status`; an end is logged once.
    fn export_progress(&mut self, v: Value) {
        let state = |e: &Option<Value>| {
            e.as_ref()
                .and_then(|e| e.get("state"))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let (was, now) = (state(&self.export), state(&Some(v.clone())));
        if was != now {
            let path = v.get("path").and_then(Value::as_str).unwrap_or("?");
            let id = v.get("id").and_then(Value::as_u64).unwrap_or(0);
            match now.as_deref() {
                Some("done") => self.note(format!(
                    "exported checkpoint {id} to {path}: {} MiB",
                    v.get("file_bytes").and_then(Value::as_u64).unwrap_or(0) >> 20
                )),
                Some("failed") => self.note(format!(
                    "the export of checkpoint {id} failed: {}",
                    v.get("error").and_then(Value::as_str).unwrap_or("?")
                )),
                Some("cancelled") => {
                    self.note(format!("the export of checkpoint {id} was cancelled"))
                }
                _ => {}
            }
        }
        if now.as_deref() != Some("running") {
            self.export_asked = None;
        }
        self.export = Some(v);
    }

    fn answer(&mut self, req: Request, v: Value) -> Vec<Request> {
        let ok = v.get("ok").and_then(Value::as_bool).unwrap_or(true);
        if !matches!(
            req,
            Request::Status
                | Request::List
                | Request::ExportStatus
                | Request::Cpus(_)
                | Request::Compare { .. }
                | Request::Stats
        ) {
            self.busy = None;
        }
        if req == Request::Stats {
            if ok {
                self.stats_answer(v);
            }
            return Vec::new();
        }
        if let Request::Compare { .. } = req {
            if self.compare.as_ref().is_some_and(|(r, _)| *r == req) {
                self.compare = Some((req, Some(v)));
            }
            return Vec::new();
        }
        if let Request::Cpus(id) = req {
            // For the details still open on that checkpoint; a refusal is shown there.
            if self.details.as_ref().is_some_and(|c| c.id == id) {
                self.details_cpus = Some(v);
            }
            return Vec::new();
        }
        if !ok {
            let why = v.get("error").and_then(Value::as_str).unwrap_or("refused");
            self.note(format!("{} refused: {why}", req.line()));
            return Vec::new();
        }
        match req {
            Request::Status => {
                if let Some(now) = v.get("link_bytes").and_then(Value::as_u64) {
                    if let Some(before) = self.last_link_bytes {
                        self.link_rate.push_back(now.saturating_sub(before));
                        while self.link_rate.len() > RATE_SAMPLES {
                            self.link_rate.pop_front();
                        }
                    }
                    self.last_link_bytes = Some(now);
                }
                self.status = Some(v);
                Vec::new()
            }
            Request::List => {
                self.checkpoints = v
                    .get("checkpoints")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Checkpoint::from_json).collect())
                    .unwrap_or_default();
                let n = self.visible().len();
                self.selected = self.selected.min(n.saturating_sub(1));
                let m = |k: &str| v.get("memory")?.get(k)?.as_u64();
                self.memory = m("capacity_bytes").zip(m("used_bytes"));
                self.active_cpus = v.get("active_cpus").and_then(Value::as_u64);
                let p = |k: &str| v.get("periodic")?.get(k)?.as_u64();
                self.periodic = p("every_ms").zip(p("keep"));
                Vec::new()
            }
            Request::Take => {
                let id = v.get("id").and_then(Value::as_u64).unwrap_or(0);
                let pause = v.get("pause_us").and_then(Value::as_u64).unwrap_or(0);
                self.note(format!(
                    "took checkpoint {id}: every CPU stopped {pause} us"
                ));
                vec![Request::List]
            }
            Request::Rollback(id) => {
                self.note(format!("rolled back to checkpoint {id}"));
                vec![Request::List]
            }
            Request::Delete(id) => {
                self.note(format!("deleted checkpoint {id}"));
                vec![Request::List]
            }
            Request::Export { id, ref path, .. } => {
                self.note(format!("exporting checkpoint {id} to {path}"));
                self.export_asked = Some(req.clone());
                self.export = None;
                if let Some(e) = v.get("export") {
                    self.export_progress(e.clone());
                }
                Vec::new()
            }
            Request::ExportStatus => {
                let e = v.get("export").filter(|e| !e.is_null()).cloned();
                let running =
                    e.as_ref().and_then(|e| e.get("state")) == Some(&Value::from("running"));
                match self.export_asked.take() {
                    // The bridge came back without the export this TUI asked for: a new
                    // bridge continues it from what the last one staged.
                    Some(again) if !running => {
                        self.note("qs-bridge came back without the export: asking it to continue");
                        return vec![again];
                    }
                    asked => {
                        self.export_asked = asked;
                        if let Some(e) = e {
                            self.export_progress(e);
                        }
                    }
                }
                Vec::new()
            }
            Request::Periodic { every_ms: 0, .. } => {
                self.note("the periodic ring stopped (its checkpoints stay until deleted)");
                vec![Request::List]
            }
            Request::Periodic { every_ms, keep } => {
                self.note(format!(
                    "a checkpoint every {every_ms} ms from now on, the last {keep} kept"
                ));
                vec![Request::List]
            }
            Request::ExportCancel => {
                self.note("cancelling the export");
                self.export_asked = None;
                Vec::new()
            }
            // Answered above.
            Request::Cpus(_) | Request::Compare { .. } | Request::Stats => Vec::new(),
        }
    }

    /// A `stats` answer: kept, and the exits per second since the last one.
    fn stats_answer(&mut self, v: Value) {
        let total: u64 = v
            .get("cpus")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("exits")?.as_object())
            .flat_map(|e| e.values().filter_map(Value::as_u64))
            .sum();
        if let Some((t, before)) = self.last_exits {
            let secs = self.now.saturating_sub(t).max(1);
            self.exit_rate
                .push_back(total.saturating_sub(before) / secs);
            while self.exit_rate.len() > RATE_SAMPLES {
                self.exit_rate.pop_front();
            }
        }
        self.last_exits = Some((self.now, total));
        self.stats = Some(v);
    }

    /// The periodic dialog's keys: digits, a space and `off` edit it, Enter asks, Esc cancels.
    fn periodic_key(&mut self, k: KeyEvent, mut text: String) -> Vec<Request> {
        match k.code {
            KeyCode::Esc => return Vec::new(),
            KeyCode::Enter => {
                let words: Vec<&str> = text.split_whitespace().collect();
                let req = match words.as_slice() {
                    ["off"] => Some(Request::Periodic {
                        every_ms: 0,
                        keep: 0,
                    }),
                    [ms] => ms
                        .parse()
                        .ok()
                        .map(|every_ms| Request::Periodic { every_ms, keep: 20 }),
                    [ms, keep] => ms
                        .parse()
                        .ok()
                        .zip(keep.parse().ok())
                        .map(|(every_ms, keep)| Request::Periodic { every_ms, keep }),
                    _ => None,
                };
                return match req {
                    Some(r) => {
                        self.busy = Some("setting the periodic ring".into());
                        vec![r]
                    }
                    None => {
                        self.note("periodic: type MS KEEP (1000 20) or off");
                        Vec::new()
                    }
                };
            }
            KeyCode::Backspace => {
                text.pop();
            }
            KeyCode::Char(c) if c.is_ascii_alphanumeric() || c == ' ' => text.push(c),
            _ => {}
        }
        self.dialog = Some(Dialog::Periodic(text));
        Vec::new()
    }

    /// Whether an export runs now.
    pub fn exporting(&self) -> bool {
        self.export.as_ref().and_then(|e| e.get("state")) == Some(&Value::from("running"))
    }

    /// The export dialog's keys: typing edits the path, Tab switches the format, Enter asks
    /// the bridge, Esc cancels.
    fn export_key(
        &mut self,
        k: KeyEvent,
        id: u32,
        mut path: String,
        mut elf: bool,
    ) -> Vec<Request> {
        match k.code {
            KeyCode::Esc => return Vec::new(),
            KeyCode::Enter => {
                let p = self.dir.join(path.trim());
                let path = p.display().to_string();
                if path.contains(char::is_whitespace) || path.trim().is_empty() {
                    self.note("the export's path must not contain spaces: type another");
                    return Vec::new();
                }
                self.busy = Some(format!("asking the bridge to export checkpoint {id}"));
                return vec![Request::Export { id, path, elf }];
            }
            KeyCode::Tab => {
                elf = !elf;
                let (from, to) = if elf {
                    (".qsc", ".elf")
                } else {
                    (".elf", ".qsc")
                };
                if let Some(stem) = path.strip_suffix(from) {
                    path = format!("{stem}{to}");
                }
            }
            KeyCode::Backspace => {
                path.pop();
            }
            KeyCode::Char(c) => path.push(c),
            _ => {}
        }
        self.dialog = Some(Dialog::Export { id, path, elf });
        Vec::new()
    }

    fn key(&mut self, k: KeyEvent) -> Vec<Request> {
        if k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c') {
            self.quit = true;
            return Vec::new();
        }
        if let Some(d) = self.dialog.clone() {
            self.dialog = None;
            if let Dialog::Export { id, path, elf } = d {
                return self.export_key(k, id, path, elf);
            }
            if let Dialog::Periodic(text) = d {
                return self.periodic_key(k, text);
            }
            // Only a deliberate `y` goes ahead; anything else (Enter, Esc, n) is No.
            if k.code == KeyCode::Char('y') {
                let (busy, req) = match d {
                    Dialog::Rollback(c) => (
                        format!("rolling back to checkpoint {}", c.id),
                        Request::Rollback(c.id),
                    ),
                    Dialog::Delete(c) => (
                        format!("deleting checkpoint {}", c.id),
                        Request::Delete(c.id),
                    ),
                    Dialog::Export { .. } | Dialog::Periodic(_) => return Vec::new(),
                };
                self.busy = Some(busy);
                return vec![req];
            }
            return Vec::new();
        }
        if self.editing_filter {
            match k.code {
                KeyCode::Enter => self.editing_filter = false,
                KeyCode::Esc => {
                    self.editing_filter = false;
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) => self.filter.push(c),
                _ => {}
            }
            self.selected = 0;
            return Vec::new();
        }
        if self.help || self.details.is_some() {
            self.help = false;
            self.details = None;
            return Vec::new();
        }
        match k.code {
            KeyCode::Char('q') => self.quit = true,
            KeyCode::Char('?') => self.help = true,
            KeyCode::Char(c @ '1'..='4') => self.pane = Pane::ALL[(c as u8 - b'1') as usize],
            KeyCode::Tab => {
                let i = Pane::ALL.iter().position(|&p| p == self.pane).unwrap_or(0);
                self.pane = Pane::ALL[(i + 1) % Pane::ALL.len()];
            }
            KeyCode::Esc => {
                self.filter.clear();
                self.pane = Pane::Checkpoints;
            }
            KeyCode::Char('/') if self.pane == Pane::Checkpoints => self.editing_filter = true,
            KeyCode::Down | KeyCode::Char('j') => {
                let n = self.visible().len();
                if self.selected + 1 < n {
                    self.selected += 1;
                }
            }
            KeyCode::Up | KeyCode::Char('k') => self.selected = self.selected.saturating_sub(1),
            KeyCode::Char('c') if self.connected => {
                self.busy = Some("taking a checkpoint".into());
                return vec![Request::Take];
            }
            KeyCode::Char('r') if self.pane == Pane::Checkpoints => {
                self.dialog = self.selected_checkpoint().map(Dialog::Rollback);
            }
            KeyCode::Char('d') if self.pane == Pane::Checkpoints => {
                self.dialog = self.selected_checkpoint().map(Dialog::Delete);
            }
            KeyCode::Char('e') if self.pane == Pane::Checkpoints && self.connected => {
                if self.exporting() {
                    self.note("an export is under way: x cancels it");
                } else if let Some(c) = self.selected_checkpoint() {
                    self.dialog = Some(Dialog::Export {
                        id: c.id,
                        path: self
                            .dir
                            .join(format!("checkpoint-{}.qsc", c.id))
                            .display()
                            .to_string(),
                        elf: false,
                    });
                }
            }
            KeyCode::Char('x') if self.exporting() => return vec![Request::ExportCancel],
            KeyCode::Char('p') if self.pane == Pane::Checkpoints && self.connected => {
                // The likely next step: off if it runs, a second's interval if not.
                let text = match self.periodic {
                    Some((ms, _)) if ms > 0 => "off".to_string(),
                    _ => "1000 20".to_string(),
                };
                self.dialog = Some(Dialog::Periodic(text));
            }
            KeyCode::Char('m') if self.pane == Pane::Checkpoints => {
                self.marked = self.selected_checkpoint().map(|c| c.id);
                if let Some(id) = self.marked {
                    self.note(format!(
                        "checkpoint {id} marked: select another and press = to compare, or n on the Compare pane for now"
                    ));
                }
            }
            KeyCode::Char('=') | KeyCode::Char('n') if self.connected => {
                // `=`: the marked checkpoint (or the selected one) with the selected one;
                // `n`: with now.
                let sel = self.selected_checkpoint().map(|c| c.id);
                let (a, b) = match (k.code, self.marked, sel) {
                    (KeyCode::Char('n'), Some(m), _) => (m, None),
                    (KeyCode::Char('n'), None, Some(s)) => (s, None),
                    (_, Some(m), Some(s)) if m != s => (m, Some(s)),
                    (_, None, Some(s)) => (s, None),
                    (_, Some(m), _) => (m, None),
                    _ => return Vec::new(),
                };
                let req = Request::Compare { a, b };
                self.compare = Some((req.clone(), None));
                self.pane = Pane::Compare;
                return vec![req];
            }
            KeyCode::Char('l') => return vec![Request::List],
            KeyCode::Enter if self.pane == Pane::Checkpoints => {
                self.details = self.selected_checkpoint();
                self.details_cpus = None;
                if let Some(c) = &self.details {
                    if self.connected {
                        return vec![Request::Cpus(c.id)];
                    }
                }
            }
            _ => {}
        }
        Vec::new()
    }
}

/// "2 min 10 s", "12.4 s", "850 ms".
pub fn age(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{} min {} s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{} h {} min", ms / 3_600_000, ms / 60_000 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(c: char) -> Event {
        Event::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE))
    }

    fn app_with_two() -> App {
        let mut a = App::default();
        a.update(Event::Connected);
        a.update(Event::Answer(
            Request::List,
            json!({"ok": true, "count": 2, "checkpoints": [
                {"id": 1, "parent": 0, "age_ms": 130_000, "pause_us": 1800, "pages": 10, "bytes": 40960, "cpus": 2, "periodic": false, "current": false},
                {"id": 2, "parent": 1, "age_ms": 900, "pause_us": 1500, "pages": 3, "bytes": 12288, "cpus": 2, "periodic": true, "current": true}
            ]}),
        ));
        a
    }

    #[test]
    fn a_rollback_asks_first_and_only_y_goes_ahead() {
        let mut a = app_with_two();
        assert!(
            a.update(key('r')).is_empty(),
            "nothing is sent before the answer"
        );
        assert!(matches!(a.dialog, Some(Dialog::Rollback(ref c)) if c.id == 1));
        assert!(a
            .update(Event::Key(KeyEvent::new(
                KeyCode::Enter,
                KeyModifiers::NONE
            )))
            .is_empty());
        assert_eq!(a.dialog, None, "Enter is No");
        a.update(key('r'));
        assert_eq!(a.update(key('y')), vec![Request::Rollback(1)]);
        assert!(a.busy.is_some());
    }

    #[test]
    fn delete_and_take_and_the_list_follows_what_was_done() {
        let mut a = app_with_two();
        a.update(Event::Key(KeyEvent::new(KeyCode::Down, KeyModifiers::NONE)));
        a.update(key('d'));
        assert_eq!(a.update(key('y')), vec![Request::Delete(2)]);
        assert_eq!(a.update(key('c')), vec![Request::Take]);
        let next = a.update(Event::Answer(
            Request::Take,
            json!({"ok": true, "id": 3, "pause_us": 2000}),
        ));
        assert_eq!(next, vec![Request::List]);
        assert!(a
            .log
            .back()
            .is_some_and(|(_, t)| t.contains("took checkpoint 3")));
    }

    #[test]
    fn p_sets_the_periodic_ring_or_stops_it() {
        let mut a = app_with_two();
        let enter = || Event::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE));
        // Off (no list said otherwise): the dialog offers a second's interval, 20 kept.
        a.update(key('p'));
        assert_eq!(a.dialog, Some(Dialog::Periodic("1000 20".into())));
        let backspace = || Event::Key(KeyEvent::new(KeyCode::Backspace, KeyModifiers::NONE));
        a.update(backspace());
        a.update(backspace());
        a.update(key('3'));
        assert_eq!(
            a.update(enter()),
            vec![Request::Periodic {
                every_ms: 1000,
                keep: 3
            }]
        );
        // On: it offers off.
        a.periodic = Some((1000, 3));
        a.update(key('p'));
        assert_eq!(a.dialog, Some(Dialog::Periodic("off".into())));
        assert_eq!(
            a.update(enter()),
            vec![Request::Periodic {
                every_ms: 0,
                keep: 0
            }]
        );
        assert_eq!(
            Request::Periodic {
                every_ms: 0,
                keep: 0
            }
            .line(),
            "periodic off"
        );
    }

    #[test]
    fn a_refusal_is_logged_with_the_bridges_words() {
        let mut a = app_with_two();
        a.update(Event::Answer(
            Request::Take,
            json!({"ok": false, "error": "checkpoint refused: the checkpoint memory is full"}),
        ));
        assert!(a
            .log
            .back()
            .is_some_and(|(_, t)| t.contains("memory is full")));
    }

    #[test]
    fn the_filter_keeps_matching_rows_and_esc_clears_it() {
        let mut a = app_with_two();
        a.update(key('/'));
        for c in "periodic".chars() {
            a.update(key(c));
        }
        a.update(Event::Key(KeyEvent::new(
            KeyCode::Enter,
            KeyModifiers::NONE,
        )));
        assert_eq!(a.visible().len(), 1);
        assert_eq!(a.selected_checkpoint().map(|c| c.id), Some(2));
        a.update(Event::Key(KeyEvent::new(KeyCode::Esc, KeyModifiers::NONE)));
        assert_eq!(a.visible().len(), 2);
    }

    #[test]
    fn the_list_is_polled_rarely_and_refreshed_on_events() {
        let mut a = app_with_two();
        let lists = (0..LIST_EVERY)
            .flat_map(|_| a.update(Event::Tick))
            .filter(|r| *r == Request::List)
            .count();
        assert_eq!(lists, 1, "once per {LIST_EVERY} s");
        assert_eq!(
            a.update(Event::Pushed(json!({"event": "checkpoint", "id": 9}))),
            vec![Request::List]
        );
    }

    #[test]
    fn a_lost_bridge_is_said_once_and_q_quits() {
        let mut a = app_with_two();
        a.update(Event::Disconnected("connection refused".into()));
        a.update(Event::Disconnected("connection refused".into()));
        let said = a
            .log
            .iter()
            .filter(|(_, t)| t.contains("reconnecting"))
            .count();
        assert_eq!(said, 1);
        assert!(!a.connected);
        a.update(key('q'));
        assert!(a.quit);
    }

    #[test]
    fn ages_read_as_people_say_them() {
        assert_eq!(age(850), "850 ms");
        assert_eq!(age(12_400), "12.4 s");
        assert_eq!(age(130_000), "2 min 10 s");
    }
}
