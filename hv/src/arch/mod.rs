//! Everything that knows the CPU vendor or executes a privileged instruction.
//!
//! - [`instr`]: the privileged instructions, one small `unsafe fn` each.
//! - [`svm`]: AMD SVM: the VMCB, the world switch, exit decoding.
//!
//! Nothing outside this module executes a privileged instruction or knows the VMCB layout.

pub mod instr;
pub mod svm;
