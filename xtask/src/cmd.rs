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
        bail!(
            "`{}` failed ({}); its output ends with:\n{}",
            describe(cmd),
            output.status,
            tail(&text)
        );
    }
    Ok(output)
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
