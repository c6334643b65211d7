//! Where things are: the repository, cargo's target directory, what `cargo xtask build` made
//! (`<target>/qs`) and what `cargo xtask setup` fetched or built (`<repo>/.cache`).

use std::path::{Path, PathBuf};

/// The system's QEMU, used when no patched build is there.
pub const SYSTEM_QEMU: &str = "qemu-system-x86_64";

/// The repository's root (where the workspace `Cargo.toml` is).
pub fn repo_root() -> PathBuf {
    // This crate lives two levels below the root (tests/harness); the path is fixed when it is
    // compiled, which is also when the tests and xtask that link it are.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/harness has a grandparent directory")
        .to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` if set, else `<repo>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => repo_root().join(dir),
        None => repo_root().join("target"),
    }
}

/// Where `cargo xtask build` puts everything: `<target>/qs`.
pub fn out_dir() -> PathBuf {
    target_dir().join("qs")
}

/// Downloads, extracted packages and the patched QEMU: `<repo>/.cache`.
pub fn cache_dir() -> PathBuf {
    repo_root().join(".cache")
}

/// Where `cargo xtask setup` builds the patched QEMU: `<repo>/.cache/qemu`.
pub fn qemu_dir() -> PathBuf {
    cache_dir().join("qemu")
}

/// The patched QEMU's binary inside `dir` (see [`qemu_dir`]).
pub fn patched_qemu(dir: &Path) -> PathBuf {
    dir.join("bin").join(SYSTEM_QEMU)
}

/// The QEMU binary to run: the patched build if `cargo xtask setup` made one, else the
/// system's.
pub fn qemu_binary() -> PathBuf {
    let patched = patched_qemu(&qemu_dir());
    if patched.exists() {
        patched
    } else {
        PathBuf::from(SYSTEM_QEMU)
    }
}
