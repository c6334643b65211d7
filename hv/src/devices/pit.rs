//! The 8254 programmable interval timer (Intel 8254 datasheet): counters at 0x40-0x42, the
//! control word at 0x43; channel 2's gate and the speaker in port 0x61 (NMI status and
//! control, bits 1:0).
//!
//! What can be read back: with the read-back command (control word 11 C S c2 c1 c0 0: bit 5
//! clear latches the count, bit 4 clear the status), each channel's status byte: OUT (bit 7),
//! NULL COUNT (6), access mode (5:4), mode (3:1), BCD (0); and a counter-latch command
//! (access bits 00) latches the current count. What cannot: the reload value (the count last
//! written: in modes 2 and 3 it sets the period), and the read/write byte flip-flops if the
//! guest was stopped between the two bytes of a 16-bit access (Linux makes those under
//! `i8253_lock`, only when it programs or reads the PIT, which it stops doing once the local
//! APIC timer runs).
//!
//! Channels 0 (the system timer, IRQ 0) and 2 (the speaker, and Linux's TSC calibration) are
//! kept; channel 1 (DRAM refresh on ancient PCs) is not used by anything. On a modern kernel
//! the PIT is idle: Linux's clockevent shuts channel 0 down (`pit_shutdown`: control word 0x30,
//! mode 0, count 0) once the local APIC timer is calibrated, or never uses it when the HPET
//! is there. Measured under QEMU 7.2 with 6.12: channel 0 reads status 0x34 (mode 2, the
//! firmware's 18.2 Hz tick, never reprogrammed: the HPET runs in legacy replacement mode,
//! which takes IRQ 0 away from the PIT), channel 2 0xB0 (mode 0, expired, from calibration). A restore therefore writes a channel only when its mode differs from the captured
//! one (a control word stops and restarts the counter: writing it to a running channel would
//! shift its phase): the captured mode, and the captured current count as the new count (the
//! reload value is not readable; for a one-shot mode the remaining count is the right value,
//! for modes 2 and 3 it makes a shorter period, which nothing on a Linux that has left the PIT
//! behind depends on).
//!
//! QEMU 7.2 (`hw/timer/i8254.c`): the status has no NULL COUNT bit (always 0); latching the
//! count of a channel never programmed (access mode 0) does nothing; port 0x61 is the
//! speaker's (`hw/audio/pcspk.c`), bits 3:2 read back 0.

use super::PortIo;

pub const CHANNEL0: u16 = 0x40;
pub const CHANNEL2: u16 = 0x42;
pub const CONTROL: u16 = 0x43;
/// NMI status and control (AT): bit 0 channel 2's gate, bit 1 speaker data; bits 3:2 NMI
/// enables (active low); bits 7:4 status, read-only.
pub const PORT61: u16 = 0x61;
const PORT61_WRITABLE: u8 = 0x0F;

/// Read-back command: latch status only (count bit 5 set means "do not latch the count").
const READ_BACK_STATUS: u8 = 0xC0 | 0x20;
/// Status bits that say how the channel is programmed (access, mode, BCD).
pub const STATUS_PROGRAM: u8 = 0x3F;

/// One channel's readable state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PitChannel {
    /// The read-back status.
    pub status: u8,
    /// 1 if `count` was read (access mode non-zero).
    pub count_valid: u8,
    /// The current count when captured (a record, and the count a restore loads).
    pub count: u16,
}

impl PitChannel {
    /// Access mode: 1 LSB, 2 MSB, 3 LSB then MSB (0: never programmed).
    pub fn access(&self) -> u8 {
        (self.status >> 4) & 3
    }
    pub fn mode(&self) -> u8 {
        (self.status >> 1) & 7
    }
}

/// Channels 0 and 2, and port 0x61.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PitState {
    pub channels: [PitChannel; 2],
    pub port61: u8,
    pub reserved: [u8; 7],
}

/// The counter port and read-back select bit of the channels kept (0 and 2).
const CHANNELS: [(u16, u8); 2] = [(CHANNEL0, 0), (CHANNEL2, 2)];

impl PitState {
    pub const ZERO: PitState = PitState {
        channels: [PitChannel {
            status: 0,
            count_valid: 0,
            count: 0,
        }; 2],
        port61: 0,
        reserved: [0; 7],
    };

    /// Do the restorable parts (how each channel is programmed, the gate) differ?
    pub fn differs(&self, o: &PitState) -> bool {
        self.channels
            .iter()
            .zip(o.channels.iter())
            .any(|(a, b)| a.status & STATUS_PROGRAM != b.status & STATUS_PROGRAM)
            || self.port61 & PORT61_WRITABLE != o.port61 & PORT61_WRITABLE
    }
}

fn status(io: &mut impl PortIo, port: u16, channel: u8) -> u8 {
    io.outb(CONTROL, READ_BACK_STATUS | (2 << channel));
    io.inb(port)
}

/// Captures channels 0 and 2 and port 0x61.
pub fn capture(io: &mut impl PortIo, out: &mut PitState) {
    for (k, (port, ch)) in CHANNELS.into_iter().enumerate() {
        let mut c = PitChannel {
            status: status(io, port, ch),
            ..Default::default()
        };
        let access = c.access();
        if access != 0 {
            // Counter latch: the control word with access 00.
            io.outb(CONTROL, ch << 6);
            c.count = match access {
                1 => io.inb(port) as u16,
                2 => (io.inb(port) as u16) << 8,
                _ => {
                    let lo = io.inb(port) as u16;
                    lo | (io.inb(port) as u16) << 8
                }
            };
            c.count_valid = 1;
        }
        out.channels[k] = c;
    }
    out.port61 = io.inb(PORT61);
}

/// Reprograms a channel whose mode differs from the captured one, and the gate bits.
pub fn restore(io: &mut impl PortIo, s: &PitState) {
    for (k, (port, ch)) in CHANNELS.into_iter().enumerate() {
        let want = s.channels[k];
        if want.access() == 0
            || status(io, port, ch) & STATUS_PROGRAM == want.status & STATUS_PROGRAM
        {
            continue;
        }
        io.outb(CONTROL, ch << 6 | (want.status & STATUS_PROGRAM));
        match want.access() {
            1 => io.outb(port, want.count as u8),
            2 => io.outb(port, (want.count >> 8) as u8),
            _ => {
                io.outb(port, want.count as u8);
                io.outb(port, (want.count >> 8) as u8);
            }
        }
    }
    let now = io.inb(PORT61);
    if now & PORT61_WRITABLE != s.port61 & PORT61_WRITABLE {
        io.outb(PORT61, s.port61 & PORT61_WRITABLE);
    }
}
