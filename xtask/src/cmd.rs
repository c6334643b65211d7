//! Running external programs with errors that say what ran, how it failed and what to do.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context as _};

/// How much of a failed command's output an error repeats (its tail, where the error is).
const TAIL_LINES: usize = 60;

/// The command line as a user would type it, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    if let Some(dir) = cmd.get_current_dir() {
        line = format!("(cd {} && {line})", dir.display());
    }
    line
}

/// The last 60 lines of `text` (where a failed command says why).
pub fn tail(text: &str) -> String {
    qs_testkit::child::tail(text, TAIL_LINES)
}

/// Starting failed: most often the program is not installed.
fn spawn_error(cmd: &Command, err: std::io::Error) -> anyhow::Error {
    let program = cmd.get_program().to_string_lossy();
    if err.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!(
            "`{program}` is not installed or not on PATH: run `cargo xtask setup`, or install it"
        )
    } else {
        anyhow::Error::new(err).context(format!("cannot start `{}`", describe(cmd)))
    }
}

/// Runs `cmd` with its output captured. On a non-zero exit the error holds the command line,
/// its status and the tail of its stdout and stderr.
pub fn run_captured(cmd: &mut Command) -> anyhow::Result<Output> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error(cmd, e))?;
    if !output.status.success() {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        return Err(failed(cmd, output.status, &text));
    }
    Ok(output)
}

/// A command that exited non-zero: its command line, status and the tail of its output.
fn failed(cmd: &Command, status: std::process::ExitStatus, output: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "`{}` failed ({status}); its output ends with:\n{}",
        describe(cmd),
        tail(output)
    )
}

/// Runs a long build step with its output captured, like [`run_captured`], and says how far it
/// is: `progress` reads "n of m" out of an output line (ninja's `[n/m]`), and a line goes to
/// the user at every further tenth of the steps, with the time so far.
pub fn run_with_progress(
    cmd: &mut Command,
    what: &str,
    progress: fn(&str) -> Option<(u64, u64)>,
) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader, Read};
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_error(cmd, e))?;
    let mut stderr = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let start = std::time::Instant::now();
    let mut text = String::new();
    let mut told = 0;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.unwrap_or_default();
        if let Some((n, m)) = progress(&line) {
            let tenth = n * 10 / m.max(1);
            if tenth > told {
                told = tenth;
                crate::note(format!(
                    "{what}: {n} of {m} steps ({}%) after {} s",
                    n * 100 / m.max(1),
                    start.elapsed().as_secs()
                ));
            }
        }
        text.push_str(&line);
        text.push('\n');
    }
    let status = child.wait().map_err(|e| spawn_error(cmd, e))?;
    text.push_str(&errors.join().unwrap_or_default());
    if !status.success() {
        return Err(failed(cmd, status, &text));
    }
    Ok(())
}

/// ninja's progress, "[n/m] ..." at the start of a line.
pub fn ninja_progress(line: &str) -> Option<(u64, u64)> {
    let (n, m) = line.strip_prefix('[')?.split_once(']')?.0.split_once('/')?;
    Some((n.parse().ok()?, m.parse().ok()?))
}

/// Runs `cmd` with its output captured and returns its stdout as text.
pub fn stdout_of(cmd: &mut Command) -> anyhow::Result<String> {
    let output = run_captured(cmd)?;
    String::from_utf8(output.stdout)
        .with_context(|| format!("`{}` printed non-UTF-8 output", describe(cmd)))
}

/// Runs `cmd` on the user's terminal (cargo's and apt's progress stays visible); fails if it
/// exits non-zero.
pub fn run_inherit(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().map_err(|e| spawn_error(cmd, e))?;
    if !status.success() {
        bail!(
            "`{}` failed ({status}); see its output above",
            describe(cmd)
        );
    }
    Ok(())
}

/// Whether `program` is an executable file somewhere on PATH.
pub fn on_path(program: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| is_executable(&dir.join(program)))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Removes a file, a symlink (not what it leads to) or a whole directory, if there.
pub fn remove_if_exists(path: &Path) -> anyhow::Result<()> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Makes `link` a symlink to `target` unless it already is one.
pub fn ensure_symlink(target: &Path, link: &Path) -> anyhow::Result<()> {
    if std::fs::read_link(link).is_ok_and(|to| to == target) {
        return Ok(());
    }
    remove_if_exists(link)?;
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} to {}", link.display(), target.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ninjas_progress_is_read_from_its_lines() {
        assert_eq!(
            ninja_progress("[123/2345] Compiling C object libqemu.a.p/foo.c.o"),
            Some((123, 2345))
        );
        assert_eq!(ninja_progress("ninja: Entering directory `build'"), None);
        assert_eq!(ninja_progress("[a/b] x"), None);
    }

    #[test]
    fn a_long_step_says_how_far_it_is_and_a_failure_shows_its_output() {
        // Ten steps, then a failure with a message on stderr.
        let mut ok = Command::new("sh");
        ok.args([
            "-c",
            "for i in 1 2 3 4 5 6 7 8 9 10; do echo \"[$i/10] step\"; done",
        ]);
        run_with_progress(&mut ok, "test build", ninja_progress).unwrap();
        let mut bad = Command::new("sh");
        bad.args(["-c", "echo '[1/2] a'; echo 'no such header' >&2; exit 3"]);
        let err = run_with_progress(&mut bad, "test build", ninja_progress).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("no such header") && msg.contains("exit status: 3"),
            "{msg}"
        );
    }
}
