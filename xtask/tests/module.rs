//! Out-of-tree modules build against the cached headers (`cargo xtask setup` first), and a
//! build error reaches the user with the compiler's words.

use std::path::PathBuf;

use xtask::build::build_module;
use xtask::initrd::modinfo;
use xtask::Kernel;

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
