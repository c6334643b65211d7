// SPDX-License-Identifier: GPL-2.0
/*
 * Quicksilver guest agent: loads the hv image, keeps it dormant, and switches every CPU into
 * and out of it on request from qsctl (/dev/quicksilver).
 *
 * This module is deliberately thin: it validates the image before running a byte of it, gives
 * it memory, calls its entry points on every CPU, and passes bytes between qsctl and the hv.
 * Every decision about SVM lives in the hv (Rust).
 *
 * The switch is an IPI to every online CPU (on_each_cpu), not stop_machine: each CPU enters
 * and leaves guest mode on its own (the nested page tables are built once and shared), so no
 * CPU needs to wait for another, and an IPI costs far less than waking a stopper thread on
 * every CPU and stepping them through stop_machine's barriers.
 *
 * Concurrency: qs_lock serializes every request. Each switch holds cpus_read_lock, and CPU
 * hotplug is refused from the start of an activation to the end of the deactivation
 * (qs_hotplug_blocked, set under that lock), so the set of CPUs in guest mode never changes
 * under us.
 */
#define pr_fmt(fmt) "quicksilver: " fmt

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/uaccess.h>
#include <linux/mutex.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/gfp.h>
#include <linux/mm.h>
#include <linux/crc32.h>
#include <linux/cpu.h>
#include <linux/cpuhotplug.h>
#include <linux/kernel_read_file.h>
#include <linux/ktime.h>
#include <linux/interrupt.h>
#include <linux/ioport.h>
#include <linux/kthread.h>
#include <linux/hrtimer.h>
#include <linux/string.h>
#include <linux/serial_8250.h>
#include <linux/io.h>
#include <linux/kprobes.h>
#include <linux/delay.h>
#include <linux/math64.h>
#include <linux/irq_work.h>
#include <linux/workqueue.h>
#include <linux/random.h>
#include <linux/timekeeping.h>
#include <linux/ioport.h>
#include <uapi/linux/random.h>
#include <linux/nmi.h>
#include <linux/pci.h>
#include <linux/inet.h>
#include <linux/device.h>
#include <linux/iommu.h>
#include <linux/version.h>
#include <asm/nmi.h>
/* 6.12 moved the unaligned accessors from asm/ to linux/. */
#include <linux/utsname.h>
#include <linux/zlib.h>
#include <linux/sort.h>
/* 6.12 moved the VMCOREINFO note's declarations out of crash_core.h. */
#if __has_include(<linux/vmcore_info.h>)
#include <linux/vmcore_info.h>
#else
#include <linux/crash_core.h>
#endif
#if __has_include(<linux/unaligned.h>)
#include <linux/unaligned.h>
#else
#include <asm/unaligned.h>
#endif
#include <asm/msr.h>
#include <asm/asm.h>
#include <asm/pgtable.h>
#include <asm/tlbflush.h>
#include <asm/tsc.h>
#include <asm/processor.h>
#include "qs_abi.h"

/* Where the quicksilver package installs it (under /usr, not the /lib alias: Debian 12 and 13
 * merged /lib into /usr/lib, and packages ship in /usr). */
static char *image = "/usr/lib/quicksilver/hv.img";
module_param(image, charp, 0444);
MODULE_PARM_DESC(image, "path of the hv image (default /usr/lib/quicksilver/hv.img, where the quicksilver package installs it)");

static unsigned int link_port;
module_param(link_port, uint, 0444);
MODULE_PARM_DESC(link_port, "I/O port of the 16550 UART for the link to qs-bridge (0x2f8 for COM2); 0 = no link");
static unsigned int link_irq = 3;
module_param(link_irq, uint, 0444);
MODULE_PARM_DESC(link_irq, "IRQ of the link UART (3 for COM2)");
static char *key_file = "";
module_param(key_file, charp, 0444);
MODULE_PARM_DESC(key_file, "a file only root may read (mode 0600 or 0400) holding the link key qs-bridge must prove (the same key as qs-bridge's --key FILE); the key itself is never a parameter, which /sys, shell history and ps would show. Without one the link refuses every bridge");
static char *net = "";
module_param(net, charp, 0444);
MODULE_PARM_DESC(net, "PCI address of a NIC for the fast link (0000:00:04.0 or 00:04.0): the agent takes it from Linux's driver and the hv drives it, for gdb and checkpoint export over UDP (needs link_port= and key_file=: the fast link proves the same key); empty = no fast link");
static char *net_ip = "10.13.0.2";
module_param(net_ip, charp, 0444);
MODULE_PARM_DESC(net_ip, "the hv's IPv4 address on the fast link (default 10.13.0.2)");
static ushort net_port = 50000;
module_param(net_port, ushort, 0444);
MODULE_PARM_DESC(net_port, "the UDP port the hv serves on the fast link (default 50000)");
static char *store_mem = "16M";
module_param(store_mem, charp, 0444);
MODULE_PARM_DESC(store_mem, "memory for the hv's own tables (nested page tables split to 4 KiB pages while checkpoints are kept: 2 MiB per GiB of RAM), taken at load in 4 MiB blocks: bytes with an optional K, M or G suffix (default 16M)");
static char *ckpt_mem = "64M";
module_param(ckpt_mem, charp, 0444);
MODULE_PARM_DESC(ckpt_mem, "memory for checkpoints (the old contents of every page written after a checkpoint, and each CPU's state), taken at load in 4 MiB blocks, at most 256M: bytes with an optional K, M or G suffix (default 64M); 0 = no checkpoints");

/* qs_abi.h is generated from quicksilver-proto (cargo xtask abi-header) and asserts every
 * layout; the store's chunks are page-allocator blocks of this order. */
#define QS_STORE_ORDER 10
static_assert((PAGE_SIZE << QS_STORE_ORDER) == QS_STORE_CHUNK_SIZE);
/* The largest order the page allocator gives: 6.8 renamed the inclusive bound MAX_PAGE_ORDER;
 * 6.1's MAX_ORDER was exclusive. (6.4 to 6.7 had an inclusive MAX_ORDER: this reads it as one
 * less, which only refuses the largest block; neither is a kernel Quicksilver supports.) */
#ifdef MAX_PAGE_ORDER
#define QS_MAX_ORDER MAX_PAGE_ORDER
#else
#define QS_MAX_ORDER (MAX_ORDER - 1)
#endif
static_assert(QS_STORE_ORDER <= QS_MAX_ORDER);

typedef long (*qs_init_fn)(const struct qs_init_args *args);
typedef long (*qs_activate_fn)(u32 cpu);
typedef long (*qs_control_fn)(u64 op, void *buf, u64 len);

static struct {
	struct page *pages;
	unsigned int order;
	void *base;			/* vmap'd, executable */
	u64 size;
	struct qs_image_header header;
	qs_activate_fn activate;
	qs_control_fn control;
} hv;

static DEFINE_MUTEX(qs_lock);
static bool qs_active;			/* under qs_lock */
static bool qs_hotplug_blocked;		/* read by the hotplug callbacks */
static int qs_hp_state = -1;
static long qs_cpu_status[NR_CPUS];	/* per-CPU result of the last switch */

/* Is this CPU running as a guest of our hv? Asked with CPUID, which the hv answers. */
static bool qs_this_cpu_virtualized(void)
{
	unsigned int a, b, c, d;

	cpuid(QS_CPUID_SIGNATURE_LEAF, &a, &b, &c, &d);
	return b == QS_SIG_EBX && c == QS_SIG_ECX && d == QS_SIG_EDX;
}

/* A hypercall; -EFAULT if this CPU is native (a VMMCALL there would be #UD, or another
 * hypervisor's). Call with preemption off. A debugger's detach can step a CPU out of guest
 * mode between the check and the VMMCALL (it was stopped there): the VMMCALL then raises #UD
 * natively, and the exception table sends it to the same -EFAULT. */
static long qs_hypercall(u64 op, u64 a0, u64 a1)
{
	long ret;

	if (!qs_this_cpu_virtualized())
		return -EFAULT;
	asm volatile("1: vmmcall\n"
		     "2:\n"
		     _ASM_EXTABLE_TYPE_REG(1b, 2b, EX_TYPE_EFAULT_REG, %%rax)
		     : "=a"(ret)
		     : "a"(QS_HYPERCALL_MAGIC | op), "b"(a0), "c"(a1)
		     : "memory");
	return ret;
}

/* ---- image validation: before a byte of the image runs ---- */

static u32 qs_image_checksum(const u8 *p, size_t len)
{
	static const u8 zero[4];
	u32 crc = crc32_le(~0u, p, QS_CHECKSUM_OFFSET);

	crc = crc32_le(crc, zero, sizeof(zero));
	crc = crc32_le(crc, p + QS_CHECKSUM_OFFSET + 4, len - QS_CHECKSUM_OFFSET - 4);
	return ~crc;
}

/* Returns NULL if the image is sound, else what is wrong with it. */
static const char *qs_validate(const u8 *p, size_t len, struct qs_image_header *h)
{
	u64 i, end;

	if (len < QS_HEADER_SIZE)
		return "shorter than its header";
	memcpy(h, p, sizeof(*h));
	if (memcmp(h->magic, QS_IMAGE_MAGIC, 8))
		return "bad magic: not a Quicksilver hv image";
	if (h->abi_version != QS_ABI_VERSION)
		return "ABI version mismatch: rebuild the image and the module from one tree";
	if (h->header_size != QS_HEADER_SIZE)
		return "bad header size";
	if (h->image_size != len || len > QS_MAX_IMAGE_SIZE)
		return "size mismatch: the file is truncated or padded";
	if (h->code_start < QS_HEADER_SIZE || h->code_start > h->code_end || h->code_end > len)
		return "code range out of bounds";
	/* Its pages are mapped read-only and executable, the rest never executable. */
	if (!PAGE_ALIGNED(h->code_start))
		return "code does not start on a page boundary: rebuild the image with hv/link.ld";
	if (h->entry_init < h->code_start || h->entry_init >= h->code_end ||
	    h->entry_activate < h->code_start || h->entry_activate >= h->code_end ||
	    h->entry_control < h->code_start || h->entry_control >= h->code_end)
		return "entry point outside the code";
	if (h->reloc_offset % 8 || h->reloc_count > len / 8 ||
	    check_add_overflow(h->reloc_offset, h->reloc_count * 8, &end) || end > len)
		return "relocation table out of bounds";
	if (qs_image_checksum(p, len) != h->checksum)
		return "checksum mismatch: the file is corrupt";
	for (i = 0; i < h->reloc_count; i++) {
		u64 off = get_unaligned((const u64 *)(p + h->reloc_offset + i * 8));

		if (off < QS_HEADER_SIZE || off > len - 8)
			return "relocation entry out of bounds";
		/* The code pages are mapped read-only (qs_protect_code). */
		if (off + 8 > h->code_start && off < PAGE_ALIGN(h->code_end))
			return "relocation entry inside the code";
	}
	if (h->max_cpus < nr_cpu_ids)
		return "more possible CPUs than the image supports";
	return NULL;
}

/* ---- the store: the hv's second memory region ---- */

/*
 * The store (checkpoints will live there) can be far larger than the one block the page
 * allocator gives the hv, so it is a list of blocks of QS_STORE_CHUNK_SIZE bytes wherever the
 * allocator found them; init gets their physical addresses. Taken at load and kept until
 * unload: the hv owns it from init on.
 */
static struct {
	u64 *chunks;		/* physical addresses; kvmalloc'd */
	unsigned int count;
	unsigned int ckpt;	/* the last `ckpt` of them hold checkpoints (ckpt_mem=) */
} qs_store;

static void qs_store_free(void)
{
	unsigned int i;

	for (i = 0; i < qs_store.count; i++)
		__free_pages(pfn_to_page(PHYS_PFN(qs_store.chunks[i])), QS_STORE_ORDER);
	kvfree(qs_store.chunks);
	qs_store.chunks = NULL;
	qs_store.count = 0;
	qs_store.ckpt = 0;
}

/* ---- what a checkpoint saves: RAM ---- */

/* The machine's RAM ("System RAM" in /proc/iomem), which checkpoints write-protect and
 * keep; merged where ranges touch. */
static u64 qs_ram[2 * QS_MAX_RAM_RANGES];
static unsigned int qs_ram_n;
static bool qs_ram_overflow;

/* A "System RAM" resource, widened to whole pages (a page that is partly RAM is memory, not
 * a device); ranges come in address order. */
static int qs_add_ram(struct resource *r, void *unused)
{
	u64 start = round_down(r->start, PAGE_SIZE), end = round_up(r->end + 1, PAGE_SIZE);

	if (qs_ram_n && qs_ram[2 * qs_ram_n - 1] >= start) {
		qs_ram[2 * qs_ram_n - 1] = max(end, qs_ram[2 * qs_ram_n - 1]);
		return 0;
	}
	if (qs_ram_n == QS_MAX_RAM_RANGES) {
		qs_ram_overflow = true;
		return 0;
	}
	qs_ram[2 * qs_ram_n] = start;
	qs_ram[2 * qs_ram_n + 1] = end;
	qs_ram_n++;
	return 0;
}

/* The notice the hv writes after a rollback (a page of its own: the hv writes it by physical
 * address), the last one the agent handled, and how it learns of one (qs_nmi). */
/*
 * One page: the hv writes `n` by physical address after a rollback (which makes the page
 * writable again for the kernel: it copies its old contents first), so the NMI handler's
 * own writes here cost no copy-on-write fault of their own.
 */
static void qs_rollback_irq_work_fn(struct irq_work *w);
static unsigned long qs_lookup(const char *name);

/*
 * The NMI handler queues each notice it takes (`taken`, a ring: the NMI handler alone moves
 * `head`, the work alone `tail`): the work that acts on one (the wall clock, the log line) may
 * not have run when the next rollback comes, and that rollback can be to a checkpoint taken
 * in between (gdb stopped the kernel right after the first). The kernel then owes both: the
 * first's clock correction is missing from that checkpoint's clock too. The page is rolled
 * back with the machine, so the queue holds exactly what this kernel's own past took and has
 * not acted on.
 */
#define QS_NOTICES_KEPT 4
struct qs_notice_page {
	struct qs_rollback_notice n;
	u64 handled;			/* the generation the NMI handler took */
	u64 head, tail;
	struct irq_work work;
	struct qs_rollback_notice taken[QS_NOTICES_KEPT];
};
static_assert(sizeof(struct qs_notice_page) <= QS_NOTICE_HOT_PAGES_OFFSET);
static struct qs_notice_page *qs_notice;
static struct qs_rollback_notice qs_last_rollback;
static struct work_struct qs_rollback_work;
/* Not exported; found through kallsyms (qs_lookup). */
static void (*qs_clocksource_touch_watchdog)(void);

/* A size parameter in whole chunks; -EINVAL (said) if it is not a size. */
static long long qs_chunks_of(const char *name, const char *value)
{
	unsigned long long bytes;
	char *end;

	bytes = memparse(value, &end);
	if (end == value || *end) {
		pr_err("refusing to load: %s=%s is not a size: give bytes with an optional K, M or G suffix (%s=64M), or 0\n",
		       name, value, name);
		return -EINVAL;
	}
	return DIV_ROUND_UP(bytes, QS_STORE_CHUNK_SIZE);
}

/* Takes store_mem and ckpt_mem bytes, each rounded up to whole chunks, zeroed; all or
 * nothing. */
static int qs_store_alloc(void)
{
	long long tables = qs_chunks_of("store_mem", store_mem);
	long long ckpt = qs_chunks_of("ckpt_mem", ckpt_mem);
	unsigned long long want;

	if (tables < 0 || ckpt < 0)
		return -EINVAL;
	if (ckpt > QS_CKPT_MAX_CHUNKS) {
		pr_err("refusing to load: ckpt_mem=%s is more than the hv keeps (%u MiB): load with a smaller ckpt_mem=\n",
		       ckpt_mem, QS_CKPT_MAX_CHUNKS * (u32)(QS_STORE_CHUNK_SIZE >> 20));
		return -EINVAL;
	}
	want = tables + ckpt;
	qs_store.ckpt = ckpt;
	if (!want)
		return 0;
	if (want > (totalram_pages() >> QS_STORE_ORDER)) {
		pr_err("refusing to load: store_mem=%s and ckpt_mem=%s are more than this machine's %lu MiB of RAM: load with smaller ones\n",
		       store_mem, ckpt_mem, totalram_pages() >> (20 - PAGE_SHIFT));
		return -ENOMEM;
	}
	qs_store.chunks = kvcalloc(want, sizeof(*qs_store.chunks), GFP_KERNEL);
	while (qs_store.chunks && qs_store.count < want) {
		struct page *p = alloc_pages(GFP_KERNEL | __GFP_ZERO | __GFP_NOWARN, QS_STORE_ORDER);

		if (!p)
			break;
		qs_store.chunks[qs_store.count++] = page_to_phys(p);
		cond_resched();
	}
	if (qs_store.count < want) {
		pr_err("refusing to load: cannot allocate store_mem=%s and ckpt_mem=%s (got %u of %llu blocks of %llu MiB): load with smaller ones, or earlier after boot before memory fragments\n",
		       store_mem, ckpt_mem, qs_store.count, want, QS_STORE_CHUNK_SIZE >> 20);
		qs_store_free();
		return -ENOMEM;
	}
	return 0;
}

/* The page each CPU's NMI handler writes besides the notice's: irq_work_queue() adds to the
 * CPU's `raised_list` (a per-CPU variable of the kernel's, found through kallsyms). The hv
 * makes it writable before the notice NMI (QS_NOTICE_HOT_PAGES_OFFSET). And where the
 * clocksource watchdog's reset counter is, which the hv bumps during a rollback
 * (QS_NOTICE_WATCHDOG_RESET_OFFSET). */
static void qs_notice_hot_pages(void)
{
	u64 *hot = (u64 *)((u8 *)qs_notice + QS_NOTICE_HOT_PAGES_OFFSET);
	unsigned long raised = qs_lookup("raised_list");
	unsigned int cpu;
	unsigned long reset = qs_lookup("watchdog_reset_pending");

	if (reset)
		*(u64 *)((u8 *)qs_notice + QS_NOTICE_WATCHDOG_RESET_OFFSET) =
			slow_virt_to_phys((void *)reset);
	if (!raised)
		return;
	for_each_possible_cpu(cpu) {
		if (cpu >= 64)
			break;
		hot[cpu] = slow_virt_to_phys(per_cpu_ptr((void __percpu *)raised, cpu)) & PAGE_MASK;
	}
}

/* ---- load: read, validate, allocate, map executable, init ---- */

static void qs_flush_tlb(void *unused)
{
	__flush_tlb_all();
}

/*
 * vmap() forces NX (pgprot_nx, since Linux 5.8) and the kernel exports no way for a module to
 * get executable memory (neither 6.1's module_alloc nor 6.12's execmem_alloc, set_memory_x or
 * __vmalloc_node_range are exported), so the agent edits the PTEs of its own, fresh mapping:
 * the image's code pages (text and read-only data, which hv/link.ld page-aligns) become
 * read-only and executable; the header page, the data and the working memory stay writable
 * and NX. No page is both writable and executable, which is what the kernel's W^X checks
 * (CONFIG_DEBUG_WX) look for; the relocations never touch the code (qs_validate). The image
 * is copied in before this, through the writable mapping.
 */
static int qs_protect_code(void *code, unsigned long pages)
{
	unsigned long i;
	unsigned int level;

	for (i = 0; i < pages; i++) {
		pte_t *pte = lookup_address((unsigned long)code + i * PAGE_SIZE, &level);

		if (!pte || level != PG_LEVEL_4K) {
			pr_err("refusing to load: unexpected mapping of the hv's memory\n");
			return -EFAULT;
		}
		set_pte(pte, pte_clear_flags(*pte, _PAGE_NX | _PAGE_RW));
	}
	on_each_cpu(qs_flush_tlb, NULL, 1);
	return 0;
}

/* Where the kernel's text runs, for the debugger's KASLR offset (gdb's qOffsets). Modules
 * cannot link against _text and 6.1 exports no symbol lookup, so ask kprobes, which resolve
 * names through kallsyms, for kallsyms_lookup_name first. 0 (unknown) if that fails: the
 * debugger then says it cannot relocate symbols. */
static unsigned long qs_lookup(const char *name)
{
	static unsigned long (*lookup)(const char *name);
	struct kprobe kp = { .symbol_name = "kallsyms_lookup_name" };

	if (!lookup && register_kprobe(&kp) == 0) {
		lookup = (void *)kp.addr;
		unregister_kprobe(&kp);
	}
	return lookup ? lookup(name) : 0;
}

static u64 qs_kernel_text(void)
{
	u64 text = qs_lookup("_text");

	if (!text)
		pr_warn("cannot find the kernel's text (no kprobes?): gdb will need symbol-file -o\n");
	return text;
}

/* TSC ticks per millisecond over 20 ms of the kernel's clock; 0 if either went backwards. */
static u64 qs_tsc_khz_once(void)
{
	u64 t0, t1, c0, c1;
	unsigned long flags;

	local_irq_save(flags);
	t0 = ktime_get_ns();
	c0 = rdtsc_ordered();
	local_irq_restore(flags);
	msleep(20);
	local_irq_save(flags);
	t1 = ktime_get_ns();
	c1 = rdtsc_ordered();
	local_irq_restore(flags);
	if (t1 <= t0 || c1 <= c0)
		return 0;
	return div64_u64((c1 - c0) * NSEC_PER_MSEC, t1 - t0);
}

/* The TSC's rate in kHz, for the hv's timeouts (it counts TSC ticks in host mode, where no
 * kernel clock runs). The kernel's tsc_khz is a boot-time calibration that nothing checks
 * once the TSC is not the clocksource: under QEMU on a loaded host it came out as 37 MHz for
 * a 2.6 GHz TSC ("PIT calibration deviates from HPET"), which made every hv timeout 70 times
 * too short. So the rate is measured against the kernel's clock, the median of three 20 ms
 * samples (a vCPU the host preempts between the two reads spoils one); the kernel's figure is
 * kept when they agree within 5 % (it is the finer one). */
static u32 qs_tsc_khz(void)
{
	u64 a = qs_tsc_khz_once(), b = qs_tsc_khz_once(), c = qs_tsc_khz_once();
	u64 measured = max(min(a, b), min(max(a, b), c));

	if (!measured || measured > U32_MAX)
		return tsc_khz;
	if (tsc_khz && measured * 100 >= (u64)tsc_khz * 95 &&
	    measured * 100 <= (u64)tsc_khz * 105)
		return tsc_khz;
	pr_warn("the kernel's TSC rate (%u kHz) is not what the TSC runs at (%llu kHz, measured against the kernel's clock): the hv times its waits with the measured rate\n",
		tsc_khz, measured);
	return measured;
}

static int qs_load(void)
{
	void *file = NULL;
	size_t file_size = 0;
	struct qs_image_header *h = &hv.header;
	struct page **pages = NULL;
	struct qs_init_args args;
	u64 image_bytes, phys_limit, need, gib;
	unsigned long i, n;
	const char *why;
	ssize_t got;
	long st;
	int err;

	/* Read as what it is: code that will run in ring 0, so that the security policies
	 * which govern modules (IMA appraisal, LoadPin, IPE) govern the image too. 6.12's IPE
	 * warns about READING_UNKNOWN, which no policy can name. */
	got = kernel_read_file_from_path(image, 0, &file, QS_MAX_IMAGE_SIZE, &file_size,
					 READING_MODULE);
	if (got < 0) {
		pr_err("refusing to load: cannot read hv image %s (error %zd): pass image=PATH\n",
		       image, got);
		return (int)got;
	}
	why = qs_validate(file, got, h);
	if (why) {
		pr_err("refusing to load: bad hv image %s: %s; rebuild it with cargo xtask build\n",
		       image, why);
		err = -ENOEXEC;
		goto out_file;
	}

	phys_limit = __pa(high_memory - 1) + 1;
	gib = DIV_ROUND_UP(phys_limit, 1ull << 30);
	image_bytes = PAGE_ALIGN(h->image_size);
	need = image_bytes + PAGE_ALIGN(h->mem_fixed + h->mem_per_cpu * nr_cpu_ids +
					h->mem_per_gib * gib);
	hv.order = get_order(need);
	if (hv.order > QS_MAX_ORDER) {
		pr_err("refusing to load: the hv needs %llu KiB in one block, more than the page allocator gives (%lu KiB): fewer possible CPUs (nr_cpus=) help\n",
		       need >> 10, (PAGE_SIZE << QS_MAX_ORDER) >> 10);
		err = -ENOMEM;
		goto out_file;
	}
	hv.pages = alloc_pages(GFP_KERNEL | __GFP_ZERO | __GFP_NOWARN, hv.order);
	if (!hv.pages) {
		pr_err("refusing to load: no %llu KiB contiguous block free for the hv: retry, or load early after boot\n",
		       (u64)(PAGE_SIZE << hv.order) >> 10);
		err = -ENOMEM;
		goto out_file;
	}
	n = 1ul << hv.order;
	hv.size = (u64)n << PAGE_SHIFT;
	pages = kmalloc_array(n, sizeof(*pages), GFP_KERNEL);
	if (!pages) {
		err = -ENOMEM;
		goto out_pages;
	}
	for (i = 0; i < n; i++)
		pages[i] = hv.pages + i;
	/* The image runs from here while dormant and, at the same address, in host mode. */
	hv.base = vmap(pages, n, VM_MAP, PAGE_KERNEL);
	kfree(pages);
	if (!hv.base) {
		pr_err("refusing to load: cannot map the hv's memory\n");
		err = -ENOMEM;
		goto out_pages;
	}
	memcpy(hv.base, file, got);
	err = qs_protect_code(hv.base + h->code_start,
			      (PAGE_ALIGN(h->code_end) - h->code_start) >> PAGE_SHIFT);
	if (err)
		goto out_unmap;
	err = qs_store_alloc();
	if (err)
		goto out_unmap;
	qs_ram_n = 0;
	walk_iomem_res_desc(IORES_DESC_NONE, IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY, 0,
			    phys_limit - 1, NULL, qs_add_ram);
	if (qs_ram_overflow && qs_store.ckpt) {
		pr_warn("RAM is in more than %u ranges: checkpoints are off (ckpt_mem ignored)\n",
			QS_MAX_RAM_RANGES);
		qs_ram_n = 0;
	}
	qs_notice = (void *)get_zeroed_page(GFP_KERNEL);
	if (qs_notice) {
		init_irq_work(&qs_notice->work, qs_rollback_irq_work_fn);
		qs_notice_hot_pages();
	}
	if (!qs_notice) {
		err = -ENOMEM;
		goto out_store;
	}

	args = (struct qs_init_args){
		.base_va = (u64)hv.base,
		.base_pa = page_to_phys(hv.pages),
		.mem_size = hv.size,
		.phys_limit = phys_limit,
		.cpus = nr_cpu_ids,
		.tsc_khz = qs_tsc_khz(),
		.kernel_text = qs_kernel_text(),
		.kernel_text_link = __START_KERNEL,
		.store_chunks_va = (u64)qs_store.chunks,
		.store_chunks = qs_store.count,
		.ckpt_chunks = qs_store.ckpt,
		.ram_ranges_va = (u64)qs_ram,
		.ram_ranges = qs_ram_n,
		.notice_pa = qs_notice ? virt_to_phys(qs_notice) : 0,
	};
	st = ((qs_init_fn)(hv.base + h->entry_init))(&args);
	if (st != QS_OK) {
		pr_err("refusing to load: %s\n", qs_status_message(st));
		err = st == QS_NOT_ENOUGH_MEMORY ? -ENOMEM : -ENODEV;
		goto out_store;
	}
	hv.activate = (qs_activate_fn)(hv.base + h->entry_activate);
	hv.control = (qs_control_fn)(hv.base + h->entry_control);
	vfree(file);
	pr_info("hv %.32s loaded: %llu KiB at %pa for %u CPUs, store %llu MiB (checkpoints %llu MiB); dormant\n",
		h->version, hv.size >> 10, &args.base_pa, nr_cpu_ids,
		(qs_store.count * QS_STORE_CHUNK_SIZE) >> 20,
		(qs_store.ckpt * QS_STORE_CHUNK_SIZE) >> 20);
	return 0;

out_store:
	free_page((unsigned long)qs_notice);
	qs_notice = NULL;
	qs_store_free();
out_unmap:
	vunmap(hv.base);
out_pages:
	__free_pages(hv.pages, hv.order);
out_file:
	vfree(file);
	return err;
}

/* ---- the link: the agent owns the UART's interrupt, the hv the protocol ---- */

#define QS_UART_RBR 0
#define QS_UART_IER 1
#define QS_UART_FCR 2
#define QS_UART_LCR 3
#define QS_UART_MCR 4
#define QS_UART_LSR 5
#define QS_UART_SCR 7

static u8 *qs_link_buf;			/* kmalloc'd: the hv reads it by physical address */
static bool qs_link_up;
/* Exported by the 8250 core but declared only in its private header. */
extern struct uart_8250_port *serial8250_get_port(int line);

static struct uart_8250_port qs_taken;	/* the serial driver's port we took, to give back */
static int qs_taken_line = -1;

/*
 * The kernel's 8250 driver registers the legacy ports (ttyS0-3) at boot and holds their I/O
 * regions. The link needs its UART to itself: take that port from the driver (its ttyS line
 * goes away) and give it back at unload.
 */
static void qs_take_port_from_8250(void)
{
	int line;

	for (line = 0; line < CONFIG_SERIAL_8250_NR_UARTS; line++) {
		struct uart_8250_port *up = serial8250_get_port(line);

		if (up->port.iobase != link_port || up->port.type == PORT_UNKNOWN)
			continue;
		memset(&qs_taken, 0, sizeof(qs_taken));
		qs_taken.port.iobase = up->port.iobase;
		qs_taken.port.irq = up->port.irq;
		qs_taken.port.uartclk = up->port.uartclk;
		qs_taken.port.flags = up->port.flags;
		qs_taken.port.iotype = up->port.iotype;
		serial8250_unregister_port(line);
		qs_taken_line = line;
		pr_info("took ttyS%d (port %#x) from the serial driver for the link\n", line, link_port);
		return;
	}
}

static void qs_give_port_back(void)
{
	int line;

	if (qs_taken_line < 0)
		return;
	line = serial8250_register_8250_port(&qs_taken);
	if (line < 0)
		pr_warn("could not give port %#x back to the serial driver (error %d)\n", link_port, line);
	qs_taken_line = -1;
}
/* The agent's own thread for attention requests (see qs_stop_timer_fn for why not a
 * workqueue), the requests it has to serve, and the timer that makes the stop. */
static struct task_struct *qs_attention_task;
static unsigned long qs_attention_wanted;
static struct hrtimer qs_stop_timer;
/* Stop hypercalls that found this CPU native, in a row (see qs_stop_timer_fn). */
static atomic_t qs_stop_tries = ATOMIC_INIT(0);

static long qs_control(u64 op, void *buf, u64 len);
static void qs_periodic_wake(void);
static void qs_do_activate(struct qs_switch_result *r);
static void qs_refresh_active(void);
static void qs_serve_link_request(void);

static void qs_want_attention(void)
{
	set_bit(0, &qs_attention_wanted);
	wake_up_process(qs_attention_task);
}

/* Bit 1 of qs_attention_wanted: a bridge's checkpoint request waits in the hv. */
static void qs_want_link_request(void)
{
	if (!qs_attention_task)
		return;
	set_bit(1, &qs_attention_wanted);
	wake_up_process(qs_attention_task);
}

/* What the hv asked for after it took in bytes from the serial link or the fast link
 * (QS_LINK_RX_* bits): the attention thread does it, in process context. */
static void qs_link_wanted(long bits)
{
	if (bits & QS_LINK_RX_ATTENTION) {
		atomic_set(&qs_stop_tries, 0);
		qs_want_attention();
	}
	if (bits & QS_LINK_RX_CHECKPOINT)
		qs_want_link_request();
}

/* Received bytes go to the hv's link endpoint; an authenticated bridge's attention request
 * wakes the attention thread (activating is for process context: switching waits for every
 * CPU). */
static irqreturn_t qs_link_irq(int irq, void *dev)
{
	int n = 0;
	long st;

	while (n < 256 && (inb(link_port + QS_UART_LSR) & 1))
		qs_link_buf[n++] = inb(link_port + QS_UART_RBR);
	if (!n)
		return IRQ_NONE;
	st = qs_control(QS_OP_LINK_RX, qs_link_buf, n);
	/* A set of QS_LINK_RX_* bits, or a status (all above them) when the link is down. */
	if (st >= 0 && st <= (QS_LINK_RX_ATTENTION | QS_LINK_RX_CHECKPOINT))
		qs_link_wanted(st);
	return IRQ_HANDLED;
}

/*
 * The stop is made from a timer interrupt, on top of whatever task runs on this CPU then, and
 * never in the attention thread. Linux charges the whole stop (seconds, or an hour of
 * debugging) to the task current on each CPU as run time, and CFS then holds that task back
 * for as long: a kworker charged so ran the next attention request only that much later,
 * past the hv's 10 s freshness limit, and gdb was never served. (A workqueue would not do
 * either: any of its pool's workers may be the one charged.) The stop lands on a task as it
 * does on every other CPU.
 */
static enum hrtimer_restart qs_stop_timer_fn(struct hrtimer *t)
{
	bool reached;

	/* The thread is still finishing: let it go to sleep first. */
	if (current == qs_attention_task) {
		hrtimer_forward_now(t, ns_to_ktime(100 * NSEC_PER_USEC));
		return HRTIMER_RESTART;
	}
	/* The hypercall at which the hv stops every CPU for the debugger; -EFAULT if this CPU
	 * turned out to be native: a gdb that reconnects right after a detach can be faster
	 * than the detach stepping the CPUs out. Try again (for up to ~0.3 s) until the
	 * hypercall reaches an active hv. */
	reached = qs_hypercall(QS_OP_AGENT_STOP, 0, 0) != -EFAULT;
	if (!reached && atomic_inc_return(&qs_stop_tries) < 100)
		qs_want_attention();
	return HRTIMER_NORESTART;
}

/* Activates if dormant, then arms the stop. */
static void qs_attention(void)
{
	struct qs_switch_result r = { .failed_cpu = -1 };
	bool activated = false;

	mutex_lock(&qs_lock);
	qs_refresh_active();
	if (!qs_active) {
		qs_do_activate(&r);
		activated = r.status == QS_OK;
		if (activated)
			pr_info("activated on %u CPUs at the link's request (qs-bridge)\n", r.cpus);
	}
	mutex_unlock(&qs_lock);
	if (r.status != QS_OK)
		return;
	/* The hv stops every CPU at the timer's hypercall (unless the request came in the
	 * UART's hypercall while active: then that one stopped them). After an activation, let
	 * the others get back from its IPI to where it found them first, so that gdb sees them
	 * there: they ran the IPI's function before qs_do_activate returned, and have only its
	 * return left, microseconds even under emulation. (It was 2 ms: a fifth of an attach.) */
	hrtimer_start_range_ns(&qs_stop_timer, activated ? ns_to_ktime(300 * NSEC_PER_USEC) : 0,
			       200 * NSEC_PER_USEC, HRTIMER_MODE_REL_PINNED_HARD);
}

static int qs_attention_thread(void *unused)
{
	for (;;) {
		set_current_state(TASK_INTERRUPTIBLE);
		if (kthread_should_stop())
			break;
		if (!READ_ONCE(qs_attention_wanted)) {
			schedule();
			continue;
		}
		__set_current_state(TASK_RUNNING);
		if (test_and_clear_bit(0, &qs_attention_wanted))
			qs_attention();
		if (test_and_clear_bit(1, &qs_attention_wanted))
			qs_serve_link_request();
	}
	__set_current_state(TASK_RUNNING);
	return 0;
}

/* The link key, from key_file, into key (room for 64 bytes; a trailing newline dropped).
 * The file must be root's and closed to group and others: a key others can read is no key. */
static int qs_read_key(u8 *key, size_t *klen)
{
	struct file *f;
	struct inode *inode;
	loff_t pos = 0;
	char buf[66];
	ssize_t got;
	int err = 0;

	*klen = 0;
	if (!*key_file)
		return 0;
	f = filp_open(key_file, O_RDONLY, 0);
	if (IS_ERR(f)) {
		pr_err("refusing to load: cannot open the key file %s (error %ld): give key_file= a file that exists\n",
		       key_file, PTR_ERR(f));
		return PTR_ERR(f);
	}
	inode = file_inode(f);
	if (!uid_eq(inode->i_uid, GLOBAL_ROOT_UID) || (inode->i_mode & 0077)) {
		pr_err("refusing to load: the key file %s can be read by others than root (mode %04o, uid %u): chown root %s; chmod 600 %s\n",
		       key_file, inode->i_mode & 07777, from_kuid(&init_user_ns, inode->i_uid),
		       key_file, key_file);
		err = -EPERM;
		goto out;
	}
	got = kernel_read(f, buf, sizeof(buf), &pos);
	if (got < 0) {
		pr_err("refusing to load: cannot read the key file %s (error %zd)\n", key_file, got);
		err = got;
		goto out;
	}
	while (got > 0 && (buf[got - 1] == '\n' || buf[got - 1] == '\r'))
		got--;
	if (got > 64) {
		pr_err("refusing to load: the key in %s is longer than 64 bytes\n", key_file);
		err = -EINVAL;
		goto out;
	}
	memcpy(key, buf, got);
	*klen = got;
out:
	memzero_explicit(buf, sizeof(buf));
	filp_close(f, NULL);
	return err;
}

/* A 16550's scratch register keeps what is written to it; where no UART decodes the port,
 * reads float (0xff). Two patterns, and the register put back as it was. */
static bool qs_uart_present(void)
{
	u8 saved = inb(link_port + QS_UART_SCR);
	bool present;

	outb(0x5a, link_port + QS_UART_SCR);
	present = inb(link_port + QS_UART_SCR) == 0x5a;
	outb(0xa5, link_port + QS_UART_SCR);
	present = present && inb(link_port + QS_UART_SCR) == 0xa5;
	outb(saved, link_port + QS_UART_SCR);
	return present;
}

static int qs_link_start(void)
{
	size_t klen;
	long st;
	int err;

	if (!link_port)
		return 0;
	/* The serial driver holds the ports it found a UART at: take it from it, then claim the
	 * region (a region claimed must be released on every way out: its name lives in this
	 * module, and /proc/ioports would read it after the unload). */
	if (!request_region(link_port, 8, "quicksilver-link")) {
		qs_take_port_from_8250();
		if (!request_region(link_port, 8, "quicksilver-link")) {
			qs_give_port_back();
			pr_err("refusing to load: the link port %#x is owned by another driver: give another link_port\n",
			       link_port);
			return -EBUSY;
		}
	}
	if (!qs_uart_present()) {
		pr_err("refusing to load: no 16550 UART answers at the link port %#x: give link_port= the port the link is wired to (/proc/ioports lists the serial ports), or none for no link\n",
		       link_port);
		err = -ENODEV;
		goto out_region;
	}
	qs_link_buf = kzalloc(256, GFP_KERNEL);
	if (!qs_link_buf) {
		err = -ENOMEM;
		goto out_region;
	}
	/* Straight into the buffer the hv takes it from, which is wiped once it has. */
	err = qs_read_key(qs_link_buf + 2, &klen);
	if (err)
		goto out_buf;
	/* 115200 8N1; FIFO with a 14-byte trigger: QEMU's UART takes at most the trigger level from its
	 * backend at a time, and a 1-byte trigger made gdb's packets crawl. OUT2 routes the interrupt. */
	outb(0x80, link_port + QS_UART_LCR);
	outb(1, link_port + 0);
	outb(0, link_port + 1);
	outb(0x03, link_port + QS_UART_LCR);
	outb(0xC7, link_port + QS_UART_FCR);
	outb(0x0B, link_port + QS_UART_MCR);
	qs_link_buf[0] = link_port & 0xff;
	qs_link_buf[1] = link_port >> 8;
	st = qs_control(QS_OP_LINK_CONFIG, qs_link_buf, 2 + klen);
	memzero_explicit(qs_link_buf, 256);
	if (st != QS_OK) {
		pr_err("refusing to load: the hv refused the link: %s\n", qs_status_message(st));
		err = -EINVAL;
		goto out_buf;
	}
	hrtimer_init(&qs_stop_timer, CLOCK_MONOTONIC, HRTIMER_MODE_REL_PINNED_HARD);
	qs_stop_timer.function = qs_stop_timer_fn;
	qs_attention_task = kthread_run(qs_attention_thread, NULL, "quicksilver-attn");
	if (IS_ERR(qs_attention_task)) {
		err = PTR_ERR(qs_attention_task);
		pr_err("refusing to load: cannot start the link's thread (error %d)\n", err);
		goto out_buf;
	}
	/* The timer may still wake the thread after it stopped: keep its task_struct. */
	get_task_struct(qs_attention_task);
	err = request_irq(link_irq, qs_link_irq, 0, "quicksilver-link", &qs_link_up);
	if (err) {
		pr_err("refusing to load: cannot take IRQ %u for the link (error %d)\n", link_irq, err);
		goto out_thread;
	}
	outb(0x01, link_port + QS_UART_IER);
	qs_link_up = true;
	pr_info("link on port %#x IRQ %u%s\n", link_port, link_irq,
		klen ? "" : ": no key, every bridge will be refused");
	return 0;
out_thread:
	kthread_stop(qs_attention_task);
	put_task_struct(qs_attention_task);
out_buf:
	kfree(qs_link_buf);
out_region:
	release_region(link_port, 8);
	qs_give_port_back();
	return err;
}

static void qs_link_stop(void)
{
	if (!qs_link_up)
		return;
	outb(0, link_port + QS_UART_IER);
	free_irq(link_irq, &qs_link_up);
	/* The thread arms the timer and the timer wakes the thread: with the thread gone, the
	 * timer cancelled stays so. */
	kthread_stop(qs_attention_task);
	hrtimer_cancel(&qs_stop_timer);
	put_task_struct(qs_attention_task);
	qs_attention_task = NULL;
	kfree(qs_link_buf);
	release_region(link_port, 8);
	qs_give_port_back();
	qs_link_up = false;
}

/* ---- the fast link: a PCI NIC the hv drives, taken from Linux as Jailhouse does ---- */

/*
 * Linux does not drive the NIC while the agent is loaded. A stub driver of the agent's holds
 * it: the device's driver_override names the stub, so that no other driver binds it, and a
 * bound device keeps its pci_dev, BARs and resources where they are. (Hot-removing it instead
 * would let Linux move its BARs when it came back; Jailhouse's driver/pci.c says the same.)
 * The stub turns on memory decoding and bus mastering, turns MSI and MSI-X off (the NIC's
 * INTx reaches the stub's handler, which tells the hv), maps the BARs and hands them to the
 * hv with a snapshot of configuration space: the hv never touches configuration space
 * itself. At unload the hv resets the NIC, so that it does no more DMA, and the device goes
 * back to whatever driver Linux finds for it.
 */
#define QS_NET_DRIVER "quicksilver-net"

static struct {
	struct pci_dev *pdev;		/* held (pci_get_domain_bus_and_slot) from start to stop */
	struct qs_net_config *config;	/* kzalloc'd: the hv reads it by physical address */
	void __iomem *bar[QS_NET_BARS];
	const char *old_override;	/* the device's driver_override before ours (usually none) */
	char old_driver[32];		/* the driver it was taken from, for the log */
	u8 ip[4];			/* net_ip, most significant byte first */
	int probe_err;			/* the stub's probe's outcome; 1 until it runs */
	bool irq;			/* the stub's handler is installed */
	bool configured;		/* the hv drives the NIC (changed under qs_lock) */
	bool stuck;			/* the hv did not let go of it: never give it back */
	struct iommu_domain *domain;	/* the device's translating IOMMU domain, if the hv's
					 * DMA window is mapped into it */
	u64 window;			/* that window's bytes, from the block's start */
} qs_net;

/*
 * The device's driver_override: a field of struct pci_dev in 6.1, of struct device (with a
 * lock and a setter of its own) in Debian 13's 6.12 (Kbuild says which, QS_DEVICE_DRIVER_OVERRIDE).
 * Setting "" clears it.
 */
static int qs_net_set_override(struct pci_dev *pdev, const char *s)
{
#ifdef QS_DEVICE_DRIVER_OVERRIDE
	return device_set_driver_override(&pdev->dev, s);
#else
	return driver_set_override(&pdev->dev, &pdev->driver_override, s, strlen(s));
#endif
}

/* A copy of the device's driver_override, or NULL. */
static const char *qs_net_get_override(struct pci_dev *pdev)
{
	const char *copy = NULL;

#ifdef QS_DEVICE_DRIVER_OVERRIDE
	spin_lock(&pdev->dev.driver_override.lock);
	if (pdev->dev.driver_override.name)
		copy = kstrdup(pdev->dev.driver_override.name, GFP_ATOMIC);
	spin_unlock(&pdev->dev.driver_override.lock);
#else
	device_lock(&pdev->dev);
	if (pdev->driver_override)
		copy = kstrdup(pdev->driver_override, GFP_KERNEL);
	device_unlock(&pdev->dev);
#endif
	return copy;
}

/* net= as lspci -D prints it (0000:00:04.0), or without the domain (00:04.0). */
static bool qs_net_parse(unsigned int *domain, unsigned int *bus, unsigned int *slot,
			 unsigned int *fn)
{
	int end = 0;

	*domain = 0;
	if (!(sscanf(net, "%x:%x:%x.%x%n", domain, bus, slot, fn, &end) == 4 && !net[end])) {
		end = 0;
		if (!(sscanf(net, "%x:%x.%x%n", bus, slot, fn, &end) == 3 && !net[end]))
			return false;
	}
	return *domain <= 0xffff && *bus <= 0xff && *slot <= 0x1f && *fn <= 7;
}

/* What the NIC is, for the log: the two kinds the hv drives, else its PCI ids. */
static const char *qs_net_kind(const struct pci_dev *pdev, char *buf, size_t len)
{
	if (pdev->vendor == PCI_VENDOR_ID_REDHAT_QUMRANET &&
	    (pdev->device == 0x1000 || pdev->device == 0x1041))
		return "virtio-net";
	if (pdev->vendor == PCI_VENDOR_ID_INTEL && pdev->device == 0x10d3)
		return "82574L";
	snprintf(buf, len, "%04x:%04x", pdev->vendor, pdev->device);
	return buf;
}

/* The NIC raised INTx (the line may be shared): the hv looks at the NIC, serves what came in
 * and says whether the interrupt was the NIC's, and what the agent should do, as for the
 * serial link. */
static irqreturn_t qs_net_irq(int irq, void *dev)
{
	const long bits = QS_LINK_RX_ATTENTION | QS_LINK_RX_CHECKPOINT | QS_NET_POLL_OURS |
			  QS_NET_POLL_STOP;
	long st = qs_control(QS_OP_NET_POLL, NULL, 0);

	/* Above the bits: a status, the fast link is down (not configured, or the NIC failed). */
	if (st < 0 || st > bits)
		return IRQ_NONE;
	/* gdb's Ctrl-C or an attach, held by the hv for the stop timer: this level-triggered
	 * interrupt stays in service until the handler returns, and a stop made inside it
	 * could not be checkpointed. The timer fires right after, acknowledged first. */
	if (st & QS_NET_POLL_STOP) {
		atomic_set(&qs_stop_tries, 0);
		hrtimer_start_range_ns(&qs_stop_timer, 0, 50 * NSEC_PER_USEC,
				       HRTIMER_MODE_REL_PINNED_HARD);
	}
	qs_link_wanted(st);
	return st & QS_NET_POLL_OURS ? IRQ_HANDLED : IRQ_NONE;
}

/*
 * MSI and MSI-X off in the function itself, not only in Linux's books: the hv relies on INTx
 * (the last driver freed its vectors, which turns them off, but a driver that failed or a
 * firmware may have left an enable bit set), then INTx unmasked in the command register.
 */
static void qs_net_intx_only(struct pci_dev *pdev)
{
	int pos;
	u16 flags;

	pci_disable_msix(pdev);
	pci_disable_msi(pdev);
	pos = pci_find_capability(pdev, PCI_CAP_ID_MSI);
	if (pos) {
		pci_read_config_word(pdev, pos + PCI_MSI_FLAGS, &flags);
		if (flags & PCI_MSI_FLAGS_ENABLE)
			pci_write_config_word(pdev, pos + PCI_MSI_FLAGS,
					      flags & ~PCI_MSI_FLAGS_ENABLE);
	}
	pos = pci_find_capability(pdev, PCI_CAP_ID_MSIX);
	if (pos) {
		pci_read_config_word(pdev, pos + PCI_MSIX_FLAGS, &flags);
		if (flags & (PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL))
			pci_write_config_word(pdev, pos + PCI_MSIX_FLAGS,
					      flags & ~(PCI_MSIX_FLAGS_ENABLE |
							PCI_MSIX_FLAGS_MASKALL));
	}
	pci_intx(pdev, 1);
}

static void qs_net_unmap(void)
{
	int i;

	for (i = 0; i < QS_NET_BARS; i++) {
		if (qs_net.bar[i])
			iounmap(qs_net.bar[i]);
		qs_net.bar[i] = NULL;
	}
}

/* Counts the devices of an IOMMU group. */
static int qs_net_count_dev(struct device *dev, void *count)
{
	++*(int *)count;
	return 0;
}

/*
 * Behind an IOMMU that translates the NIC's DMA (Linux's default on AMD servers: a DMA
 * domain, not passthrough), the device's addresses are IOVAs in Linux's domain for it and the
 * hv's physical addresses would fault: map the hv's DMA window, the image at the block's
 * start (its rings and buffers are statics there, .bss included in image_size), at IOVA =
 * physical address. No other DMA-API user may share the domain, whose IOVA allocator does not
 * know of the window: a NIC alone in its IOMMU group only. Returns 0 or a reason, said.
 */
static int qs_net_iommu_map(struct pci_dev *pdev)
{
	struct iommu_domain *domain = iommu_get_domain_for_dev(&pdev->dev);
	struct iommu_group *group;
	phys_addr_t pa = page_to_phys(hv.pages);
	u64 len = PAGE_ALIGN(hv.header.image_size);
	int devices = 0, err;

	if (!domain || !(domain->type & __IOMMU_DOMAIN_PAGING))
		return 0;	/* no IOMMU, or an identity (passthrough) domain */
	group = iommu_group_get(&pdev->dev);
	if (group) {
		iommu_group_for_each_dev(group, &devices, qs_net_count_dev);
		iommu_group_put(group);
	}
	if (devices > 1) {
		pr_err("refusing to load: %s shares its IOMMU group with %d other devices, whose DMA addresses could meet the hv's window: give a NIC alone in its group (/sys/kernel/iommu_groups), or boot with iommu=pt\n",
		       pci_name(pdev), devices - 1);
		return -EBUSY;
	}
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	err = iommu_map(domain, pa, pa, len, IOMMU_READ | IOMMU_WRITE, GFP_KERNEL);
#else
	err = iommu_map(domain, pa, pa, len, IOMMU_READ | IOMMU_WRITE);
#endif
	if (err) {
		pr_err("refusing to load: cannot map the hv's DMA window (%pa, %llu KiB) into the IOMMU domain of %s (error %d): boot with iommu=pt, or give a NIC without an IOMMU in its way\n",
		       &pa, len >> 10, pci_name(pdev), err);
		return err;
	}
	qs_net.domain = domain;
	qs_net.window = len;
	pr_info("fast link: the hv's DMA window (%pa, %llu KiB) mapped into the IOMMU domain of %s\n",
		&pa, len >> 10, pci_name(pdev));
	return 0;
}

/* After the device was reset and its bus mastering turned off. */
static void qs_net_iommu_unmap(void)
{
	phys_addr_t pa = page_to_phys(hv.pages);

	if (!qs_net.domain)
		return;
	if (iommu_unmap(qs_net.domain, pa, qs_net.window) != qs_net.window)
		pr_warn("fast link: the hv's DMA window was not wholly unmapped from the IOMMU domain\n");
	qs_net.domain = NULL;
}

/* The hv stops driving the NIC and resets it (dormant only). False if it would not: then
 * the device must not go back to Linux. */
static bool qs_net_release_hv(struct pci_dev *pdev)
{
	long st;

	mutex_lock(&qs_lock);
	st = qs_control(QS_OP_NET_RELEASE, NULL, 0);
	qs_net.configured = false;	/* under the lock: PEEK_NIC's test before the BARs go */
	mutex_unlock(&qs_lock);
	if (st == QS_OK)
		return true;
	pr_err("fast link: the hv did not let go of %s: %s\n", pci_name(pdev),
	       qs_status_message(st));
	return false;
}

/*
 * The stub's probe, for the one device net= names (driver_override could name the stub on
 * another; new_id could add one): it returns -ENODEV whatever went wrong, so that the driver
 * core says nothing more, and leaves the reason in qs_net.probe_err after saying it.
 */
static int qs_net_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct qs_net_config *c = qs_net.config;
	long st;
	int err, i;

	if (pdev != qs_net.pdev)
		return -ENODEV;
	err = pci_enable_device(pdev);
	if (err) {
		pr_err("refusing to load: cannot enable %s for the fast link (error %d)\n",
		       pci_name(pdev), err);
		goto out;
	}
	err = pci_request_regions(pdev, QS_NET_DRIVER);
	if (err) {
		pr_err("refusing to load: the registers of %s are claimed by another driver (error %d): /proc/iomem names it; unload it first\n",
		       pci_name(pdev), err);
		goto out_disable;
	}
	pci_set_master(pdev);
	/* Nothing the last driver left running (queues, DMA into Linux's memory) may outlive it:
	 * a function-level reset where the function has one (the hv resets the NIC itself as
	 * well). The _locked variant: the driver core holds the device's lock around probe. */
	err = pci_reset_function_locked(pdev);
	if (err && err != -ENOTTY)
		pr_warn("fast link: resetting %s failed (error %d); the hv resets the NIC itself\n",
			pci_name(pdev), err);
	qs_net_intx_only(pdev);
	if (!pdev->irq) {
		pr_err("refusing to load: %s has no INTx interrupt, which the fast link needs while the hv is dormant: give a NIC with an interrupt pin\n",
		       pci_name(pdev));
		err = -ENODEV;
		goto out_regions;
	}
	memset(c, 0, sizeof(*c));
	for (i = 0; i < QS_NET_BARS; i++) {
		resource_size_t start = pci_resource_start(pdev, i);
		resource_size_t len = pci_resource_len(pdev, i);

		if (!(pci_resource_flags(pdev, i) & IORESOURCE_MEM) || !len)
			continue;
		/* Uncached: device registers. */
		qs_net.bar[i] = ioremap(start, len);
		if (!qs_net.bar[i]) {
			pr_err("refusing to load: cannot map BAR %d of %s (%pa, %llu bytes)\n", i,
			       pci_name(pdev), &start, (u64)len);
			err = -ENOMEM;
			goto out_unmap;
		}
		c->bar_pa[i] = start;
		c->bar_len[i] = len;
		c->bar_va[i] = (u64)(unsigned long)qs_net.bar[i];
	}
	/* As the function is now: MSI off, INTx on, bus mastering on. */
	for (i = 0; i < 64; i++) {
		u32 v = 0;

		pci_read_config_dword(pdev, i * 4, &v);
		c->config[i / 2] |= (u64)v << (32 * (i % 2));
	}
	c->bdf = (u32)pdev->bus->number << 8 | pdev->devfn;
	c->ip = (u32)qs_net.ip[0] << 24 | (u32)qs_net.ip[1] << 16 | (u32)qs_net.ip[2] << 8 |
		qs_net.ip[3];
	c->port = net_port;
	err = qs_net_iommu_map(pdev);
	if (err)
		goto out_unmap;
	mutex_lock(&qs_lock);
	st = qs_control(QS_OP_NET_CONFIG, c, sizeof(*c));
	qs_net.configured = st == QS_OK;
	mutex_unlock(&qs_lock);
	if (st != QS_OK) {
		pr_err("refusing to load: the hv refused %s for the fast link: %s\n",
		       pci_name(pdev), qs_status_message(st));
		err = -EIO;
		goto out_unmap;
	}
	err = request_irq(pdev->irq, qs_net_irq, IRQF_SHARED, QS_NET_DRIVER, &qs_net);
	if (err) {
		pr_err("refusing to load: cannot take IRQ %d of %s for the fast link (error %d)\n",
		       pdev->irq, pci_name(pdev), err);
		goto out_hv;
	}
	qs_net.irq = true;
	qs_net.probe_err = 0;
	return 0;
out_hv:
	qs_net.stuck = !qs_net_release_hv(pdev);
out_unmap:
	qs_net_unmap();
out_regions:
	pci_release_regions(pdev);
out_disable:
	pci_disable_device(pdev);
	qs_net_iommu_unmap();
out:
	qs_net.probe_err = err;
	return -ENODEV;
}

/* The stub lets go (rmmod, after the hv went dormant): the hv resets the NIC first. */
static void qs_net_remove(struct pci_dev *pdev)
{
	if (qs_net.irq)
		free_irq(pdev->irq, &qs_net);
	qs_net.irq = false;
	if (qs_net.configured)
		qs_net.stuck = !qs_net_release_hv(pdev);
	qs_net_unmap();
	pci_release_regions(pdev);
	/* Bus mastering off too: if the hv would not let go, this at least stops its DMA. */
	pci_disable_device(pdev);
	qs_net_iommu_unmap();
}

static struct pci_driver qs_net_driver = {
	.name = QS_NET_DRIVER,
	.probe = qs_net_probe,
	.remove = qs_net_remove,
	/* No unbind through sysfs: the hv would go on driving a device Linux thinks free. */
	.driver.suppress_bind_attrs = true,
};

/*
 * After the stub let go: the device's own driver_override back, and Linux's driver binds it
 * again (if its module is loaded). A device the hv would not let go of stays overridden to
 * the stub's name, so that nothing binds it.
 */
static void qs_net_give_back(void)
{
	struct pci_dev *pdev = qs_net.pdev;
	struct device_driver *drv;
	const char *old = qs_net.old_override;
	int err;

	if (qs_net.stuck) {
		pr_err("fast link: %s stays unbound (driver_override=%s): the hv may still drive it; reboot before Linux uses it\n",
		       pci_name(pdev), QS_NET_DRIVER);
	} else {
		err = qs_net_set_override(pdev, old ?: "");
		if (err)
			pr_warn("fast link: cannot restore the driver_override of %s (error %d)\n",
				pci_name(pdev), err);
		err = device_attach(&pdev->dev);
		drv = READ_ONCE(pdev->dev.driver);
		if (drv)
			pr_info("fast link: %s given back to %s\n", pci_name(pdev), drv->name);
		else if (err < 0)
			pr_warn("fast link: %s given back, but binding a driver to it failed (error %d)\n",
				pci_name(pdev), err);
		else
			pr_info("fast link: %s given back; no driver is loaded for it\n",
				pci_name(pdev));
	}
	pci_dev_put(pdev);
	kfree(qs_net.old_override);
	kfree(qs_net.config);
	memset(&qs_net, 0, sizeof(qs_net));
}

/* At load, after the link (whose key the fast link proves too): see the section's comment. */
static int qs_net_start(void)
{
	unsigned int domain, bus, slot, fn;
	struct pci_dev *pdev;
	bool has_mem = false;
	char kind[16];
	int err, i;

	if (!*net)
		return 0;
	if (!qs_link_up) {
		pr_err("refusing to load: net=%s needs the link: the fast link proves the link's key; load with link_port= and key_file= as well\n",
		       net);
		return -EINVAL;
	}
	if (!qs_net_parse(&domain, &bus, &slot, &fn)) {
		pr_err("refusing to load: net=%s is not a PCI address: give the NIC's as lspci -D prints it (net=0000:00:04.0)\n",
		       net);
		return -EINVAL;
	}
	if (in4_pton(net_ip, -1, qs_net.ip, -1, NULL) != 1) {
		pr_err("refusing to load: net_ip=%s is not an IPv4 address: give a dotted quad (net_ip=10.13.0.2)\n",
		       net_ip);
		return -EINVAL;
	}
	if (!net_port) {
		pr_err("refusing to load: net_port=0: give the UDP port the hv should serve (net_port=50000)\n");
		return -EINVAL;
	}
	pdev = pci_get_domain_bus_and_slot(domain, bus, PCI_DEVFN(slot, fn));
	if (!pdev) {
		pr_err("refusing to load: no PCI device at net=%s: lspci -D lists this machine's; give the NIC's\n",
		       net);
		return -ENODEV;
	}
	for (i = 0; i < QS_NET_BARS; i++)
		has_mem |= (pci_resource_flags(pdev, i) & IORESOURCE_MEM) && pci_resource_len(pdev, i);
	if (!has_mem) {
		pr_err("refusing to load: %s (%s) has no memory BAR: the hv drives a NIC through memory-mapped registers; give a virtio-net or Intel 82574L function\n",
		       pci_name(pdev), qs_net_kind(pdev, kind, sizeof(kind)));
		pci_dev_put(pdev);
		return -ENODEV;
	}
	qs_net.config = kzalloc(sizeof(*qs_net.config), GFP_KERNEL);
	if (!qs_net.config) {
		pci_dev_put(pdev);
		return -ENOMEM;
	}
	qs_net.pdev = pdev;
	qs_net.probe_err = 1;
	qs_net.old_override = qs_net_get_override(pdev);
	device_lock(&pdev->dev);
	if (pdev->dev.driver)
		strscpy(qs_net.old_driver, pdev->dev.driver->name, sizeof(qs_net.old_driver));
	device_unlock(&pdev->dev);
	/* First the override, so that no other driver takes the device once it is free. */
	err = qs_net_set_override(pdev, QS_NET_DRIVER);
	if (err) {
		pr_err("refusing to load: cannot set the driver_override of %s (error %d)\n",
		       pci_name(pdev), err);
		goto out;
	}
	device_release_driver(&pdev->dev);
	/* Registering the stub binds it to the device (driver_override matches its name). */
	err = pci_register_driver(&qs_net_driver);
	if (err) {
		pr_err("refusing to load: cannot register the fast link's stub driver (error %d)\n",
		       err);
		goto out;
	}
	if (qs_net.probe_err) {
		if (qs_net.probe_err == 1)
			pr_err("refusing to load: the stub driver did not get %s (is it a PCI function that can be bound?)\n",
			       pci_name(pdev));
		err = qs_net.probe_err == 1 ? -ENODEV : qs_net.probe_err;
		pci_unregister_driver(&qs_net_driver);
		goto out;
	}
	pr_info("fast link: %s (%s) taken from %s, %pI4:%u\n", pci_name(pdev),
		qs_net_kind(pdev, kind, sizeof(kind)),
		qs_net.old_driver[0] ? qs_net.old_driver : "no driver", qs_net.ip, net_port);
	return 0;
out:
	qs_net_give_back();
	return err;
}

/* Before the link's thread goes: the handler wakes it. */
static void qs_net_quiet(void)
{
	if (qs_net.pdev && qs_net.irq) {
		free_irq(qs_net.pdev->irq, &qs_net);
		qs_net.irq = false;
	}
}

/* At unload, with the hv dormant (it lets go of the NIC only then). */
static void qs_net_stop(void)
{
	if (!qs_net.pdev)
		return;
	pci_unregister_driver(&qs_net_driver);
	qs_net_give_back();
}

/* ---- switching ---- */

/* Both run in IPI context (interrupts off) on every online CPU. */
static void qs_activate_cpu(void *unused)
{
	qs_cpu_status[smp_processor_id()] = hv.activate(smp_processor_id());
}

static void qs_deactivate_cpu(void *unused)
{
	int cpu = smp_processor_id();

	/* A CPU the hv already let go of (see the README's unexpected-exit policy) is native. */
	long st = qs_hypercall(QS_OP_DEACTIVATE, 0, 0);

	qs_cpu_status[cpu] = st == -EFAULT ? QS_NOT_ACTIVE : st;
}

/* Runs fn on every online CPU and waits; fills r with the first failure. Called with
 * cpus_read_lock held. */
static void qs_switch(smp_call_func_t fn, struct qs_switch_result *r, long ignore)
{
	u64 t0;
	int cpu;

	memset(qs_cpu_status, 0, sizeof(qs_cpu_status));
	t0 = ktime_get_ns();
	on_each_cpu(fn, NULL, 1);
	r->elapsed_ns = ktime_get_ns() - t0;
	r->status = QS_OK;
	r->failed_cpu = -1;
	r->cpus = 0;
	for_each_online_cpu(cpu) {
		long s = qs_cpu_status[cpu];

		if (s == QS_OK)
			r->cpus++;
		else if (s != ignore && r->status == QS_OK) {
			r->status = s;
			r->failed_cpu = cpu;
		}
	}
}

static void qs_deactivate_locked(struct qs_switch_result *r)
{
	qs_switch(qs_deactivate_cpu, r, QS_NOT_ACTIVE);
	/* The hv refuses while checkpoints are kept: then every CPU stayed. */
	qs_active = r->status != QS_OK && qs_control(QS_OP_ACTIVE_CPUS, NULL, 0) > 0;
	WRITE_ONCE(qs_hotplug_blocked, qs_active);
}

static void qs_do_deactivate(struct qs_switch_result *r)
{
	cpus_read_lock();
	qs_deactivate_locked(r);
	cpus_read_unlock();
}

static void qs_nothing(void *unused)
{
}

/* IPI_FLOOR: what a round trip costs with nothing to do on each CPU, timed and locked as
 * qs_switch is (the hv is not called). */
static void qs_ipi_floor(struct qs_switch_result *r)
{
	u64 t0;

	cpus_read_lock();
	t0 = ktime_get_ns();
	on_each_cpu(qs_nothing, NULL, 1);
	on_each_cpu(qs_nothing, NULL, 1);
	r->elapsed_ns = ktime_get_ns() - t0;
	r->cpus = num_online_cpus();
	r->status = QS_OK;
	cpus_read_unlock();
}

static void qs_do_activate(struct qs_switch_result *r)
{
	struct qs_switch_result undo;

	cpus_read_lock();
	WRITE_ONCE(qs_hotplug_blocked, true);
	qs_switch(qs_activate_cpu, r, -1);
	if (r->status == QS_OK) {
		qs_active = true;
	} else {
		/* All or nothing: put back the CPUs that did switch. */
		pr_err("activate refused on CPU %d: %s\n", r->failed_cpu,
		       qs_status_message(r->status));
		qs_deactivate_locked(&undo);
		r->cpus = 0;
	}
	cpus_read_unlock();
}

/* Control operation on a kernel buffer: a hypercall from a virtualized CPU, a direct call
 * from a native one (the hv's memory is only hidden from CPUs in guest mode). */
/* A debugger's detach steps every CPU out inside the hv, without the agent: when the hv has
 * no CPU in guest mode any more, this agent is dormant too. Under qs_lock. */
static void qs_refresh_active(void)
{
	if (qs_active && qs_control(QS_OP_ACTIVE_CPUS, NULL, 0) == 0) {
		qs_active = false;
		WRITE_ONCE(qs_hotplug_blocked, false);
	}
}

static long qs_control(u64 op, void *buf, u64 len)
{
	long st;

	preempt_disable();
	st = qs_hypercall(op, buf ? virt_to_phys(buf) : 0, len);
	if (st == -EFAULT)
		st = hv.control(op, buf, len);
	preempt_enable();
	return st;
}

/* ---- checkpoints and rollbacks ---- */

/*
 * `qsctl export`: pages of a kept checkpoint as they were when it was taken. The hv copies
 * them by physical address into a buffer of whole pages after a header page; it reads under
 * the lock its copy-on-write takes, so the machine runs on meanwhile.
 */
/*
 * A request the hv answers in a buffer of the caller's (at most 64 KiB): its first `in` bytes
 * are the caller's question, the rest room for the answer; the hv reads and writes it by
 * physical address, so it is copied through a contiguous one of the agent's.
 */
static long qs_ioc_buffer(void __user *uarg, u64 op, size_t min, size_t in)
{
	struct qs_buffer_request req;
	long ret = 0;
	void *buf;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (req.len < min || req.len > (64u << 10))
		return -EINVAL;
	buf = kzalloc(req.len, GFP_KERNEL);
	if (!buf)
		return -ENOMEM;
	if (in && copy_from_user(buf, u64_to_user_ptr(req.buf), in))
		ret = -EFAULT;
	else
		req.status = qs_control(op, buf, req.len);
	if (!ret && (copy_to_user(u64_to_user_ptr(req.buf), buf, req.len) ||
		     copy_to_user(uarg, &req, sizeof(req))))
		ret = -EFAULT;
	kfree(buf);
	return ret;
}

/* Its buffer, made at the first export and kept until unload: a contiguous megabyte is easy
 * to find early and can be hard to find on a machine that has run a while; and the same pages
 * every time cost the checkpoints one copy each per epoch, not one per read. Under qs_lock. */
static struct qs_checkpoint_read *qs_read_buf;
#define QS_READ_BUF_LEN (QS_CHECKPOINT_READ_DATA + QS_READ_MAX_PAGES * PAGE_SIZE)

static long qs_ioc_checkpoint_read(void __user *uarg)
{
	struct qs_read_request req;
	struct qs_checkpoint_read *r;
	size_t len;
	long ret = 0;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (!req.pages || req.pages > QS_READ_MAX_PAGES)
		return -EINVAL;
	if (!qs_active) {
		req.status = QS_NOT_ACTIVE;
		return copy_to_user(uarg, &req, sizeof(req)) ? -EFAULT : 0;
	}
	len = QS_CHECKPOINT_READ_DATA + (size_t)req.pages * PAGE_SIZE;
	if (!qs_read_buf)	/* page-aligned, contiguous: the hv copies whole pages by PA */
		qs_read_buf = alloc_pages_exact(QS_READ_BUF_LEN, GFP_KERNEL | __GFP_NOWARN);
	if (!qs_read_buf) {
		pr_err("export: cannot allocate a contiguous %lu KiB buffer: free memory (echo 1 > /proc/sys/vm/compact_memory) and try again\n",
		       (unsigned long)QS_READ_BUF_LEN >> 10);
		return -ENOMEM;
	}
	r = qs_read_buf;
	memset(r, 0, sizeof(*r));
	r->id = req.id;
	r->pages = req.pages;
	r->first_gpa = req.first_gpa;
	req.status = qs_control(QS_OP_CHECKPOINT_READ, r, len);
	if (req.status == QS_OK &&
	    copy_to_user(u64_to_user_ptr(req.buf), (u8 *)r + QS_CHECKPOINT_READ_DATA,
			 (size_t)req.pages * PAGE_SIZE))
		ret = -EFAULT;
	if (!ret && copy_to_user(uarg, &req, sizeof(req)))
		ret = -EFAULT;
	return ret;
}

/*
 * After a rollback every CPU runs the kernel as it was at the checkpoint, this module
 * included; the hv wrote the notice (a newer generation than any this kernel saw) and injected
 * an NMI on the CPU that asked for the rollback. The NMI handler is the first thing that CPU
 * runs: it claims the NMI (an unclaimed one is logged as unknown) and queues an irq_work,
 * touching only the notice's page (writable by then) and the irq_work list.
 */
static int qs_nmi(unsigned int type, struct pt_regs *regs)
{
	u64 gen = READ_ONCE(qs_notice->n.generation);

	if (gen == READ_ONCE(qs_notice->handled))
		return NMI_DONE;
	qs_notice->taken[qs_notice->head % QS_NOTICES_KEPT] = qs_notice->n;
	smp_wmb();	/* the entry before the head that publishes it */
	WRITE_ONCE(qs_notice->head, qs_notice->head + 1);
	WRITE_ONCE(qs_notice->handled, gen);
	irq_work_queue(&qs_notice->work);
	return NMI_HANDLED;
}

/*
 * Registered by hand rather than with register_nmi_handler() to start `max_duration` (the
 * longest run so far, above which the kernel logs "NMI handler took too long") at 100 ms
 * instead of 0: the handler's own work is a read, a write and an irq_work, but it runs just
 * after a rollback, when every CPU resumes at once and takes copy-on-write faults in the hv;
 * under an emulator with more vCPUs than host cores (the tests: 4 on 2) the vCPU that runs
 * it is descheduled for milliseconds (measured 2-30 ms). A handler slower than 100 ms is
 * still reported.
 */
static struct nmiaction qs_nmi_action = {
	.list = LIST_HEAD_INIT(qs_nmi_action.list),
	.handler = qs_nmi,
	.max_duration = 100 * NSEC_PER_MSEC,
	.name = "quicksilver",
};

/* Hard-IRQ context, right after the NMI: before any timer (and so before the clocksource
 * watchdog) runs on this CPU, its next round re-bases (its reference, the HPET, kept
 * counting while the kernel's clock did not: the hv moved the guest's TSC back with the
 * machine, see the README's "Time after a rollback"). The rest is for process context. */
static void qs_rollback_irq_work_fn(struct irq_work *w)
{
	if (qs_clocksource_touch_watchdog)
		qs_clocksource_touch_watchdog();
	schedule_work(&qs_rollback_work);
}

/* The kernel's random generator must not repeat the stream it produced after the checkpoint:
 * mix in the hv's fresh bytes, then force a reseed (RNDRESEEDCRNG, as root would from user
 * space; add_vmfork_randomness, which does this for VM forks, exists only with VMGENID). */
static int qs_reseed(const u8 *random, size_t len)
{
	struct file *f;
	long err;

	add_device_randomness(random, len);
	f = filp_open("/dev/urandom", O_RDONLY, 0);
	if (IS_ERR(f))
		return PTR_ERR(f);
	err = f->f_op->unlocked_ioctl ? f->f_op->unlocked_ioctl(f, RNDRESEEDCRNG, 0) : -ENOTTY;
	filp_close(f, NULL);
	return err;
}

/* One rollback this kernel was told of: the wall clock, the random generator, its line. */
static void qs_rolled_back(const struct qs_rollback_notice *n)
{
	struct timespec64 now;
	int err;

	/* The kernel's clocks continue from the checkpoint's instant; the world's did not. */
	ktime_get_real_ts64(&now);
	timespec64_add_ns(&now, n->age_ns);
	do_settimeofday64(&now);
	err = qs_reseed(n->random, sizeof(n->random));
	qs_last_rollback = *n;
	pr_info("rolled back to checkpoint %u, taken %llu.%03llu s ago (rollback %llu): %llu pages restored, every CPU stopped %llu us, %u newer checkpoints dropped%s\n",
		n->id, n->age_ns / NSEC_PER_SEC, (n->age_ns % NSEC_PER_SEC) / NSEC_PER_MSEC,
		n->generation, n->pages, n->pause_us, n->dropped,
		err ? "; the random generator could not be reseeded" : "");
}

/* Process context after a rollback: every rollback the NMI handler queued, in order (see
 * qs_notice_page). */
static void qs_rollback_work_fn(struct work_struct *w)
{
	struct qs_rollback_notice n;
	u64 head;

	while ((head = READ_ONCE(qs_notice->head)) != qs_notice->tail) {
		smp_rmb();	/* the head before the entries it publishes */
		if (head - qs_notice->tail > QS_NOTICES_KEPT) {
			pr_warn("%llu rollbacks came and went before the kernel could act on them: the wall clock may be behind by as long as their checkpoints were old; set it (or let NTP)\n",
				head - qs_notice->tail - QS_NOTICES_KEPT);
			qs_notice->tail = head - QS_NOTICES_KEPT;
		}
		memcpy(&n, &qs_notice->taken[qs_notice->tail % QS_NOTICES_KEPT], sizeof(n));
		smp_rmb();	/* the copy before the check that it was not overwritten meanwhile */
		if (READ_ONCE(qs_notice->head) - qs_notice->tail > QS_NOTICES_KEPT)
			continue;
		qs_rolled_back(&n);
		qs_notice->tail++;
	}
	qs_periodic_wake();
	/* The thread's flags are back at the checkpoint's instant; a request the hv took since
	 * would wait for a wake-up that was rolled away. */
	qs_want_link_request();
}

/* Takes a checkpoint, activating the hv first if it is dormant; a CPU caught where its state
 * cannot be restored (an interrupt in service) makes the hv refuse, and a try a moment later
 * almost always finds it elsewhere. Under qs_lock. */
#define QS_CHECKPOINT_TRIES 50
static bool qs_ckpt_activated;	/* the hv was dormant before the first checkpoint */

static void qs_checkpoint(struct qs_checkpoint *a)
{
	struct qs_switch_result r = { .failed_cpu = -1 };
	int tries;
	long st;

	if (!qs_active) {
		qs_do_activate(&r);
		if (r.status != QS_OK) {
			a->status = r.status;
			return;
		}
		qs_ckpt_activated = true;
	}
	for (tries = 0; tries < QS_CHECKPOINT_TRIES; tries++) {
		preempt_disable();
		st = qs_hypercall(QS_OP_CHECKPOINT, virt_to_phys(a), sizeof(*a));
		preempt_enable();
		/* Here a second time after a rollback to this checkpoint: a->status is RolledBack. */
		if (st == -EFAULT)
			a->status = QS_NOT_ACTIVE;
		else if (st != QS_OK)
			a->status = st;
		if (a->status != QS_NOT_QUIESCENT)
			break;
		usleep_range(500, 1000);
	}
}

/* The hv's checkpoint list header (no entries); all zero if it cannot be had. */
static struct qs_checkpoint_list qs_checkpoint_list(void)
{
	struct qs_checkpoint_list *l = kzalloc(sizeof(*l), GFP_KERNEL);	/* written by PA */
	struct qs_checkpoint_list out = { 0 };

	if (l && qs_control(QS_OP_CHECKPOINTS, l, sizeof(*l)) == QS_OK)
		out = *l;
	kfree(l);
	return out;
}

/* How far the kernel's clock runs behind the CPUs' TSC after rollbacks (0 if unknown), and
 * how many checkpoints are kept. */
static u64 qs_clock_behind_ns(u32 *kept)
{
	struct qs_checkpoint_list l = qs_checkpoint_list();

	*kept = l.count;
	return l.clock_behind_ns;
}

/*
 * After the last checkpoint is deleted the hv goes dormant again if a checkpoint woke it,
 * unless a rollback moved the kernel's clock back: natively the kernel reads the CPUs' own
 * TSC, and its clock would jump forward by the time rolled back (see the README's "Time after
 * a rollback"); the hv stays active instead, and `qsctl deactivate` says what it costs.
 */
static void qs_after_delete(void)
{
	struct qs_switch_result r;
	u64 behind;
	u32 kept;

	if (!qs_active || !qs_ckpt_activated)
		return;
	behind = qs_clock_behind_ns(&kept);
	if (kept)
		return;
	if (behind) {
		pr_info("no checkpoint is kept; the hv stays active: the kernel's clock runs %llu.%03llu s behind the CPUs' TSC since rollbacks, and going native would make it jump (qsctl deactivate does it anyway)\n",
			behind / NSEC_PER_SEC, (behind % NSEC_PER_SEC) / NSEC_PER_MSEC);
		return;
	}
	qs_do_deactivate(&r);
	if (r.status == QS_OK)
		qs_ckpt_activated = false;
}

/* Puts the machine back at checkpoint a->id. Returns only when refused: after a rollback
 * this CPU is elsewhere (at the checkpoint's instant). Under qs_lock. */
static void qs_rollback(struct qs_rollback *a)
{
	long st;

	/* No age limit: the kernel's clocks do not jump (the hv moves the TSC back). */
	a->max_age_ns = 0;
	if (!qs_active) {
		a->status = QS_NO_SUCH_CHECKPOINT;	/* a dormant hv keeps none */
		return;
	}
	preempt_disable();
	st = qs_hypercall(QS_OP_ROLLBACK, virt_to_phys(a), sizeof(*a));
	preempt_enable();
	if (st == -EFAULT)
		a->status = QS_NOT_ACTIVE;
	else if (st != QS_OK)
		a->status = st;
}

/* Deletes checkpoint d->id (or all), then lets the hv go dormant if nothing needs it. Under
 * qs_lock. */
static void qs_checkpoint_delete(struct qs_checkpoint_delete *d)
{
	d->status = qs_control(QS_OP_CHECKPOINT_DELETE, d, sizeof(*d));
	qs_after_delete();
}

/*
 * A checkpoint request from the bridge's control socket: the hv took it in the link's
 * interrupt handler, where no checkpoint can be taken, and hands it to this thread, which
 * does what the ioctls do and gives the hv the outcome to send back. A rollback that
 * succeeds does not return here (this thread is back at the checkpoint's instant): the hv
 * answers the bridge itself, and drops the reply this thread may send again for a request it
 * was serving at that instant.
 */
/*
 * The bridge's reads (an export over the link): this thread reads what `qsctl export` reads
 * (the kernel's facts, a CPU of the checkpoint, its pages) and hands the bytes to the hv, which
 * sends them on the bulk channel (`QS_OP_LINK_BULK`), a page at a time, rescheduling between
 * them: on a real serial line a page takes a third of a second. The end carries the outcome,
 * which pages were all zero (not sent) and the CRC-32 of what was.
 */
struct qs_bulk {
	u8 *buf;		/* records: a qs_link_bulk, its bytes, zeros to a multiple of 8 */
	size_t used;		/* bytes of records not yet handed to the hv */
	size_t cap;		/* room in buf: one page's record, or a batch on the fast link */
	bool fast;		/* QS_LINK_REQUEST_FAST: pages go as they are */
	u32 tag;
	u32 crc;
	u64 total;
	bool gone;		/* the hv no longer has the request in flight */
};

#define QS_BULK_RECORD(len) (sizeof(struct qs_link_bulk) + ALIGN((size_t)(len), 8))

/* The records so far to the hv, in one hypercall. */
static void qs_bulk_flush(struct qs_bulk *k)
{
	size_t at;

	if (k->used && !k->gone) {
		if (qs_control(QS_OP_LINK_BULK, k->buf, k->used) != QS_OK)
			k->gone = true;
		for (at = 0; at < k->used && !k->gone;) {
			struct qs_link_bulk *b = (void *)(k->buf + at);

			k->gone = b->status != QS_OK;
			at += QS_BULK_RECORD(b->len);
		}
		cond_resched();
	}
	k->used = 0;
}

/* A record for the hv: it goes at once over the serial link, when the batch is full over the
 * fast link. */
static struct qs_link_bulk *qs_bulk_record(struct qs_bulk *k, u32 len)
{
	struct qs_link_bulk *b;

	if (k->used + QS_BULK_RECORD(len) > k->cap)
		qs_bulk_flush(k);
	b = (void *)(k->buf + k->used);
	memset(b, 0, QS_BULK_RECORD(len));
	b->tag = k->tag;
	b->len = len;
	k->used += QS_BULK_RECORD(len);
	return b;
}

static void qs_bulk_send(struct qs_bulk *k, u32 item, u32 offset, const void *data, u32 len)
{
	struct qs_link_bulk *b;

	if (k->gone)
		return;
	b = qs_bulk_record(k, len);
	b->item = item;
	b->offset = offset;
	memcpy(b + 1, data, len);
	k->crc = crc32_le(k->crc, data, len);
	k->total += len;
	if (!k->fast)
		qs_bulk_flush(k);
}

/* One item of any length, a page at a time. */
static void qs_bulk_item(struct qs_bulk *k, u32 item, const u8 *data, size_t len)
{
	size_t at;

	for (at = 0; at < len; at += PAGE_SIZE)
		qs_bulk_send(k, item, at, data + at, min_t(size_t, PAGE_SIZE, len - at));
}

/* A short text file's first line (the boot id), into `out` of `n` bytes, NUL-terminated. */
static void qs_read_line(const char *path, char *out, size_t n)
{
	struct file *f = filp_open(path, O_RDONLY, 0);
	loff_t pos = 0;
	ssize_t got;

	out[0] = 0;
	if (IS_ERR(f))
		return;
	got = kernel_read(f, out, n - 1, &pos);
	filp_close(f, NULL);
	out[got > 0 ? got : 0] = 0;
	out[strcspn(out, "\n")] = 0;
}

static long qs_read_meta(struct qs_bulk *k)
{
	size_t ranges = 2 * sizeof(u64) * qs_ram_n, at;
	size_t len = sizeof(struct qs_export_meta) + ranges + 2 * (__NEW_UTS_LEN + 1) + 40;
	struct qs_export_meta *m = kzalloc(len, GFP_KERNEL);
	char *text;

	if (!m)
		return QS_NOT_ENOUGH_MEMORY;
	m->page_offset = (u64)PAGE_OFFSET;
	m->vmcoreinfo_pa = paddr_vmcoreinfo_note();
	m->vmcoreinfo_size = VMCOREINFO_NOTE_SIZE;
	m->cpus = nr_cpu_ids;
	m->ram_ranges = qs_ram_n;
	memcpy(m + 1, qs_ram, ranges);
	text = (char *)(m + 1) + ranges;
	at = scnprintf(text, 2 * (__NEW_UTS_LEN + 1), "%s", utsname()->nodename) + 1;
	at += scnprintf(text + at, __NEW_UTS_LEN + 1, "%s", utsname()->release) + 1;
	qs_read_line("/proc/sys/kernel/random/boot_id", text + at, 40);
	at += strlen(text + at) + 1;
	qs_bulk_item(k, 0, (u8 *)m, sizeof(*m) + ranges + at);
	kfree(m);
	return QS_OK;
}

/*
 * One of the hv's answers about a kept checkpoint (a CPU, the devices) into `buf` of `len`
 * bytes, whose header the caller filled; every such header starts with the hv's status.
 * Under qs_lock, which keeps the hv active meanwhile.
 */
static long qs_checkpoint_query(u64 op, void *buf, size_t len)
{
	long st;

	mutex_lock(&qs_lock);
	st = qs_active ? qs_control(op, buf, len) : QS_NOT_ACTIVE;
	mutex_unlock(&qs_lock);
	return st == QS_OK ? *(s64 *)buf : st;
}

static long qs_read_cpu(struct qs_bulk *k, u32 id, u32 cpu)
{
	const size_t len = 64u << 10;
	struct qs_checkpoint_cpu *c = kzalloc(len, GFP_KERNEL);
	long st;

	if (!c)
		return QS_NOT_ENOUGH_MEMORY;
	c->id = id;
	c->cpu = cpu;
	st = qs_checkpoint_query(QS_OP_CHECKPOINT_CPU, c, len);
	if (st == QS_OK)
		qs_bulk_item(k, 0, (u8 *)c, sizeof(*c) + c->xsave_len + c->lapic_len);
	kfree(c);
	return st;
}

/*
 * A page crosses the link deflated (raw DEFLATE, RFC 1951, zlib's level 1) where that makes it
 * shorter, which the bridge tells by its length: the link is the bottleneck (a page is 15 ms
 * under QEMU, a third of a second on a real 115200-baud line) and a kernel's pages deflate to
 * a half or less. zlib is built into every Debian kernel (CONFIG_ZLIB_DEFLATE). Its workspace
 * and output are made at the first read and kept until unload; under qs_lock.
 */
#define QS_Z_WBITS 12		/* a 4 KiB window: one page is all there is to match against */
#define QS_Z_MEMLEVEL 8
static void *qs_z_work;
static u8 *qs_z_out;

static unsigned int qs_deflate(const u8 *page)
{
	struct z_stream_s z = { .workspace = qs_z_work };
	unsigned int n;
	int ret;

	if (!qs_z_work || !qs_z_out ||
	    zlib_deflateInit2(&z, 1, Z_DEFLATED, -QS_Z_WBITS, QS_Z_MEMLEVEL,
			      Z_DEFAULT_STRATEGY) != Z_OK)
		return 0;
	z.next_in = page;
	z.avail_in = PAGE_SIZE;
	z.next_out = qs_z_out;
	z.avail_out = PAGE_SIZE - 1;	/* shorter than the page, or not worth it */
	ret = zlib_deflate(&z, Z_FINISH);
	n = z.total_out;
	zlib_deflateEnd(&z);
	return ret == Z_STREAM_END ? n : 0;
}

/* The pages, through the export's own buffer (under qs_lock, which guards it). */
static long qs_read_pages(struct qs_bulk *k, u32 id, u64 first_gpa, u32 count, u64 *zero)
{
	struct qs_checkpoint_read *r;
	long st;
	u32 i;

	if (!count || count > QS_LINK_READ_MAX_PAGES)
		return QS_BAD_ARGUMENT;
	mutex_lock(&qs_lock);
	if (!qs_read_buf)
		qs_read_buf = alloc_pages_exact(QS_READ_BUF_LEN, GFP_KERNEL | __GFP_NOWARN);
	r = qs_read_buf;
	if (!r) {
		st = QS_NOT_ENOUGH_MEMORY;
		goto out;
	}
	if (!qs_z_work)	/* without it pages go as they are */
		qs_z_work = vmalloc(zlib_deflate_workspacesize(QS_Z_WBITS, QS_Z_MEMLEVEL));
	if (!qs_z_out)
		qs_z_out = kmalloc(PAGE_SIZE, GFP_KERNEL);
	memset(r, 0, sizeof(*r));
	r->id = id;
	r->pages = count;
	r->first_gpa = first_gpa;
	st = qs_active ? qs_control(QS_OP_CHECKPOINT_READ, r,
				    QS_CHECKPOINT_READ_DATA + (size_t)count * PAGE_SIZE)
		       : QS_NOT_ACTIVE;
	if (st != QS_OK)
		goto out;
	for (i = 0; i < count; i++) {
		u8 *page = (u8 *)r + QS_CHECKPOINT_READ_DATA + (size_t)i * PAGE_SIZE;

		unsigned int n;

		if (!memchr_inv(page, 0, PAGE_SIZE)) {
			*zero |= 1ull << i;
			continue;
		}
		n = k->fast ? 0 : qs_deflate(page);
		if (n)
			qs_bulk_send(k, i, 0, qs_z_out, n);
		else
			qs_bulk_send(k, i, 0, page, PAGE_SIZE);
	}
out:
	mutex_unlock(&qs_lock);
	return st;
}

/* The hv's statistics block (what qsctl stats prints): each CPU's mode and exits. */
static long qs_read_stats(struct qs_bulk *k)
{
	size_t len = QS_STATS_HEADER_SIZE + (size_t)nr_cpu_ids * QS_CPU_STATS_SIZE;
	void *buf = kzalloc(len, GFP_KERNEL);	/* physically contiguous: the hv writes by PA */
	long st;

	if (!buf)
		return QS_NOT_ENOUGH_MEMORY;
	st = qs_control(QS_OP_STATS, buf, len);
	if (st == QS_OK)
		qs_bulk_item(k, 0, buf, len);
	kfree(buf);
	return st;
}

static long qs_read_devices(struct qs_bulk *k, u32 id)
{
	const size_t len = 16u << 10;
	struct qs_checkpoint_devices *d = kzalloc(len, GFP_KERNEL);
	long st;

	if (!d)
		return QS_NOT_ENOUGH_MEMORY;
	d->id = id;
	st = qs_checkpoint_query(QS_OP_CHECKPOINT_DEVICES, d, len);
	if (st == QS_OK && d->len <= len - sizeof(*d))
		qs_bulk_item(k, 0, (u8 *)d, sizeof(*d) + d->len);
	kfree(d);
	return st;
}

/* Pages of bytes that do not compress (xorshift64), sent as pages are: the link, measured. */
static long qs_read_fill(struct qs_bulk *k, u32 count)
{
	u64 *page, x = ktime_get_ns() | 1;
	u32 i, w;

	if (!count || count > QS_LINK_READ_MAX_PAGES)
		return QS_BAD_ARGUMENT;
	page = kmalloc(PAGE_SIZE, GFP_KERNEL);
	if (!page)
		return QS_NOT_ENOUGH_MEMORY;
	for (i = 0; i < count; i++) {
		for (w = 0; w < PAGE_SIZE / 8; w++) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			page[w] = x;
		}
		qs_bulk_send(k, i, 0, page, PAGE_SIZE);
	}
	kfree(page);
	return QS_OK;
}

static int qs_cmp_u64(const void *a, const void *b)
{
	u64 x = *(const u64 *)a, y = *(const u64 *)b;

	return x < y ? -1 : x > y;
}

/*
 * The pages written between two checkpoints (or since one), for the bridge's comparison: the
 * hv lists what its undo log holds (a page once per epoch), this sorts them and sends each run
 * of consecutive pages as one u64 (the first page, the run's length less one in the low 12
 * bits), after a qs_checkpoint_changed. Through the export's buffer, under qs_lock.
 */
static long qs_read_changed(struct qs_bulk *k, u32 a, u32 b)
{
	const size_t room = (QS_READ_BUF_LEN - sizeof(struct qs_checkpoint_changed)) / 8;
	struct qs_checkpoint_changed *c;
	u64 *g, n, i, runs = 0, pages = 0, start = 0, len = 0;
	long st;

	mutex_lock(&qs_lock);
	if (!qs_read_buf)
		qs_read_buf = alloc_pages_exact(QS_READ_BUF_LEN, GFP_KERNEL | __GFP_NOWARN);
	c = (struct qs_checkpoint_changed *)qs_read_buf;
	if (!c) {
		st = QS_NOT_ENOUGH_MEMORY;
		goto out;
	}
	memset(c, 0, sizeof(*c));
	c->a = a;
	c->b = b;
	st = qs_active ? qs_control(QS_OP_CHECKPOINT_CHANGED, c, QS_READ_BUF_LEN) : QS_NOT_ACTIVE;
	if (st == QS_OK)
		st = c->status;
	if (st != QS_OK)
		goto out;
	g = (u64 *)(c + 1);
	n = min_t(u64, c->count, room);
	c->truncated = c->count > room;
	sort(g, n, sizeof(*g), qs_cmp_u64, NULL);
	/* In place: a run is written at an index no greater than the entry being read. */
	for (i = 0; i < n; i++) {
		u64 cur = g[i];

		if (pages && cur < start + len * PAGE_SIZE)
			continue;	/* logged in more than one epoch */
		pages++;
		if (runs && cur == start + len * PAGE_SIZE && len < QS_CHANGED_RUN_PAGES) {
			len++;
			g[runs - 1] = start | (len - 1);
		} else {
			start = cur;
			len = 1;
			g[runs++] = start;
		}
	}
	c->pages = pages;
	c->runs = runs;
	qs_bulk_item(k, 0, (u8 *)c, sizeof(*c) + runs * sizeof(*g));
out:
	mutex_unlock(&qs_lock);
	return st;
}

static void qs_serve_link_read(const struct qs_link_request *q)
{
	struct qs_bulk k = { .tag = q->tag, .crc = ~0u };
	struct qs_link_bulk *end;
	u64 zero = 0;
	long st;

	/* Physically contiguous: the hv reads it by physical address. Without room for a batch
	 * (memory in pieces), one page at a time serves as well, only slower. */
	k.fast = q->flags & QS_LINK_REQUEST_FAST;
	k.cap = k.fast ? QS_LINK_BULK_BATCH : QS_BULK_RECORD(PAGE_SIZE);
	k.buf = kmalloc(k.cap, GFP_KERNEL | (k.fast ? __GFP_NOWARN : 0));
	if (!k.buf && k.fast) {
		k.cap = QS_BULK_RECORD(PAGE_SIZE);
		k.buf = kmalloc(k.cap, GFP_KERNEL);
	}
	if (!k.buf)
		return;	/* the bridge times out and asks again */
	switch (q->op) {
	case QS_LINK_OP_READ_META:
		st = qs_read_meta(&k);
		break;
	case QS_LINK_OP_READ_CPU:
		st = qs_read_cpu(&k, q->id, q->index);
		break;
	case QS_LINK_OP_READ_FILL:
		st = qs_read_fill(&k, q->count);
		break;
	case QS_LINK_OP_READ_CHANGED:
		st = qs_read_changed(&k, q->id, q->index);
		break;
	case QS_LINK_OP_READ_DEVICES:
		st = qs_read_devices(&k, q->id);
		break;
	case QS_LINK_OP_READ_STATS:
		st = qs_read_stats(&k);
		break;
	default:
		st = qs_read_pages(&k, q->id, q->first_gpa, q->count, &zero);
	}
	if (!k.gone) {
		end = qs_bulk_record(&k, 0);
		end->flags = QS_LINK_BULK_END;
		end->outcome = st;
		end->zero_mask = zero;
		end->crc = ~k.crc;
		end->total = k.total;
		qs_bulk_flush(&k);
	}
	kfree(k.buf);
}

/* The periodic ring's setting (the ioctl's and the bridge's): a dormant hv is activated for
 * it, as for a checkpoint. Under qs_lock; p->status says how it went. */
static void qs_periodic(struct qs_checkpoint_periodic *p)
{
	struct qs_switch_result r = { .failed_cpu = -1 };

	if (p->every_ms && !qs_active) {
		qs_do_activate(&r);
		if (r.status == QS_OK)
			qs_ckpt_activated = true;
	}
	p->status = r.status != QS_OK ? r.status :
		qs_control(QS_OP_CHECKPOINT_PERIODIC, p, sizeof(*p));
	qs_periodic_wake();
}

static void qs_serve_link_request(void)
{
	/* The hv reads and writes these by physical address. */
	struct qs_link_request *q = kzalloc(sizeof(*q), GFP_KERNEL);
	struct qs_checkpoint *a = kzalloc(sizeof(*a), GFP_KERNEL);
	struct qs_rollback *rb = kzalloc(sizeof(*rb), GFP_KERNEL);
	struct qs_checkpoint_delete *d = kzalloc(sizeof(*d), GFP_KERNEL);

	if (!q || !a || !rb || !d)
		goto out;
	mutex_lock(&qs_lock);
	qs_refresh_active();
	if (qs_control(QS_OP_LINK_REQUEST, q, sizeof(*q)) != QS_OK || !q->op) {
		mutex_unlock(&qs_lock);
		goto out;
	}
	if (q->op == QS_LINK_OP_READ_META || q->op == QS_LINK_OP_READ_CPU ||
	    q->op == QS_LINK_OP_READ_PAGES || q->op == QS_LINK_OP_READ_FILL ||
	    q->op == QS_LINK_OP_READ_CHANGED || q->op == QS_LINK_OP_READ_DEVICES ||
	    q->op == QS_LINK_OP_READ_STATS) {
		/* Answered on the bulk channel, taking qs_lock only where it reads. */
		mutex_unlock(&qs_lock);
		qs_serve_link_read(q);
		goto out;
	}
	switch (q->op) {
	case QS_LINK_OP_TAKE:
		qs_checkpoint(a);
		q->status = a->status;
		q->id = a->id;
		q->cpus = a->cpus;
		q->busy_cpu = a->busy_cpu;
		q->busy_what = a->busy_what;
		q->pause_us = a->pause_us;
		q->pages = a->pages_before;
		q->bytes = a->bytes;
		break;
	case QS_LINK_OP_ROLLBACK:
		rb->id = q->id;
		qs_rollback(rb);
		q->status = rb->status;
		break;
	case QS_LINK_OP_DELETE:
		d->id = q->id;
		qs_checkpoint_delete(d);
		q->status = d->status;
		q->count = d->deleted;
		break;
	case QS_LINK_OP_PERIODIC: {
		/* The hv reads it by physical address: a kmalloc'ed one, not the stack. */
		struct qs_checkpoint_periodic *p = kzalloc(sizeof(*p), GFP_KERNEL);

		if (!p) {
			q->status = QS_NOT_ENOUGH_MEMORY;
			break;
		}
		p->every_ms = q->id;
		p->keep = q->count;
		qs_periodic(p);
		q->status = p->status;
		kfree(p);
		break;
	}
	default:
		q->status = QS_BAD_ARGUMENT;
	}
	mutex_unlock(&qs_lock);
	qs_control(QS_OP_LINK_REPLY, q, sizeof(*q));
	if (q->op == QS_LINK_OP_TAKE && q->status == QS_OK)
		pr_info("checkpoint %u taken at the link's request (qs-bridge): every CPU stopped %llu us\n",
			q->id, q->pause_us);
out:
	kfree(d);
	kfree(rb);
	kfree(a);
	kfree(q);
}

static void qs_touch_softlockup(void *unused)
{
	touch_softlockup_watchdog();
}

/* Going native after rollbacks: the kernel's clock jumps forward by the time rolled back.
 * The clocksource watchdog re-bases its next two rounds (one may come before the jump),
 * and every CPU's soft-lockup watchdog starts over. */
static void qs_before_clock_jump(void)
{
	u32 kept;
	u64 behind = qs_clock_behind_ns(&kept);

	if (!behind || kept)	/* kept checkpoints: the hv refuses to go native */
		return;
	pr_info("going native: the kernel's clock jumps forward %llu.%03llu s, the time rolled back\n",
		behind / NSEC_PER_SEC, (behind % NSEC_PER_SEC) / NSEC_PER_MSEC);
	if (qs_clocksource_touch_watchdog) {
		qs_clocksource_touch_watchdog();
		qs_clocksource_touch_watchdog();
	}
	on_each_cpu(qs_touch_softlockup, NULL, 1);
}

/*
 * The periodic ring: this thread asks for a checkpoint every `every_ms` the hv holds (the
 * setting lives in the hv, which is not rolled back: after a rollback this thread, back at
 * the checkpoint's instant, reads it again and goes on). Under qs_lock, like every request.
 */
static struct task_struct *qs_periodic_task;
static DECLARE_WAIT_QUEUE_HEAD(qs_periodic_wq);
static atomic_t qs_periodic_kick = ATOMIC_INIT(0);

static int qs_periodic_fn(void *unused)
{
	struct qs_checkpoint *a = kzalloc(sizeof(*a), GFP_KERNEL);	/* the hv answers by PA */
	u32 every;

	if (!a)
		return -ENOMEM;
	while (!kthread_should_stop()) {
		mutex_lock(&qs_lock);
		every = qs_active ? qs_checkpoint_list().every_ms : 0;
		if (every) {
			memset(a, 0, sizeof(*a));
			a->flags = QS_CHECKPOINT_PERIODIC;
			preempt_disable();
			qs_hypercall(QS_OP_CHECKPOINT, virt_to_phys(a), sizeof(*a));
			preempt_enable();
		}
		mutex_unlock(&qs_lock);
		if (every)
			wait_event_interruptible_timeout(qs_periodic_wq, kthread_should_stop() ||
							 atomic_xchg(&qs_periodic_kick, 0),
							 msecs_to_jiffies(every));
		else
			wait_event_interruptible(qs_periodic_wq, kthread_should_stop() ||
						 atomic_xchg(&qs_periodic_kick, 0));
	}
	kfree(a);
	return 0;
}

static void qs_periodic_wake(void)
{
	atomic_set(&qs_periodic_kick, 1);
	wake_up(&qs_periodic_wq);
}

static void qs_probe_cpu(void *arg)
{
	struct qs_probe *p = arg;

	p->signature = qs_this_cpu_virtualized();
	rdmsrl(MSR_EFER, p->efer);
}

static long qs_ioctl(struct file *f, unsigned int cmd, unsigned long arg)
{
	void __user *uarg = (void __user *)arg;
	long ret = 0;

	mutex_lock(&qs_lock);
	qs_refresh_active();
	switch (cmd) {
	case QS_IOC_ACTIVATE:
	case QS_IOC_DEACTIVATE: {
		struct qs_switch_result r = { .failed_cpu = -1 };

		if (cmd == QS_IOC_ACTIVATE && qs_active)
			r.status = QS_ALREADY_ACTIVE;
		else if (cmd == QS_IOC_DEACTIVATE && !qs_active)
			r.status = QS_NOT_ACTIVE;
		else if (cmd == QS_IOC_ACTIVATE)
			qs_do_activate(&r);
		else {
			qs_before_clock_jump();
			qs_do_deactivate(&r);
		}
		if (cmd == QS_IOC_DEACTIVATE && r.status == QS_OK && r.cpus < num_online_cpus())
			pr_warn("%u CPUs had already left guest mode after an unexpected exit (see qsctl stats)\n",
				num_online_cpus() - r.cpus);
		/* A refused activation has said why already (qs_do_activate). */
		if (cmd == QS_IOC_DEACTIVATE && r.status != QS_OK && r.status != QS_NOT_ACTIVE)
			pr_err("deactivate failed on CPU %d: %s\n", r.failed_cpu,
			       qs_status_message(r.status));
		if (copy_to_user(uarg, &r, sizeof(r)))
			ret = -EFAULT;
		break;
	}
	case QS_IOC_IPI_FLOOR: {
		struct qs_switch_result r = { .failed_cpu = -1 };

		qs_ipi_floor(&r);
		if (copy_to_user(uarg, &r, sizeof(r)))
			ret = -EFAULT;
		break;
	}
	case QS_IOC_STATS: {
		struct qs_stats_request req;
		void *buf;

		if (copy_from_user(&req, uarg, sizeof(req))) {
			ret = -EFAULT;
			break;
		}
		if (req.len == 0 || req.len > (256u << 10)) {
			ret = -EINVAL;
			break;
		}
		buf = kzalloc(req.len, GFP_KERNEL);	/* physically contiguous: the hv writes by PA */
		if (!buf) {
			ret = -ENOMEM;
			break;
		}
		req.status = qs_control(QS_OP_STATS, buf, req.len);
		if (copy_to_user(u64_to_user_ptr(req.buf), buf, req.len) ||
		    copy_to_user(uarg, &req, sizeof(req)))
			ret = -EFAULT;
		kfree(buf);
		break;
	}
	case QS_IOC_PROBE: {
		struct qs_probe p;

		if (copy_from_user(&p, uarg, sizeof(p))) {
			ret = -EFAULT;
			break;
		}
		if (p.cpu >= nr_cpu_ids || !cpu_online(p.cpu)) {
			ret = -EINVAL;
			break;
		}
		ret = smp_call_function_single(p.cpu, qs_probe_cpu, &p, 1);
		if (!ret && copy_to_user(uarg, &p, sizeof(p)))
			ret = -EFAULT;
		break;
	}
	case QS_IOC_PEEK:
	case QS_IOC_POKE: {
		struct qs_peek p;
		u64 *at;

		if (copy_from_user(&p, uarg, sizeof(p))) {
			ret = -EFAULT;
			break;
		}
		/* Offsets past the block are into the store, chunk after chunk. */
		if (p.offset % 8 || p.offset > hv.size + qs_store.count * QS_STORE_CHUNK_SIZE - 8) {
			ret = -EINVAL;
			break;
		}
		/* The kernel touching the hv's memory: allowed while dormant, refused by the hv's
		 * nested page tables while active (reads see zeros, writes land in scratch). */
		if (p.offset < hv.size) {
			at = hv.base + p.offset;
		} else {
			u64 off = p.offset - hv.size;

			at = (u64 *)((u8 *)phys_to_virt(qs_store.chunks[off / QS_STORE_CHUNK_SIZE]) +
				     off % QS_STORE_CHUNK_SIZE);
		}
		if (cmd == QS_IOC_PEEK) {
			p.value = READ_ONCE(*at);
			if (copy_to_user(uarg, &p, sizeof(p)))
				ret = -EFAULT;
		} else if (!qs_active) {
			ret = -EPERM;	/* never scribble on a dormant hv */
		} else {
			WRITE_ONCE(*at, p.value);
		}
		break;
	}
	case QS_IOC_FREEZE: {
		/* The hv answers in this buffer by physical address, after every CPU ran again. */
		struct qs_freeze *fz = kzalloc(sizeof(*fz), GFP_KERNEL);
		long st;

		if (!fz) {
			ret = -ENOMEM;
			break;
		}
		if (copy_from_user(fz, uarg, sizeof(*fz))) {
			kfree(fz);
			ret = -EFAULT;
			break;
		}
		if (!qs_active) {
			fz->status = QS_NOT_ACTIVE;
		} else {
			preempt_disable();
			st = qs_hypercall(QS_OP_FREEZE, virt_to_phys(fz), sizeof(*fz));
			preempt_enable();
			if (st == -EFAULT)
				st = QS_NOT_ACTIVE;
			if (st != QS_OK)
				fz->status = st;
		}
		if (copy_to_user(uarg, fz, sizeof(*fz)))
			ret = -EFAULT;
		kfree(fz);
		break;
	}
	case QS_IOC_CHECKPOINT: {
		/* The hv answers in this buffer by physical address. */
		struct qs_checkpoint *a = kzalloc(sizeof(*a), GFP_KERNEL);

		if (!a) {
			ret = -ENOMEM;
			break;
		}
		if (copy_from_user(a, uarg, sizeof(*a))) {
			kfree(a);
			ret = -EFAULT;
			break;
		}
		qs_checkpoint(a);
		if (copy_to_user(uarg, a, sizeof(*a)))
			ret = -EFAULT;
		kfree(a);
		break;
	}
	case QS_IOC_ROLLBACK: {
		struct qs_rollback *a = kzalloc(sizeof(*a), GFP_KERNEL);

		if (!a) {
			ret = -ENOMEM;
			break;
		}
		if (copy_from_user(a, uarg, sizeof(*a))) {
			kfree(a);
			ret = -EFAULT;
			break;
		}
		qs_rollback(a);
		if (copy_to_user(uarg, a, sizeof(*a)))
			ret = -EFAULT;
		kfree(a);
		break;
	}
	case QS_IOC_CHECKPOINTS:
		ret = qs_ioc_buffer(uarg, QS_OP_CHECKPOINTS, sizeof(struct qs_checkpoint_list), 0);
		break;
	case QS_IOC_CHECKPOINT_DELETE: {
		struct qs_checkpoint_delete *d = kzalloc(sizeof(*d), GFP_KERNEL);

		if (!d) {
			ret = -ENOMEM;
			break;
		}
		if (copy_from_user(d, uarg, sizeof(*d))) {
			kfree(d);
			ret = -EFAULT;
			break;
		}
		qs_checkpoint_delete(d);
		if (copy_to_user(uarg, d, sizeof(*d)))
			ret = -EFAULT;
		kfree(d);
		break;
	}
	case QS_IOC_CHECKPOINT_PERIODIC: {
		struct qs_checkpoint_periodic *p = kzalloc(sizeof(*p), GFP_KERNEL);

		if (!p) {
			ret = -ENOMEM;
			break;
		}
		if (copy_from_user(p, uarg, sizeof(*p))) {
			kfree(p);
			ret = -EFAULT;
			break;
		}
		qs_periodic(p);
		if (copy_to_user(uarg, p, sizeof(*p)))
			ret = -EFAULT;
		kfree(p);
		break;
	}
	case QS_IOC_CHECKPOINT_READ:
		ret = qs_ioc_checkpoint_read(uarg);
		break;
	case QS_IOC_CHECKPOINT_DEVICES:
		ret = qs_ioc_buffer(uarg, QS_OP_CHECKPOINT_DEVICES, sizeof(struct qs_checkpoint_devices),
				    sizeof(struct qs_checkpoint_devices));
		break;
	case QS_IOC_CHECKPOINT_CPU:
		ret = qs_ioc_buffer(uarg, QS_OP_CHECKPOINT_CPU, sizeof(struct qs_checkpoint_cpu),
				    sizeof(struct qs_checkpoint_cpu));
		break;
	case QS_IOC_EXPORT_INFO: {
		struct qs_buffer_request req;
		struct qs_export_info info = {
			.page_offset = (u64)PAGE_OFFSET,
			.ram_ranges = qs_ram_n,
			.cpus = nr_cpu_ids,
		};
		size_t ranges = 2 * sizeof(u64) * qs_ram_n;

		if (copy_from_user(&req, uarg, sizeof(req))) {
			ret = -EFAULT;
			break;
		}
		if (req.len < sizeof(info) + ranges) {
			ret = -EINVAL;
			break;
		}
		req.status = QS_OK;
		if (copy_to_user(u64_to_user_ptr(req.buf), &info, sizeof(info)) ||
		    copy_to_user(u64_to_user_ptr(req.buf) + sizeof(info), qs_ram, ranges) ||
		    copy_to_user(uarg, &req, sizeof(req)))
			ret = -EFAULT;
		break;
	}
	case QS_IOC_LAST_ROLLBACK:
		if (copy_to_user(uarg, &qs_last_rollback, sizeof(qs_last_rollback)))
			ret = -EFAULT;
		break;
	case QS_IOC_AGENT_INFO: {
		struct qs_agent_info info = {
			.store_bytes = qs_store.count * QS_STORE_CHUNK_SIZE,
			.store_chunks = qs_store.count,
		};

		if (copy_to_user(uarg, &info, sizeof(info)))
			ret = -EFAULT;
		break;
	}
	case QS_IOC_PEEK_PHYS: {
		struct qs_peek p;
		void __iomem *at;

		if (copy_from_user(&p, uarg, sizeof(p))) {
			ret = -EFAULT;
			break;
		}
		/* ioremap refuses RAM; only device memory and holes can be read this way. */
		at = p.offset % 8 ? NULL : ioremap(p.offset, 8);
		if (!at) {
			ret = -EINVAL;
			break;
		}
		p.value = readq(at);
		iounmap(at);
		if (copy_to_user(uarg, &p, sizeof(p)))
			ret = -EFAULT;
		break;
	}
	case QS_IOC_PEEK_NIC:
	case QS_IOC_POKE_NIC: {
		struct qs_nic_peek p;
		void __iomem *at;

		if (copy_from_user(&p, uarg, sizeof(p))) {
			ret = -EFAULT;
			break;
		}
		/* The NIC's registers as its driver would touch them, through the stub's own
		 * mapping: read by the device while dormant, refused by the hv's nested page
		 * tables while active (reads see zeros, writes land in scratch). */
		if (!qs_net.configured || p.bar >= QS_NET_BARS || !qs_net.bar[p.bar] ||
		    !(p.width == 1 || p.width == 2 || p.width == 4 || p.width == 8) ||
		    p.offset % p.width ||
		    p.offset + p.width > pci_resource_len(qs_net.pdev, p.bar)) {
			ret = -EINVAL;
			break;
		}
		at = qs_net.bar[p.bar] + p.offset;
		if (cmd == QS_IOC_PEEK_NIC) {
			p.value = p.width == 1 ? ioread8(at) :
				  p.width == 2 ? ioread16(at) :
				  p.width == 4 ? ioread32(at) : readq(at);
			if (copy_to_user(uarg, &p, sizeof(p)))
				ret = -EFAULT;
		} else if (!qs_active) {
			ret = -EPERM;	/* never reprogram the device a dormant hv drives */
		} else if (p.width == 1) {
			iowrite8(p.value, at);
		} else if (p.width == 2) {
			iowrite16(p.value, at);
		} else if (p.width == 4) {
			iowrite32(p.value, at);
		} else {
			writeq(p.value, at);
		}
		break;
	}
	default:
		ret = -ENOTTY;
	}
	mutex_unlock(&qs_lock);
	return ret;
}

static const struct file_operations qs_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = qs_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
};

static struct miscdevice qs_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "quicksilver",
	.fops = &qs_fops,
	.mode = 0600,
};

/* CPU hotplug is refused while any CPU may be in guest mode. */
static int qs_cpu_online(unsigned int cpu)
{
	if (READ_ONCE(qs_hotplug_blocked) && qs_control(QS_OP_ACTIVE_CPUS, NULL, 0) > 0) {
		pr_warn("refusing to online CPU %u while the hypervisor is active: deactivate first\n", cpu);
		return -EBUSY;
	}
	return 0;
}

static int qs_cpu_offline(unsigned int cpu)
{
	if (READ_ONCE(qs_hotplug_blocked) && qs_control(QS_OP_ACTIVE_CPUS, NULL, 0) > 0) {
		pr_warn("refusing to offline CPU %u while the hypervisor is active: deactivate first\n", cpu);
		return -EBUSY;
	}
	return 0;
}

static int __init qs_init(void)
{
	int err = qs_load();

	if (err)
		return err;
	qs_hp_state = cpuhp_setup_state_nocalls(CPUHP_AP_ONLINE_DYN, "quicksilver:online",
						qs_cpu_online, qs_cpu_offline);
	if (qs_hp_state < 0) {
		err = qs_hp_state;
		goto out;
	}
	INIT_WORK(&qs_rollback_work, qs_rollback_work_fn);
	qs_clocksource_touch_watchdog = (void *)qs_lookup("clocksource_touch_watchdog");
	err = __register_nmi_handler(NMI_LOCAL, &qs_nmi_action);
	if (err)
		goto out_hp;
	qs_periodic_task = kthread_run(qs_periodic_fn, NULL, "quicksilver-ckpt");
	if (IS_ERR(qs_periodic_task)) {
		err = PTR_ERR(qs_periodic_task);
		goto out_nmi;
	}
	err = misc_register(&qs_dev);
	if (err)
		goto out_periodic;
	err = qs_link_start();
	if (err)
		goto out_dev;
	err = qs_net_start();
	if (err)
		goto out_link;
	return 0;
out_link:
	qs_link_stop();
out_dev:
	misc_deregister(&qs_dev);
out_periodic:
	kthread_stop(qs_periodic_task);
out_nmi:
	unregister_nmi_handler(NMI_LOCAL, "quicksilver");
out_hp:
	cpuhp_remove_state_nocalls(qs_hp_state);
out:
	vunmap(hv.base);
	__free_pages(hv.pages, hv.order);
	qs_store_free();
	free_page((unsigned long)qs_notice);
	return err;
}

static void __exit qs_exit(void)
{
	struct qs_switch_result r;

	qs_net_quiet();
	qs_link_stop();
	misc_deregister(&qs_dev);
	kthread_stop(qs_periodic_task);
	mutex_lock(&qs_lock);
	qs_refresh_active();
	if (qs_active) {
		struct qs_checkpoint_delete *d = kzalloc(sizeof(*d), GFP_KERNEL);

		/* Kept checkpoints hold every CPU in guest mode (the hv writes by PA: no stack). */
		if (d) {
			d->id = QS_CHECKPOINT_ALL;
			qs_control(QS_OP_CHECKPOINT_DELETE, d, sizeof(*d));
			if (d->deleted)
				pr_info("deleted %u checkpoints before unloading\n", d->deleted);
			kfree(d);
		}
		qs_before_clock_jump();
		qs_do_deactivate(&r);
		pr_info("deactivated %u CPUs before unloading\n", r.cpus);
	}
	mutex_unlock(&qs_lock);
	qs_net_stop();
	cpuhp_remove_state_nocalls(qs_hp_state);
	unregister_nmi_handler(NMI_LOCAL, "quicksilver");
	irq_work_sync(&qs_notice->work);
	cancel_work_sync(&qs_rollback_work);
	vunmap(hv.base);
	__free_pages(hv.pages, hv.order);
	qs_store_free();
	free_page((unsigned long)qs_notice);
	if (qs_read_buf)
		free_pages_exact(qs_read_buf, QS_READ_BUF_LEN);
	vfree(qs_z_work);
	kfree(qs_z_out);
	pr_info("unloaded\n");
}

module_init(qs_init);
module_exit(qs_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Quicksilver guest agent: a dormant hypervisor for the running kernel");
MODULE_AUTHOR("The Quicksilver developers");
