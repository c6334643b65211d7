//! Checkpoints of a live machine as data: the model ([`model`], `no_std` with `alloc`, for
//! the hv too), Quicksilver's own file format ([`qsc`]) and, with `std`, kdump-compatible
//! ELF cores ([`elf`]) and comparisons ([`diff`]). `qs-checkpoint` is the command line over
//! them.
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

#[cfg(feature = "std")]
pub mod assemble;
#[cfg(feature = "std")]
pub mod diff;
#[cfg(feature = "std")]
pub mod elf;
pub mod model;
pub mod qsc;
