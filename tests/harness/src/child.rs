//! Child processes: QEMU, gdb and `qs-bridge` are started, watched and killed here, and
//! nowhere else.
//!
//! [`Process`] starts a program with one output stream watched (stdout, stderr, or both on
//! one pipe so that errors stay in order with the rest), a thread that reads it into a shared
//! text as it comes, line hooks (logs, echo), waits for a needle with a deadline, and kills the
//! program when dropped. The program is also killed when the thread that started it ends
//! ([`die_with_parent`]), so that a test killed by its runner leaves nothing running: start
//! processes from the thread that owns them.

use std::io::{Read, Write as _};
use std::os::unix::process::CommandExt as _;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How many lines of output an error repeats (its end, where the reason is).
pub const TAIL_LINES: usize = 40;

/// The last `lines` lines of `text`, each ending in a newline, after a note of how many were
/// left out.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let skip = all.len().saturating_sub(lines);
    let mut out = String::new();
    if skip > 0 {
        out.push_str(&format!("[... {skip} earlier lines ...]\n"));
    }
    for line in &all[skip..] {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Makes the program `command` starts receive SIGKILL when the thread that starts it ends
/// (`PR_SET_PDEATHSIG`; Linux ties it to the thread, not the process). Without it, a test
/// that its runner kills on a timeout would leave QEMU burning a CPU until the guest ends.
pub fn die_with_parent(command: &mut Command) {
    // The parent's process id, read before the fork: if the parent dies between the fork and
    // the prctl below, the signal is never sent, and the child sees another parent instead.
    let parent = std::process::id();
    // SAFETY: `pre_exec` runs the closure in the child between fork and exec, where the
    // parent's other threads no longer exist, so only async-signal-safe work is allowed: no
    // allocation, no locks. The closure makes two system calls, prctl and getppid, both
    // async-signal-safe; it reads only `parent`, a u32 copied into the closure, and builds
    // its error with `last_os_error`, which stores the errno code without allocating. It
    // touches no memory the parent's threads share.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                // The parent is already gone: end as the signal would have ended us.
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Which output of the program is watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Standard output; standard error is collected apart ([`Process::stderr_text`]).
    Stdout,
    /// Standard error; standard output is discarded.
    Stderr,
    /// Both, on one pipe (in the order the program wrote them).
    Both,
}

/// Called with each complete line of the watched output and the time since the start.
pub type LineHook = Box<dyn FnMut(Duration, &str) + Send>;
/// Called once when the watched output ends, after the last line's hook.
pub type EndHook = Box<dyn FnOnce() + Send>;

/// How to start a [`Process`].
pub struct Watch {
    stream: Stream,
    stdin: bool,
    on_line: Option<LineHook>,
    on_end: Option<EndHook>,
}

impl Watch {
    /// Watches `stream`; standard input is closed unless [`Watch::stdin`] is asked for.
    pub fn new(stream: Stream) -> Watch {
        Watch {
            stream,
            stdin: false,
            on_line: None,
            on_end: None,
        }
    }

    /// Gives the program a pipe as standard input, for [`Process::send`].
    pub fn stdin(mut self) -> Watch {
        self.stdin = true;
        self
    }

    /// Calls `hook` in the reading thread with each complete line.
    pub fn on_line(mut self, hook: impl FnMut(Duration, &str) + Send + 'static) -> Watch {
        self.on_line = Some(Box::new(hook));
        self
    }

    /// Calls `hook` in the reading thread when the output ends.
    pub fn on_end(mut self, hook: impl FnOnce() + Send + 'static) -> Watch {
        self.on_end = Some(Box::new(hook));
        self
    }

    /// Starts `command`, which dies with this thread ([`die_with_parent`]).
    pub fn spawn(self, name: &str, mut command: Command) -> std::io::Result<Process> {
        let watched = match self.stream {
            Stream::Stdout => {
                command.stdout(Stdio::piped()).stderr(Stdio::piped());
                None
            }
            Stream::Stderr => {
                command.stdout(Stdio::null()).stderr(Stdio::piped());
                None
            }
            Stream::Both => {
                let (reader, writer) = std::io::pipe()?;
                command.stdout(writer.try_clone()?).stderr(writer);
                Some(reader)
            }
        };
        command.stdin(if self.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        die_with_parent(&mut command);
        let mut child = command.spawn()?;
        // `command` holds our copies of the pipes' write ends: drop it so that the reader sees
        // the end of the output when the program exits.
        drop(command);
        let started = Instant::now();
        let stdin = child.stdin.take();
        let (source, stderr): (Box<dyn Read + Send>, _) = match (self.stream, watched) {
            (Stream::Both, Some(reader)) => (Box::new(reader), None),
            (Stream::Stderr, _) => (Box::new(child.stderr.take().expect("piped")), None),
            _ => {
                let mut err = child.stderr.take().expect("piped");
                let collect = std::thread::spawn(move || {
                    let mut text = String::new();
                    let _ = err.read_to_string(&mut text);
                    text
                });
                (Box::new(child.stdout.take().expect("piped")), Some(collect))
            }
        };
        let output = Arc::new(Output::default());
        let reader = {
            let output = Arc::clone(&output);
            let (mut on_line, on_end) = (self.on_line, self.on_end);
            std::thread::spawn(move || read_into(source, &output, started, &mut on_line, on_end))
        };
        Ok(Process {
            name: name.to_string(),
            child,
            stdin,
            output,
            reader: Some(reader),
            stderr,
            started,
            cursor: 0,
            status: None,
        })
    }
}

/// The reading thread: `source` into `output` until it ends.
fn read_into(
    mut source: Box<dyn Read + Send>,
    output: &Output,
    started: Instant,
    on_line: &mut Option<LineHook>,
    on_end: Option<EndHook>,
) {
    let mut buf = [0u8; 8192];
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let lines = output.push(&buf[..n]);
        if let Some(hook) = on_line.as_mut() {
            let at = started.elapsed();
            for line in &lines {
                hook(at, line);
            }
        }
    }
    let last = output.last_line();
    if let (Some(hook), Some(line)) = (on_line.as_mut(), last) {
        hook(started.elapsed(), &line);
    }
    if let Some(hook) = on_end {
        hook();
    }
    // Last, so that whoever sees the end also sees every hook done (the log complete).
    output.lock().eof = true;
    output.changed.notify_all();
}

/// The watched output, shared between the reading thread and [`Process`].
#[derive(Default)]
struct Output {
    state: Mutex<Text>,
    changed: Condvar,
}

#[derive(Default)]
struct Text {
    /// Everything received, carriage returns dropped, the unfinished line included. Byte
    /// offsets into it stay valid as it grows.
    text: String,
    /// The start of a UTF-8 sequence whose other bytes have not arrived yet.
    pending: Vec<u8>,
    /// Where the unfinished line starts.
    line_start: usize,
    /// The program closed the stream (it exited).
    eof: bool,
}

impl Output {
    fn lock(&self) -> MutexGuard<'_, Text> {
        // A hook that panicked poisons nothing we rely on: the text stays consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds received bytes; returns the lines they completed.
    fn push(&self, bytes: &[u8]) -> Vec<String> {
        let mut t = self.lock();
        t.pending.extend(bytes.iter().filter(|&&b| b != b'\r'));
        let pending = std::mem::take(&mut t.pending);
        let mut rest = &pending[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    t.text.push_str(s);
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    t.text
                        .push_str(std::str::from_utf8(valid).expect("checked valid"));
                    match e.error_len() {
                        Some(bad) => {
                            t.text.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        None => {
                            // Cut in the middle of a character: the rest comes next time.
                            t.pending = after.to_vec();
                            break;
                        }
                    }
                }
            }
        }
        let mut lines = Vec::new();
        while let Some(nl) = t.text[t.line_start..].find('\n') {
            let end = t.line_start + nl;
            lines.push(t.text[t.line_start..end].to_string());
            t.line_start = end + 1;
        }
        drop(t);
        self.changed.notify_all();
        lines
    }

    /// The output ended: ends the unfinished line, and returns it if there was one.
    fn last_line(&self) -> Option<String> {
        let mut t = self.lock();
        if !t.pending.is_empty() {
            let rest = String::from_utf8_lossy(&std::mem::take(&mut t.pending)).into_owned();
            t.text.push_str(&rest);
        }
        if t.line_start == t.text.len() {
            return None;
        }
        let line = t.text[t.line_start..].to_string();
        t.text.push('\n');
        t.line_start = t.text.len();
        Some(line)
    }
}

/// How a wait ended without what it waited for.
#[derive(Debug)]
pub enum Ended {
    /// The program closed its output: it exited.
    Exited {
        /// The end of its output.
        tail: String,
    },
    /// The deadline passed.
    TimedOut {
        /// The end of its output.
        tail: String,
    },
}

/// What [`Process::wait_for`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// The output from where the previous wait stopped up to and including the needle.
    pub text: String,
    /// The whole line holding the needle (perhaps not finished yet), without its newline.
    pub line: String,
    /// Which of the needles it was.
    pub needle: usize,
}

/// A running program (see the module documentation). Dropping it kills the program.
pub struct Process {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    output: Arc<Output>,
    reader: Option<JoinHandle<()>>,
    stderr: Option<JoinHandle<String>>,
    started: Instant,
    /// Byte offset in the output up to which [`Process::wait_for`] has consumed.
    cursor: usize,
    /// Set once the program has been waited for.
    status: Option<ExitStatus>,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .finish()
    }
}

impl Process {
    /// The program's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time since the program started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// When the program started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Everything the watched stream carried so far (carriage returns dropped).
    pub fn text(&self) -> String {
        self.output.lock().text.clone()
    }

    /// Writes `bytes` to the program's standard input.
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let stdin = self.stdin.as_mut().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                format!("{}: no standard input to write to", self.name),
            )
        })?;
        stdin.write_all(bytes)?;
        stdin.flush()
    }

    /// Waits until `test`, given the whole output so far each time it grows, returns
    /// something; fails when the program exits first or at `deadline`.
    pub fn wait_until<T>(
        &self,
        deadline: Instant,
        mut test: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, Ended> {
        let mut t = self.output.lock();
        loop {
            if let Some(found) = test(&t.text) {
                return Ok(found);
            }
            let now = Instant::now();
            if t.eof {
                return Err(Ended::Exited {
                    tail: tail(&t.text, TAIL_LINES),
                });
            }
            if now >= deadline {
                return Err(Ended::TimedOut {
                    tail: tail(&t.text, TAIL_LINES),
                });
            }
            t = self
                .output
                .changed
                .wait_timeout(t, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until one of `needles` appears after what earlier waits consumed, and consumes up
    /// to the end of the first one that appears.
    pub fn wait_for(&mut self, needles: &[&str], deadline: Instant) -> Result<Found, Ended> {
        let from = self.cursor;
        let found = self.wait_until(deadline, |text| {
            let view = &text[from..];
            let (at, index) = needles
                .iter()
                .enumerate()
                .filter_map(|(i, n)| view.find(n).map(|at| (at, i)))
                .min()?;
            let (start, end) = (from + at, from + at + needles[index].len());
            let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
            let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
            Some((
                end,
                Found {
                    text: text[from..end].to_string(),
                    line: text[line_start..line_end].to_string(),
                    needle: index,
                },
            ))
        })?;
        self.cursor = found.0;
        Ok(found.1)
    }

    /// Waits (until `deadline`) for the program to close its output, then for it to exit;
    /// `None` if it was still running at the deadline.
    pub fn wait_exit(&mut self, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        if self
            .wait_until(deadline, |_| None::<()>)
            .is_err_and(|e| matches!(e, Ended::TimedOut { .. }))
        {
            return Ok(None);
        }
        let status = self.child.wait()?;
        self.status = Some(status);
        if let Some(reader) = self.reader.take() {
            // The output ended and every hook has run: the thread is leaving.
            let _ = reader.join();
        }
        Ok(Some(status))
    }

    /// What the program wrote on standard error, when only standard output is watched; after
    /// it exited (else the reading would wait for it).
    pub fn stderr_text(&mut self) -> String {
        self.stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }

    /// Kills the program now, unless it has exited (also done on drop).
    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    }

    #[test]
    fn lines_are_split_carriage_returns_dropped_and_characters_kept_whole() {
        let out = Output::default();
        assert!(out.push(b"hel").is_empty());
        assert_eq!(out.push(b"lo\r\nwor\xc3"), ["hello"]);
        assert_eq!(out.push(b"\xa9ld\n\xffpart"), ["woréld"]);
        assert_eq!(out.lock().text, "hello\nworéld\n\u{fffd}part");
        assert_eq!(out.last_line().as_deref(), Some("\u{fffd}part"));
        assert_eq!(out.last_line(), None);
        assert!(out.lock().text.ends_with("part\n"));
    }

    #[test]
    fn waits_consume_in_order_and_find_the_whole_line() {
        let mut p = Watch::new(Stream::Both)
            .spawn("sh", sh("echo one; echo 'two three' >&2; echo four"))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let found = p.wait_for(&["four", "three"], deadline).unwrap();
        assert_eq!(
            (found.text.as_str(), found.line.as_str(), found.needle),
            ("one\ntwo three", "two three", 1)
        );
        assert_eq!(p.wait_for(&["four"], deadline).unwrap().text, "\nfour");
        let err = p.wait_for(&["one"], deadline).unwrap_err();
        assert!(
            matches!(err, Ended::Exited { ref tail } if tail.contains("four")),
            "{err:?}"
        );
        assert!(p.wait_exit(deadline).unwrap().is_some_and(|s| s.success()));
    }

    #[test]
    fn hooks_see_every_line_and_stderr_is_kept_apart() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let ended = Arc::new(Mutex::new(false));
        let (l, e) = (lines.clone(), ended.clone());
        let mut p = Watch::new(Stream::Stdout)
            .stdin()
            .on_line(move |_, line| l.lock().unwrap().push(line.to_string()))
            .on_end(move || *e.lock().unwrap() = true)
            .spawn(
                "sh",
                sh("read x; echo \"got $x\"; echo oops >&2; printf last"),
            )
            .unwrap();
        p.send(b"hello\n").unwrap();
        let status = p
            .wait_exit(Instant::now() + Duration::from_secs(10))
            .unwrap();
        assert!(status.is_some_and(|s| s.success()));
        assert_eq!(*lines.lock().unwrap(), ["got hello", "last"]);
        assert!(*ended.lock().unwrap());
        assert_eq!(p.text(), "got hello\nlast\n");
        assert_eq!(p.stderr_text(), "oops\n");
    }

    #[test]
    fn a_deadline_ends_a_wait_and_drop_kills() {
        let mut p = Watch::new(Stream::Stdout)
            .spawn("sleep", sh("echo started; exec sleep 600"))
            .unwrap();
        let err = p
            .wait_for(&["never"], Instant::now() + Duration::from_millis(300))
            .unwrap_err();
        assert!(
            matches!(err, Ended::TimedOut { ref tail } if tail == "started\n"),
            "{err:?}"
        );
        assert_eq!(p.wait_exit(Instant::now()).unwrap(), None);
        let pid = p.pid();
        drop(p);
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
        assert!(!alive, "the program was killed and reaped");
    }

    #[test]
    fn the_tail_says_how_much_it_left_out() {
        assert_eq!(tail("a\nb\nc", 2), "[... 1 earlier lines ...]\nb\nc\n");
        assert_eq!(tail("a\n", 2), "a\n");
    }
}
