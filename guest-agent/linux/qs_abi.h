/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * The C mirror of quicksilver-proto (proto/src/image.rs, proto/src/abi.rs) and the agent's
 * ioctl ABI, which qsctl mirrors in guest-agent/qsctl/src/ioctl.rs. Sizes and offsets are
 * checked at compile time here and in Rust.
 */
#ifndef QS_ABI_H
#define QS_ABI_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define QS_IMAGE_MAGIC "QSHVIMG"	/* 7 bytes and a NUL */
#define QS_ABI_VERSION 2
#define QS_HEADER_SIZE 256
#define QS_MAX_IMAGE_SIZE (4u << 20)
#define QS_CHECKSUM_OFFSET 24

struct qs_image_header {
	__u8 magic[8];
	__u32 abi_version;
	__u32 header_size;
	__u64 image_size;
	__u32 checksum;
	__u32 code_crc;
	__u64 code_start;
	__u64 code_end;
	__u64 reloc_offset;
	__u64 reloc_count;
	__u64 entry_init;
	__u64 entry_activate;
	__u64 entry_control;
	__u64 mem_fixed;
	__u64 mem_per_cpu;
	__u64 mem_per_gib;
	__u32 max_cpus;
	__u32 flags;
	__u8 version[32];
	__u8 reserved[104];
};

struct qs_init_args {
	__u64 base_va;
	__u64 base_pa;
	__u64 mem_size;
	__u64 phys_limit;
	__u32 cpus;
	__u32 tsc_khz;
	__u64 kernel_text;	/* runtime _text, 0 if unknown */
	__u64 kernel_text_link;	/* link-time _text */
};

#define QS_HYPERCALL_MAGIC 0x5153000000000000ull
#define QS_OP_DEACTIVATE 1
#define QS_OP_STATS 2
#define QS_OP_LINK_CONFIG 3
#define QS_OP_LINK_RX 4
#define QS_OP_ACTIVE_CPUS 5

#define QS_CPUID_SIGNATURE_LEAF 0x40000000u
/* "Quicksilver\0" as EBX, ECX, EDX. */
#define QS_SIG_EBX 0x63697551u	/* "Quic" */
#define QS_SIG_ECX 0x6c69736bu	/* "ksil" */
#define QS_SIG_EDX 0x00726576u	/* "ver\0" */

/* Status codes (proto abi::Status). */
enum qs_status {
	QS_OK = 0,
	QS_NO_SVM = 1,
	QS_SVM_DISABLED = 2,
	QS_SVM_IN_USE = 3,
	QS_NO_NPT = 4,
	QS_NOT_ENOUGH_MEMORY = 5,
	QS_TOO_MANY_CPUS = 6,
	QS_BAD_ARGUMENT = 7,
	QS_ALREADY_ACTIVE = 8,
	QS_NOT_ACTIVE = 9,
	QS_VMRUN_FAILED = 10,
	QS_BAD_OP = 11,
	QS_BUFFER_TOO_SMALL = 12,
	QS_NOT_INITIALIZED = 13,
	QS_LA57_UNSUPPORTED = 14,
};

/* ioctls on /dev/quicksilver. */

/* ACTIVATE / DEACTIVATE: the result of one switch of every online CPU. */
struct qs_switch_result {
	__s64 status;		/* enum qs_status of the first CPU that failed, or QS_OK */
	__u64 elapsed_ns;	/* request to every CPU switched, IPIs included */
	__u32 cpus;		/* CPUs switched */
	__s32 failed_cpu;	/* -1 if none */
};

/* STATS: the hv's statistics block (proto stats.rs) into a user buffer. */
struct qs_stats_request {
	__u64 buf;		/* user pointer */
	__u64 len;
	__s64 status;
};

/* PROBE: what a CPU looks like from the kernel's side. */
struct qs_probe {
	__u32 cpu;		/* in: CPU index */
	__u32 signature;	/* out: 1 if CPUID 0x40000000 says Quicksilver on that CPU */
	__u64 efer;		/* out: EFER as RDMSR reads it on that CPU */
};

/* PEEK / POKE: the kernel reads or writes 8 bytes of the hv's memory (test of isolation). */
struct qs_peek {
	__u64 offset;		/* in: offset into the hv's block (8-aligned) */
	__u64 value;		/* out for PEEK, in for POKE */
};

#define QS_IOC_MAGIC 'Q'
#define QS_IOC_ACTIVATE   _IOR(QS_IOC_MAGIC, 1, struct qs_switch_result)
#define QS_IOC_DEACTIVATE _IOR(QS_IOC_MAGIC, 2, struct qs_switch_result)
#define QS_IOC_STATS      _IOWR(QS_IOC_MAGIC, 3, struct qs_stats_request)
#define QS_IOC_PROBE      _IOWR(QS_IOC_MAGIC, 4, struct qs_probe)
#define QS_IOC_PEEK       _IOWR(QS_IOC_MAGIC, 5, struct qs_peek)
#define QS_IOC_POKE       _IOW(QS_IOC_MAGIC, 6, struct qs_peek)
/* PEEK_PHYS: the kernel reads 8 bytes at a physical address outside RAM (ioremap): a device
 * or a hole, e.g. above what the hv's nested tables map (test of the unexpected-exit policy). */
#define QS_IOC_PEEK_PHYS  _IOWR(QS_IOC_MAGIC, 7, struct qs_peek)

#endif
