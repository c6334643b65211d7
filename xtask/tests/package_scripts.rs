//! The agent package's maintainer scripts, as dpkg runs them, taken from the built package:
//! the link key, DKMS's registration and builds, removal and purge. They run against a scratch
//! root (`DPKG_ROOT`, dpkg's own variable for installing elsewhere) with a stand-in `dkms`
//! first on PATH that records its calls, so nothing of this machine changes; the real DKMS
//! build is `package_dkms.rs`.

mod deb;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use deb::{build_packages, Deb, Scratch};
use xtask::package::{version, LINK_KEY};

/// A stand-in for dkms: appends its arguments to `$DKMS_LOG`; `status` prints a line once
/// `add` was called (as dkms does); `install` fails for the kernel named in `$DKMS_FAIL`.
const FAKE_DKMS: &str = r#"#!/bin/sh
echo "$*" >> "$DKMS_LOG"
case "$1" in
status) [ -e "$DKMS_LOG.added" ] && echo "quicksilver/$5: added" ;;
add) touch "$DKMS_LOG.added" ;;
install) [ "$7" != "$DKMS_FAIL" ]; exit ;;
esac
exit 0
"#;

/// The maintainer scripts of the built agent package, a scratch root and the fake dkms.
struct Scripts {
    scratch: Scratch,
    control: PathBuf,
    root: PathBuf,
    fail: String,
}

impl Scripts {
    fn new(name: &str) -> Scripts {
        let scratch = Scratch::new(name);
        let debs = build_packages(&scratch);
        let control = scratch.path("control");
        Deb(&debs.agent).control(&control);
        let bin = scratch.path("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("dkms"), FAKE_DKMS).unwrap();
        std::fs::set_permissions(bin.join("dkms"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let root = scratch.path("root");
        std::fs::create_dir_all(&root).unwrap();
        Scripts {
            control,
            root,
            scratch,
            fail: String::new(),
        }
    }

    /// Headers for `release` (what `linux-headers-<release>` installs:
    /// `/lib/modules/<release>/build`), or only the modules folder without them.
    fn kernel(&self, release: &str, headers: bool) {
        let dir = self.root.join("lib/modules").join(release);
        std::fs::create_dir_all(if headers { dir.join("build") } else { dir }).unwrap();
    }

    fn run(&self, script: &str, arg: &str) -> Output {
        let path = format!(
            "{}:{}",
            self.scratch.path("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Command::new("sh")
            .arg(self.control.join(script))
            .arg(arg)
            .env("DPKG_ROOT", &self.root)
            .env("PATH", path)
            .env("DKMS_LOG", self.scratch.path("dkms.log"))
            .env("DKMS_FAIL", &self.fail)
            .output()
            .unwrap()
    }

    fn run_ok(&self, script: &str, arg: &str) -> String {
        let out = self.run(script, arg);
        let text = text(&out);
        assert!(
            out.status.success(),
            "{script} {arg}: {}\n{text}",
            out.status
        );
        text
    }

    /// The fake dkms' calls so far, and forgets them.
    fn dkms_calls(&self) -> Vec<String> {
        let log = self.scratch.path("dkms.log");
        let calls = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        calls.lines().map(str::to_string).collect()
    }

    fn key(&self) -> PathBuf {
        self.root.join(&LINK_KEY[1..])
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn running_kernel() -> String {
    deb::output(Command::new("uname").arg("-r"))
        .trim()
        .to_string()
}

fn mode_and_owner(path: &Path) -> (u32, u32, u32) {
    let meta = std::fs::metadata(path).unwrap();
    (meta.mode() & 0o7777, meta.uid(), meta.gid())
}

#[test]
fn the_postinst_makes_a_root_only_key_once_and_builds_for_every_kernel_with_headers() {
    let s = Scripts::new("scripts-postinst");
    let v = version();
    s.kernel("6.1.0-57-cloud-amd64", true);
    s.kernel("6.12.0-1-amd64", true);
    s.kernel("5.10.0-9-amd64", false);
    let said = s.run_ok("postinst", "configure");

    let key = std::fs::read_to_string(s.key()).unwrap();
    let hex = key.strip_suffix('\n').expect("one line");
    assert!(
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "32 bytes as lowercase hex: {key:?}"
    );
    assert_eq!(mode_and_owner(&s.key()), (0o600, 0, 0), "root only");
    assert!(said.contains(LINK_KEY), "{said}");
    assert_eq!(
        s.dkms_calls(),
        [
            format!("status -m quicksilver -v {v}"),
            format!("add -m quicksilver -v {v}"),
            format!("install -m quicksilver -v {v} -k 6.1.0-57-cloud-amd64"),
            format!("install -m quicksilver -v {v} -k 6.12.0-1-amd64"),
        ],
        "a kernel without headers is left alone"
    );
    assert!(
        said.contains("built for 6.1.0-57-cloud-amd64 6.12.0-1-amd64"),
        "{said}"
    );
    let running = running_kernel();
    assert!(
        said.contains(&format!("apt install linux-headers-{running}")),
        "{said}"
    );

    // Configured again (an upgrade, a `dpkg --configure -a`): the key stays, no second add.
    let said = s.run_ok("postinst", "configure");
    assert_eq!(std::fs::read_to_string(s.key()).unwrap(), key);
    assert!(!said.contains(LINK_KEY), "{said}");
    assert_eq!(
        s.dkms_calls(),
        [
            format!("status -m quicksilver -v {v}"),
            format!("install -m quicksilver -v {v} -k 6.1.0-57-cloud-amd64"),
            format!("install -m quicksilver -v {v} -k 6.12.0-1-amd64"),
        ]
    );
}

#[test]
fn a_key_the_operator_already_has_is_never_replaced() {
    let s = Scripts::new("scripts-key-kept");
    std::fs::create_dir_all(s.key().parent().unwrap()).unwrap();
    std::fs::write(s.key(), "the operator's key\n").unwrap();
    std::fs::set_permissions(s.key(), std::fs::Permissions::from_mode(0o400)).unwrap();
    s.run_ok("postinst", "configure");
    assert_eq!(
        std::fs::read_to_string(s.key()).unwrap(),
        "the operator's key\n"
    );
    assert_eq!(mode_and_owner(&s.key()).0, 0o400);
}

#[test]
fn a_kernel_the_agent_does_not_build_for_is_reported_and_only_the_running_one_fails_the_installation(
) {
    let mut s = Scripts::new("scripts-failure");
    let v = version();
    s.kernel("6.1.0-57-cloud-amd64", true);
    s.kernel("4.19.0-old-amd64", true);
    s.fail = "4.19.0-old-amd64".to_string();
    let said = s.run_ok("postinst", "configure");
    assert!(
        said.contains(&format!(
            "did not build for 4.19.0-old-amd64: see /var/lib/dkms/quicksilver/{v}/build/make.log"
        )),
        "{said}"
    );
    assert!(said.contains("built for 6.1.0-57-cloud-amd64"), "{said}");

    let running = running_kernel();
    s.kernel(&running, true);
    s.fail = running.clone();
    let out = s.run("postinst", "configure");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("did not build for {running}")),
        "{}",
        text(&out)
    );
}

#[test]
fn removal_takes_the_module_out_of_dkms_and_only_a_purge_removes_the_key() {
    let s = Scripts::new("scripts-removal");
    let v = version();
    s.run_ok("postinst", "configure");
    s.dkms_calls();

    s.run_ok("prerm", "remove");
    assert_eq!(
        s.dkms_calls(),
        [
            format!("status -m quicksilver -v {v}"),
            format!("remove -m quicksilver -v {v} --all"),
        ]
    );
    s.run_ok("postrm", "remove");
    assert!(s.key().exists(), "removal keeps the key (purge removes it)");
    s.run_ok("postrm", "purge");
    assert!(!s.key().exists());
    assert!(!s.root.join("etc/quicksilver").exists());

    // A postinst that failed before `dkms add` does not make the removal fail.
    let fresh = Scripts::new("scripts-removal-unadded");
    fresh.run_ok("prerm", "remove");
    assert_eq!(
        fresh.dkms_calls(),
        [format!("status -m quicksilver -v {v}")]
    );
}
