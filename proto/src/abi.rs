//! How the agent talks to the hv.
//!
//! While **dormant** the agent calls the image's entry points directly (the image is mapped
//! executable in the kernel's address space): `init` once, `activate` on every CPU (from an
//! IPI), `control` for statistics and the link. While **active** the hv's memory is invisible to the
//! guest, so the agent uses `VMMCALL` instead:
//!
//! | register | in | out |
//! | --- | --- | --- |
//! | RAX | [`HYPERCALL_MAGIC`] `|` op | [`Status`] as u64 |
//! | RBX | first argument | preserved |
//! | RCX | second argument | preserved |
//!
//! A `VMMCALL` from CPL > 0 gets `#UD`, as on a machine without a hypervisor.

/// Tag in the high half of RAX that marks a Quicksilver hypercall ("QS").
pub const HYPERCALL_MAGIC: u64 = 0x5153_0000_0000_0000;

crate::abi_enum! {
    /// Control operations, the same numbers for the dormant entry and for hypercalls.
    pub enum Op: u64, from_u64 {
        /// Leave guest mode on this CPU (hypercall only, from the agent's IPI on each CPU).
        Deactivate = 1,
        /// Fill a [`crate::stats`] block: arg0 = buffer (kernel VA dormant, PA active), arg1 = len.
        Stats = 2,
        /// Start serving the serial link: buffer = port (u16 LE) then the key (may be empty: then
        /// every bridge is refused). The hv writes its replies to that UART itself.
        LinkConfig = 3,
        /// Bytes received on the link (the agent's interrupt handler reads the UART). Returns
        /// [`LINK_RX_ATTENTION`] if an authenticated bridge asked for attention (the agent then
        /// activates), with [`LINK_RX_CHECKPOINT`] if a checkpoint request waits.
        LinkRx = 4,
        /// How many CPUs are in guest mode now (the agent's view can go stale: a debugger's detach
        /// steps every CPU out without the agent). Returns the count.
        ActiveCpus = 5,
        /// Stop every CPU for a while, then resume them (hypercall only): buffer = a
        /// [`FreezeArgs`] (guest-physical address, length), answered in place.
        Freeze = 6,
        /// Take a checkpoint of the whole machine (hypercall only): buffer = a
        /// [`CheckpointArgs`] (guest-physical), answered in place once every CPU runs again.
        Checkpoint = 7,
        /// Put the whole machine back at a checkpoint (hypercall only): buffer = a
        /// [`RollbackArgs`]. On success the call does not return: every CPU continues from the
        /// checkpoint, and the agent learns of it through its [`RollbackNotice`] and an NMI.
        Rollback = 8,
        /// The checkpoints kept: buffer = a [`CheckpointList`] followed by room for
        /// [`CheckpointInfo`] entries.
        Checkpoints = 9,
        /// Delete a checkpoint, or all of them: buffer = a [`CheckpointDelete`].
        CheckpointDelete = 10,
        /// The periodic ring's interval and size: buffer = a [`CheckpointPeriodic`]. The hv
        /// keeps the setting; the agent's thread asks for each periodic checkpoint.
        CheckpointPeriodic = 11,
        /// The checkpoint request a bridge sent on the link, for the agent's thread (process
        /// context, where a checkpoint can be taken; the link's interrupt handler cannot):
        /// buffer = a [`LinkRequest`], filled in (`op` 0: none waits). The hv hands each
        /// request out once and keeps it as in flight until `LinkReply`.
        LinkRequest = 12,
        /// The outcome of the request `LinkRequest` handed out: buffer = a [`LinkRequest`]
        /// (same `tag`). The hv answers the bridge with it; a reply for a request no longer in
        /// flight (an agent rolled back to before it answered) is dropped.
        LinkReply = 13,
        /// Pages of a kept checkpoint's memory as they were when it was taken: buffer = a
        /// [`CheckpointRead`], then from [`CHECKPOINT_READ_DATA`] room for its pages.
        CheckpointRead = 14,
        /// One CPU's state in a kept checkpoint: buffer = a [`CheckpointCpu`], then room for
        /// its XSAVE area and local APIC record (`xsave_len`, `lapic_len` bytes).
        CheckpointCpu = 15,
        /// Bytes for the bridge, answering the read request `LinkRequest` handed out: buffer =
        /// a [`LinkBulk`], then `len` bytes. The hv sends them on the link's bulk channel as
        /// frames of its own size; with [`LINK_BULK_END`] it sends the request's end (status,
        /// zero pages, checksum) and the request is over.
        LinkBulk = 16,
        /// The pages written between two kept checkpoints, or since one: buffer = a
        /// [`CheckpointChanged`], then room for u64 page addresses (unsorted; a page once per
        /// epoch it was logged in).
        CheckpointChanged = 17,
        /// The platform devices' state in a kept checkpoint: buffer = a
        /// [`CheckpointDevices`], then room for the record ([`DEVICES_RECORD_V1`]).
        CheckpointDevices = 18,
        /// Start serving the fast link on the NIC the agent claimed for the hv (dormant, once,
        /// after `LinkConfig`): buffer = a [`NetConfig`]. The hv maps the NIC's registers at
        /// the agent's addresses in its own tables, hides them from the guest, resets the
        /// device and drives it from then on.
        NetConfig = 19,
        /// The NIC raised its interrupt (the agent's handler, by direct call while dormant
        /// and by hypercall while active; no buffer): the hv acknowledges it and serves what
        /// arrived. Returns the same bits as `LinkRx`, with [`NET_POLL_OURS`] if the NIC had
        /// interrupted (the INTx line may be shared) and [`NET_POLL_STOP`] if a stop waits
        /// for the agent's timer, or a status when the link is down.
        NetPoll = 20,
        /// Stop driving the NIC (dormant, before the agent gives it back to Linux): the hv
        /// resets the device, so that it does no more DMA, and forgets it.
        NetRelease = 21,
        /// The agent's stopping hypercall, from its timer (hypercall only, no buffer): a stop
        /// the hv holds for it (an attach, or gdb's Ctrl-C from the fast link) is made when
        /// it completes, on top of the timer interrupt, which Linux acknowledged first.
        /// Returns how many CPUs are in guest mode, as `ActiveCpus` does.
        AgentStop = 22,
    }
}

/// CPUID leaf whose answer proves the hv is active on this CPU.
pub const CPUID_SIGNATURE_LEAF: u32 = 0x4000_0000;
/// CPUID leaf with the hv's ABI version (EAX) and this CPU's index (EBX).
pub const CPUID_INFO_LEAF: u32 = 0x4000_0001;
/// EBX, ECX, EDX of the signature leaf spell this.
pub const CPUID_SIGNATURE: [u8; 12] = *b"Quicksilver\0";

/// Bytes in one chunk of the hv's store (the second memory region, where checkpoints will
/// live): 4 MiB, one order-10 block of Linux's page allocator, naturally aligned to its size.
/// The store is any number of such chunks, wherever the allocator found them.
pub const STORE_CHUNK_SIZE: u64 = 4 << 20;

crate::abi_struct! {
    /// Arguments to the `init` entry point.
    #[c_name = "qs_init_args"]
    pub struct InitArgs {
        /// Kernel virtual address where the image starts; the block is contiguous and mapped RWX.
        pub base_va: u64,
        /// Physical address of the same first byte (the block is physically contiguous).
        pub base_pa: u64,
        /// Bytes in the block: the image rounded up to a page, then the working memory.
        pub mem_size: u64,
        /// Physical addresses below this are identity-mapped into the guest (RAM and MMIO).
        pub phys_limit: u64,
        /// Possible CPUs; `activate` is called with indices below this.
        pub cpus: u32,
        /// TSC frequency in kHz, to turn cycles into time.
        pub tsc_khz: u32,
        /// Where the kernel's text (`_text`) runs: with `kernel_text_link`, the KASLR offset the
        /// debugger reports (qOffsets, `monitor kaslr`). 0 if unknown.
        pub kernel_text: u64,
        /// Where the kernel's text was linked (`__START_KERNEL`).
        pub kernel_text_link: u64,
        /// Kernel virtual address of an array of `store_chunks` u64 physical addresses, one per
        /// store chunk of [`STORE_CHUNK_SIZE`] bytes (zeroed, each aligned to its size). Valid
        /// only during `init` (which runs on the kernel's address space): the hv copies it. 0 if
        /// there is no store.
        pub store_chunks_va: u64,
        /// Entries in that array; 0 if there is no store (`store_mem=0` and `ckpt_mem=0`).
        pub store_chunks: u32,
        /// How many of the last chunks of that array hold checkpoints (the agent's
        /// `ckpt_mem=`); the others hold the hv's tables (`store_mem=`).
        pub ckpt_chunks: u32,
        /// Kernel virtual address of `ram_ranges` pairs of u64 (start, end) physical addresses:
        /// the machine's RAM ("System RAM" in /proc/iomem), which a checkpoint saves. Valid only
        /// during `init`, like the chunk list.
        pub ram_ranges_va: u64,
        /// Entries in that array, at most [`MAX_RAM_RANGES`].
        pub ram_ranges: u32,
        /// Zero; keeps the struct a multiple of 8 bytes.
        pub _reserved: u32,
        /// Physical address of the agent's [`RollbackNotice`], which the hv writes after a
        /// rollback; 0 if none.
        pub notice_pa: u64,
    }
}

const _: () = assert!(core::mem::size_of::<InitArgs>() == 96);

/// Most chunks of checkpoint memory (`ckpt_mem=` up to 256 MiB).
pub const CKPT_MAX_CHUNKS: u32 = 64;
/// Where, in the page of the agent's [`RollbackNotice`], the agent lists per CPU (u64 by CPU
/// index, up to 64) the physical address of a page its NMI handler writes (0: none). Before
/// injecting the notice NMI on a CPU, the hv makes that page writable (copying it first, as
/// for any write), so that the handler itself takes no copy-on-write fault: it runs with
/// every other CPU busy faulting after the rollback, and the kernel times NMI handlers.
pub const NOTICE_HOT_PAGES_OFFSET: u64 = 512;
/// Where, in the same page, the agent puts the physical address of the kernel's clocksource
/// watchdog reset counter (`watchdog_reset_pending`, a 32-bit atomic; 0: none). The hv adds
/// one to it during a rollback, before any CPU runs: the watchdog's next round re-bases
/// instead of comparing the TSC (moved back with the kernel) with the HPET (which kept
/// counting). The agent's own reset comes too late on the other CPUs.
pub const NOTICE_WATCHDOG_RESET_OFFSET: u64 = 1024;
/// Most RAM ranges the hv takes from the agent.
pub const MAX_RAM_RANGES: u32 = 32;
/// Most checkpoints the hv keeps at once.
pub const MAX_CHECKPOINTS: u32 = 64;
/// [`CheckpointDelete::id`] that deletes every checkpoint.
pub const CHECKPOINT_ALL: u32 = u32::MAX;
/// [`CheckpointArgs::flags`]: a checkpoint of the periodic ring (dropped first when memory
/// runs out) rather than one the user asked for.
pub const CHECKPOINT_PERIODIC: u32 = 1;
/// [`CheckpointInfo::flags`]: the machine runs on from this checkpoint (its epoch is the
/// current one: the next checkpoint's parent).
pub const CHECKPOINT_CURRENT: u32 = 2;

crate::abi_struct! {
    /// `Op::Checkpoint`'s argument and answer.
    #[c_name = "qs_checkpoint"]
    pub struct CheckpointArgs {
        /// Out: the hv's `Status`. Before the machine is stopped the hv writes `RolledBack`
        /// here (and `id`): that is what the caller finds if the machine is later rolled back
        /// to this checkpoint, and returns from this call a second time.
        pub status: i64,
        /// In: [`CHECKPOINT_PERIODIC`] or 0.
        pub flags: u32,
        /// Out: the checkpoint's id (ids only grow; never reused).
        pub id: u32,
        /// Out: CPUs in the checkpoint.
        pub cpus: u32,
        /// Out, for `NotQuiescent`: the CPU that was not at a point where it can be restored,
        /// and what it was doing (the vector in service on its local APIC, or 256 + the
        /// vector of an event being delivered).
        pub busy_cpu: i32,
        pub busy_what: u32,
        /// Zero.
        pub _reserved: u32,
        /// Out: microseconds every CPU was stopped (from the request to the release).
        pub pause_us: u64,
        /// Out: microseconds of that spent stopping them.
        pub gather_us: u64,
        /// Out: bytes of checkpoint memory this checkpoint holds now (its CPUs' state; it
        /// grows as the machine writes pages it must keep).
        pub bytes: u64,
        /// Out: pages the machine wrote since the previous checkpoint (kept for that one).
        pub pages_before: u64,
    }
}

crate::abi_struct! {
    /// `Op::Rollback`'s argument (answered in place only when refused).
    #[c_name = "qs_rollback"]
    pub struct RollbackArgs {
        /// Out: the hv's `Status` when refused.
        pub status: i64,
        /// In: the checkpoint.
        pub id: u32,
        /// Zero.
        pub _reserved: u32,
        /// In: the oldest checkpoint the kernel's clock survives (nanoseconds; the agent knows
        /// its kernel's timekeeping); 0 = no limit.
        pub max_age_ns: u64,
        /// Out, when refused as too old: the checkpoint's age.
        pub age_ns: u64,
    }
}

crate::abi_struct! {
    /// Written by the hv into the agent's memory after each rollback (`InitArgs::notice_pa`),
    /// then an NMI on every CPU tells the agent to read it.
    #[c_name = "qs_rollback_notice"]
    pub struct RollbackNotice {
        /// Grows by one at each rollback (the hv's count, which is not rolled back).
        pub generation: u64,
        /// The checkpoint rolled back to.
        pub id: u32,
        /// Newer checkpoints dropped by the rollback.
        pub dropped: u32,
        /// How old the checkpoint was (nanoseconds): how far the kernel's clocks jump.
        pub age_ns: u64,
        /// Microseconds every CPU was stopped for the rollback.
        pub pause_us: u64,
        /// Pages of memory put back.
        pub pages: u64,
        /// Fresh randomness from the hv (RDRAND and the TSC) for the kernel's generator: a
        /// restored machine must not repeat its random stream.
        pub random: [u8; 32],
    }
}

crate::abi_struct! {
    /// One checkpoint kept, in `Op::Checkpoints`' answer.
    #[c_name = "qs_checkpoint_info"]
    pub struct CheckpointInfo {
        pub id: u32,
        /// The checkpoint this one was taken after (its epoch's predecessor); 0 if none.
        pub parent: u32,
        /// [`CHECKPOINT_PERIODIC`], [`CHECKPOINT_CURRENT`].
        pub flags: u32,
        pub cpus: u32,
        /// Nanoseconds since it was taken.
        pub age_ns: u64,
        /// Microseconds every CPU was stopped to take it.
        pub pause_us: u64,
        /// Pages of memory kept to restore it (written after it was taken, before the next).
        pub pages: u64,
        /// Bytes of checkpoint memory those pages and its CPUs' state take.
        pub bytes: u64,
    }
}

crate::abi_struct! {
    /// `Op::Checkpoints`' answer; [`CheckpointInfo`] entries follow it in the buffer.
    #[c_name = "qs_checkpoint_list"]
    pub struct CheckpointList {
        /// Out: the hv's `Status`.
        pub status: i64,
        /// Out: checkpoints kept (entries written: as many as fit).
        pub count: u32,
        /// Out: the most it keeps ([`MAX_CHECKPOINTS`]).
        pub max: u32,
        /// Out: bytes of checkpoint memory (the agent's `ckpt_mem=`), and how much is used.
        pub capacity_bytes: u64,
        pub used_bytes: u64,
        /// Out: checkpoints dropped because the memory ran out, since load.
        pub dropped_for_memory: u64,
        /// Out: rollbacks since load.
        pub rollbacks: u64,
        /// Out: the periodic ring's interval (milliseconds, 0 = off) and size.
        pub every_ms: u32,
        pub keep: u32,
        /// Out: how far the kernel's clock runs behind the CPUs' own TSC (nanoseconds): the
        /// time rolled back so far. Going native would make the kernel's clock jump forward
        /// by this much.
        pub clock_behind_ns: u64,
    }
}

/// The shortest interval of the periodic ring (100 checkpoints a second).
pub const PERIODIC_MIN_MS: u32 = 10;

crate::abi_struct! {
    /// `Op::CheckpointPeriodic`'s argument and answer.
    #[c_name = "qs_checkpoint_periodic"]
    pub struct CheckpointPeriodic {
        /// Out: the hv's `Status`.
        pub status: i64,
        /// In: milliseconds between periodic checkpoints (at least [`PERIODIC_MIN_MS`]), or 0
        /// to stop them (the ring's checkpoints stay until deleted).
        pub every_ms: u32,
        /// In: how many periodic checkpoints the ring keeps (1 to [`MAX_CHECKPOINTS`]); the
        /// oldest goes when a new one comes.
        pub keep: u32,
    }
}

crate::abi_struct! {
    /// `Op::CheckpointDelete`'s argument and answer.
    #[c_name = "qs_checkpoint_delete"]
    pub struct CheckpointDelete {
        /// Out: the hv's `Status`.
        pub status: i64,
        /// In: the checkpoint, or [`CHECKPOINT_ALL`].
        pub id: u32,
        /// Out: how many were deleted.
        pub deleted: u32,
    }
}

/// `Op::LinkRx`'s answer is a set of these bits (every status is above them): an
/// authenticated bridge asked for attention, which the agent must serve by activating.
pub const LINK_RX_ATTENTION: i64 = 1;
/// `Op::LinkRx`'s answer: a bridge's checkpoint request waits for the agent's thread
/// (`Op::LinkRequest`).
pub const LINK_RX_CHECKPOINT: i64 = 2;

/// The BARs of a PCI function.
pub const NET_BARS: usize = 6;

crate::abi_struct! {
    /// `Op::NetConfig`'s argument: the NIC the agent claimed (bound to its stub driver, memory
    /// decoding and bus mastering on, INTx routed to the agent's handler), as Linux's PCI
    /// code left it. The hv never touches PCI configuration space itself: it reads this
    /// snapshot, so it cannot race Linux's own configuration accesses.
    #[c_name = "qs_net_config"]
    pub struct NetConfig {
        /// Bus << 8 | device << 3 | function (for messages).
        pub bdf: u32,
        /// The hv's IPv4 address, most significant byte first (10.0.2.15 is 0x0a00020f).
        pub ip: u32,
        /// The UDP port the hv serves.
        pub port: u16,
        /// Zero.
        pub _reserved: [u8; 6],
        /// Each BAR's physical address (0: none), length, and where the agent mapped it
        /// (uncached, `ioremap`): the hv maps the same addresses in its own tables, so that
        /// one pointer reaches the registers in both modes.
        pub bar_pa: [u64; 6],
        pub bar_len: [u64; 6],
        pub bar_va: [u64; 6],
        /// The function's first 256 bytes of configuration space, as 32 little-endian
        /// quadwords (byte `i` is bits `8 * (i % 8)` up of quadword `i / 8`).
        pub config: [u64; 32],
    }
}

/// `Op::NetPoll`'s answer: the NIC had raised its interrupt (the handler returns
/// `IRQ_HANDLED`; without it, `IRQ_NONE`: the line is shared).
pub const NET_POLL_OURS: i64 = 4;
/// `Op::NetPoll`'s answer: gdb's Ctrl-C or an attention request arrived and the hv holds the
/// stop for `Op::AgentStop`; the agent arms its stop timer. (The stop is not made when the
/// NIC's hypercall completes: INTx is level-triggered, so Linux acknowledges it only after
/// its handler returns, and a machine stopped inside the handler cannot be checkpointed.)
pub const NET_POLL_STOP: i64 = 8;

/// What a CPU that was not quiescent was doing ([`CheckpointArgs::busy_what`]), in the words
/// `qsctl`, gdb's `monitor checkpoint` and the bridge's control socket all use: "handling
/// interrupt vector 0xec", "delivering event vector 0x2", "inside an NMI handler".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusyWhat(pub u32);

/// [`BusyWhat`]: inside an NMI handler (from the NMI's delivery to its IRET).
pub const BUSY_IN_NMI: u32 = 512;

impl core::fmt::Display for BusyWhat {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            BUSY_IN_NMI => f.write_str("inside an NMI handler"),
            w if w >= 256 => write!(f, "delivering event vector {:#x}", w - 256),
            w => write!(f, "handling interrupt vector {w:#x}"),
        }
    }
}

/// Where a [`CheckpointRead`] buffer's pages start (the header is padded to a page, so the
/// hv copies whole aligned pages).
pub const CHECKPOINT_READ_DATA: u64 = 4096;

crate::abi_struct! {
    /// `Op::CheckpointRead`'s header: `pages` pages from `first_gpa` (all in one RAM range) of
    /// checkpoint `id`, as they were when it was taken, copied after the header. The hv reads
    /// them under the lock its copy-on-write takes, so the machine may run meanwhile.
    #[c_name = "qs_checkpoint_read"]
    pub struct CheckpointRead {
        /// Out: a `Status`.
        pub status: i64,
        /// In: the checkpoint.
        pub id: u32,
        /// In: pages wanted (at most what the buffer holds after its header).
        pub pages: u32,
        /// In: the first page's guest-physical address.
        pub first_gpa: u64,
    }
}

/// [`CheckpointCpu::flags`]: in an interrupt shadow (after STI or MOV SS).
pub const CPU_INTERRUPT_SHADOW: u32 = 1;
/// [`CheckpointCpu::flags`]: inside an NMI handler.
pub const CPU_NMI_BLOCKED: u32 = 2;
/// [`CheckpointCpu::lapic_version`]: the hv's local APIC record, version 1.
pub const LAPIC_RECORD_V1: u32 = 1;

crate::abi_struct! {
    /// `Op::CheckpointCpu`: CPU `cpu`'s state in checkpoint `id`, vendor-neutral. Its XSAVE
    /// area (standard format) and the hv's local APIC record follow the header.
    #[c_name = "qs_checkpoint_cpu"]
    pub struct CheckpointCpu {
        /// Out: a `Status`.
        pub status: i64,
        /// In: the checkpoint.
        pub id: u32,
        /// In: the CPU's index.
        pub cpu: u32,
        /// Its local APIC ID, and CPL.
        pub apic_id: u32,
        /// The current privilege level.
        pub cpl: u32,
        /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8-R15 (encoding order).
        pub gprs: [u64; 16],
        /// RIP.
        pub rip: u64,
        /// RFLAGS.
        pub rflags: u64,
        /// ES, CS, SS, DS, FS, GS, LDTR, TR: selectors.
        pub seg_selector: [u16; 8],
        /// Their attributes (the VMCB's packed format).
        pub seg_attrib: [u16; 8],
        /// Their limits.
        pub seg_limit: [u32; 8],
        /// Their bases.
        pub seg_base: [u64; 8],
        /// GDTR's base.
        pub gdtr_base: u64,
        /// IDTR's base.
        pub idtr_base: u64,
        /// GDTR's limit.
        pub gdtr_limit: u32,
        /// IDTR's limit.
        pub idtr_limit: u32,
        /// CR0, CR2, CR3, CR4, CR8, XCR0.
        pub cr: [u64; 6],
        /// EFER.
        pub efer: u64,
        /// DR0-DR3, DR6, DR7.
        pub dr: [u64; 6],
        /// STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE, SYSENTER_CS, SYSENTER_ESP,
        /// SYSENTER_EIP, PAT, TSC_AUX.
        pub msrs: [u64; 10],
        /// An event being delivered, in EXITINTINFO's format (bit 31: valid).
        pub pending: u64,
        /// `CPU_INTERRUPT_SHADOW`, `CPU_NMI_BLOCKED`.
        pub flags: u32,
        /// Out: bytes of XSAVE area after the header.
        pub xsave_len: u32,
        /// Out: bytes of local APIC record after the XSAVE area.
        pub lapic_len: u32,
        /// Out: that record's layout (`LAPIC_RECORD_V1`).
        pub lapic_version: u32,
    }
}

/// [`LinkRequest::op`]: take a checkpoint.
pub const LINK_OP_TAKE: u32 = 1;
/// [`LinkRequest::op`]: roll back to `id`.
pub const LINK_OP_ROLLBACK: u32 = 3;
/// [`LinkRequest::op`]: delete `id` (or [`CHECKPOINT_ALL`]).
pub const LINK_OP_DELETE: u32 = 4;
/// [`LinkRequest::op`]: what an export needs of the kernel (an [`ExportMeta`], then its RAM
/// ranges as pairs of u64), sent with [`Op::LinkBulk`].
pub const LINK_OP_READ_META: u32 = 5;
/// [`LinkRequest::op`]: CPU `index`'s state in checkpoint `id` (what `Op::CheckpointCpu`
/// answers: the header, the XSAVE area, the local APIC record), sent with [`Op::LinkBulk`].
pub const LINK_OP_READ_CPU: u32 = 6;
/// [`LinkRequest::op`]: `count` pages of checkpoint `id` from `first_gpa` (all in one RAM
/// range), each page that is not all zero sent with [`Op::LinkBulk`] as item `i`.
pub const LINK_OP_READ_PAGES: u32 = 7;
/// [`LinkRequest::op`]: `count` pages of bytes that do not compress, sent as pages are: the
/// bridge's measure of what the link carries (`link-test`).
pub const LINK_OP_READ_FILL: u32 = 8;
/// [`LinkRequest::op`]: the pages written between checkpoints `id` and `index` (0: since
/// `id`), as runs (`CHANGED_RUN_PAGES`), sent with [`Op::LinkBulk`] after a
/// [`CheckpointChanged`].
pub const LINK_OP_READ_CHANGED: u32 = 9;
/// A run of changed pages as the link carries it: the first page's address, with the run's
/// length less one in the low 12 bits (at most 4096 pages a run).
pub const CHANGED_RUN_PAGES: u64 = 4096;

crate::abi_struct! {
    /// `Op::CheckpointChanged`'s header (and, over the link, the answer's).
    #[c_name = "qs_checkpoint_changed"]
    pub struct CheckpointChanged {
        /// Out: a `Status`.
        pub status: i64,
        /// In: the checkpoints (either older); `b` 0: since `a`.
        pub a: u32,
        pub b: u32,
        /// Out: entries the hv had (more than the buffer holds: the first that fit are there).
        pub count: u64,
        /// Over the link: distinct pages, and the runs that follow (`CHANGED_RUN_PAGES`); 1 in
        /// `truncated` if the agent's buffer could not hold them all.
        pub pages: u64,
        pub runs: u32,
        pub truncated: u32,
    }
}

/// [`LinkRequest::op`]: the platform devices' record of checkpoint `id` (what
/// `Op::CheckpointDevices` answers), sent with [`Op::LinkBulk`].
pub const LINK_OP_READ_DEVICES: u32 = 10;
/// [`CheckpointDevices::version`]: the hv's `devices::DeviceState` (IOAPIC, 8259s, 8254, HPET,
/// RTC, COM1; `hv/src/devices/mod.rs`), version 1.
pub const DEVICES_RECORD_V1: u32 = 1;

crate::abi_struct! {
    /// `Op::CheckpointDevices`: the platform devices' state in checkpoint `id`; the record
    /// follows the header.
    #[c_name = "qs_checkpoint_devices"]
    pub struct CheckpointDevices {
        /// Out: a `Status`.
        pub status: i64,
        /// In: the checkpoint.
        pub id: u32,
        /// Out: the record's layout ([`DEVICES_RECORD_V1`]).
        pub version: u32,
        /// Out: its bytes after the header.
        pub len: u64,
    }
}

/// [`LinkRequest::op`]: the hv's statistics block (`Op::Stats`: each CPU's mode and exits
/// by reason), sent with [`Op::LinkBulk`].
pub const LINK_OP_READ_STATS: u32 = 11;
/// [`LinkRequest::op`]: the periodic ring's setting: every `id` milliseconds (0: off), `count`
/// kept (what `qsctl checkpoint --every` sets; activates a dormant hv).
pub const LINK_OP_PERIODIC: u32 = 12;
/// [`LINK_OP_READ_PAGES`]'s `count` at most: one bit each in [`LinkBulk::zero_mask`].
pub const LINK_READ_MAX_PAGES: u32 = 64;

crate::abi_struct! {
    /// `Op::LinkRequest`'s answer and `Op::LinkReply`'s argument: a bridge's checkpoint
    /// request as the agent's thread serves it, and its outcome (the fields `qsctl` prints).
    #[c_name = "qs_link_request"]
    pub struct LinkRequest {
        /// `LinkReply`: the outcome's `Status`.
        pub status: i64,
        /// The bridge's tag for the request; the reply carries it back.
        pub tag: u32,
        /// [`LINK_OP_TAKE`], [`LINK_OP_ROLLBACK`], [`LINK_OP_DELETE`]; 0: no request waits.
        pub op: u32,
        /// The checkpoint (rollback, delete; or [`CHECKPOINT_ALL`]); a take's new id.
        pub id: u32,
        /// Delete: how many were deleted.
        pub count: u32,
        /// Take: CPUs in the checkpoint.
        pub cpus: u32,
        /// Take refused as `NotQuiescent`: the CPU, and what it was doing (as in
        /// [`CheckpointArgs`]).
        pub busy_cpu: i32,
        pub busy_what: u32,
        /// Read a CPU: its index.
        pub index: u32,
        /// Take: microseconds every CPU was stopped.
        pub pause_us: u64,
        /// Take: pages written since the previous checkpoint.
        pub pages: u64,
        /// Take: bytes of checkpoint memory it holds.
        pub bytes: u64,
        /// Read pages: the first page's physical address (`count` pages from it).
        pub first_gpa: u64,
        /// [`LINK_REQUEST_FAST`], or 0.
        pub flags: u32,
        /// Zero.
        pub _reserved: u32,
    }
}

/// [`LinkRequest::flags`]: the bridge asked over the fast link. The agent then hands a read's
/// bytes to the hv in batches (several [`LinkBulk`] records per `Op::LinkBulk`, up to
/// [`LINK_BULK_BATCH`] bytes: under emulation a hypercall costs as much as sending a page) and
/// sends pages as they are (deflating one costs ~2 ms under emulation, far more than the fast
/// link saves by it). Over the serial link each call carries one page: the hv sends what it
/// is given before it returns, and a page is a third of a second on a real line.
pub const LINK_REQUEST_FAST: u32 = 1;
/// Bytes of records the agent gives one `Op::LinkBulk` at most on the fast link.
pub const LINK_BULK_BATCH: u32 = 64 << 10;

/// [`LinkBulk::flags`]: the read request is over; the end (status, zero pages, checksum) goes
/// to the bridge and the request is no longer in flight.
pub const LINK_BULK_END: u32 = 1;

crate::abi_struct! {
    /// `Op::LinkBulk`'s record: bytes of the read request in flight for the bridge, or its end.
    /// A call's buffer holds one record or more, back to back: each this header, then `len`
    /// bytes, then zeros to the next multiple of 8. The hv answers in each header.
    #[c_name = "qs_link_bulk"]
    pub struct LinkBulk {
        /// Out: a `Status` (`Ok`; a request no longer in flight drops the bytes, and says so
        /// with `NoSuchRequest`, so that the agent stops serving it).
        pub status: i64,
        /// The request's tag.
        pub tag: u32,
        /// Data: which item (the page's index in the request; 0 for a CPU or the meta).
        pub item: u32,
        /// Data: where in the item these bytes start.
        pub offset: u32,
        /// Data: bytes after this header.
        pub len: u32,
        /// [`LINK_BULK_END`], or 0 for data.
        pub flags: u32,
        /// End: CRC-32 of every data byte of the request, in the order sent.
        pub crc: u32,
        /// End: the request's outcome (a `Status`).
        pub outcome: i64,
        /// End: bit `i` set: page `i` of the request is all zero (not sent).
        pub zero_mask: u64,
        /// End: data bytes sent for the request in all.
        pub total: u64,
    }
}

crate::abi_struct! {
    /// [`LINK_OP_READ_META`]'s answer: what an export needs of the kernel besides the
    /// checkpoint (what `qsctl export` reads in the guest). Then `ram_ranges` pairs of u64
    /// (start, end), then three NUL-terminated strings: the machine's name, the kernel's
    /// release (`uname -r`) and its boot id (`/proc/sys/kernel/random/boot_id`).
    #[c_name = "qs_export_meta"]
    pub struct ExportMeta {
        /// Where the kernel maps all of RAM (`page_offset_base`).
        pub page_offset: u64,
        /// The kernel's VMCOREINFO note: physical address and bytes (`/sys/kernel/vmcoreinfo`).
        pub vmcoreinfo_pa: u64,
        pub vmcoreinfo_size: u32,
        /// CPUs the hv was loaded for (`nr_cpu_ids`).
        pub cpus: u32,
        /// RAM ranges that follow.
        pub ram_ranges: u32,
        /// Zero.
        pub _reserved: u32,
    }
}

/// The message for a status number the hv returned, known or not (the C header's
/// `qs_status_message` answers the same).
pub fn status_message(v: i64) -> &'static str {
    match Status::from_i64(v) {
        Some(s) => s.message(),
        None => UNKNOWN_STATUS,
    }
}

/// What the agent and `qsctl` say for a status number this tree does not know.
pub const UNKNOWN_STATUS: &str =
    "the hv returned an unknown status: the hv image and the agent come from different trees; rebuild both with cargo xtask build";

/// [`FreezeArgs::flags`]: after the freeze, every CPU writes its whole captured state back,
/// captures it again and compares (a test of capture and restore under a running kernel).
pub const FREEZE_CHECK: u32 = 1;
/// The longest freeze: longer stops make the kernel report soft lockups (after ~20 s).
pub const FREEZE_MAX_MS: u32 = 10_000;

crate::abi_struct! {
    /// `Op::Freeze`'s argument and answer: every CPU stopped for `ms` milliseconds.
    #[c_name = "qs_freeze"]
    pub struct FreezeArgs {
        /// Out: the hv's `Status` (the hypercall's RAX; the agent copies it here for qsctl).
        pub status: i64,
        /// In: how long every CPU stays stopped, at most [`FREEZE_MAX_MS`].
        pub ms: u32,
        /// In: [`FREEZE_CHECK`] or 0.
        pub flags: u32,
        /// Out: CPUs that were stopped.
        pub cpus: u32,
        /// Out: CPUs whose state came back identical (with [`FREEZE_CHECK`]).
        pub identical: u32,
        /// Out: microseconds from the request to every CPU stopped.
        pub gather_us: u64,
        /// Out: microseconds every CPU was held.
        pub held_us: u64,
        /// Out: bit n set if CPU n's state came back different, or its verdict did not come.
        pub differing_cpus: u64,
        /// Out: bit n set if CPU n was active but did not stop (it did not answer its NMI in
        /// time and ran on: the cut is not consistent).
        pub missing_cpus: u64,
        /// Out: what differed on the first such CPU (comma-separated names, NUL-padded).
        pub what: [u8; 32],
    }
}

crate::abi_enum! {
    /// What an entry point or hypercall returns: 0 for success, otherwise a code that names the
    /// cause. The numbers are ABI; each message names the cause and the fix.
    pub enum Status: i64, from_i64 {
        /// Done.
        Ok = 0 => "ok",
        /// CPUID says the CPU has no AMD SVM.
        NoSvm = 1 =>
            "this CPU has no AMD SVM: Quicksilver needs AMD-V (Intel VMX comes later); under a hypervisor, give the guest a CPU model with svm",
        /// SVM is disabled by firmware (VM_CR.SVMDIS).
        SvmDisabled = 2 =>
            "SVM is disabled by firmware (VM_CR.SVMDIS): enable SVM/AMD-V in the BIOS",
        /// EFER.SVME is already set: another hypervisor (such as kvm_amd) owns SVM.
        SvmInUse = 3 =>
            "EFER.SVME is already set: another hypervisor (kvm_amd?) owns SVM; stop its VMs or unload it",
        /// The CPU has no nested paging, or no 1 GiB pages (the nested tables map with them).
        NoNpt = 4 =>
            "this CPU has no nested paging (NPT) or no 1 GiB pages, both of which the hv needs: use a CPU (or a CPU model) that has both",
        /// The memory given to `init` is too small.
        NotEnoughMemory = 5 =>
            "the hv was given too little memory for its tables: the agent sized it wrong, please report this bug",
        /// More CPUs than the image supports.
        TooManyCpus = 6 =>
            "more possible CPUs than this hv image supports: boot with fewer (nr_cpus=) or rebuild the hv with a larger MAX_CPUS",
        /// An argument is out of range.
        BadArgument = 7 =>
            "an argument to the hv is out of range: the agent and the hv disagree; rebuild both with cargo xtask build",
        /// The hv is already active on this CPU.
        AlreadyActive = 8 =>
            "the hypervisor is already active: nothing to do (qsctl deactivate returns every CPU to native)",
        /// The hv is not active.
        NotActive = 9 =>
            "the hypervisor is not active (dormant): nothing to do (qsctl activate starts it)",
        /// VMRUN failed its consistency checks; the CPU stayed native.
        VmrunFailed = 10 =>
            "VMRUN failed its consistency checks; the CPU stayed native: qsctl stats shows the state it refused, please report it",
        /// Unknown operation.
        BadOp = 11 =>
            "unknown operation: the hv image and the agent come from different trees; rebuild both with cargo xtask build",
        /// The buffer is too small for the answer.
        BufferTooSmall = 12 =>
            "the buffer is too small for the hv's answer: pass a larger one",
        /// `init` has not run, or failed.
        NotInitialized = 13 =>
            "the hv image is not initialized (its init failed or never ran): reload the module and read its log",
        /// The kernel runs 5-level paging, which the hv does not support yet.
        La57Unsupported = 14 =>
            "the kernel runs 5-level paging, which the hv does not support yet: boot it with no5lvl",
        /// A debugger holds the hv (attached, or CPUs stopped), or another request runs.
        Busy = 15 =>
            "the hv is busy: a gdb session holds it (attached, or some CPUs stopped), or another checkpoint request is under way: continue or detach gdb, or wait, then try again",
        /// More store chunks than the hv takes.
        StoreTooLarge = 17 =>
            "the store is larger than this hv takes (128 chunks of 4 MiB, 512 MiB, for store_mem= and ckpt_mem= together): load the agent with a smaller store_mem= or ckpt_mem=",
        /// A CPU was not at a point where its state can be restored.
        NotQuiescent = 18 =>
            "a CPU was inside an interrupt or NMI handler or delivering an event at every try, where a checkpoint could not be restored exactly: try again (qsctl checkpoint retries for 50 ms)",
        /// No checkpoint has that id.
        NoSuchCheckpoint = 19 =>
            "no checkpoint has that id: qsctl checkpoints lists the ones kept (a rollback drops newer ones, the periodic ring its oldest)",
        /// The checkpoint memory is full.
        CheckpointMemoryFull = 20 =>
            "the checkpoint memory is full: delete checkpoints (qsctl checkpoint --delete ID|all) or load the agent with a larger ckpt_mem=",
        /// The agent gave the hv no checkpoint memory.
        NoCheckpointMemory = 21 =>
            "the agent was loaded with ckpt_mem=0, so there is nowhere to keep checkpoints: reload it with ckpt_mem=64M (or more)",
        /// The checkpoint is older than the kernel's clock can jump.
        CheckpointTooOld = 22 =>
            "that checkpoint is older than this kernel's timekeeping can jump forward without corrupting its clock: roll back to a newer one",
        /// Checkpoints need the hv active.
        CheckpointsKept = 23 =>
            "checkpoints are kept, and keeping them needs the hv active: delete them first (qsctl checkpoint --delete all)",
        /// A CPU did not stop in time: the cut would not be consistent.
        CpusDidNotStop = 24 =>
            "a CPU did not stop within 2 s, so the machine could not be stopped as one: try again; if it persists, a CPU is stuck with NMIs blocked",
        /// The most checkpoints the hv keeps are kept.
        TooManyCheckpoints = 25 =>
            "64 checkpoints are kept, the most the hv holds: delete some (qsctl checkpoint --delete ID|all)",
        /// The machine was rolled back to this checkpoint (what its taker finds then).
        RolledBack = 26 =>
            "the machine was rolled back to this checkpoint: every process resumed from the instant it was taken",
        /// The CPU's XSAVE state is larger than the hv keeps per CPU.
        XsaveTooLarge = 16 =>
            "this CPU's XSAVE state (CPUID 0xD) is larger than the hv keeps per CPU: please report it; the hv needs a larger XSAVE_AREA_SIZE",
        /// A debugger holds every CPU: the bridge's checkpoint requests are refused meanwhile
        /// (gdb's monitor commands do the same things).
        DebuggerHoldsCpus = 27 =>
            "a debugger holds every CPU (gdb is attached through the bridge): use gdb's monitor checkpoint, monitor checkpoints or monitor rollback ID, or detach gdb and ask again",
        /// The machine is still serving an earlier checkpoint request from the bridge.
        LinkRequestPending = 28 =>
            "the machine is still serving an earlier checkpoint request from the bridge (one at a time; one older than 30 s is given up): wait for it, then ask again",
        /// A CPU left guest mode while the others stayed (an unexpected exit): it runs
        /// natively, where its writes escape any checkpoint.
        CpuLeftGuestMode = 29 =>
            "a CPU left guest mode while the others stayed (an unexpected exit: qsctl stats shows it), so the machine cannot be checkpointed or rolled back as one: qsctl deactivate, then qsctl activate, and take a new checkpoint",
        /// A checkpoint's memory was asked for outside the machine's RAM.
        NotInRam = 30 =>
            "those pages are not in the machine's RAM (System RAM in /proc/iomem): a checkpoint holds RAM only",
        /// Bytes for a bridge's read request that is no longer in flight.
        NoSuchRequest = 31 =>
            "that read request from the bridge is no longer in flight (it was given up after 30 s, or replaced): the bridge asks again",
        /// The NIC named for the fast link is not one the hv drives.
        NetUnsupported = 32 =>
            "the NIC given for the fast link (net=) is not one the hv drives: use a virtio-net (modern, 1.0) or an Intel 82574L (e1000e) function",
        /// The NIC did not come up.
        NetDeviceFailed = 33 =>
            "the NIC given for the fast link did not initialize (reset, queues or link): check the device with lspci -vv; the agent left it unbound",
        /// The fast link is not configured.
        NetNotConfigured = 34 =>
            "the fast link is not configured: load the agent with net=BDF (and net_ip=, net_port=)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::c_abi::CStruct;

    #[test]
    fn what_a_busy_cpu_was_doing_reads_the_same_everywhere() {
        assert_eq!(BusyWhat(0xec).to_string(), "handling interrupt vector 0xec");
        assert_eq!(BusyWhat(256 + 2).to_string(), "delivering event vector 0x2");
        assert_eq!(BusyWhat(BUSY_IN_NMI).to_string(), "inside an NMI handler");
    }

    #[test]
    fn every_status_round_trips_and_says_what_to_do() {
        for &s in Status::ALL {
            assert_eq!(Status::from_i64(s as i64), Some(s));
            assert_eq!(status_message(s as i64), s.message());
            // The cause, then what to do about it.
            assert!(
                s == Status::Ok || s.message().contains(": "),
                "{s:?}: {}",
                s.message()
            );
        }
        assert_eq!(Status::from_i64(Status::ALL.len() as i64), None);
        assert_eq!(status_message(-1), UNKNOWN_STATUS);
    }

    #[test]
    fn every_op_round_trips() {
        for &op in Op::ALL {
            assert_eq!(Op::from_u64(op as u64), Some(op));
        }
        assert_eq!(Op::from_u64(0), None);
        assert_eq!(Op::from_u64(99), None);
    }

    #[test]
    fn the_variant_lists_carry_numbers_docs_and_messages() {
        let no_npt = &Status::VARIANTS[Status::NoNpt as usize];
        assert_eq!((no_npt.name, no_npt.value), ("NoNpt", 4));
        assert!(no_npt.doc.contains("1 GiB pages"));
        assert_eq!(no_npt.message, Some(Status::NoNpt.message()));
        assert_eq!(Op::VARIANTS.len(), Op::ALL.len());
        assert_eq!(Op::VARIANTS[0].message, None);
    }

    #[test]
    fn init_args_layout_is_the_one_the_agent_fills() {
        let offsets: Vec<(&str, usize)> = InitArgs::FIELDS
            .iter()
            .map(|f| (f.name, f.offset))
            .collect();
        assert_eq!(
            offsets,
            [
                ("base_va", 0),
                ("base_pa", 8),
                ("mem_size", 16),
                ("phys_limit", 24),
                ("cpus", 32),
                ("tsc_khz", 36),
                ("kernel_text", 40),
                ("kernel_text_link", 48),
                ("store_chunks_va", 56),
                ("store_chunks", 64),
                ("ckpt_chunks", 68),
                ("ram_ranges_va", 72),
                ("ram_ranges", 80),
                ("_reserved", 84),
                ("notice_pa", 88),
            ]
        );
        assert_eq!(InitArgs::SIZE, 96);
        assert_eq!(core::mem::align_of::<InitArgs>(), 8);
    }
}
