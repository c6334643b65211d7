//! `qs-tui`: the operator's terminal over `qs-bridge`'s control socket. Numbered panes
//! (Machine, Checkpoints, Compare, Activity), a help bar, `?` for every key, dialogs before
//! anything destructive; `--batch` prints the same as JSON lines for scripts, as `virt-top -b`
//! does for `virt-top`.
//!
//! The shape is ratatui's event-driven template: state changes only in `app::App::update`,
//! drawing is `ui::draw` of the state, one worker owns the socket (`worker`).

mod app;
mod ui;
mod worker;

use anyhow::{Context, Result};
use app::{App, Event, Request};
use clap::Parser;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Parser)]
#[command(
    version,
    about = "Quicksilver's operator terminal: the machine and its checkpoints"
)]
struct Cli {
    /// qs-bridge's control socket (the bridge prints its path; the demo's is
    /// target/qs/bridge.sock).
    #[arg(long, env = "QS_CONTROL", default_value = "target/qs/bridge.sock")]
    socket: PathBuf,
    /// No screen: one JSON line every --interval seconds with the bridge's status and the
    /// checkpoints kept, for scripts.
    #[arg(long)]
    batch: bool,
    /// Seconds between two --batch lines.
    #[arg(long, default_value_t = 2)]
    interval: u64,
    /// Stop --batch after this many lines.
    #[arg(long)]
    count: Option<u64>,
}

fn main() {
    let cli = Cli::parse();
    let r = if cli.batch {
        batch(&cli)
    } else {
        interactive(&cli)
    };
    if let Err(e) = r {
        eprintln!("qs-tui: {e:#}");
        std::process::exit(1);
    }
}

fn interactive(cli: &Cli) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    let requests = worker::spawn(cli.socket.clone(), tx.clone());
    let keys = tx.clone();
    std::thread::spawn(move || loop {
        match crossterm::event::read() {
            Ok(crossterm::event::Event::Key(k))
                if k.kind == crossterm::event::KeyEventKind::Press =>
            {
                if keys.send(Event::Key(k)).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    });
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        if tx.send(Event::Tick).is_err() {
            return;
        }
    });
    // ratatui::init puts the terminal in raw mode on the alternate screen, and installs a
    // panic hook that restores it first.
    let mut terminal = ratatui::init();
    let mut app = App {
        dir: std::env::current_dir().unwrap_or_default(),
        ..App::default()
    };
    let result = (|| -> Result<()> {
        terminal.draw(|f| ui::draw(f, &app))?;
        for ev in &rx {
            for r in app.update(ev) {
                let _ = requests.send(r);
            }
            if app.quit {
                break;
            }
            terminal.draw(|f| ui::draw(f, &app))?;
        }
        Ok(())
    })();
    ratatui::restore();
    result
}

fn batch(cli: &Cli) -> Result<()> {
    let s = UnixStream::connect(&cli.socket).with_context(|| {
        format!(
            "cannot connect to qs-bridge's control socket {} (is qs-bridge running? it prints the socket's path)",
            cli.socket.display()
        )
    })?;
    let mut out = s.try_clone()?;
    let mut lines = BufReader::new(s).lines();
    let mut ask = |req: Request| -> Result<serde_json::Value> {
        writeln!(out, "{}", req.line())?;
        let l = lines.next().context("qs-bridge closed the connection")??;
        Ok(serde_json::from_str(&l)?)
    };
    let mut n = 0;
    loop {
        let status = ask(Request::Status)?;
        let list = ask(Request::List)?;
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        println!(
            "{}",
            serde_json::json!({"time_ms": t, "status": status, "checkpoints": list})
        );
        n += 1;
        if cli.count.is_some_and(|c| n >= c) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(cli.interval));
    }
}
