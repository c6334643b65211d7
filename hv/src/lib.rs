//! The Quicksilver hypervisor image: a `no_std` AMD SVM hypervisor that slides under a
//! running kernel on request and steps out again.
//!
//! Layout:
//! - [`arch`]: privileged instructions and the AMD SVM vendor layer (VMCB, world switch);
//! - [`exit`]: what to do about each exit, vendor-neutral;
//! - [`vcpu`]: one CPU's activation, run loop and return to native;
//! - [`debug`]: the gdbstub: stopping CPUs, registers, memory, breakpoints;
//! - [`vmm`]: global state built by `init`: memory layout, nested and host page tables;
//! - [`paging`], [`decode`]: page-table building and walking, instruction lengths (pure
//!   logic, unit-tested on the host).
//!
//! The image's entry points and header are in `main.rs`; the ABI is in `quicksilver-proto`.
#![cfg_attr(not(test), no_std)]

pub mod arch;
pub mod debug;
pub mod decode;
pub mod exit;
pub mod frames;
pub mod link;
pub mod npt;
pub mod paging;
pub mod serial;
pub mod vcpu;
pub mod vmm;
