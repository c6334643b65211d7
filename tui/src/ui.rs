//! Drawing: a pure function of the state ([`draw`]). Numbered panes along the top, the pane,
//! a help bar at the bottom; a dialog or the help over them.

use crate::app::{age, App, Dialog, Pane};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Clear, Paragraph, Row, Table, Wrap};
use ratatui::Frame;

pub fn draw(f: &mut Frame, app: &App) {
    let [top, body, bottom] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(f.area());
    tabs(f, app, top);
    match app.pane {
        Pane::Machine => machine(f, app, body),
        Pane::Checkpoints => checkpoints(f, app, body),
        Pane::Compare => compare(f, app, body),
        Pane::Activity => activity(f, app, body),
    }
    help_bar(f, app, bottom);
    if let Some(d) = &app.dialog {
        dialog(f, d);
    } else if let Some(c) = &app.details {
        details(f, c, app.details_cpus.as_ref());
    } else if app.help {
        help(f);
    }
}

fn tabs(f: &mut Frame, app: &App, area: Rect) {
    let mut spans = Vec::new();
    for (i, p) in Pane::ALL.iter().enumerate() {
        let style = if *p == app.pane {
            Style::default().add_modifier(Modifier::REVERSED | Modifier::BOLD)
        } else {
            Style::default()
        };
        spans.push(Span::styled(format!(" {} {} ", i + 1, p.title()), style));
        spans.push(Span::raw(" "));
    }
    let link = if app.connected {
        let state = app
            .status
            .as_ref()
            .and_then(|s| s.get("link"))
            .and_then(|l| l.as_str())
            .unwrap_or("?");
        Span::styled(format!(" link {state} "), Style::default().fg(Color::Green))
    } else {
        Span::styled(" qs-bridge not connected ", Style::default().fg(Color::Red))
    };
    spans.push(link);
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn machine(f: &mut Frame, app: &App, area: Rect) {
    let s = app.status.as_ref();
    let field = |k: &str| {
        s.and_then(|s| s.get(k))
            .map(|v| match v {
                serde_json::Value::String(t) => t.clone(),
                serde_json::Value::Null => "none".into(),
                other => other.to_string(),
            })
            .unwrap_or_else(|| "unknown".into())
    };
    let held: u64 = app.checkpoints.iter().map(|c| c.bytes).sum();
    // The hv: stopped for gdb, active (CPUs in guest mode, from the last list), or dormant.
    let hv = match (field("session").as_str(), app.active_cpus) {
        ("stopped", _) => "every CPU stopped for gdb".to_string(),
        (_, Some(0)) => "dormant: the kernel runs natively".to_string(),
        (_, Some(n)) => format!("active: {n} CPUs run as its guests"),
        (_, None) => "unknown (no list yet)".to_string(),
    };
    let mut lines = vec![
        Line::from(format!("link:           {}", field("link"))),
        Line::from(format!("hv:             {hv}")),
        Line::from(format!("gdb session:    {}", field("session"))),
        Line::from(format!("gdb client:     {}", field("gdb_client"))),
        Line::from(format!("gdb sessions:   {}", field("sessions"))),
        Line::from(format!("console bytes:  {}", field("console_bytes"))),
        Line::from(format!(
            "checkpoints:    {} kept, {} KiB held",
            app.checkpoints.len(),
            held >> 10
        )),
    ];
    // Each CPU, from the hv's statistics (read over the link every few seconds).
    for c in app
        .stats
        .as_ref()
        .and_then(|s| s.get("cpus"))
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
    {
        let n = |k: &str| c.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        let mut exits: Vec<(String, u64)> = c
            .get("exits")
            .and_then(serde_json::Value::as_object)
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
            .filter(|(_, v)| *v > 0)
            .collect();
        exits.sort_by_key(|e| std::cmp::Reverse(e.1));
        let total: u64 = exits.iter().map(|e| e.1).sum();
        let top: Vec<String> = exits
            .iter()
            .take(3)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        lines.push(Line::from(format!(
            "{:<16}{}, {} exits ({}), {} ms in the hv",
            format!("CPU {}:", n("cpu")),
            if c.get("active") == Some(&serde_json::Value::Bool(true)) {
                "guest mode"
            } else {
                "native"
            },
            total,
            top.join(", "),
            n("ms_in_hv")
        )));
    }
    if let Some(why) = &app.down_reason {
        lines.push(Line::from(Span::styled(
            format!("qs-bridge: {why}; retrying every second"),
            Style::default().fg(Color::Red),
        )));
    }
    let block = Block::default().borders(Borders::ALL).title(" Machine ");
    let inner = block.inner(area);
    f.render_widget(block, area);
    let [text, gauge] = Layout::vertical([Constraint::Min(1), Constraint::Length(1)]).areas(inner);
    f.render_widget(Paragraph::new(lines), text);
    // The checkpoint store as a gauge: when it is full the oldest checkpoint goes.
    if let Some((capacity, used)) = app.memory.filter(|m| m.0 > 0) {
        let ratio = (used as f64 / capacity as f64).clamp(0.0, 1.0);
        let color = if ratio > 0.9 {
            Color::Red
        } else {
            Color::Green
        };
        f.render_widget(
            ratatui::widgets::Gauge::default()
                .gauge_style(Style::default().fg(color))
                .ratio(ratio)
                .label(format!(
                    "checkpoint memory: {} of {} ({:.0}%)",
                    size(used),
                    size(capacity),
                    ratio * 100.0
                )),
            gauge,
        );
    }
}

fn checkpoints(f: &mut Frame, app: &App, area: Rect) {
    let area = match &app.export {
        Some(e) => {
            let [table, gauge] =
                Layout::vertical([Constraint::Min(3), Constraint::Length(3)]).areas(area);
            export_gauge(f, e, gauge);
            table
        }
        None => area,
    };
    let header = Row::new(["id", "age", "pause", "pages", "KiB", "parent", "kind"])
        .style(Style::default().add_modifier(Modifier::BOLD));
    let rows = app.visible().into_iter().enumerate().map(|(i, c)| {
        let style = if i == app.selected {
            Style::default().add_modifier(Modifier::REVERSED)
        } else {
            Style::default()
        };
        let kind = match (c.periodic, c.current) {
            (true, true) => "periodic, current",
            (true, false) => "periodic",
            (false, true) => "manual, current",
            (false, false) => "manual",
        };
        Row::new([
            Cell::from(c.id.to_string()),
            Cell::from(age(c.age_ms)),
            Cell::from(format!("{:.1} ms", c.pause_us as f64 / 1000.0)),
            Cell::from(c.pages.to_string()),
            Cell::from((c.bytes >> 10).to_string()),
            Cell::from(if c.parent == 0 {
                "-".to_string()
            } else {
                c.parent.to_string()
            }),
            Cell::from(kind),
        ])
        .style(style)
    });
    let title = if app.editing_filter || !app.filter.is_empty() {
        format!(
            " Checkpoints  /{}{} ",
            app.filter,
            if app.editing_filter { "_" } else { "" }
        )
    } else {
        let ring = match app.periodic {
            Some((ms, keep)) if ms > 0 => format!("  periodic every {ms} ms, {keep} kept"),
            Some(_) => "  periodic off".to_string(),
            None => String::new(),
        };
        format!(" Checkpoints ({}){ring} ", app.checkpoints.len())
    };
    let table = Table::new(
        rows,
        [
            Constraint::Length(5),
            Constraint::Length(12),
            Constraint::Length(9),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(7),
            Constraint::Min(8),
        ],
    )
    .header(header)
    .block(Block::default().borders(Borders::ALL).title(title));
    f.render_widget(table, area);
    if app.checkpoints.is_empty() {
        let inner = area.inner(ratatui::layout::Margin::new(2, 2));
        f.render_widget(
            Paragraph::new("No checkpoint is kept. Press c to take one.").wrap(Wrap { trim: true }),
            inner,
        );
    }
}

/// "12.3 MiB", "640 KiB".
fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// The export's progress bar: how much of the checkpoint's RAM is read, the link's rate, the
/// time left; or how it ended.
fn export_gauge(f: &mut Frame, e: &serde_json::Value, area: Rect) {
    let n = |k: &str| e.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let s = |k: &str| e.get(k).and_then(serde_json::Value::as_str).unwrap_or("");
    let (done, total) = (n("done_bytes"), n("total_bytes"));
    let ratio = if total == 0 {
        0.0
    } else {
        (done as f64 / total as f64).clamp(0.0, 1.0)
    };
    let (label, color) = match s("state") {
        "running" => (
            format!(
                "{:.0}% {}: {} of {}, link {}/s, {}  x cancels",
                ratio * 100.0,
                s("phase"),
                size(done),
                size(total),
                size(n("link_bytes_per_s")),
                match e.get("eta_s").and_then(serde_json::Value::as_u64) {
                    Some(t) => format!("{} left", age(t * 1000)),
                    None => "time left not known yet".into(),
                }
            ),
            Color::Cyan,
        ),
        "done" => (
            format!(
                "done: {} written in {}",
                size(n("file_bytes")),
                age((e
                    .get("seconds")
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(0.0)
                    * 1000.0) as u64)
            ),
            Color::Green,
        ),
        "cancelled" => ("cancelled".into(), Color::Yellow),
        _ => (format!("failed: {}", s("error")), Color::Red),
    };
    let title = format!(
        " Export of checkpoint {} to {} ({}) ",
        n("id"),
        s("path"),
        s("format")
    );
    f.render_widget(
        ratatui::widgets::Gauge::default()
            .block(Block::default().borders(Borders::ALL).title(title))
            .gauge_style(Style::default().fg(color))
            .ratio(ratio)
            .label(label),
        area,
    );
}

/// The Compare pane: what changed between two checkpoints, or since one, by region of
/// memory and by the kernel's own names (the bridge reads it from the hv's undo log).
fn compare(f: &mut Frame, app: &App, area: Rect) {
    let block = |t: String| Block::default().borders(Borders::ALL).title(t);
    let Some((req, answer)) = &app.compare else {
        let text = "Nothing compared yet. On the Checkpoints pane: m marks a checkpoint, = \
                    compares it with the selected one (or the selected one with now), n \
                    compares it with now. Kernel regions and variables need the bridge to have \
                    the kernel's vmlinux (qs-bridge --vmlinux FILE; the demo gives it).";
        f.render_widget(
            Paragraph::new(text)
                .wrap(Wrap { trim: true })
                .block(block(" Compare ".into())),
            area,
        );
        return;
    };
    let title = match req {
        crate::app::Request::Compare { a, b: Some(b) } => {
            format!(" Compare: checkpoint {a} with checkpoint {b} ")
        }
        crate::app::Request::Compare { a, b: None } => {
            format!(" Compare: checkpoint {a} with now ")
        }
        other => format!(" {} ", other.line()),
    };
    let Some(v) = answer else {
        f.render_widget(
            Paragraph::new("reading the pages written between them over the link...")
                .block(block(title)),
            area,
        );
        return;
    };
    if v.get("ok") == Some(&serde_json::Value::Bool(false)) {
        let why = v
            .get("error")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("?");
        f.render_widget(
            Paragraph::new(why.to_string())
                .wrap(Wrap { trim: true })
                .style(Style::default().fg(Color::Red))
                .block(block(title)),
            area,
        );
        return;
    }
    let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let mut lines = vec![Line::from(format!(
        "{} pages ({}) written between them{}{}",
        n("pages"),
        size(n("pages") * 4096),
        if v.get("truncated") == Some(&serde_json::Value::Bool(true)) {
            " (more than the agent's buffer holds: the first ones)"
        } else {
            ""
        },
        if v.get("symbols") == Some(&serde_json::Value::Bool(true)) {
            ""
        } else {
            "; regions need qs-bridge --vmlinux"
        }
    ))];
    lines.push(Line::from(""));
    for r in v
        .get("regions")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
    {
        let what = r
            .get("region")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("?");
        let pages = r
            .get("pages")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        let names: Vec<&str> = r
            .get("names")
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(serde_json::Value::as_str)
            .collect();
        let flagged = r.get("flagged") == Some(&serde_json::Value::Bool(true));
        let style = if flagged {
            Style::default().fg(Color::Red).add_modifier(Modifier::BOLD)
        } else {
            Style::default()
        };
        let text = what == "kernel text";
        let unexpected = n("unexpected");
        let why = match (text, flagged) {
            (false, _) => String::new(),
            (true, false) => "  all at places the kernel patches itself".to_string(),
            (true, true) if unexpected > 0 => format!(
                "  {unexpected} written where the kernel never patches itself: a corruption, \
                 a bad module or a rootkit"
            ),
            (true, true) => "  compare two checkpoints to tell the kernel's own patching (jump \
                             labels, static calls, alternatives, ftrace, kprobes) from other \
                             writes"
                .to_string(),
        };
        lines.push(Line::from(vec![
            Span::styled(format!("{what:<44} {pages:>7} pages"), style),
            Span::raw(why),
        ]));
        if !names.is_empty() {
            // One line of names (the bridge sends up to 40 a region): the rest as a count.
            let room = area.width.saturating_sub(20) as usize;
            let mut shown = String::new();
            let mut n = 0;
            for name in &names {
                if shown.len() + name.len() + 2 > room {
                    break;
                }
                if n > 0 {
                    shown.push_str(", ");
                }
                shown.push_str(name);
                n += 1;
            }
            if n < names.len() {
                shown.push_str(&format!(" and {} more", names.len() - n));
            }
            lines.push(Line::from(format!("    {shown}")));
        }
        if text {
            // Each change to the text: where, by whom, its bytes before and after.
            for p in v
                .get("patches")
                .and_then(serde_json::Value::as_array)
                .into_iter()
                .flatten()
            {
                let s = |k: &str| p.get(k).and_then(serde_json::Value::as_str).unwrap_or("?");
                let style = if p.get("expected") == Some(&serde_json::Value::Bool(false)) {
                    Style::default().fg(Color::Red).add_modifier(Modifier::BOLD)
                } else {
                    Style::default()
                };
                // Narrow: the first 5 bytes (an instruction the kernel patches is at most 5).
                let (at_w, bytes) = if area.width >= 120 {
                    (40, 32)
                } else {
                    (18, 10)
                };
                let cut = |h: &str| {
                    if h.len() > bytes {
                        format!("{}..", &h[..bytes])
                    } else {
                        h.to_string()
                    }
                };
                lines.push(Line::from(Span::styled(
                    format!(
                        "    {:<27} {:<at_w$} {} -> {}",
                        s("kind"),
                        s("at"),
                        cut(s("old")),
                        cut(s("new"))
                    ),
                    style,
                )));
            }
        }
    }
    let values: Vec<&serde_json::Value> = v
        .get("values")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    if !values.is_empty() {
        lines.push(Line::from(""));
        lines.push(Line::from(Span::styled(
            "small variables that changed (old -> new):",
            Style::default().add_modifier(Modifier::BOLD),
        )));
        for x in values {
            let s = |k: &str| x.get(k).and_then(serde_json::Value::as_str).unwrap_or("?");
            let u = |k: &str| x.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
            lines.push(Line::from(format!(
                "    {:<40} {} -> {}",
                s("name"),
                u("old"),
                u("new")
            )));
        }
    }
    f.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(block(title)),
        area,
    );
}

/// The Activity pane: sparklines over what the bridge and the list tell (the link's bytes per
/// second; each kept checkpoint's pause and the pages written before it), then the event log.
fn activity(f: &mut Frame, app: &App, area: Rect) {
    let [exits, link, pauses, pages, log] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Length(3),
        Constraint::Length(3),
        Constraint::Length(3),
        Constraint::Min(3),
    ])
    .areas(area);
    let rate: Vec<u64> = app.exit_rate.iter().copied().collect();
    sparkline(
        f,
        exits,
        format!(
            " hv exits per second, all CPUs: {} now, {} at most (every {} s) ",
            rate.last().copied().unwrap_or(0),
            rate.iter().copied().max().unwrap_or(0),
            crate::app::STATS_EVERY
        ),
        &rate,
        Color::Green,
    );
    let rate: Vec<u64> = app.link_rate.iter().copied().collect();
    let last = rate.last().copied().unwrap_or(0);
    let peak = rate.iter().copied().max().unwrap_or(0);
    sparkline(
        f,
        link,
        format!(
            " link to the bridge: {}/s now, {}/s at most (one a second, last {} s) ",
            size(last),
            size(peak),
            rate.len()
        ),
        &rate,
        Color::Cyan,
    );
    let pause: Vec<u64> = app.checkpoints.iter().map(|c| c.pause_us).collect();
    sparkline(
        f,
        pauses,
        format!(
            " checkpoint pauses: last {:.1} ms, longest {:.1} ms (each kept checkpoint, oldest first) ",
            pause.last().copied().unwrap_or(0) as f64 / 1000.0,
            pause.iter().copied().max().unwrap_or(0) as f64 / 1000.0
        ),
        &pause,
        Color::Yellow,
    );
    let dirty: Vec<u64> = app.checkpoints.iter().map(|c| c.pages).collect();
    sparkline(
        f,
        pages,
        format!(
            " pages written before each checkpoint: last {}, most {} ",
            dirty.last().copied().unwrap_or(0),
            dirty.iter().copied().max().unwrap_or(0)
        ),
        &dirty,
        Color::Magenta,
    );
    let room = log.height.saturating_sub(2) as usize;
    let lines: Vec<Line> = app
        .log
        .iter()
        .rev()
        .take(room)
        .rev()
        .map(|(t, text)| Line::from(format!("{:>5} s  {text}", t)))
        .collect();
    f.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" Events ")),
        log,
    );
}

/// One sparkline in a box, the newest values that fit.
fn sparkline(f: &mut Frame, area: Rect, title: String, data: &[u64], color: Color) {
    let width = area.width.saturating_sub(2) as usize;
    let shown = &data[data.len().saturating_sub(width)..];
    f.render_widget(
        ratatui::widgets::Sparkline::default()
            .block(Block::default().borders(Borders::ALL).title(title))
            .style(Style::default().fg(color))
            .data(shown),
        area,
    );
}

fn help_bar(f: &mut Frame, app: &App, area: Rect) {
    let text = if let Some(b) = &app.busy {
        format!(" {b}...")
    } else if app.editing_filter {
        " filter: type an id, periodic, manual or current; Enter keeps it, Esc clears it".into()
    } else {
        match app.pane {
            Pane::Checkpoints => {
                " c take  r rollback  d delete  e export  m mark  = compare  Enter details  ? help  q quit"
                    .into()
            }
            _ => " c take a checkpoint  1-4 panes  ? help  q quit".into(),
        }
    };
    f.render_widget(
        Paragraph::new(text).style(Style::default().add_modifier(Modifier::REVERSED)),
        area,
    );
}

fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

fn dialog(f: &mut Frame, d: &Dialog) {
    let (title, text) =
        match d {
            Dialog::Rollback(c) => (
                " Roll back? ",
                format!(
                "Every process on the machine returns to where it was {} ago, at checkpoint {}. \
                 Checkpoints newer than it are dropped. The kernel logs the rollback.\n\n\
                 y: roll back    any other key: cancel",
                age(c.age_ms),
                c.id
            ),
            ),
            Dialog::Export { id, path, elf } => {
                (
                    " Export ",
                    format!(
                "Checkpoint {id} into a file on this machine, read over the link while the \
                 machine runs on.\n\nPath: {path}_\nFormat: {}\n\n\
                 Enter: export   Tab: {}   Esc: cancel",
                if *elf {
                    "ELF core (crash vmlinux FILE, gdb vmlinux FILE)"
                } else {
                    "Quicksilver's own (.qsc: qs-checkpoint inspect FILE)"
                },
                if *elf { ".qsc instead" } else { "an ELF core instead" },
            ),
                )
            }
            Dialog::Periodic(text) => (
                " Periodic checkpoints ",
                format!(
                    "A checkpoint of the whole machine every MS milliseconds, the last KEEP \
                     kept (older ones go as new ones come); off stops the ring (its \
                     checkpoints stay).\n\nMS KEEP or off: {text}_\n\nEnter: set   Esc: cancel"
                ),
            ),
            Dialog::Delete(c) => (
                " Delete? ",
                format!(
                "Checkpoint {} ({} old, {} KiB) is deleted: the machine can no longer return to \
                 it.\n\ny: delete    any other key: cancel",
                c.id,
                age(c.age_ms),
                c.bytes >> 10
            ),
            ),
        };
    let h = if matches!(d, Dialog::Export { .. }) {
        12
    } else {
        9
    };
    let area = centered(f.area(), 64, h);
    f.render_widget(Clear, area);
    f.render_widget(
        Paragraph::new(text)
            .wrap(Wrap { trim: true })
            .block(Block::default().borders(Borders::ALL).title(title)),
        area,
    );
}

fn details(f: &mut Frame, c: &crate::app::Checkpoint, cpus: Option<&serde_json::Value>) {
    let mut text = format!(
        "checkpoint {}: taken {} ago, {}{}\n\
         parent: {}\n\
         every CPU stopped: {:.1} ms ({} CPUs)\n\
         memory held: {} pages, {} KiB (the pages written since it was taken)\n\n",
        c.id,
        age(c.age_ms),
        if c.periodic {
            "by the periodic ring"
        } else {
            "on request"
        },
        if c.current {
            ", the machine runs on from it"
        } else {
            ""
        },
        if c.parent == 0 {
            "none".to_string()
        } else {
            c.parent.to_string()
        },
        c.pause_us as f64 / 1000.0,
        c.cpus,
        c.pages,
        c.bytes >> 10,
    );
    match cpus {
        None => text.push_str("reading its CPUs over the link...\n"),
        Some(v) if v.get("ok") == Some(&serde_json::Value::Bool(false)) => {
            let why = v
                .get("error")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("?");
            text.push_str(&format!("{why}\n"));
        }
        Some(v) => {
            let have_symbols = v.get("symbols") == Some(&serde_json::Value::Bool(true));
            for cpu in v
                .get("cpus")
                .and_then(serde_json::Value::as_array)
                .into_iter()
                .flatten()
            {
                let s = |k: &str| {
                    cpu.get(k)
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or("?")
                };
                let n = |k: &str| cpu.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
                let place = match cpu.get("symbol").and_then(serde_json::Value::as_str) {
                    Some(sym) => sym.to_string(),
                    None if n("cpl") == 3 => "user space".into(),
                    None if have_symbols => "outside vmlinux (a module?)".into(),
                    None => "(no symbol: qs-bridge --vmlinux FILE)".into(),
                };
                text.push_str(&format!(
                    "CPU {}  {}  {}, interrupts {}\n",
                    n("cpu"),
                    s("rip"),
                    place,
                    if cpu.get("interrupts") == Some(&serde_json::Value::Bool(true)) {
                        "on"
                    } else {
                        "off"
                    }
                ));
            }
        }
    }
    text.push_str(&format!(
        "\nThe devices and the whole memory are in an export: e here, or qsctl export {} FILE \
         in the guest; then qs-checkpoint inspect FILE.\n\nany key: close",
        c.id
    ));
    let lines = text.lines().count() as u16;
    let area = centered(f.area(), 76, lines + 4);
    f.render_widget(Clear, area);
    f.render_widget(
        Paragraph::new(text)
            .wrap(Wrap { trim: true })
            .block(Block::default().borders(Borders::ALL).title(" Details ")),
        area,
    );
}

fn help(f: &mut Frame) {
    let keys = [
        ("1 2 3 4, Tab", "Machine, Checkpoints, Compare, Activity"),
        ("c", "take a checkpoint of the whole machine"),
        ("r", "roll back to the selected checkpoint (asks first)"),
        ("d", "delete the selected checkpoint (asks first)"),
        (
            "e",
            "export the selected checkpoint to a file here, over the link",
        ),
        ("x", "cancel the export under way"),
        ("p", "the periodic ring: on (every MS, KEEP kept) or off"),
        (
            "m, =, n",
            "mark a checkpoint; compare it with the selected one; with now",
        ),
        ("Enter", "the selected checkpoint's details"),
        ("j k, arrows", "move the selection"),
        (
            "/",
            "filter the checkpoints: an id, periodic, manual, current",
        ),
        ("l", "list the checkpoints again now"),
        ("Esc", "back to the checkpoints, filter cleared"),
        ("?", "this help; any key closes it"),
        ("q, Ctrl-C", "quit (the terminal is restored)"),
    ];
    let lines: Vec<Line> = keys
        .iter()
        .map(|(k, d)| Line::from(format!("{k:>13}  {d}")))
        .collect();
    let area = centered(f.area(), 76, keys.len() as u16 + 2);
    f.render_widget(Clear, area);
    f.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" Keys ")),
        area,
    );
}

#[cfg(test)]
mod tests {
    //! Every view and dialog, drawn at 80x24 and at 200x60, as snapshots.
    use super::*;
    use crate::app::{Event, Request};
    use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;
    use serde_json::json;

    fn render(app: &App, w: u16, h: u16) -> String {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| draw(f, app)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..h)
            .map(|y| {
                (0..w)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect::<String>()
                    .trim_end()
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn key(c: char) -> Event {
        Event::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE))
    }

    fn sample() -> App {
        let mut a = App::default();
        a.update(Event::Connected);
        for (i, bytes) in [0u64, 1200, 2400, 9000, 60_000, 340_000, 690_000, 700_000]
            .iter()
            .enumerate()
        {
            a.update(Event::Answer(
                Request::Status,
                json!({"link": "authenticated", "session": "none", "gdb_client": null, "cpus": 2, "sessions": 0, "console_bytes": 5120 + i, "link_bytes": bytes}),
            ));
        }
        a.update(Event::Answer(
            Request::List,
            json!({"ok": true, "count": 3, "memory": {"capacity_bytes": 67_108_864u64, "used_bytes": 1_470_464u64}, "active_cpus": 2, "periodic": {"every_ms": 1000, "keep": 10}, "checkpoints": [
                {"id": 1, "parent": 0, "age_ms": 130_000, "pause_us": 1800, "pages": 310, "bytes": 1_269_760, "cpus": 2, "periodic": false, "current": false},
                {"id": 2, "parent": 1, "age_ms": 12_400, "pause_us": 1500, "pages": 42, "bytes": 172_032, "cpus": 2, "periodic": true, "current": false},
                {"id": 3, "parent": 2, "age_ms": 850, "pause_us": 1400, "pages": 7, "bytes": 28_672, "cpus": 2, "periodic": true, "current": true}
            ]}),
        ));
        a.update(Event::Pushed(json!({"event": "checkpoint", "id": 3})));
        for (t, npf) in [(0u64, 1000u64), (5, 6000), (10, 8000), (15, 30000)] {
            a.now = t;
            a.update(Event::Answer(Request::Stats, json!({"ok": true, "active_cpus": 2, "cpus": [
                {"cpu": 0, "active": true, "exits": {"npf": npf, "msr": 40, "cpuid": 3, "vmmcall": 12}, "ms_in_hv": 31},
                {"cpu": 1, "active": true, "exits": {"npf": npf / 2, "msr": 9}, "ms_in_hv": 12}
            ]})));
        }
        a.now = 0;
        a
    }

    macro_rules! views {
        ($($name:ident: $setup:expr),* $(,)?) => {$(
            #[test]
            fn $name() {
                let app: App = $setup;
                insta::assert_snapshot!(concat!(stringify!($name), "_80x24"), render(&app, 80, 24));
                insta::assert_snapshot!(concat!(stringify!($name), "_200x60"), render(&app, 200, 60));
            }
        )*};
    }

    views! {
        checkpoints_pane: sample(),
        machine_pane: { let mut a = sample(); a.update(key('1')); a },
        compare_pane: { let mut a = sample(); a.update(key('3')); a },
        periodic_dialog: { let mut a = sample(); a.update(key('p')); a },
        compare_answered: {
            let mut a = sample();
            a.update(key('m'));
            a.update(key('j'));
            a.update(key('='));
            a.update(Event::Answer(Request::Compare { a: 1, b: Some(2) }, json!({"ok": true, "a": 1, "b": 2, "pages": 1234, "runs": 300, "truncated": false, "symbols": true, "regions": [
                {"region": "kernel bss", "pages": 12, "flagged": false, "names": ["jiffies_64", "tick_nohz_full_mask", "nr_context_switches"]},
                {"region": "kernel data", "pages": 30, "flagged": false, "names": ["init_task", "runqueues"]},
                {"region": "kernel text", "pages": 2, "flagged": true, "names": ["do_sys_openat2", "schedule"]},
                {"region": "modules", "pages": 1, "flagged": false, "names": []},
                {"region": "page tables", "pages": 49, "flagged": false, "names": []},
                {"region": "process memory (anonymous)", "pages": 957, "flagged": false, "names": []},
                {"region": "slab (kernel objects)", "pages": 159, "flagged": false, "names": []},
                {"region": "free pages", "pages": 25, "flagged": false, "names": []}
            ], "values": [{"name": "jiffies_64", "address": "0xffffffff83205a00", "size": 8, "old": 4294893486u64, "new": 4294895112u64}],
            "unexpected": 1, "patches": [
                {"at": "schedule+0x2d", "kind": "jump label", "expected": true, "bytes": 5, "old": "0f1f440000", "new": "e9a1000000"},
                {"at": "do_sys_openat2+0x4", "kind": "not the kernel's own patch", "expected": false, "bytes": 5, "old": "4889e54155", "new": "e912345678"}
            ]})));
            a
        },
        activity_pane: { let mut a = sample(); a.update(key('4')); a },
        rollback_dialog: { let mut a = sample(); a.update(key('r')); a },
        delete_dialog: { let mut a = sample(); a.update(key('j')); a.update(key('d')); a },
        help_popup: { let mut a = sample(); a.update(key('?')); a },
        details_popup: { let mut a = sample(); a.update(Event::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE))); a },
        details_with_cpus: {
            let mut a = sample();
            a.update(Event::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE)));
            a.update(Event::Answer(Request::Cpus(1), json!({"ok": true, "id": 1, "symbols": true, "cpus": [
                {"cpu": 0, "rip": "0xffffffffb5e3c6d4", "cpl": 0, "interrupts": true, "symbol": "default_idle+0x14"},
                {"cpu": 1, "rip": "0x401a2c", "cpl": 3, "interrupts": true, "symbol": null}
            ]})));
            a
        },
        filtered: { let mut a = sample(); a.update(key('/')); a.update(key('3')); a },
        disconnected: { let mut a = sample(); a.update(Event::Disconnected("connection refused".into())); a.update(key('1')); a },
        empty: { let mut a = App::default(); a.update(Event::Connected); a },
        export_dialog: { let mut a = sample(); a.update(key('e')); a },
        export_running: { let mut a = sample(); a.update(Event::Pushed(json!({"event": "export", "id": 1, "path": "/home/op/checkpoint-1.elf", "format": "elf", "state": "running", "phase": "pages", "done_bytes": 100u64 << 20, "total_bytes": 256u64 << 20, "link_bytes_per_s": 280_000, "eta_s": 130, "seconds": 40.0}))); a },
        export_failed: { let mut a = sample(); a.update(Event::Pushed(json!({"event": "export", "id": 1, "path": "/home/op/checkpoint-1.qsc", "format": "qsc", "state": "failed", "phase": "pages", "done_bytes": 10u64 << 20, "total_bytes": 256u64 << 20, "error": "the machine sent nothing for 10 s; gave up after 12 tries: ask again to continue where it stopped"}))); a },
    }
}

#[cfg(test)]
mod bench {
    //! `cargo xtask bench export` runs this (release build) for the redraw time.
    use super::*;
    use crate::app::{Event, Request};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;
    use serde_json::json;

    #[test]
    #[ignore = "a benchmark: cargo xtask bench export runs it"]
    fn redraw_200x60_with_100_checkpoints() {
        let mut app = App::default();
        app.update(Event::Connected);
        let list: Vec<_> = (1..=100)
            .map(|i| json!({"id": i, "parent": i - 1, "age_ms": i * 1000, "pause_us": 1500, "pages": 40, "bytes": 163_840, "cpus": 4, "periodic": i % 2 == 0, "current": i == 100}))
            .collect();
        app.update(Event::Answer(
            Request::List,
            json!({"ok": true, "checkpoints": list}),
        ));
        let mut t = Terminal::new(TestBackend::new(200, 60)).unwrap();
        let frames = 2000;
        let t0 = std::time::Instant::now();
        for i in 0..frames {
            app.selected = i % 100;
            t.draw(|f| draw(f, &app)).unwrap();
        }
        let us = t0.elapsed().as_secs_f64() * 1e6 / frames as f64;
        println!("QS-BENCH {{\"redraw_us\": {us:.1}, \"frames\": {frames}}}");
    }
}
