//! DKMS builds the agent from what the package installs, as `dkms install` does on a Debian
//! machine, for the headers of every supported kernel (`cargo xtask test` fetches them), and
//! the module it makes explains every parameter (`modinfo`); then the DKMS-built module, with
//! the package's hv image and qsctl, loads in a guest of the default kernel and activates.
//! DKMS works in a scratch tree (`--dkmstree`, `--sourcetree`, `--kernelsourcedir`), so
//! /var/lib/dkms and /usr/src are not touched and no root-owned state is needed.

mod deb;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use deb::{build_packages, output, sbin, Deb, Scratch};
use xtask::agent_source::{agent_c_source, module_params};
use xtask::package::version;
use xtask::{Artifacts, Kernel, KernelId};

/// Builds the packaged agent with DKMS for `kernel` (its `headers_dir` and `release`; nothing
/// else of the kernel cache is used) and checks the module; returns the module DKMS built
/// (compressed if the kernel compresses its modules), inside `scratch/dkms`, and where the
/// package was extracted (`scratch/root`).
fn dkms_builds_the_packaged_agent_for(kernel: &Kernel, scratch: &Scratch) -> (PathBuf, PathBuf) {
    let debs = build_packages(scratch);
    let root = scratch.path("root");
    Deb(&debs.agent).extract(&root);
    let v = version();
    let system_tree = kernel
        .chroot
        .clone()
        .unwrap_or_else(|| "/".into())
        .join("var/lib/dkms/quicksilver");
    let system_tree_had_it = system_tree.exists();

    // Debian 13's kernels build in their Debian 13 system, with its dkms (and gcc-14).
    let inside = |p: std::path::PathBuf| kernel.inside(&p);
    let program = |name: &str| match kernel.chroot {
        Some(_) => kernel.command(name),
        None => sbin(name),
    };
    let dkms = |action: &str, extra: &[&str]| {
        let mut cmd = program("dkms");
        cmd.arg(action)
            .args(["-m", "quicksilver", "-v", &v])
            .args(extra)
            .arg("--dkmstree")
            .arg(inside(scratch.path("dkms")))
            .arg("--sourcetree")
            .arg(inside(root.join("usr/src")))
            // dkms signs the module when it finds the kernel's sign-file, with a key it makes
            // in /var/lib/dkms unless told otherwise: keep that in the scratch tree too.
            // (dkms takes these from the environment as well as from framework.conf.)
            .env("mok_signing_key", inside(scratch.path("mok.key")))
            .env("mok_certificate", inside(scratch.path("mok.pub")));
        output(&mut cmd)
    };
    std::fs::create_dir_all(scratch.path("dkms")).unwrap();
    dkms("add", &[]);
    let started = Instant::now();
    let headers = inside(kernel.headers_dir.clone());
    let headers = headers.to_str().unwrap();
    let said = dkms(
        "build",
        &["-k", &kernel.release, "--kernelsourcedir", headers],
    );
    eprintln!(
        "dkms build for {} took {:.1} s",
        kernel.release,
        started.elapsed().as_secs_f64()
    );
    let status = dkms("status", &[]);
    assert!(
        status.contains(&format!(
            "quicksilver/{v}, {}, x86_64: built",
            kernel.release
        )),
        "{status}\n{said}"
    );

    // Where DKMS keeps what it built; compressed if the kernel compresses its modules.
    let built = scratch
        .path("dkms/quicksilver")
        .join(&v)
        .join(&kernel.release)
        .join("x86_64/module");
    let ko = std::fs::read_dir(&built)
        .unwrap_or_else(|e| panic!("{}: {e}\n{said}", built.display()))
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("quicksilver.ko")
        })
        .unwrap_or_else(|| panic!("no quicksilver.ko in {}\n{said}", built.display()));

    let vermagic = output(
        program("modinfo")
            .args(["-F", "vermagic"])
            .arg(inside(ko.clone())),
    );
    assert!(
        vermagic.starts_with(&format!("{} ", kernel.release)),
        "{vermagic}"
    );
    // `modinfo` shows each parameter as `parm: NAME:DESCRIPTION (TYPE)`.
    let info = output(program("modinfo").arg(inside(ko.clone())));
    let source = std::fs::read_to_string(agent_c_source()).unwrap();
    let params = module_params(&source);
    assert!(params.len() >= 5, "{params:?}");
    for param in &params {
        let description = param.description.as_deref().unwrap_or("");
        assert!(
            info.lines()
                .any(|l| l.strip_prefix("parm:").is_some_and(|rest| rest
                    .trim_start()
                    .starts_with(&format!("{}:{description} (", param.name)))),
            "modinfo does not explain {}:\n{info}",
            param.name
        );
    }
    if !system_tree_had_it {
        assert!(
            !system_tree.exists(),
            "the test touched the system's DKMS tree"
        );
    }
    (ko, root)
}

#[test]
fn dkms_builds_the_packaged_agent_for_every_supported_kernel() {
    for id in KernelId::ALL {
        let kernel = Kernel::locate_id(id).unwrap_or_else(|e| panic!("{e}"));
        let scratch = Scratch::under(&kernel.scratch_base(), &format!("package-dkms-{id}"));
        dkms_builds_the_packaged_agent_for(&kernel, &scratch);
    }
}

/// As installed: the agent DKMS built, the hv image where the package puts it (the agent's
/// default `image=`, so none is given) and the package's `qsctl`.
#[test]
fn the_dkms_built_agent_loads_the_packaged_hv_and_activates() {
    let a = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let scratch = Scratch::under(&a.kernel.scratch_base(), "package-dkms-boot");
    let (ko, root) = dkms_builds_the_packaged_agent_for(&a.kernel, &scratch);
    let ko = xtask::initrd::read_module(&ko).unwrap_or_else(|e| panic!("{e:#}"));
    let read = |rel: &str| {
        std::fs::read(root.join(rel)).unwrap_or_else(|e| panic!("{rel} in the package: {e}"))
    };
    let script = r#"set -e
insmod /lib/modules/dkms/quicksilver.ko
/usr/sbin/qsctl status
/usr/sbin/qsctl activate
/usr/sbin/qsctl probe --expect active
/usr/sbin/qsctl deactivate
/usr/sbin/qsctl probe --expect native
dmesg | grep quicksilver
"#;
    let out = a
        .qemu("package-dkms-boot")
        .smp(2)
        .noload()
        .timeout(Duration::from_secs(600))
        .file("/lib/modules/dkms/quicksilver.ko", 0o644, ko)
        .file(
            "/usr/lib/quicksilver/hv.img",
            0o644,
            read("usr/lib/quicksilver/hv.img"),
        )
        .file("/usr/sbin/qsctl", 0o755, read("usr/sbin/qsctl"))
        .run_script(script)
        .unwrap_or_else(|e| panic!("{e}"));
    out.ensure_success().unwrap_or_else(|e| panic!("{e}"));
    let o = out.script_output();
    assert!(o.contains("state: dormant"), "{o}");
    assert!(o.contains("active on 2 CPUs"), "{o}");
    assert!(o.contains("native on 2 CPUs"), "{o}");
    assert!(
        o.contains("quicksilver: hv ") && o.contains(" loaded: "),
        "the agent's load line:\n{o}"
    );
}
