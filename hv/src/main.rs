//! The hv image: its header and the three entry points the agent calls while dormant.
//! Built for `x86_64-unknown-none` as a static PIE at address 0 (`link.ld`), then turned into
//! a flat image by `cargo xtask build` (see `quicksilver_proto::image`).
#![no_std]
#![no_main]

use core::fmt::Write;
use quicksilver_hv::{arch::instr, serial::Com1, vmm};
use quicksilver_proto::abi::{InitArgs, Op, Status};
use quicksilver_proto::image::{self, ImageHeader};

const fn version() -> [u8; 32] {
    let v = env!("CARGO_PKG_VERSION").as_bytes();
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < v.len() && i < 31 {
        out[i] = v[i];
        i += 1;
    }
    out
}

/// The header at offset 0. `cargo xtask build` fills in the fields marked "builder".
#[used]
#[link_section = ".qs_header"]
static QS_HEADER: ImageHeader = ImageHeader {
    magic: image::IMAGE_MAGIC,
    abi_version: image::ABI_VERSION,
    header_size: image::HEADER_SIZE as u32,
    image_size: 0,   // builder
    checksum: 0,     // builder
    code_crc: 0,     // builder
    code_start: 0,   // builder
    code_end: 0,     // builder
    reloc_offset: 0, // builder
    reloc_count: 0,  // builder
    entry_init: 0,   // builder
    entry_activate: 0,
    entry_control: 0,
    mem_fixed: vmm::FIXED_PAGES * image::PAGE_SIZE,
    mem_per_cpu: quicksilver_hv::vcpu::mem_per_cpu(),
    // One page-directory-pointer page for each of the two tables per 512 GiB.
    mem_per_gib: 16,
    max_cpus: vmm::MAX_CPUS,
    flags: 0,
    version: version(),
    reserved: [0; 104],
};

/// The header as the builder left it (the compiler must not fold the zeros above).
fn header() -> ImageHeader {
    // SAFETY: QS_HEADER is a valid static; the volatile read sees the bytes in memory.
    unsafe { core::ptr::read_volatile(&QS_HEADER) }
}

// The agent reaches every entry point by an indirect call. On a kernel built with IBT
// (Debian's 6.12) each target must begin with ENDBR64, which is a NOP where IBT is off. Stable
// Rust cannot emit it, so each Rust entry point gets a trampoline: ENDBR64, then a jump
// (`qs_entry_activate` in world_switch.S begins with one itself). The image builder refuses an
// image whose entry points lack it.
core::arch::global_asm!(
    ".section .text.qs_entry_init, \"ax\"",
    ".global qs_entry_init",
    "qs_entry_init:",
    "    endbr64",
    "    jmp {init}",
    ".section .text.qs_entry_control, \"ax\"",
    ".global qs_entry_control",
    "qs_entry_control:",
    "    endbr64",
    "    jmp {control}",
    init = sym init,
    control = sym control,
);

/// `init` (`qs_entry_init`): relocate the image, check the CPU, build the tables. Once, on one
/// CPU.
///
/// # Safety
/// The agent's call: the image validated and loaded at `args.base_va`, `args` valid.
unsafe extern "C" fn init(args: *const InitArgs) -> i64 {
    if args.is_null() {
        return Status::BadArgument as i64;
    }
    // SAFETY: the agent passes a valid InitArgs for the duration of the call.
    let args = unsafe { *args };
    // SAFETY: base_va is where the agent loaded the image, after validating it (magic,
    // sizes, relocation bounds, checksum). Nothing before this line uses a static.
    unsafe { vmm::relocate(args.base_va as *mut u8) };
    vmm::init(&header(), &args) as i64
}

/// `control` (`qs_entry_control`): operations while dormant, on a buffer in the kernel's address
/// space.
///
/// # Safety
/// The agent's call: `buf` valid for `len` bytes for the duration of the call.
unsafe extern "C" fn control(op: u64, buf: *mut u8, len: u64) -> i64 {
    let Some(hv) = vmm::get() else {
        return Status::NotInitialized as i64;
    };
    let Some(op) = Op::from_u64(op) else {
        return Status::BadOp as i64;
    };
    if matches!(
        op,
        Op::ActiveCpus | Op::AgentStop | Op::NetPoll | Op::NetRelease
    ) {
        return hv.control(op, &mut [], false);
    }
    if buf.is_null() || len > (1 << 20) {
        return Status::BadArgument as i64;
    }
    // SAFETY: the agent passes a buffer of `len` bytes it owns for the duration of the call.
    let buf = unsafe { core::slice::from_raw_parts_mut(buf, len as usize) };
    hv.control(op, buf, false)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let _ = writeln!(Com1, "\r\nquicksilver hv: panic: {info}");
    instr::halt_forever()
}
