//! Instruction lengths for the exits that must step over an instruction.
//!
//! QEMU's TCG has no NRIP save (the VMCB's next-RIP field stays 0, FACTS.md), so the hv
//! finds the length itself from the bytes at the guest's RIP. Only the instructions the hv
//! intercepts and completes on the guest's behalf are known; anything else is an error rather
//! than a guess. Legacy prefixes and REX are skipped as the decoder in AMD APM vol. 3, 1.2
//! describes (at most 15 bytes in all).

/// An instruction the hv completes for the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insn {
    Cpuid,
    Rdmsr,
    Wrmsr,
    Vmmcall,
    Stgi,
    /// IN or OUT (AMD APM vol. 3: E4-E7, EC-EF, with prefixes), whose length the exit reported
    /// (SVM's IOIO exit gives the next RIP even without NRIP save: APM vol. 2, 15.10.2).
    PortIo {
        len: u8,
    },
}

impl Insn {
    /// The length the exit reported, for instructions whose bytes need not be decoded.
    pub fn reported_length(self) -> Option<usize> {
        match self {
            Insn::PortIo { len } => Some(len as usize),
            _ => None,
        }
    }
}

/// Why no length could be found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes end before the instruction does.
    Truncated,
    /// More than 15 bytes, or only prefixes.
    TooLong,
    /// The bytes are not the instruction the exit said.
    Mismatch,
}

/// Longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;

/// Length of `insn` at the start of `bytes`, prefixes included.
pub fn length(insn: Insn, bytes: &[u8]) -> Result<usize, DecodeError> {
    if let Some(len) = insn.reported_length() {
        return match len {
            1..=MAX_INSN_LEN => Ok(len),
            _ => Err(DecodeError::TooLong),
        };
    }
    let mut i = 0;
    loop {
        let b = *bytes.get(i).ok_or(DecodeError::Truncated)?;
        let is_prefix = matches!(
            b,
            0x26 | 0x2E | 0x36 | 0x3E | 0x64 | 0x65 | 0x66 | 0x67 | 0xF0 | 0xF2 | 0xF3
        );
        // REX (0x40-0x4F) is a prefix only directly before the opcode; skipping it here is
        // equivalent for the opcodes below, which all start with 0x0F.
        if !(is_prefix || (0x40..=0x4F).contains(&b)) {
            break;
        }
        i += 1;
        if i >= MAX_INSN_LEN {
            return Err(DecodeError::TooLong);
        }
    }
    let opcode: &[u8] = match insn {
        Insn::Cpuid => &[0x0F, 0xA2],
        Insn::Rdmsr => &[0x0F, 0x32],
        Insn::Wrmsr => &[0x0F, 0x30],
        Insn::Vmmcall => &[0x0F, 0x01, 0xD9],
        Insn::Stgi => &[0x0F, 0x01, 0xDC],
        // Answered above from the reported length.
        Insn::PortIo { .. } => return Err(DecodeError::Mismatch),
    };
    for (k, want) in opcode.iter().enumerate() {
        let got = *bytes.get(i + k).ok_or(DecodeError::Truncated)?;
        if got != *want {
            return Err(DecodeError::Mismatch);
        }
    }
    let len = i + opcode.len();
    if len > MAX_INSN_LEN {
        return Err(DecodeError::TooLong);
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_encodings() {
        assert_eq!(length(Insn::Cpuid, &[0x0F, 0xA2, 0x90]), Ok(2));
        assert_eq!(length(Insn::Rdmsr, &[0x0F, 0x32]), Ok(2));
        assert_eq!(length(Insn::Wrmsr, &[0x0F, 0x30]), Ok(2));
        assert_eq!(length(Insn::Vmmcall, &[0x0F, 0x01, 0xD9]), Ok(3));
    }

    #[test]
    fn prefixes_count() {
        // Compilers emit REX.W before WRMSR in some inline asm; operand-size and segment
        // prefixes are legal but useless: all count toward the length.
        assert_eq!(length(Insn::Wrmsr, &[0x48, 0x0F, 0x30]), Ok(3));
        assert_eq!(length(Insn::Cpuid, &[0x66, 0x2E, 0x0F, 0xA2]), Ok(4));
        assert_eq!(length(Insn::Vmmcall, &[0xF3, 0x0F, 0x01, 0xD9]), Ok(4));
    }

    #[test]
    fn wrong_or_short_bytes_are_errors() {
        assert_eq!(
            length(Insn::Cpuid, &[0x0F, 0x30]),
            Err(DecodeError::Mismatch)
        );
        assert_eq!(
            length(Insn::Vmmcall, &[0x0F, 0x01, 0xD8]),
            Err(DecodeError::Mismatch)
        );
        assert_eq!(
            length(Insn::Vmmcall, &[0x0F, 0x01]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(length(Insn::Cpuid, &[]), Err(DecodeError::Truncated));
        assert_eq!(length(Insn::Cpuid, &[0x66; 20]), Err(DecodeError::TooLong));
        let mut long = [0x66u8; 15];
        long[13] = 0x0F;
        long[14] = 0x01;
        assert_eq!(length(Insn::Vmmcall, &long), Err(DecodeError::Truncated));
    }

    #[test]
    fn never_panics_on_any_short_input() {
        for a in 0..=255u8 {
            for b in [0x0F, 0x01, 0xA2, 0x66, 0x48] {
                for insn in [Insn::Cpuid, Insn::Rdmsr, Insn::Wrmsr, Insn::Vmmcall] {
                    let _ = length(insn, &[a, b]);
                    let _ = length(insn, &[b, a, 0x0F]);
                }
            }
        }
    }
}
