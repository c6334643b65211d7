//! `qs-bridge`: the operator's end of the serial link. One concern per module:
//!
//! - [`link`]: where the link is and the framed link over it (Unix socket, TCP, serial port);
//!   its reader drops (and counts) anything corrupt, truncated, oversized or replayed;
//! - [`net`]: the fast link (`--net`): the machine's NIC, UDP datagrams, its handshake,
//!   pings and the fall back to the serial link; [`rate`]: a byte counter's recent rate;
//! - [`auth`]: the hello and the challenge/response, with clear refusals;
//! - [`state`]: what the bridge knows (link, session, counts), shared by the threads below;
//! - [`gdb`]: the demultiplexer that routes every frame by channel, and one gdb client at a
//!   time on TCP (attention, wait for every CPU to stop, detach for a gdb that vanished);
//! - [`rsp`]: the pure filter over gdb's packets (target-description reads answered here);
//! - [`control`]: the control socket (for `qs-tui`): one request a line, one JSON reply a line;
//! - [`checkpoints`]: its checkpoint commands and reads, matched with the machine's replies by
//!   tag, and the machine's events pushed to subscribed clients;
//! - [`export`]: a checkpoint into a file over the link (staged, resumable);
//! - [`facts`]: the machine's facts for those reads, and a page as it crosses the link;
//! - [`inspect`]: where each CPU of a checkpoint was, with `--vmlinux`'s symbols;
//! - [`compare`]: what changed between two checkpoints (or since one), by region and symbol.
//!
//! `main.rs` wires them: open the link, authenticate, serve the control socket and gdb.
//!
//! No `unsafe` here: a serial port's termios goes through `rustix`'s safe calls.

#![forbid(unsafe_code)]

pub mod auth;
pub mod checkpoints;
pub mod compare;
pub mod control;
pub mod export;
pub mod facts;
pub mod gdb;
pub mod inspect;
pub mod link;
pub mod net;
pub mod page_kinds;
pub mod patch_sites;
pub mod rate;
pub mod rsp;
pub mod state;

pub use auth::{authenticate, authenticate_until};
pub use control::{bind_control, control_reply, serve_control};
pub use gdb::{serve_gdb, DETACH};
pub use link::{Inbound, Link, LinkAddr};
pub use net::{NetAddr, NetOptions};
pub use state::{LinkState, SessionState, State, Status};
