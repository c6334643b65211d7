//! Checkpoints of the whole machine.

pub mod undo;
