//! Host tests of capture and restore against the fake devices (`fake`): round trips, the
//! restore order the module promises, and what each device must never be made to do.

use super::fake::{Access, FakePlatform};
use super::*;
use quicksilver_proto::stats::device;

const IOAPIC: u64 = ioapic::DEFAULT_BASE;
const HPET: u64 = hpet::DEFAULT_BASE;

fn shadows_with_fcr(v: u8) -> intercept::WriteShadows {
    let s = intercept::WriteShadows::new();
    s.guest_write(intercept::COM1_FCR, 1, v as u32, || ());
    s.guest_write(intercept::RTC_INDEX, 1, 0x0C, || ());
    s
}

/// Position of the first access matching `f`, and of the last.
fn first(log: &[Access], f: impl Fn(&Access) -> bool) -> Option<usize> {
    log.iter().position(f)
}
fn last(log: &[Access], f: impl Fn(&Access) -> bool) -> Option<usize> {
    log.iter().rposition(f)
}

fn is_port_write(a: &Access) -> bool {
    matches!(a, Access::Out(..))
}
fn is_hpet_write(a: &Access) -> bool {
    matches!(a, Access::Write(pa, _) if (HPET..HPET + 0x400).contains(pa))
}

#[test]
fn a_capture_finds_every_device_and_leaves_each_as_it_found_it() {
    let mut m = FakePlatform::linux();
    let shadows = shadows_with_fcr(0x81);
    let before = {
        let mut c = m.clone();
        c.log.clear();
        c
    };
    let s = capture_with(&mut m, &Bases::PC, &shadows);
    assert_eq!(s.layout, LAYOUT);
    assert_eq!(
        s.present,
        device::IOAPIC | device::PIC | device::PIT | device::HPET | device::RTC | device::COM1
    );
    assert_eq!(s.ioapic.entries, 24);
    assert_eq!(s.ioapic.ioregsel, 0x13);
    assert_eq!(s.ioapic.redirection[4], 0x34);
    assert_eq!((s.pic.master.imr, s.pic.slave.imr), (0xFF, 0xFF));
    assert_eq!(s.pit.channels[0].status & pit::STATUS_PROGRAM, 0x34);
    assert_eq!(s.pit.channels[0].count, 0xC123);
    assert_eq!((s.hpet.timers, s.hpet.config), (3, 3));
    assert_eq!((s.rtc.reg_a, s.rtc.reg_b, s.rtc.index), (0x26, 0x02, 0x0C));
    assert_eq!((s.com1.lcr, s.com1.ier, s.com1.dll), (0x13, 0x05, 12));
    assert_eq!((s.com1.fcr, s.com1.fcr_known), (0x81, 1));
    // Every register capture selected is back as it was: IOREGSEL, OCW3, LCR, the CMOS index.
    let mut after = m.clone();
    after.log.clear();
    assert_eq!(after, before);
}

#[test]
fn a_capture_restored_in_place_comes_back_identical() {
    let mut m = FakePlatform::linux();
    let shadows = shadows_with_fcr(0x81);
    let a = capture_with(&mut m, &Bases::PC, &shadows);
    restore_with(&mut m, &Bases::PC, &a, &shadows);
    let b = capture_with(&mut m, &Bases::PC, &shadows);
    let mut names = [""; 8];
    let n = differences(&a, &b, &mut names);
    assert_eq!(n, 0, "differs in {:?}", &names[..n]);
}

#[test]
fn a_restore_puts_back_every_device_a_changed_world_left_different() {
    let mut m = FakePlatform::linux();
    let shadows = shadows_with_fcr(0x81);
    let a = capture_with(&mut m, &Bases::PC, &shadows);
    m.disturb(&shadows);
    let changed = capture_with(&mut m, &Bases::PC, &shadows);
    let mut names = [""; 8];
    let n = differences(&a, &changed, &mut names);
    assert_eq!(
        &names[..n],
        &["ioapic", "pic", "pit", "hpet", "rtc", "uart", "uart-fcr"]
    );
    restore_with(&mut m, &Bases::PC, &a, &shadows);
    let b = capture_with(&mut m, &Bases::PC, &shadows);
    let n = differences(&a, &b, &mut names);
    assert_eq!(n, 0, "differs in {:?}", &names[..n]);
    // The hidden state too: the 8259s' init words are Linux's, the UART's FCR the shadow's,
    // the level pin's Remote IRR cleared (by the EOI register: version 0x20).
    assert_eq!(m.pic[0].icw, [0x11, 0x30, 0x04, 0x01]);
    assert_eq!(m.pic[1].icw, [0x11, 0x38, 0x02, 0x01]);
    assert_eq!(m.pic[0].init_state, 0);
    assert_eq!(m.uart.fcr, 0x81);
    assert_eq!(shadows.com1_fcr(), Some(0x81));
    assert_eq!(m.ioapic.rte[9] & ioapic::rte::REMOTE_IRR, 0);
    // The EOI names the vector the entry has once rewritten: the captured one.
    assert_eq!(m.ioapic.eois, vec![0x39]);
    assert_eq!(m.rtc.index, 0x0C);
    // The PIT channel the other world shut down is back in its mode, with the count it had
    // (its reload value is not readable: the remaining count is what is loaded).
    assert_eq!(
        (m.pit[0].mode, m.pit[0].access, m.pit[0].reload),
        (2, 3, 0xC123)
    );
    // The HPET's main counter is never written.
    assert!(!m
        .log
        .iter()
        .any(|a| matches!(a, Access::Write(pa, _) if *pa == HPET + 0xF0 || *pa == HPET + 0xF4)));
}

#[test]
fn the_restore_order_masks_the_ioapic_first_unmasks_it_last_and_enables_the_hpet_last() {
    let mut m = FakePlatform::linux();
    let shadows = shadows_with_fcr(0x81);
    let a = capture_with(&mut m, &Bases::PC, &shadows);
    m.disturb(&shadows);
    let disturbed = m.ioapic.rte;
    restore_with(&mut m, &Bases::PC, &a, &shadows);
    let log = m.log.clone();

    // Replay the IOAPIC writes to see, at each point, which pins were unmasked.
    let mut sel = 0u32;
    let mut rte_lo = [0u32; 24];
    for (i, e) in disturbed.iter().enumerate() {
        rte_lo[i] = *e as u32;
    }
    let mut all_masked_at = None;
    let mut unmask_writes = Vec::new();
    for (at, acc) in log.iter().enumerate() {
        if let Access::Write(pa, v) = *acc {
            if pa == IOAPIC + ioapic::IOREGSEL {
                sel = v;
            } else if pa == IOAPIC + ioapic::IOWIN && (0x10..0x40).contains(&sel) && sel & 1 == 0 {
                let pin = (sel as usize - 0x10) / 2;
                if v as u64 & ioapic::rte::MASK == 0 {
                    unmask_writes.push(at);
                }
                rte_lo[pin] = v;
            }
        }
        if all_masked_at.is_none() && rte_lo.iter().all(|e| *e as u64 & ioapic::rte::MASK != 0) {
            all_masked_at = Some(at);
        }
    }
    let masked = all_masked_at.expect("every changing pin was masked");
    let first_port = first(&log, is_port_write).unwrap();
    let first_hpet = first(&log, is_hpet_write).unwrap();
    assert!(
        masked < first_port && masked < first_hpet,
        "the IOAPIC is masked before any other device is written"
    );
    let last_other = last(&log, |a| is_port_write(a) || is_hpet_write(a)).unwrap();
    assert!(unmask_writes.iter().all(|&u| u > last_other));
    assert_eq!(
        unmask_writes.len(),
        3,
        "the three pins the checkpoint had unmasked"
    );
    // The very last write is IOREGSEL, as captured.
    assert_eq!(
        log.last(),
        Some(&Access::Write(IOAPIC + ioapic::IOREGSEL, 0x13))
    );

    // The HPET: the general configuration, with ENABLE_CNF, is its last write; each timer's
    // interrupt is off while its comparator is written.
    let hpet_writes: Vec<_> = log.iter().filter(|a| is_hpet_write(a)).collect();
    assert_eq!(
        hpet_writes.last(),
        Some(&&Access::Write(
            HPET + hpet::GEN_CONF,
            hpet::ENABLE_CNF | hpet::LEG_RT_CNF
        ))
    );
    let cmp2 = first(
        &log,
        |a| matches!(a, Access::Write(pa, _) if *pa == HPET + 0x148),
    )
    .unwrap();
    let cfg2: Vec<_> = log
        .iter()
        .enumerate()
        .filter_map(|(i, a)| match a {
            Access::Write(pa, v) if *pa == HPET + 0x140 => Some((i, *v)),
            _ => None,
        })
        .collect();
    assert!(cfg2[0].0 < cmp2 && cfg2[0].1 as u64 & hpet::tn::INT_ENB == 0);

    // The 8259s: masked, then the whole init sequence, paced, then the captured masks.
    let pic_writes: Vec<_> = log
        .iter()
        .filter_map(|a| match a {
            Access::Out(p, v) if [0x20, 0x21, 0xA0, 0xA1].contains(p) => Some((*p, *v)),
            _ => None,
        })
        .collect();
    assert_eq!(
        pic_writes,
        vec![
            (0x21, 0xFF),
            (0xA1, 0xFF),
            (0x20, 0x11),
            (0x21, 0x30),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xA0, 0x11),
            (0xA1, 0x38),
            (0xA1, 0x02),
            (0xA1, 0x01),
            (0x21, 0xFF),
            (0xA1, 0xFF),
        ]
    );
    assert!(log.contains(&Access::Delay(100)));
    // The UART's LCR is its last write, as captured (DLAB clear).
    let uart_last = last(
        &log,
        |a| matches!(a, Access::Out(p, _) if (0x3F8..0x400).contains(p)),
    )
    .unwrap();
    assert_eq!(log[uart_last], Access::Out(0x3FB, 0x13));
}

#[test]
fn pins_that_keep_their_route_are_never_masked() {
    let mut m = FakePlatform::linux();
    let shadows = shadows_with_fcr(0x81);
    let a = capture_with(&mut m, &Bases::PC, &shadows);
    m.log.clear();
    restore_with(&mut m, &Bases::PC, &a, &shadows);
    // Only IOREGSEL selections and the final IOREGSEL: no redirection entry written.
    let mut sel = 0;
    for acc in &m.log {
        if let Access::Write(pa, v) = *acc {
            if pa == IOAPIC + ioapic::IOREGSEL {
                sel = v;
            } else {
                assert!(
                    pa != IOAPIC + ioapic::IOWIN,
                    "IOWIN written (register {sel:#x}) though nothing changed"
                );
            }
        }
    }
    // Nor is the PIT reprogrammed (its counter would restart), nor the RTC's A or B.
    assert!(
        !m.log.iter().any(|a| matches!(a, Access::Out(0x40..=0x43, _)
        if !matches!(a, Access::Out(0x43, v) if *v & 0xC0 == 0xC0 || *v & 0x30 == 0)))
    );
    assert!(!m.log.iter().any(|a| matches!(a, Access::Out(0x71, _))));
}

#[test]
fn an_ioapic_without_an_eoi_register_gets_remote_irr_cleared_by_an_edge_toggle() {
    let mut m = FakePlatform::linux();
    m.ioapic.version = 0x0017_0011;
    let shadows = shadows_with_fcr(0x81);
    let a = capture_with(&mut m, &Bases::PC, &shadows);
    m.ioapic.rte[9] |= ioapic::rte::REMOTE_IRR;
    restore_with(&mut m, &Bases::PC, &a, &shadows);
    assert_eq!(m.ioapic.rte[9] & ioapic::rte::REMOTE_IRR, 0);
    assert!(m.ioapic.eois.is_empty());
    assert_eq!(
        m.ioapic.rte[9] & !ioapic::rte::READ_ONLY,
        a.ioapic.redirection[9] & !ioapic::rte::READ_ONLY,
        "and the entry is back as captured, unmasked"
    );
}

#[test]
fn an_unknown_fcr_is_left_alone_and_a_default_state_writes_nothing() {
    let mut m = FakePlatform::linux();
    let shadows = intercept::WriteShadows::new();
    let a = capture_with(&mut m, &Bases::PC, &shadows);
    assert_eq!((a.com1.fcr_known, a.rtc.index_known), (0, 0));
    m.uart.fcr = 0x41;
    restore_with(&mut m, &Bases::PC, &a, &shadows);
    assert_eq!(m.uart.fcr, 0x41, "never written from a guess");
    assert!(!m.log.iter().any(|a| matches!(a, Access::Out(0x3FA, _))));
    assert_eq!(m.rtc.index, rtc::REG_D, "left on register D");
    m.log.clear();
    restore_with(&mut m, &Bases::PC, &DeviceState::default(), &shadows);
    assert!(m.log.is_empty());
}

#[test]
fn absent_devices_are_not_captured_and_never_touched() {
    let mut m = FakePlatform::linux();
    m.hpet_present = false;
    m.ioapic_present = false;
    let shadows = shadows_with_fcr(0x81);
    let a = capture_with(&mut m, &Bases::PC, &shadows);
    assert_eq!(a.present & (device::HPET | device::IOAPIC), 0);
    m.log.clear();
    restore_with(&mut m, &Bases::PC, &a, &shadows);
    assert!(!m.log.iter().any(|a| matches!(a, Access::Write(..))));
}

#[test]
fn a_snapshot_is_plain_bytes() {
    let mut m = FakePlatform::linux();
    let shadows = shadows_with_fcr(0x81);
    let a = capture_with(&mut m, &Bases::PC, &shadows);
    assert_eq!(DeviceState::SIZE, 1816);
    let mut bytes = [0u8; DeviceState::SIZE];
    // SAFETY: DeviceState is repr(C) plain integers without padding (the size asserts);
    // copying its bytes out and back is what a checkpoint store does.
    let back: DeviceState = unsafe {
        core::ptr::copy_nonoverlapping(
            (&a as *const DeviceState).cast::<u8>(),
            bytes.as_mut_ptr(),
            DeviceState::SIZE,
        );
        core::ptr::read_unaligned(bytes.as_ptr().cast())
    };
    assert_eq!(back, a);
}

#[test]
fn differences_name_only_what_a_restore_can_change() {
    let mut m = FakePlatform::linux();
    let shadows = shadows_with_fcr(0x81);
    let a = capture_with(&mut m, &Bases::PC, &shadows);
    let mut b = a;
    // Records and read-only bits: IRR/ISR, PIT counts and OUT, Remote IRR, delivery status.
    b.pic.master.irr = 0x01;
    b.pit.channels[0].count = 7;
    b.pit.channels[0].status |= 0x80;
    b.ioapic.redirection[4] |= ioapic::rte::DELIVERY_STATUS | ioapic::rte::REMOTE_IRR;
    b.rtc.reg_a |= 0x80;
    let mut names = [""; 2];
    assert_eq!(differences(&a, &b, &mut names), 0);
    b.com1.fcr = 0x41;
    b.hpet.timer[1].config |= hpet::tn::INT_ENB;
    b.pic.slave.imr = 0xFE;
    // More differences than room: counted, the first ones named.
    assert_eq!(differences(&a, &b, &mut names), 3);
    assert_eq!(names, ["pic", "hpet"]);
}
