//! `cargo xtask abi-header`: writes `guest-agent/linux/qs_abi.h`, the C side of the ABI, from
//! `quicksilver-proto`, its one source. The C module includes the header; nothing in it is
//! written by hand, so the module and `qsctl` cannot disagree on a number, a layout or a
//! message. The test below fails while the committed header differs from what proto
//! generates; the header asserts every size, offset and request number as Rust computed
//! them, so a C compiler that lays a struct out otherwise fails the module's build.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use quicksilver_proto::abi::{self, InitArgs, Op, Status};
use quicksilver_proto::c_abi::{CStruct, CVariant};
use quicksilver_proto::image::{self, ImageHeader};
use quicksilver_proto::ioctl::{self, AgentInfo, NicPeek, Peek, Probe, StatsRequest, SwitchResult};

/// The generated header, relative to the repository's root.
pub const HEADER: &str = "guest-agent/linux/qs_abi.h";

/// Where the header lives in this checkout.
pub fn header_path() -> PathBuf {
    crate::repo_root().join(HEADER)
}

/// Writes the header if it differs from what proto generates; returns whether it changed.
pub fn write() -> anyhow::Result<bool> {
    let path = header_path();
    let text = generate();
    if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
        return Ok(false);
    }
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(true)
}

/// Fails, saying what to run, if the committed header is not what proto generates.
pub fn check() -> anyhow::Result<()> {
    let path = header_path();
    let committed =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    if committed != generate() {
        anyhow::bail!("{HEADER} is stale: run cargo xtask abi-header");
    }
    Ok(())
}

/// The header's text.
pub fn generate() -> String {
    let mut h = String::new();
    h.push_str(PREAMBLE);

    section(&mut h, "the hv image (proto/src/image.rs)");
    let (nul, magic) = image::IMAGE_MAGIC.split_last().expect("a magic");
    assert_eq!(*nul, 0, "the magic ends in its NUL");
    let magic = std::str::from_utf8(magic).expect("an ASCII magic");
    defines(
        &mut h,
        [
            (
                "QS_IMAGE_MAGIC",
                format!("\"{magic}\"\t/* 8 bytes with the NUL */"),
            ),
            ("QS_ABI_VERSION", image::ABI_VERSION.to_string()),
            ("QS_HEADER_SIZE", image::HEADER_SIZE.to_string()),
            ("QS_MAX_IMAGE_SIZE", u64_hex(image::MAX_IMAGE_SIZE)),
            ("QS_CHECKSUM_OFFSET", image::CHECKSUM_OFFSET.to_string()),
        ],
    );
    h.push('\n');
    structure::<ImageHeader>(&mut h);

    section(&mut h, "init and the store (proto/src/abi.rs)");
    structure::<InitArgs>(&mut h);
    comment(
        &mut h,
        "",
        "Bytes in one chunk of the hv's store (InitArgs.store_chunks_va): one order-10 block of\n\
         the page allocator, aligned to its size.",
    );
    defines(
        &mut h,
        [("QS_STORE_CHUNK_SIZE", u64_hex(abi::STORE_CHUNK_SIZE))],
    );

    section(&mut h, "the fast link's NIC (proto/src/abi.rs)");
    structure::<abi::NetConfig>(&mut h);
    defines(
        &mut h,
        [
            ("QS_NET_BARS", abi::NET_BARS.to_string()),
            ("QS_NET_POLL_OURS", abi::NET_POLL_OURS.to_string()),
            ("QS_NET_POLL_STOP", abi::NET_POLL_STOP.to_string()),
        ],
    );

    section(&mut h, "freeze (proto/src/abi.rs)");
    structure::<abi::FreezeArgs>(&mut h);
    defines(
        &mut h,
        [
            ("QS_FREEZE_CHECK", abi::FREEZE_CHECK.to_string()),
            ("QS_FREEZE_MAX_MS", abi::FREEZE_MAX_MS.to_string()),
        ],
    );

    section(&mut h, "checkpoints (proto/src/abi.rs)");
    structure::<abi::CheckpointArgs>(&mut h);
    structure::<abi::RollbackArgs>(&mut h);
    structure::<abi::RollbackNotice>(&mut h);
    structure::<abi::CheckpointInfo>(&mut h);
    structure::<abi::CheckpointList>(&mut h);
    structure::<abi::CheckpointDelete>(&mut h);
    structure::<abi::CheckpointPeriodic>(&mut h);
    structure::<abi::LinkRequest>(&mut h);
    structure::<abi::LinkBulk>(&mut h);
    structure::<abi::CheckpointChanged>(&mut h);
    structure::<abi::CheckpointDevices>(&mut h);
    structure::<abi::ExportMeta>(&mut h);
    structure::<abi::CheckpointRead>(&mut h);
    structure::<abi::CheckpointCpu>(&mut h);
    defines(
        &mut h,
        [
            ("QS_MAX_RAM_RANGES", abi::MAX_RAM_RANGES.to_string()),
            ("QS_MAX_CHECKPOINTS", abi::MAX_CHECKPOINTS.to_string()),
            ("QS_CKPT_MAX_CHUNKS", abi::CKPT_MAX_CHUNKS.to_string()),
            ("QS_CHECKPOINT_ALL", u32_hex(abi::CHECKPOINT_ALL)),
            (
                "QS_CHECKPOINT_PERIODIC",
                abi::CHECKPOINT_PERIODIC.to_string(),
            ),
            ("QS_CHECKPOINT_CURRENT", abi::CHECKPOINT_CURRENT.to_string()),
            ("QS_PERIODIC_MIN_MS", abi::PERIODIC_MIN_MS.to_string()),
            ("QS_LINK_RX_ATTENTION", abi::LINK_RX_ATTENTION.to_string()),
            ("QS_LINK_RX_CHECKPOINT", abi::LINK_RX_CHECKPOINT.to_string()),
            ("QS_LINK_OP_TAKE", abi::LINK_OP_TAKE.to_string()),
            ("QS_LINK_OP_ROLLBACK", abi::LINK_OP_ROLLBACK.to_string()),
            ("QS_LINK_OP_DELETE", abi::LINK_OP_DELETE.to_string()),
            ("QS_LINK_OP_READ_META", abi::LINK_OP_READ_META.to_string()),
            ("QS_LINK_OP_READ_CPU", abi::LINK_OP_READ_CPU.to_string()),
            ("QS_LINK_OP_READ_PAGES", abi::LINK_OP_READ_PAGES.to_string()),
            ("QS_LINK_OP_READ_FILL", abi::LINK_OP_READ_FILL.to_string()),
            (
                "QS_LINK_OP_READ_CHANGED",
                abi::LINK_OP_READ_CHANGED.to_string(),
            ),
            ("QS_CHANGED_RUN_PAGES", abi::CHANGED_RUN_PAGES.to_string()),
            (
                "QS_LINK_OP_READ_DEVICES",
                abi::LINK_OP_READ_DEVICES.to_string(),
            ),
            ("QS_DEVICES_RECORD_V1", abi::DEVICES_RECORD_V1.to_string()),
            ("QS_LINK_OP_READ_STATS", abi::LINK_OP_READ_STATS.to_string()),
            ("QS_LINK_OP_PERIODIC", abi::LINK_OP_PERIODIC.to_string()),
            (
                "QS_STATS_HEADER_SIZE",
                std::mem::size_of::<quicksilver_proto::stats::StatsHeader>().to_string(),
            ),
            (
                "QS_CPU_STATS_SIZE",
                std::mem::size_of::<quicksilver_proto::stats::CpuStats>().to_string(),
            ),
            (
                "QS_LINK_READ_MAX_PAGES",
                abi::LINK_READ_MAX_PAGES.to_string(),
            ),
            ("QS_LINK_BULK_END", abi::LINK_BULK_END.to_string()),
            ("QS_LINK_REQUEST_FAST", abi::LINK_REQUEST_FAST.to_string()),
            ("QS_LINK_BULK_BATCH", abi::LINK_BULK_BATCH.to_string()),
            (
                "QS_CHECKPOINT_READ_DATA",
                abi::CHECKPOINT_READ_DATA.to_string(),
            ),
            (
                "QS_NOTICE_HOT_PAGES_OFFSET",
                abi::NOTICE_HOT_PAGES_OFFSET.to_string(),
            ),
            (
                "QS_NOTICE_WATCHDOG_RESET_OFFSET",
                abi::NOTICE_WATCHDOG_RESET_OFFSET.to_string(),
            ),
        ],
    );

    section(&mut h, "hypercalls and CPUID (proto/src/abi.rs)");
    defines(
        &mut h,
        [("QS_HYPERCALL_MAGIC", u64_hex(abi::HYPERCALL_MAGIC))],
    );
    for v in Op::VARIANTS {
        comment(&mut h, "", v.doc);
        defines(&mut h, [(&c_name("QS_OP_", v), v.value.to_string())]);
    }
    h.push('\n');
    defines(
        &mut h,
        [
            (
                "QS_CPUID_SIGNATURE_LEAF",
                u32_hex(abi::CPUID_SIGNATURE_LEAF),
            ),
            ("QS_CPUID_INFO_LEAF", u32_hex(abi::CPUID_INFO_LEAF)),
        ],
    );
    for (reg, bytes) in ["EBX", "ECX", "EDX"]
        .iter()
        .zip(abi::CPUID_SIGNATURE.chunks(4))
    {
        let word = u32::from_le_bytes(bytes.try_into().expect("4 bytes"));
        let text = String::from_utf8_lossy(bytes).replace('\0', "\\0");
        let value = format!("{}\t/* \"{text}\" */", u32_hex(word));
        defines(&mut h, [(&format!("QS_SIG_{reg}"), value)]);
    }

    section(&mut h, "statuses (proto/src/abi.rs)");
    h.push_str("enum qs_status {\n");
    for v in Status::VARIANTS {
        assert!(v.value >= 0, "a status indexes qs_status_text");
        comment(&mut h, "\t", v.doc);
        let _ = writeln!(h, "\t{} = {},", c_name("QS_", v), v.value);
    }
    h.push_str("};\n\n");
    h.push_str("/* What went wrong and what to do about it: Status::message() in Rust. */\n");
    h.push_str("static const char *const qs_status_text[] = {\n");
    for v in Status::VARIANTS {
        let msg = v.message.expect("every status has a message");
        let _ = writeln!(h, "\t[{}] = {},", c_name("QS_", v), c_string(msg));
    }
    h.push_str("};\n\n");
    defines(
        &mut h,
        [("QS_UNKNOWN_STATUS", c_string(abi::UNKNOWN_STATUS))],
    );
    h.push_str(STATUS_MESSAGE_FN);

    section(&mut h, "ioctls on /dev/quicksilver (proto/src/ioctl.rs)");
    structure::<SwitchResult>(&mut h);
    structure::<StatsRequest>(&mut h);
    structure::<Probe>(&mut h);
    structure::<Peek>(&mut h);
    structure::<NicPeek>(&mut h);
    structure::<AgentInfo>(&mut h);
    structure::<ioctl::BufferRequest>(&mut h);
    structure::<ioctl::ReadRequest>(&mut h);
    structure::<ioctl::ExportInfo>(&mut h);
    defines(
        &mut h,
        [("QS_READ_MAX_PAGES", ioctl::READ_MAX_PAGES.to_string())],
    );
    defines(
        &mut h,
        [("QS_IOC_MAGIC", format!("'{}'", ioctl::MAGIC as char))],
    );
    for r in ioctl::REQUESTS {
        let name = format!("QS_IOC_{}", r.name);
        comment(&mut h, "", r.doc);
        let value = format!(
            "{}(QS_IOC_MAGIC, {}, struct {})",
            r.dir.c_macro(),
            r.nr,
            r.arg
        );
        defines(&mut h, [(&name, value)]);
        let _ = writeln!(h, "QS_ASSERT({name} == {});", u32_hex(r.number));
    }

    h.push_str("\n#endif /* QS_ABI_H */\n");
    h
}

const PREAMBLE: &str = "/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * GENERATED by `cargo xtask abi-header` from quicksilver-proto (proto/src/abi.rs, image.rs,
 * ioctl.rs): do not edit. Change proto and run the command again; a host test fails while
 * this file differs from what proto generates.
 *
 * The ABI between the agent and the hv image, and between qsctl and the agent. Every size,
 * offset and request number is asserted as Rust computed it.
 */
#ifndef QS_ABI_H
#define QS_ABI_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define QS_ASSERT(cond) _Static_assert(cond, #cond \" (as quicksilver-proto has it)\")
";

const STATUS_MESSAGE_FN: &str = "
/* The message for a status an entry point or hypercall returned. */
static inline const char *qs_status_message(long s)
{
	if (s < 0 || s >= (long)(sizeof(qs_status_text) / sizeof(qs_status_text[0])) ||
	    !qs_status_text[s])
		return QS_UNKNOWN_STATUS;
	return qs_status_text[s];
}
";

fn section(h: &mut String, title: &str) {
    if !h.ends_with("\n\n") {
        h.push('\n');
    }
    let _ = writeln!(h, "/* ---- {title} ---- */\n");
}

/// `#define NAME VALUE` for each pair.
fn defines<const N: usize>(h: &mut String, pairs: [(&str, String); N]) {
    for (name, value) in pairs {
        let _ = writeln!(h, "#define {name} {value}");
    }
}

/// A Rust doc comment as a C comment at `indent`: one line, or a block.
fn comment(h: &mut String, indent: &str, doc: &str) {
    let lines: Vec<String> = doc
        .lines()
        .map(|l| {
            l.strip_prefix(' ')
                .unwrap_or(l)
                .replace("[`", "`")
                .replace("`]", "`")
        })
        .collect();
    match lines.as_slice() {
        [] => {}
        [one] => {
            let _ = writeln!(h, "{indent}/* {one} */");
        }
        many => {
            let _ = writeln!(h, "{indent}/*");
            for l in many {
                let _ = writeln!(h, "{indent} * {l}");
            }
            let _ = writeln!(h, "{indent} */");
        }
    }
}

/// A struct, its fields with their docs, and the assertions of its size and every offset.
fn structure<S: CStruct>(h: &mut String) {
    comment(h, "", S::DOC);
    let _ = writeln!(h, "struct {} {{", S::C_NAME);
    for f in S::FIELDS {
        comment(h, "\t", f.doc);
        if f.len == 0 {
            let _ = writeln!(h, "\t{} {};", f.c_type, f.name);
        } else {
            let _ = writeln!(h, "\t{} {}[{}];", f.c_type, f.name, f.len);
        }
    }
    h.push_str("};\n");
    let _ = writeln!(h, "QS_ASSERT(sizeof(struct {}) == {});", S::C_NAME, S::SIZE);
    for f in S::FIELDS {
        let _ = writeln!(
            h,
            "QS_ASSERT(__builtin_offsetof(struct {}, {}) == {});",
            S::C_NAME,
            f.name,
            f.offset
        );
    }
    h.push('\n');
}

/// `PREFIX` and the variant's name in capitals with `_` between words: `NoNpt` -> `QS_NO_NPT`.
fn c_name(prefix: &str, v: &CVariant) -> String {
    let mut out = prefix.to_string();
    let mut prev_lower = false;
    for c in v.name.chars() {
        if c.is_ascii_uppercase() && prev_lower {
            out.push('_');
        }
        prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn c_string(s: &str) -> String {
    assert!(s.is_ascii(), "C strings here are ASCII: {s:?}");
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn u64_hex(v: u64) -> String {
    format!("{v:#x}ull")
}

fn u32_hex(v: u32) -> String {
    format!("{v:#010x}u")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_header_is_what_proto_generates() {
        if let Err(e) = check() {
            panic!("{e:#}");
        }
    }

    #[test]
    fn c_names_split_words_like_the_kernel_code_spells_them() {
        let name = |n| {
            c_name(
                "QS_",
                &CVariant {
                    name: n,
                    value: 0,
                    doc: "",
                    message: None,
                },
            )
        };
        assert_eq!(name("NoNpt"), "QS_NO_NPT");
        assert_eq!(name("La57Unsupported"), "QS_LA57_UNSUPPORTED");
        assert_eq!(name("SvmInUse"), "QS_SVM_IN_USE");
        assert_eq!(name("Ok"), "QS_OK");
    }

    #[test]
    fn every_status_message_is_in_the_header_word_for_word() {
        let h = generate();
        for s in Status::ALL {
            assert!(
                h.contains(&c_string(s.message())),
                "{s:?}'s message is not in the header"
            );
        }
        assert!(h.contains("QS_NO_NPT = 4,"));
        assert!(h.contains("QS_ASSERT(QS_IOC_ACTIVATE == 0x80185101u);"));
    }
}
