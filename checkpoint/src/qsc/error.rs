//! Why a file is refused: each names what is wrong and where, in words a user acts on.

use alloc::string::String;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a Quicksilver checkpoint file (.qsc): it starts with {found:02x?}, not \"QSCKPT\"; `qs-checkpoint` reads only files that `qsctl export` or qs-tui wrote")]
    NotQsc { found: [u8; 8] },
    #[error("written in format version {found}, newer than this reader's ({supported}): use a newer qs-checkpoint")]
    NewerVersion { found: u32, supported: u32 },
    #[error(
        "corrupt: the header's checksum does not match (the file was damaged after it was written)"
    )]
    HeaderChecksum,
    #[error("truncated: {what} at byte {offset} needs {needed} bytes, the file has {left} left (an export that did not finish? export it again, or resume it)")]
    Truncated {
        what: &'static str,
        offset: u64,
        needed: u64,
        left: u64,
    },
    #[error("corrupt: section {index} at byte {offset}: its header's checksum does not match")]
    SectionHeaderChecksum { index: u32, offset: u64 },
    #[error(
        "corrupt: section {index} ({kind}) at byte {offset}: its contents' checksum does not match"
    )]
    SectionChecksum {
        index: u32,
        kind: &'static str,
        offset: u64,
    },
    #[error("corrupt or not ours: section {index} at byte {offset} is of unknown kind {kind:#x}")]
    UnknownSection { index: u32, offset: u64, kind: u32 },
    #[error("refused: section {index} ({kind}) at byte {offset} is {len} bytes, more than the {limit} this format allows")]
    TooLarge {
        index: u32,
        kind: &'static str,
        offset: u64,
        len: u64,
        limit: u64,
    },
    #[error("refused: {0}")]
    Limit(String),
    #[error("corrupt: section {index} ({kind}) at byte {offset}: {why}")]
    Invalid {
        index: u32,
        kind: &'static str,
        offset: u64,
        why: String,
    },
    #[error("truncated: the file ends after {sections} sections without its end section (an export that did not finish? export it again, or resume it)")]
    NoEnd { sections: u32 },
    #[error("corrupt: the end section says {expected} bytes and {sections_expected} sections before it; the file has {found} bytes and {sections_found} sections")]
    EndMismatch {
        expected: u64,
        found: u64,
        sections_expected: u32,
        sections_found: u32,
    },
    #[error("corrupt: bytes after the end section (at byte {offset})")]
    TrailingBytes { offset: u64 },
}
