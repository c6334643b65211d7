//! Out-of-tree modules build against the cached headers (`cargo xtask setup` first), and a
//! build error reaches the user with the compiler's words.

use std::path::PathBuf;

use xtask::build::build_module;
use xtask::initrd::modinfo;
use xtask::{Kernel, KernelId};

/// A fresh folder holding a module's sources, removed on drop.
struct ModuleSource(PathBuf);

impl ModuleSource {
    fn new(name: &str, c_source: &str) -> ModuleSource {
        let dir = std::env::temp_dir().join(format!("qs-module-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::write(dir.join("src/Kbuild"), format!("obj-m := {name}.o\n")).unwrap();
        std::fs::write(dir.join(format!("src/{name}.c")), c_source).unwrap();
        ModuleSource(dir)
    }
}

impl Drop for ModuleSource {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const HELLO: &str = r#"
#include <linux/module.h>
MODULE_LICENSE("GPL");
static int __init hello_init(void) { pr_info("hello\n"); return 0; }
static void __exit hello_exit(void) { }
module_init(hello_init);
module_exit(hello_exit);
"#;

#[test]
fn a_module_builds_for_the_test_kernel() {
    let kernel = Kernel::locate().unwrap_or_else(|e| panic!("{e}"));
    let src = ModuleSource::new("qs_hello", HELLO);
    let kos = build_module(&kernel, &src.0.join("src"), &src.0.join("work")).unwrap();
    assert_eq!(
        kos,
        [src.0.join("work/qs_hello.ko").canonicalize().unwrap()]
    );
    let info = modinfo(&kos[0]).unwrap();
    let vermagic = info
        .iter()
        .find(|(k, _)| k == "vermagic")
        .map(|(_, v)| v.as_str());
    assert!(
        vermagic.is_some_and(|v| v.starts_with(&format!("{} ", kernel.release))),
        "{vermagic:?}"
    );
}

#[test]
fn a_compile_error_shows_the_compiler_output() {
    let kernel = Kernel::locate().unwrap_or_else(|e| panic!("{e}"));
    let src = ModuleSource::new(
        "qs_broken",
        &HELLO.replace("return 0;", "return undeclared_thing;"),
    );
    let err = build_module(&kernel, &src.0.join("src"), &src.0.join("work")).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("undeclared_thing") && text.contains("error"),
        "{text}"
    );
    assert!(text.contains("make -C"), "{text}");
}

/// The agent, built from scratch for each supported kernel, draws no warning from the
/// compiler, modpost, objtool (which checks IBT's ENDBR64s and the return thunks) or BTF.
#[test]
fn the_agent_builds_without_a_warning_for_every_supported_kernel() {
    let agent = xtask::repo_root().join("guest-agent/linux");
    for id in KernelId::ALL {
        let kernel = Kernel::locate_id(id).unwrap_or_else(|e| panic!("{e}"));
        let work = std::env::temp_dir().join(format!("qs-agent-{id}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        let kos = build_module(&kernel, &agent, &work).unwrap_or_else(|e| panic!("{id}: {e:#}"));
        assert!(
            kos.iter().any(|k| k.ends_with("quicksilver.ko")),
            "{id}: {kos:?}"
        );
        let log = std::fs::read_to_string(work.join("build.log")).unwrap();
        let complaints: Vec<&str> = log
            .lines()
            .filter(|l| {
                let l = l.to_lowercase();
                l.contains("warning") || l.contains("objtool") || l.contains("error")
            })
            .collect();
        assert!(complaints.is_empty(), "{id}: {complaints:#?}\n{log}");
        assert!(log.contains("LD [M]"), "{id}: the log is kbuild's:\n{log}");
        let _ = std::fs::remove_dir_all(&work);
    }
}
