//! The fast link's Intel 82574L driver (QEMU's `e1000e`; Linux's `e1000e`): one receive and
//! one transmit ring of 16 legacy descriptors, polled. Register names and bits are the
//! datasheet's (Intel 82574 GbE Controller Family, 10.2 "Registers" and 7.1/7.2 "Receive and
//! Transmit Functionality"). Legacy descriptors (RFCTL.EXSTEN clear, TX DEXT clear) are the
//! smallest subset every 8254x/8257x part understands; checksum offload, interrupt moderation
//! and multiple queues are left off: the link's frames carry their own MAC and the hv polls.

use super::dma::{self, buffers, BUF, BUFS};
use super::Nic;
use quicksilver_proto::abi::NetConfig;
use quicksilver_proto::link::net::{Build, MAX_FRAME};

/// Device Control: Set Link Up, Global Reset.
const CTRL: usize = 0x0000;
const CTRL_SLU: u32 = 1 << 6;
const CTRL_RST: u32 = 1 << 26;
/// Device Status: Link Up.
const STATUS: usize = 0x0008;
const STATUS_LU: u32 = 1 << 1;
/// Interrupt Cause Read (cleared by the read without MSI-X), Mask Set, Mask Clear.
const ICR: usize = 0x00C0;
const IMS: usize = 0x00D0;
const IMC: usize = 0x00D8;
/// Receiver Timer Interrupt (ring 0): a frame was written back.
const ICR_RXT0: u32 = 1 << 7;
/// Receive Control: Enable, Broadcast Accept Mode (ARP requests), Strip CRC; BSIZE 00 is
/// 2048-byte buffers.
const RCTL: usize = 0x0100;
const RCTL_EN: u32 = 1 << 1;
const RCTL_BAM: u32 = 1 << 15;
const RCTL_SECRC: u32 = 1 << 26;
/// Transmit Control: Enable, Pad Short Packets, Collision Threshold 15, Collision Distance
/// 63 (the datasheet's full-duplex values).
const TCTL: usize = 0x0400;
const TCTL_EN: u32 = 1 << 1;
const TCTL_PSP: u32 = 1 << 3;
const TCTL_CT: u32 = 0x0F << 4;
const TCTL_COLD: u32 = 0x3F << 12;
/// Transmit Inter Packet Gap: IPGT 8, IPGR1 8, IPGR2 6 (the datasheet's default for copper).
const TIPG: usize = 0x0410;
const TIPG_DEFAULT: u32 = 8 | (8 << 10) | (6 << 20);
/// Receive Descriptor Base Low/High, Length, Head, Tail (queue 0).
const RDBAL: usize = 0x2800;
const RDBAH: usize = 0x2804;
const RDLEN: usize = 0x2808;
const RDH: usize = 0x2810;
const RDT: usize = 0x2818;
/// Transmit Descriptor Base Low/High, Length, Head, Tail (queue 0).
const TDBAL: usize = 0x3800;
const TDBAH: usize = 0x3804;
const TDLEN: usize = 0x3808;
const TDH: usize = 0x3810;
const TDT: usize = 0x3818;
/// Receive Address 0 Low/High (the MAC the NVM loaded; RAH.AV marks it valid).
const RAL0: usize = 0x5400;
const RAH0: usize = 0x5404;
/// Receive Filter Control: EXSTEN clear keeps legacy receive descriptors.
const RFCTL: usize = 0x5008;

/// Descriptor status: Descriptor Done.
const DD: u8 = 1 << 0;
/// Transmit command: End Of Packet, Insert FCS, Report Status.
const CMD_EOP: u8 = 1 << 0;
const CMD_IFCS: u8 = 1 << 1;
const CMD_RS: u8 = 1 << 3;

/// A legacy receive or transmit descriptor (16 bytes; the fields the two share).
#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    length: u16,
    /// Receive: packet checksum. Transmit: checksum offset.
    csum_cso: u8,
    csum_hi_cmd: u8,
    status: u8,
    /// Receive: errors. Transmit: checksum start.
    errors_css: u8,
    special: u16,
}

/// Why the device could not be brought up.
#[derive(Debug)]
pub enum Error {
    /// Not an 82574L, or its registers are not mapped.
    Unsupported,
    /// No DMA memory, or the link never came up.
    Device,
}

/// The 82574L, its rings in the DMA arena and its buffers posted.
pub struct E1000e {
    regs: *mut u32,
    rx: *mut [Desc; BUFS],
    tx: *mut [Desc; BUFS],
    rx_next: usize,
    tx_next: usize,
    mac: [u8; 6],
    /// Frames the device did not take in time (dropped).
    pub tx_dropped: u64,
}

// SAFETY: the registers and rings are reached only through the one `E1000e`, behind the net
// lock; the raw pointers are to device memory and the image's arena, valid in every address
// space the hv runs in.
unsafe impl Send for E1000e {}

impl E1000e {
    /// Is this an 82574L (vendor 0x8086, device 0x10D3)?
    pub fn matches(vendor: u16, device: u16) -> bool {
        (vendor, device) == (0x8086, 0x10D3)
    }

    /// Resets the device, sets up both rings, waits (at most `link_wait` TSC ticks) for the
    /// link.
    pub fn new(cfg: &NetConfig, link_wait: u64) -> Result<E1000e, Error> {
        // BAR 0 is the register space (128 KiB).
        let regs = super::BARS
            .va(cfg.bar_pa[0] & !0xF, 0x20000)
            .ok_or(Error::Unsupported)? as *mut u32;
        let (_, ring_va) = dma::alloc(1).ok_or(Error::Device)?;
        let rx = ring_va.as_ptr().cast::<[Desc; BUFS]>();
        // SAFETY: one page holds both 256-byte rings.
        let tx = unsafe { ring_va.as_ptr().add(2048) }.cast::<[Desc; BUFS]>();
        let mut me = E1000e {
            regs,
            rx,
            tx,
            rx_next: 0,
            tx_next: 0,
            mac: [0; 6],
            tx_dropped: 0,
        };
        me.write(IMC, u32::MAX);
        me.write(CTRL, me.read(CTRL) | CTRL_RST);
        // The reset takes about a microsecond on silicon (datasheet: wait 1 ms before
        // touching registers); QEMU's is immediate.
        let t0 = crate::arch::instr::rdtsc();
        while crate::arch::instr::rdtsc() - t0 < link_wait / 1000 {
            core::hint::spin_loop();
        }
        me.write(IMC, u32::MAX);
        let _ = me.read(ICR);
        let (ral, rah) = (me.read(RAL0), me.read(RAH0));
        me.mac = [
            ral as u8,
            (ral >> 8) as u8,
            (ral >> 16) as u8,
            (ral >> 24) as u8,
            rah as u8,
            (rah >> 8) as u8,
        ];
        me.write(RFCTL, 0);
        for i in 0..BUFS {
            // SAFETY: the rings are ours (the device is reset and not yet given them) and
            // so are the buffers.
            unsafe {
                (*me.rx)[i] = Desc {
                    addr: dma::pa_of(core::ptr::addr_of!((*buffers()).rx[i]) as u64),
                    ..Desc::EMPTY
                };
                (*me.tx)[i] = Desc {
                    status: DD,
                    ..Desc::EMPTY
                };
            }
        }
        let rx_pa = dma::pa_of(rx as u64);
        let tx_pa = dma::pa_of(tx as u64);
        let ring_bytes = (BUFS * size_of::<Desc>()) as u32;
        me.write(RDBAL, rx_pa as u32);
        me.write(RDBAH, (rx_pa >> 32) as u32);
        me.write(RDLEN, ring_bytes);
        me.write(RDH, 0);
        // Every descriptor but one belongs to the device (head == tail means none).
        me.write(RDT, (BUFS - 1) as u32);
        me.write(TDBAL, tx_pa as u32);
        me.write(TDBAH, (tx_pa >> 32) as u32);
        me.write(TDLEN, ring_bytes);
        me.write(TDH, 0);
        me.write(TDT, 0);
        me.write(TIPG, TIPG_DEFAULT);
        me.write(TCTL, TCTL_EN | TCTL_PSP | TCTL_CT | TCTL_COLD);
        me.write(RCTL, RCTL_EN | RCTL_BAM | RCTL_SECRC);
        me.write(CTRL, me.read(CTRL) | CTRL_SLU);
        let t0 = crate::arch::instr::rdtsc();
        while me.read(STATUS) & STATUS_LU == 0 {
            if crate::arch::instr::rdtsc() - t0 > link_wait {
                return Err(Error::Device);
            }
            core::hint::spin_loop();
        }
        // The interrupt is the agent's doorbell while the kernel runs (`Op::NetPoll`).
        me.write(IMS, ICR_RXT0);
        Ok(me)
    }

    fn read(&self, reg: usize) -> u32 {
        // SAFETY: `reg` is one of this file's register offsets, inside BAR 0 (128 KiB),
        // mapped uncached at `regs` in every address space the hv runs in.
        unsafe { self.regs.add(reg / 4).read_volatile() }
    }

    fn write(&mut self, reg: usize, v: u32) {
        // SAFETY: as for `read`.
        unsafe { self.regs.add(reg / 4).write_volatile(v) }
    }

    fn rx_desc(&self, i: usize) -> *mut Desc {
        // SAFETY: `i` < BUFS, inside the ring.
        unsafe { core::ptr::addr_of_mut!((*self.rx)[i]) }
    }

    fn tx_desc(&self, i: usize) -> *mut Desc {
        // SAFETY: `i` < BUFS, inside the ring.
        unsafe { core::ptr::addr_of_mut!((*self.tx)[i]) }
    }
}

impl Desc {
    const EMPTY: Desc = Desc {
        addr: 0,
        length: 0,
        csum_cso: 0,
        csum_hi_cmd: 0,
        status: 0,
        errors_css: 0,
        special: 0,
    };
}

impl Drop for E1000e {
    /// Stops both units and resets the device: no DMA after this (the arena is reused).
    fn drop(&mut self) {
        self.write(IMC, u32::MAX);
        self.write(RCTL, 0);
        self.write(TCTL, 0);
        self.write(CTRL, self.read(CTRL) | CTRL_RST);
        let _ = self.read(ICR);
    }
}

impl Nic for E1000e {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn send_in_place(&mut self, build: &mut Build<'_>) -> bool {
        let i = self.tx_next;
        let d = self.tx_desc(i);
        // The device writes DD back once it has sent the descriptor's frame (RS); QEMU
        // does it during the tail write. Wait a bounded while for a slow one.
        // SAFETY: a descriptor of our ring; the device writes `status` by DMA, hence volatile.
        let done = || unsafe { core::ptr::addr_of!((*d).status).read_volatile() } & DD != 0;
        for _ in 0..1_000_000 {
            if done() {
                break;
            }
            core::hint::spin_loop();
        }
        if !done() {
            self.tx_dropped += 1;
            return false;
        }
        // SAFETY: the descriptor is done, so its buffer is ours again.
        let buf = unsafe { &mut (*buffers()).tx[i] };
        let n = build(dma::frame_room(buf)).min(MAX_FRAME);
        // SAFETY: the descriptor is ours until the tail moves past it.
        unsafe {
            d.write_volatile(Desc {
                addr: dma::pa_of(buf.as_ptr() as u64),
                length: n as u16,
                csum_hi_cmd: CMD_EOP | CMD_IFCS | CMD_RS,
                ..Desc::EMPTY
            })
        };
        self.tx_next = (i + 1) % BUFS;
        self.write(TDT, self.tx_next as u32);
        true
    }

    fn receive(&mut self, f: &mut dyn FnMut(&[u8])) -> bool {
        let i = self.rx_next;
        let d = self.rx_desc(i);
        // DD first, then the rest: the device writes the length with (or before) DD, and a
        // descriptor read in one go may take the length before the status, i.e. the length
        // of the frame this descriptor held a ring ago with today's DD. That cut one gdb
        // request in some hundreds to another frame's length (Linux's e1000e reads DD, then
        // `dma_rmb()`, then the descriptor, for the same reason).
        // SAFETY: a descriptor of our ring, written back by the device (volatile).
        let status = unsafe { core::ptr::addr_of!((*d).status).read_volatile() };
        if status & DD == 0 {
            return false;
        }
        // x86 keeps loads in order; this keeps the compiler from hoisting the next one.
        core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
        // SAFETY: as above; DD is set, so the device has written the whole descriptor.
        let desc = unsafe { d.read_volatile() };
        // SAFETY: the device is done with buffer `i` (DD).
        let buf = unsafe { &(*buffers()).rx[i] };
        // A frame larger than a buffer (never sent by the bridge) spans descriptors without
        // EOP: such pieces, and frames with errors, are dropped.
        if desc.status & 2 != 0 && desc.errors_css == 0 {
            f(&buf[..(desc.length as usize).min(BUF)]);
        }
        // SAFETY: ours until the tail gives it back.
        unsafe { core::ptr::addr_of_mut!((*d).status).write_volatile(0) };
        self.write(RDT, i as u32);
        self.rx_next = (i + 1) % BUFS;
        true
    }

    fn ack_interrupt(&mut self) -> bool {
        self.read(ICR) != 0
    }
}
