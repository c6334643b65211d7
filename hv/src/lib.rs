//! The Quicksilver hypervisor image: a `no_std` AMD SVM hypervisor that slides under a
//! running kernel on request and steps out again.
//!
//! Layers, from the CPU up (ARCHITECTURE.md draws them):
//! - [`arch`]: the only code that knows the vendor or executes a privileged instruction; a
//!   vendor-neutral vCPU interface (`arch::VirtCpu`, `arch::VmExit`) above it;
//! - [`cpu_state`]: a CPU's whole state, vendor-neutral;
//! - [`exit`]: what to do about each exit, one file per kind, one `Action` vocabulary;
//! - [`rendezvous`]: stopping every CPU, for any client;
//! - [`vcpu`]: one CPU's area, activation, run loop, stopping and stepping out;
//! - clients: [`debug`] (the gdbstub), [`freeze`] (every CPU held, its state checked),
//!   [`checkpoint`] (the machine saved and put back);
//! - [`vmm`]: global state built by `init`: memory layout, nested and host page tables;
//! - [`devices`]: the platform's legacy devices, captured and restored (and the port writes
//!   the hv shadows for them);
//! - [`link`]: the serial link's hv end; [`net`]: the fast link's (a NIC the hv drives);
//! - [`paging`], [`npt`], [`frames`], [`decode`]: page tables, nested paging, the frame
//!   pool, instruction lengths (pure logic, unit-tested on the host).
//!
//! The image's entry points and header are in `main.rs`; the ABI is in `quicksilver-proto`.
#![cfg_attr(not(test), no_std)]

pub mod arch;
pub mod checkpoint;
pub mod cpu_state;
pub mod debug;
pub mod decode;
pub mod devices;
pub mod exit;
pub mod frames;
pub mod freeze;
pub mod link;
pub mod net;
pub mod npt;
pub mod paging;
pub mod rendezvous;
pub mod serial;
pub mod vcpu;
pub mod vmm;
