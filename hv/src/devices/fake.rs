//! Fake devices for host tests: each models its datasheet's register semantics (the hidden
//! state included: the 8259's init words, the 8254's latches, the UART's FCR), and every access
//! is logged so that tests can check the order a restore writes in.

use super::*;

/// One access, in the order it was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    In(u16, u8),
    Out(u16, u8),
    Read(u64, u32),
    Write(u64, u32),
    Delay(u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeIoApic {
    pub sel: u32,
    pub id: u32,
    pub version: u32,
    pub rte: [u64; 24],
    pub eois: Vec<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakePic {
    pub imr: u8,
    pub irr: u8,
    pub isr: u8,
    pub read_isr: bool,
    pub init_state: u8,
    /// ICW1-ICW4 as last written (write-only in the real part).
    pub icw: [u8; 4],
    pub elcr: u8,
    pub elcr_mask: u8,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakePitChannel {
    pub mode: u8,
    pub access: u8,
    pub bcd: u8,
    pub reload: u16,
    pub count: u16,
    pub write_msb_next: bool,
    pub read_msb_next: bool,
    pub status_latch: Option<u8>,
    /// Latched count and how many bytes of it are left to read.
    pub count_latch: Option<(u16, u8)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeHpet {
    pub id: u32,
    pub period: u32,
    pub config: u32,
    pub counter: u64,
    /// (configuration, comparator, FSB route) per timer.
    pub timers: [(u64, u64, u64); 3],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeRtc {
    pub index: u8,
    pub regs: [u8; 128],
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeUart {
    pub lcr: u8,
    pub ier: u8,
    pub mcr: u8,
    pub scr: u8,
    pub dll: u8,
    pub dlm: u8,
    /// Write-only in the real part.
    pub fcr: u8,
}

/// A PC's legacy devices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakePlatform {
    pub log: Vec<Access>,
    pub ioapic: FakeIoApic,
    pub pic: [FakePic; 2],
    pub pit: [FakePitChannel; 3],
    pub port61: u8,
    pub hpet: FakeHpet,
    pub rtc: FakeRtc,
    pub uart: FakeUart,
    pub ioapic_present: bool,
    pub hpet_present: bool,
}

const IOAPIC: u64 = ioapic::DEFAULT_BASE;
const HPET: u64 = hpet::DEFAULT_BASE;

impl FakePlatform {
    /// The devices as Linux 6.12 leaves them under QEMU's `pc` machine (measured with
    /// `qsctl freeze --check`): PICs initialized and fully masked, PIT channel 0 in the
    /// firmware's mode 2 and channel 2 expired in mode 0, the HPET enabled in legacy
    /// replacement mode with its timers idle, COM1 at 9600 baud (LCR 0x13) with its receive
    /// and line-status interrupts on, a few IOAPIC pins routed.
    pub fn linux() -> FakePlatform {
        let mut rte = [rte_masked(0); 24];
        rte[1] = 0x0100_0000_0000_0031; // keyboard, edge, CPU 1
        rte[4] = 0x0000_0000_0000_0034; // COM1
        rte[9] = 0x0F00_0000_0000_A039; // ACPI SCI, level, active low
        let pic = |icw2: u8, icw3: u8, elcr_mask: u8| FakePic {
            imr: 0xFF,
            icw: [pic::ICW1, icw2, icw3, pic::ICW4],
            elcr: 0x20 & elcr_mask,
            elcr_mask,
            ..Default::default()
        };
        let mut regs = [0u8; 128];
        regs[0x0A] = 0x26;
        regs[0x0B] = 0x02;
        regs[0x0D] = 0x80;
        let mut timers = [(0x0000_00F0_0000_0030u64, u64::MAX, 0u64); 3];
        timers[0].0 |= 1 << 4; // periodic capable
        FakePlatform {
            log: Vec::new(),
            ioapic: FakeIoApic {
                sel: 0x13,
                id: 0,
                version: 0x0017_0020,
                rte,
                eois: Vec::new(),
            },
            pic: [pic(0x30, 0x04, 0xF8), pic(0x38, 0x02, 0xDE)],
            pit: [
                FakePitChannel {
                    mode: 2,
                    access: 3,
                    reload: 0,
                    count: 0xC123,
                    ..Default::default()
                },
                FakePitChannel::default(),
                FakePitChannel {
                    mode: 0,
                    access: 3,
                    count: 0x2E9B,
                    ..Default::default()
                },
            ],
            port61: 0x20,
            hpet: FakeHpet {
                id: 0x8086_A201,
                period: 10_000_000,
                config: hpet::ENABLE_CNF | hpet::LEG_RT_CNF,
                counter: 0x1234_5678,
                timers,
            },
            rtc: FakeRtc { index: 0x0C, regs },
            uart: FakeUart {
                lcr: 0x13,
                ier: 0x05,
                mcr: 0x0B,
                scr: 0,
                dll: 12,
                dlm: 0,
                fcr: 0x81,
            },
            ioapic_present: true,
            hpet_present: true,
        }
    }

    /// The same machine with every device's restorable state changed, as the world a
    /// rollback abandons would have left it.
    pub fn disturb(&mut self, shadows: &intercept::WriteShadows) {
        for (i, e) in self.ioapic.rte.iter_mut().enumerate() {
            *e = 0x0300_0000_0000_0040 + i as u64; // every pin unmasked to another CPU
        }
        self.ioapic.rte[9] |= ioapic::rte::TRIGGER_LEVEL | ioapic::rte::REMOTE_IRR;
        self.ioapic.id = 0x0200_0000;
        self.ioapic.sel = 0x01;
        for p in &mut self.pic {
            p.imr = 0x00;
            p.icw = [0x13, 0x08, 0, 0x03];
            p.elcr = 0;
            p.read_isr = true;
        }
        // Linux's pit_shutdown: mode 0, count 0.
        self.pit[0] = FakePitChannel {
            mode: 0,
            access: 3,
            count: 0,
            ..Default::default()
        };
        self.port61 = 0x03;
        self.hpet.config = hpet::ENABLE_CNF;
        self.hpet.timers[0] = (0x0000_00F0_0000_003C, 0x9999, 0);
        self.hpet.timers[2] = (0x0000_00F0_0000_0134, 0x4242, 0);
        self.rtc.regs[0x0A] = 0x2F;
        self.rtc.regs[0x0B] = 0x42;
        self.rtc.index = 0x32;
        self.uart = FakeUart {
            lcr: 0x83,
            ier: 0x00,
            mcr: 0x00,
            scr: 0x5A,
            dll: 12,
            dlm: 0,
            fcr: 0x00,
        };
        shadows.guest_write(intercept::COM1_FCR, 1, 0x00, || ());
        shadows.guest_write(intercept::RTC_INDEX, 1, 0x32, || ());
        self.log.clear();
    }

    fn pic_out(&mut self, chip: usize, data: bool, v: u8) {
        let p = &mut self.pic[chip];
        if !data {
            if v & 0x10 != 0 {
                // ICW1: masks, in-service and the read selection are reset.
                p.icw[0] = v;
                p.imr = 0;
                p.isr = 0;
                p.read_isr = false;
                p.init_state = 1;
            } else if v & 0x08 != 0 && v & 0x02 != 0 {
                // OCW3 with RR set: RIS picks the ISR or the IRR.
                p.read_isr = v & 1 != 0;
            }
            return;
        }
        match p.init_state {
            1 => {
                p.icw[1] = v;
                p.init_state = if p.icw[0] & 0x02 != 0 { 3 } else { 2 };
            }
            2 => {
                p.icw[2] = v;
                p.init_state = if p.icw[0] & 0x01 != 0 { 3 } else { 0 };
            }
            3 => {
                p.icw[3] = v;
                p.init_state = 0;
            }
            _ => p.imr = v,
        }
    }

    fn pit_control(&mut self, v: u8) {
        let ch = (v >> 6) as usize;
        if ch == 3 {
            for (c, s) in self.pit.iter_mut().enumerate() {
                if v & (2 << c) == 0 {
                    continue;
                }
                if v & 0x20 == 0 && s.count_latch.is_none() {
                    s.count_latch = Some((s.count, if s.access == 3 { 2 } else { 1 }));
                }
                if v & 0x10 == 0 && s.status_latch.is_none() {
                    s.status_latch = Some(s.access << 4 | s.mode << 1 | s.bcd);
                }
            }
            return;
        }
        let s = &mut self.pit[ch];
        let access = (v >> 4) & 3;
        if access == 0 {
            if s.count_latch.is_none() && s.access != 0 {
                s.count_latch = Some((s.count, if s.access == 3 { 2 } else { 1 }));
            }
            return;
        }
        s.access = access;
        s.mode = (v >> 1) & 7;
        s.bcd = v & 1;
        s.write_msb_next = false;
        s.read_msb_next = false;
    }

    fn pit_read(&mut self, ch: usize) -> u8 {
        let s = &mut self.pit[ch];
        if let Some(st) = s.status_latch.take() {
            return st;
        }
        if let Some((c, left)) = s.count_latch {
            let msb = s.access == 2 || (s.access == 3 && left == 1);
            s.count_latch = (left > 1).then_some((c, left - 1));
            return if msb { (c >> 8) as u8 } else { c as u8 };
        }
        let msb = s.access == 2 || (s.access == 3 && s.read_msb_next);
        if s.access == 3 {
            s.read_msb_next = !s.read_msb_next;
        }
        if msb {
            (s.count >> 8) as u8
        } else {
            s.count as u8
        }
    }

    fn pit_write(&mut self, ch: usize, v: u8) {
        let s = &mut self.pit[ch];
        match s.access {
            1 => s.reload = v as u16,
            2 => s.reload = (v as u16) << 8,
            _ if !s.write_msb_next => {
                s.reload = (s.reload & 0xFF00) | v as u16;
                s.write_msb_next = true;
                return;
            }
            _ => {
                s.reload = (s.reload & 0x00FF) | (v as u16) << 8;
                s.write_msb_next = false;
            }
        }
        s.count = s.reload;
    }

    fn uart_in(&mut self, reg: u16) -> u8 {
        let u = &self.uart;
        let dlab = u.lcr & uart::LCR_DLAB != 0;
        match reg {
            0 if dlab => u.dll,
            1 if dlab => u.dlm,
            1 => u.ier,
            3 => u.lcr,
            4 => u.mcr,
            7 => u.scr,
            _ => 0,
        }
    }

    fn uart_out(&mut self, reg: u16, v: u8) {
        let u = &mut self.uart;
        let dlab = u.lcr & uart::LCR_DLAB != 0;
        match reg {
            0 if dlab => u.dll = v,
            1 if dlab => u.dlm = v,
            1 => u.ier = v & 0x0F,
            2 => u.fcr = v & 0xC9,
            3 => u.lcr = v,
            4 => u.mcr = v & 0x1F,
            7 => u.scr = v,
            _ => {}
        }
    }
}

fn rte_masked(pin: u64) -> u64 {
    ioapic::rte::MASK | (0x30 + pin)
}

impl PortIo for FakePlatform {
    fn inb(&mut self, port: u16) -> u8 {
        let v = match port {
            pic::MASTER_CMD | pic::SLAVE_CMD => {
                let p = &self.pic[(port == pic::SLAVE_CMD) as usize];
                if p.read_isr {
                    p.isr
                } else {
                    p.irr
                }
            }
            pic::MASTER_DATA | pic::SLAVE_DATA => self.pic[(port == pic::SLAVE_DATA) as usize].imr,
            pic::ELCR_MASTER | pic::ELCR_SLAVE => self.pic[(port == pic::ELCR_SLAVE) as usize].elcr,
            0x40..=0x42 => self.pit_read((port - 0x40) as usize),
            pit::PORT61 => self.port61,
            rtc::INDEX => 0xFF,
            rtc::DATA => self.rtc.regs[(self.rtc.index & 0x7F) as usize],
            0x3F8..=0x3FF => self.uart_in(port - 0x3F8),
            _ => 0xFF,
        };
        self.log.push(Access::In(port, v));
        v
    }

    fn outb(&mut self, port: u16, v: u8) {
        self.log.push(Access::Out(port, v));
        match port {
            pic::MASTER_CMD | pic::MASTER_DATA => self.pic_out(0, port == pic::MASTER_DATA, v),
            pic::SLAVE_CMD | pic::SLAVE_DATA => self.pic_out(1, port == pic::SLAVE_DATA, v),
            pic::ELCR_MASTER | pic::ELCR_SLAVE => {
                let p = &mut self.pic[(port == pic::ELCR_SLAVE) as usize];
                p.elcr = v & p.elcr_mask;
            }
            pit::CONTROL => self.pit_control(v),
            0x40..=0x42 => self.pit_write((port - 0x40) as usize, v),
            pit::PORT61 => self.port61 = (self.port61 & 0xF0) | (v & 0x0F),
            rtc::INDEX => self.rtc.index = v,
            rtc::DATA => {
                let i = (self.rtc.index & 0x7F) as usize;
                match i {
                    0x0A => self.rtc.regs[i] = v & 0x7F,
                    0x0C | 0x0D => {}
                    _ => self.rtc.regs[i] = v,
                }
            }
            0x3F8..=0x3FF => self.uart_out(port - 0x3F8, v),
            _ => {}
        }
    }

    fn delay_us(&mut self, us: u32) {
        self.log.push(Access::Delay(us));
    }
}

impl Mmio for FakePlatform {
    fn read32(&mut self, pa: u64) -> u32 {
        let v = if (IOAPIC..IOAPIC + 0x100).contains(&pa) {
            if !self.ioapic_present {
                u32::MAX
            } else {
                match pa - IOAPIC {
                    ioapic::IOREGSEL => self.ioapic.sel,
                    ioapic::IOWIN => match self.ioapic.sel {
                        0 | 2 => self.ioapic.id,
                        1 => self.ioapic.version,
                        r @ 0x10..=0x3F => {
                            let e = self.ioapic.rte[(r as usize - 0x10) / 2];
                            if r & 1 != 0 {
                                (e >> 32) as u32
                            } else {
                                e as u32
                            }
                        }
                        _ => 0,
                    },
                    _ => 0,
                }
            }
        } else if (HPET..HPET + 0x400).contains(&pa) && self.hpet_present {
            let h = &self.hpet;
            match pa - HPET {
                0x000 => h.id,
                0x004 => h.period,
                0x010 => h.config,
                0x0F0 => h.counter as u32,
                0x0F4 => (h.counter >> 32) as u32,
                off @ 0x100..=0x15F => {
                    let (cfg, cmp, fsb) = h.timers[((off - 0x100) / 0x20) as usize];
                    let r = match (off - 0x100) % 0x20 {
                        0x00 | 0x04 => cfg,
                        0x08 | 0x0C => cmp,
                        _ => fsb,
                    };
                    if off % 8 == 4 {
                        (r >> 32) as u32
                    } else {
                        r as u32
                    }
                }
                _ => 0,
            }
        } else {
            0
        };
        self.log.push(Access::Read(pa, v));
        v
    }

    fn write32(&mut self, pa: u64, v: u32) {
        self.log.push(Access::Write(pa, v));
        if (IOAPIC..IOAPIC + 0x100).contains(&pa) && self.ioapic_present {
            let a = &mut self.ioapic;
            match pa - IOAPIC {
                ioapic::IOREGSEL => a.sel = v & 0xFF,
                ioapic::IOWIN => match a.sel {
                    0 => a.id = v & 0x0F00_0000,
                    r @ 0x10..=0x3F => {
                        let e = &mut a.rte[(r as usize - 0x10) / 2];
                        let ro = *e & ioapic::rte::READ_ONLY;
                        let w = if r & 1 != 0 {
                            (*e & 0xFFFF_FFFF) | (v as u64) << 32
                        } else {
                            (*e & !0xFFFF_FFFF) | v as u64
                        };
                        *e = (w & !ioapic::rte::READ_ONLY) | ro;
                        if *e & ioapic::rte::TRIGGER_LEVEL == 0 {
                            *e &= !ioapic::rte::REMOTE_IRR;
                        }
                    }
                    _ => {}
                },
                ioapic::EOI if a.version as u8 >= 0x20 => {
                    a.eois.push(v);
                    for e in &mut a.rte {
                        if *e & ioapic::rte::VECTOR == v as u64 & 0xFF {
                            *e &= !ioapic::rte::REMOTE_IRR;
                        }
                    }
                }
                _ => {}
            }
        } else if (HPET..HPET + 0x400).contains(&pa) && self.hpet_present {
            let h = &mut self.hpet;
            match pa - HPET {
                0x010 => h.config = v & 0x3,
                off @ 0x100..=0x15F => {
                    let t = &mut h.timers[((off - 0x100) / 0x20) as usize];
                    let set = |r: &mut u64, high: bool| {
                        *r = if high {
                            (*r & 0xFFFF_FFFF) | (v as u64) << 32
                        } else {
                            (*r & !0xFFFF_FFFF) | v as u64
                        }
                    };
                    match (off - 0x100) % 0x20 {
                        0x00 => t.0 = (t.0 & !0x7F4E) | (v as u64 & 0x7F4E),
                        0x08 => set(&mut t.1, false),
                        0x0C => set(&mut t.1, true),
                        0x10 => set(&mut t.2, false),
                        0x14 => set(&mut t.2, true),
                        _ => {}
                    }
                }
                _ => {}
            }
        }
    }
}
