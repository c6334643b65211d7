//! `qs-tui`: the operator's terminal over `qs-bridge`'s control socket. Numbered panes
//! (Machine, Checkpoints, Compare, Activity), a help bar, `?` for every key, dialogs before
//! anything destructive; `--batch` prints the same as JSON lines for scripts, as `virt-top -b`
//! does for `virt-top`, and `--run COMMAND` does one operation (an export with its progress).
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
    /// No screen: send one control-socket command (`checkpoint`, `rollback 3`, `export 3
    /// /srv/c3.elf elf`, `compare 2 3`, `cpus 3`, ...; `help` lists them) and print its JSON
    /// reply; an export's progress follows as JSON lines until it ends. Exits non-zero if the
    /// bridge refused it or the export did not finish.
    #[arg(long, value_name = "COMMAND", conflicts_with = "batch")]
    run: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    let r = if let Some(command) = &cli.run {
        run_one(&cli.socket, command)
    } else if cli.batch {
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

fn connect(socket: &std::path::Path) -> Result<UnixStream> {
    UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot connect to qs-bridge's control socket {} (is qs-bridge running? it prints the socket's path)",
            socket.display()
        )
    })
}

/// `--run COMMAND`: its reply; for an export, its progress until it ends.
fn run_one(socket: &std::path::Path, command: &str) -> Result<()> {
    let s = connect(socket)?;
    let mut out = s.try_clone()?;
    let mut lines = BufReader::new(s).lines();
    let export = command.split_whitespace().next() == Some("export");
    if export {
        // The progress comes as events; subscribe first, so that none is missed.
        writeln!(out, "subscribe")?;
        lines.next().context("qs-bridge closed the connection")??;
    }
    writeln!(out, "{command}")?;
    let reply: serde_json::Value = loop {
        let l = lines.next().context("qs-bridge closed the connection")??;
        let v: serde_json::Value = serde_json::from_str(&l)?;
        if v.get("event").is_none() {
            break v;
        }
    };
    println!("{reply}");
    if reply.get("ok") == Some(&serde_json::Value::Bool(false)) {
        anyhow::bail!("qs-bridge refused it");
    }
    if !export {
        return Ok(());
    }
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(&l?)?;
        if v.get("event").and_then(|e| e.as_str()) != Some("export") {
            continue;
        }
        println!("{v}");
        match v.get("state").and_then(|s| s.as_str()) {
            Some("running") => {}
            Some("done") => return Ok(()),
            other => anyhow::bail!("the export ended {}", other.unwrap_or("?")),
        }
    }
    anyhow::bail!("qs-bridge closed the connection during the export: run the same command again to continue it")
}

fn batch(cli: &Cli) -> Result<()> {
    let s = connect(&cli.socket)?;
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
