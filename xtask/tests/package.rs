//! `cargo xtask package`: what each package carries, read with dpkg-deb as a user or a
//! reviewer would (files, modes, owners, control fields, maintainer scripts, dkms.conf).

mod deb;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

use deb::{build_packages, output, Deb, Scratch};
use xtask::agent_source::{agent_c_source, image_default, module_params};
use xtask::package::{version, AGENT_SOURCES, LINK_KEY};

fn agent_c() -> String {
    std::fs::read_to_string(agent_c_source()).unwrap()
}

/// The package at `path`, checked for what every package of ours has: its file name
/// (`<name>_<version>_amd64.deb`), and its Package, Version and Architecture fields.
fn named_package<'a>(path: &'a std::path::Path, name: &str) -> Deb<'a> {
    let version = version();
    assert_eq!(
        path.file_name().unwrap().to_str().unwrap(),
        format!("{name}_{version}_amd64.deb")
    );
    let deb = Deb(path);
    assert_eq!(deb.field("Package"), name);
    assert_eq!(deb.field("Version"), version);
    assert_eq!(deb.field("Architecture"), "amd64");
    deb
}

/// `KEY="value"` lines of a shell-like file (dkms.conf), comments skipped.
fn assignments(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

#[test]
fn the_agent_package_carries_qsctl_the_image_where_the_agent_looks_and_the_source_for_dkms() {
    let scratch = Scratch::new("package-agent");
    let debs = build_packages(&scratch);
    let deb = named_package(&debs.agent, "quicksilver");
    let version = version();
    assert_eq!(deb.field("Version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(deb.field("Depends"), "dkms, dwarves");

    // Exactly these files, with these modes; root owns everything whoever built it.
    let image = image_default(&agent_c()).expect("quicksilver.c has an image= default");
    let src = format!("/usr/src/quicksilver-{version}");
    let mut expected: BTreeMap<String, String> = [
        ("/usr/sbin/qsctl".to_string(), "-rwxr-xr-x"),
        (image.clone(), "-rw-r--r--"),
        (format!("{src}/dkms.conf"), "-rw-r--r--"),
        ("/etc/modprobe.d/quicksilver.conf".to_string(), "-rw-r--r--"),
    ]
    .into_iter()
    .map(|(path, mode)| (path, mode.to_string()))
    .collect();
    for name in AGENT_SOURCES {
        expected.insert(format!("{src}/{name}"), "-rw-r--r--".to_string());
    }
    let contents = deb.contents();
    let files: BTreeMap<String, String> = deb
        .files()
        .into_iter()
        .map(|(path, entry)| (path, entry.mode))
        .collect();
    assert_eq!(files, expected, "{contents:#?}");
    for (path, entry) in &contents {
        assert_eq!(entry.owner, "root/root", "{path}");
        if path.ends_with('/') {
            assert_eq!(entry.mode, "drwxr-xr-x", "{path}");
        }
    }
    assert!(
        !contents.keys().any(|p| p.starts_with("/etc/quicksilver")),
        "the link key is made at installation, never shipped: {contents:#?}"
    );
    assert_eq!(
        image, "/usr/lib/quicksilver/hv.img",
        "Debian 12 and 13 ship under /usr"
    );
    assert!(contents[&image].size > 0);

    // What is installed is what the repository holds.
    let root = scratch.path("root");
    deb.extract(&root);
    let agent_dir = xtask::repo_root().join("guest-agent/linux");
    for name in AGENT_SOURCES {
        assert_eq!(
            std::fs::read(root.join(&src[1..]).join(name)).unwrap(),
            std::fs::read(agent_dir.join(name)).unwrap(),
            "{name}"
        );
    }
    // Every source of the agent goes to DKMS (not kbuild's outputs of an in-tree make).
    for entry in std::fs::read_dir(&agent_dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let source = (name.ends_with(".c") || name.ends_with(".h")) && !name.ends_with(".mod.c");
        assert!(
            !source || AGENT_SOURCES.contains(&name.as_str()),
            "guest-agent/linux/{name} is not in the package: add it to AGENT_SOURCES"
        );
    }

    // dkms.conf: the module Kbuild makes, rebuilt for every new kernel.
    let conf =
        assignments(&std::fs::read_to_string(root.join(&src[1..]).join("dkms.conf")).unwrap());
    assert_eq!(conf["PACKAGE_NAME"], "quicksilver");
    assert_eq!(conf["PACKAGE_VERSION"], version);
    assert_eq!(conf["BUILT_MODULE_NAME[0]"], "quicksilver");
    assert_eq!(conf["DEST_MODULE_LOCATION[0]"], "/updates/dkms");
    assert_eq!(conf["AUTOINSTALL"], "yes");
    assert!(
        !conf.contains_key("MAKE[0]"),
        "DKMS's default make is kbuild's"
    );
    let kbuild = std::fs::read_to_string(agent_dir.join("Kbuild")).unwrap();
    assert!(kbuild.contains("obj-m := quicksilver.o"), "{kbuild}");

    // modprobe.d names the key the postinst makes; every option it mentions is a parameter.
    let modprobe = std::fs::read_to_string(root.join("etc/modprobe.d/quicksilver.conf")).unwrap();
    assert!(
        modprobe
            .lines()
            .any(|l| l == format!("options quicksilver key_file={LINK_KEY}")),
        "{modprobe}"
    );
    let params = module_params(&agent_c());
    for line in modprobe.lines() {
        let Some(options) = line
            .trim_start_matches('#')
            .strip_prefix("options quicksilver ")
        else {
            continue;
        };
        for option in options.split_whitespace() {
            let name = option.split('=').next().unwrap();
            assert!(
                params.iter().any(|p| p.name == name),
                "{line}: no parameter {name}"
            );
        }
    }

    // The maintainer scripts: there, executable, valid sh; the modprobe options are a conffile.
    let control = scratch.path("control");
    deb.control(&control);
    for script in ["postinst", "prerm", "postrm"] {
        let path = control.join(script);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755, "{script}");
        output(Command::new("sh").arg("-n").arg(&path));
    }
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains(&format!("VERSION={version}\n")));
    let prerm = std::fs::read_to_string(control.join("prerm")).unwrap();
    assert!(prerm.contains(&format!("VERSION={version}\n")));
    assert_eq!(
        std::fs::read_to_string(control.join("conffiles")).unwrap(),
        "/etc/modprobe.d/quicksilver.conf\n"
    );
}

#[test]
fn the_bridge_package_carries_only_the_static_bridge() {
    let scratch = Scratch::new("package-bridge");
    let debs = build_packages(&scratch);
    let deb = named_package(&debs.bridge, "qs-bridge");
    assert_eq!(deb.field("Depends"), "", "static: no libc to depend on");
    let files = deb.files();
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        ["/usr/bin/qs-bridge"],
        "{files:#?}"
    );
    let entry = &files["/usr/bin/qs-bridge"];
    assert_eq!(
        (entry.mode.as_str(), entry.owner.as_str()),
        ("-rwxr-xr-x", "root/root")
    );

    // It runs, and on any Debian release: it has no ELF interpreter.
    let root = scratch.path("root");
    deb.extract(&root);
    let bridge = root.join("usr/bin/qs-bridge");
    xtask::build::ensure_static(&bridge).unwrap();
    let help = output(Command::new(&bridge).arg("--help"));
    assert!(help.contains("--key"), "{help}");
    let control = scratch.path("control");
    deb.control(&control);
    let mut names: Vec<String> = std::fs::read_dir(&control)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["control"], "no maintainer scripts");
}
