//! Links the image binary with its own linker script (only that binary).
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rustc-link-arg-bin=qs-hv=-T{dir}/link.ld");
    println!("cargo:rustc-link-arg-bin=qs-hv=-zmax-page-size=4096");
}
