//! Quicksilver's own checkpoint file (`.qsc`), version 1.
//!
//! ```text
//! header    32 bytes   magic "QSCKPT\r\n", version u32, flags u32 (0), 12 reserved bytes (0),
//!                      CRC-32 of the 28 bytes before it
//! section*  24 bytes   kind u32, flags u32 (0), payload length u64, CRC-32 of the payload,
//!                      CRC-32 of the 20 header bytes before it
//!           payload
//! end       a section of kind END: the file's length up to it (u64) and the number of
//!           sections before it (u32)
//! ```
//! All integers little-endian. Every byte of a file is under a checksum, and the end section
//! says how long the file is, so any single flipped bit and any truncation is refused (the
//! property tests check both). Lengths are checked against [`limits`] before anything is
//! allocated. Section payloads other than memory are postcard encodings of [`crate::model`].
//!
//! A file holds one or more checkpoints, oldest first. Each starts with a `CHECKPOINT` section
//! ([`Meta`] and how its memory is kept), then its `CPU` sections (one per CPU, in order), its
//! `DEVICE` sections, and its `MEMORY` sections (at most [`limits::PAGES_PER_SECTION`] pages
//! each: their addresses, ascending, then their contents). The first checkpoint's memory is
//! full: a RAM page it does not list is all zeroes (so zero pages cost nothing). A later one's
//! is a delta against the checkpoint before it in the file: a page it does not list is as
//! there. That is "base plus deltas": a series of periodic checkpoints costs one image and
//! the pages each epoch wrote.
//!
//! Versioning rule: a reader refuses a version above its own and names both; fields are only
//! ever added in new section kinds or a new version, never by changing a kind's payload.
//!
//! [`Meta`]: crate::model::Meta

pub mod error;
pub mod format;
#[cfg(feature = "std")]
pub mod read;
#[cfg(feature = "std")]
pub mod write;

pub use error::FormatError;
