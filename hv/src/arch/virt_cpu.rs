//! The vendor-neutral interface of a virtual CPU: what the exit handlers, the debugger and the
//! run loop may see and change of the guest. SVM implements it over the VMCB
//! (`arch::svm::Vcpu`); VMX will over the VMCS. Host tests implement it with fake CPUs
//! (barevisor's `Guest` trait is the model; here the handlers, not only the loop, are written
//! against it, so that they are testable on the host).

/// General registers, in the encoding order of the instruction set (ModRM.reg).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gpr {
    Rax,
    Rcx,
    Rdx,
    Rbx,
    Rsp,
    Rbp,
    Rsi,
    Rdi,
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
}

/// Exception vectors the hv injects or reflects (AMD APM vol. 2, 8.2).
pub mod vector {
    pub const DB: u8 = 1;
    pub const NMI: u8 = 2;
    pub const BP: u8 = 3;
    pub const OF: u8 = 4;
    pub const UD: u8 = 6;
    pub const GP: u8 = 13;
}

/// An event to deliver to the guest at its next instruction boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A fault or trap, with its error code where the vector has one.
    Exception { vector: u8, error_code: Option<u32> },
    /// A non-maskable interrupt (a foreign NMI the hv intercepted, reflected).
    Nmi,
    /// `INT n` (and INTO), delivered as the instruction would have.
    SoftwareInterrupt { vector: u8 },
}

impl Event {
    pub const UD: Event = Event::Exception {
        vector: vector::UD,
        error_code: None,
    };
    pub const GP: Event = Event::Exception {
        vector: vector::GP,
        error_code: Some(0),
    };
    pub const BP: Event = Event::Exception {
        vector: vector::BP,
        error_code: None,
    };
    pub const DB: Event = Event::Exception {
        vector: vector::DB,
        error_code: None,
    };
}

/// RFLAGS bits the hv uses (AMD APM vol. 2, 3.1.6).
pub mod rflags {
    pub const TF: u64 = 1 << 8;
    pub const IF: u64 = 1 << 9;
    pub const RF: u64 = 1 << 16;
}

/// DR6 bits (AMD APM vol. 2, 13.1.1.3): B0-B3 in bits 3:0, BS single step.
pub mod dr6 {
    pub const B_MASK: u64 = 0xF;
    pub const BS: u64 = 1 << 14;
}

/// What the layers above the vendor may see and change of one guest CPU, between an exit and
/// the next entry.
pub trait VirtCpu {
    fn gpr(&self, r: Gpr) -> u64;
    fn set_gpr(&mut self, r: Gpr, v: u64);
    fn rip(&self) -> u64;
    fn set_rip(&mut self, v: u64);
    fn rflags(&self) -> u64;
    fn set_rflags(&mut self, v: u64);
    fn cr3(&self) -> u64;
    fn cpl(&self) -> u8;
    fn efer(&self) -> u64;
    fn set_efer(&mut self, v: u64);
    fn dr6(&self) -> u64;
    fn set_dr6(&mut self, v: u64);
    fn dr7(&self) -> u64;
    /// DR7 for the next entry (the caller also loads it into the CPU: TCG arms breakpoints
    /// only from a host-mode `mov dr7`, FACTS.md).
    fn set_dr7(&mut self, v: u64);
    /// Delivers `e` at the next entry.
    fn inject(&mut self, e: Event);
    /// Delivers again an event the exit interrupted (APM 15.7.2), if there was one.
    fn reinject_interrupted(&mut self);
    /// Is the guest inside an NMI handler: from the delivery of an NMI (every NMI the guest
    /// gets is one the hv injected) to the IRET that ends it ([`VmExit::Iret`])? The CPU holds
    /// further NMIs back meanwhile; a state captured there cannot be restored as it was.
    ///
    /// [`VmExit::Iret`]: crate::arch::VmExit::Iret
    fn in_nmi(&self) -> bool;
    /// At the IRET exit: the handler ends with this IRET (which runs when the guest resumes).
    fn end_nmi(&mut self);
    /// Completes the instruction at RIP, `len` bytes long: RIP moves past it and an interrupt
    /// shadow it had (after STI or MOV SS) no longer applies (APM 15.21.5).
    fn skip(&mut self, len: u64);
    /// Intercepts INT3/INTn, #BP and #DB (a debugger is attached), or lets them through.
    fn set_debug_intercepts(&mut self, on: bool);
    /// Holds physical interrupts away from the guest (a single step must not land in a
    /// handler), or lets them through again.
    fn hold_interrupts(&mut self, on: bool);
    /// Drops the guest's cached translations at the next entry (nested tables changed).
    fn flush_tlb(&mut self);
}

/// Sets RAX, RBX, RCX, RDX to a CPUID answer.
pub fn set_cpuid_result(cpu: &mut impl VirtCpu, r: [u32; 4]) {
    cpu.set_gpr(Gpr::Rax, r[0] as u64);
    cpu.set_gpr(Gpr::Rbx, r[1] as u64);
    cpu.set_gpr(Gpr::Rcx, r[2] as u64);
    cpu.set_gpr(Gpr::Rdx, r[3] as u64);
}

/// A fake CPU for host tests of everything written against [`VirtCpu`].
#[cfg(test)]
pub mod fake {
    use super::*;

    #[derive(Clone, Debug, Default)]
    pub struct FakeCpu {
        pub gprs: [u64; 16],
        pub rip: u64,
        pub rflags: u64,
        pub cr3: u64,
        pub cpl: u8,
        pub efer: u64,
        pub dr6: u64,
        pub dr7: u64,
        pub injected: Option<Event>,
        pub reinjected: bool,
        pub debug_intercepts: bool,
        pub interrupts_held: bool,
        pub tlb_flushed: bool,
        /// Inside an NMI handler (an NMI injected, its IRET not reached).
        pub nmi: bool,
    }

    impl VirtCpu for FakeCpu {
        fn gpr(&self, r: Gpr) -> u64 {
            self.gprs[r as usize]
        }
        fn set_gpr(&mut self, r: Gpr, v: u64) {
            self.gprs[r as usize] = v;
        }
        fn rip(&self) -> u64 {
            self.rip
        }
        fn set_rip(&mut self, v: u64) {
            self.rip = v;
        }
        fn rflags(&self) -> u64 {
            self.rflags
        }
        fn set_rflags(&mut self, v: u64) {
            self.rflags = v;
        }
        fn cr3(&self) -> u64 {
            self.cr3
        }
        fn cpl(&self) -> u8 {
            self.cpl
        }
        fn efer(&self) -> u64 {
            self.efer
        }
        fn set_efer(&mut self, v: u64) {
            self.efer = v;
        }
        fn dr6(&self) -> u64 {
            self.dr6
        }
        fn set_dr6(&mut self, v: u64) {
            self.dr6 = v;
        }
        fn dr7(&self) -> u64 {
            self.dr7
        }
        fn set_dr7(&mut self, v: u64) {
            self.dr7 = v;
        }
        fn inject(&mut self, e: Event) {
            self.nmi |= e == Event::Nmi;
            self.injected = Some(e);
        }
        fn in_nmi(&self) -> bool {
            self.nmi
        }
        fn end_nmi(&mut self) {
            self.nmi = false;
        }
        fn reinject_interrupted(&mut self) {
            self.reinjected = true;
        }
        fn skip(&mut self, len: u64) {
            self.rip += len;
        }
        fn set_debug_intercepts(&mut self, on: bool) {
            self.debug_intercepts = on;
        }
        fn hold_interrupts(&mut self, on: bool) {
            self.interrupts_held = on;
        }
        fn flush_tlb(&mut self) {
            self.tlb_flushed = true;
        }
    }
}
