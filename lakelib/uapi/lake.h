/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * lake: the one definition of everything that crosses the user/kernel
 * boundary.  laked's Python mirror (laked/abi.py) is checked against this
 * file by tests/host/test_abi.py; change both together.
 */
#ifndef _UAPI_LAKE_H
#define _UAPI_LAKE_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define LAKE_ABI_VERSION	1

/* ---- control plane: generic netlink family "lake" ---------------------- */

#define LAKE_GENL_NAME		"lake"
#define LAKE_GENL_VERSION	1
#define LAKE_POLICY_NAME_MAX	64

enum lake_genl_cmd {
	LAKE_CMD_UNSPEC,
	LAKE_CMD_HELLO,		/* daemon registers (admin) */
	LAKE_CMD_BYE,		/* daemon unregisters (admin) */
	LAKE_CMD_POLICY_SET,	/* attach FD+NAME, or detach with neither (admin) */
	LAKE_CMD_STATUS,	/* read everything */
	LAKE_CMD_DECIDE,	/* debug: run one decision on a given context (admin) */
	LAKE_CMD_MODEL_PUSH,	/* NAME, FRAC, LAYER...: create or swap weights (admin) */
	LAKE_CMD_MODEL_DEL,	/* NAME: delete a model laked pushed (admin) */
	LAKE_CMD_INFER,		/* debug: NAME, CTX_BATCH, INPUT[, MODE] -> OUTPUT (admin) */
	__LAKE_CMD_MAX,
};
#define LAKE_CMD_MAX (__LAKE_CMD_MAX - 1)

enum lake_genl_attr {
	LAKE_ATTR_UNSPEC,
	LAKE_ATTR_PAD,
	LAKE_ATTR_VERSION,		/* u32: ABI version */
	LAKE_ATTR_DAEMON_PID,		/* u32 */
	LAKE_ATTR_DAEMON_CONNECTED,	/* u8 */
	LAKE_ATTR_ENABLED,		/* u8 */
	LAKE_ATTR_POLICY_FD,		/* u32: BPF socket-filter program fd */
	LAKE_ATTR_POLICY_NAME,		/* string, < LAKE_POLICY_NAME_MAX */
	LAKE_ATTR_POLICY_ID,		/* u32: BPF prog id, 0 = builtin */
	LAKE_ATTR_CTX_MODEL,		/* u32 */
	LAKE_ATTR_CTX_BATCH,		/* u32 */
	LAKE_ATTR_CTX_QUEUE_DEPTH,	/* u32 */
	LAKE_ATTR_CTX_QUEUE_DELAY_US,	/* u32 */
	LAKE_ATTR_DECISION,		/* u32: enum lake_decision */
	LAKE_ATTR_DECIDED_BY,		/* u32: enum lake_decided_by */
	LAKE_ATTR_STAT_CPU,		/* u64: decisions for the CPU */
	LAKE_ATTR_STAT_GPU,		/* u64: decisions for the GPU */
	LAKE_ATTR_STAT_POLICY_RUNS,	/* u64: eBPF policy invocations */
	LAKE_ATTR_STAT_ERRORS,		/* u64: bad policy verdicts */
	LAKE_ATTR_STAT_NO_DAEMON,	/* u64: GPU verdicts turned to CPU */
	LAKE_ATTR_STAT_REQUESTS,	/* u64: requests sent to laked */
	LAKE_ATTR_STAT_TIMEOUTS,	/* u64: requests laked did not answer in time */
	LAKE_ATTR_STAT_SQ_FULL_WAITS,	/* u64: submitters that waited for ring space */
	LAKE_ATTR_MODEL_NAME,		/* string, < LAKE_MODEL_NAME_MAX */
	LAKE_ATTR_MODEL_FRAC,		/* u32: fixed-point fraction bits */
	LAKE_ATTR_MODEL_LAYER,		/* binary, repeated: struct lake_layer */
	LAKE_ATTR_MODEL_ID,		/* u32 */
	LAKE_ATTR_MODEL_VERSION,	/* u32: bumped by every push */
	LAKE_ATTR_INFER_INPUT,		/* binary: __s32[batch][n_in] */
	LAKE_ATTR_INFER_OUTPUT,		/* binary: __s32[batch][n_out] */
	LAKE_ATTR_INFER_MODE,		/* u32: enum lake_infer_mode */
	LAKE_ATTR_INFER_FALLBACK,	/* u8: the GPU failed, the CPU answered */
	__LAKE_ATTR_MAX,
};
#define LAKE_ATTR_MAX (__LAKE_ATTR_MAX - 1)

/* ---- models: fixed-point multilayer perceptrons ----------------------- */

#define LAKE_MODEL_NAME_MAX	32
#define LAKE_MODEL_LAYERS_MAX	8
#define LAKE_MODEL_DIM_MAX	4096
#define LAKE_MODEL_FRAC_MAX	24
#define LAKE_MODEL_IDS		64	/* ids 1..63; index of the cost map */

/*
 * One dense layer: out = sat32(((W . in) >> frac) + b), ReLU on every layer
 * but the last.  Products and sums are 64-bit two's complement (wrapping),
 * the shift is arithmetic, sat32 clamps to the s32 range: the CPU in the
 * kernel, laked's CPU and its GPU all compute exactly this.
 * Followed by __s32 w[n_out][n_in], then __s32 b[n_out].
 */
struct lake_layer {
	__u32 n_in;
	__u32 n_out;
};

/* A model's weights in the region for laked: the header, then its layers. */
struct lake_model_blob {
	__u32 n_layers;
	__u32 frac;
};

enum lake_infer_mode {
	LAKE_INFER_POLICY = 0,	/* ask lake_decide() */
	LAKE_INFER_CPU = 1,	/* force the in-kernel CPU path */
	LAKE_INFER_GPU = 2,	/* force laked (falls back to the CPU on failure) */
};

/*
 * What laked keeps in a cost policy's "costs" map, indexed by model id:
 * predicted latency = cpu_ns_per_item * batch on the CPU,
 * gpu_ns_fixed + gpu_ns_per_item * batch through laked.
 */
struct lake_model_cost {
	__u32 cpu_ns_per_item;
	__u32 gpu_ns_fixed;
	__u32 gpu_ns_per_item;
	__u32 valid;		/* 0: nothing measured yet */
};

/* ---- features: per-CPU records kernel code captures ------------------- */

#define LAKE_FEATURE_NAME_MAX	32
#define LAKE_FEATURE_FIELDS_MAX	32

enum lake_field_type {
	LAKE_FIELD_U64 = 0,
	LAKE_FIELD_S64 = 1,
	LAKE_FIELD_U32 = 2,
	LAKE_FIELD_S32 = 3,
};

/* What /sys/kernel/lake/features/NAME/records hands out, back to back. */
struct lake_feature_rec {
	__u64 ts_ns;		/* ktime_get_mono_fast_ns() at capture */
	__u32 cpu;
	__u32 n_fields;
	__u64 v[];		/* each field, sign-extended to 64 bits */
};

/* ---- decisions ---------------------------------------------------------- */

enum lake_decision {
	LAKE_DECIDE_CPU = 0,
	LAKE_DECIDE_GPU = 1,
};

enum lake_decided_by {
	LAKE_BY_DISABLED = 0,	/* /sys/kernel/lake/enabled is 0 */
	LAKE_BY_BUILTIN = 1,	/* the C rule: daemon && batch >= threshold */
	LAKE_BY_POLICY = 2,	/* the attached eBPF program */
	LAKE_BY_FALLBACK = 3,	/* policy verdict unusable: builtin used */
};

#define LAKE_CTX_F_DAEMON	(1U << 0)	/* laked is connected */

/*
 * What a policy sees.  It is copied into __sk_buff->cb[0..4] of a private
 * skb (the fastest context a socket filter can read), so it must stay
 * exactly five u32 words; the same bytes are the skb's data too, for
 * bpf_skb_load_bytes().
 */
struct lake_decide_ctx {
	__u32 model;		/* cb[0]: model id, 0 = none */
	__u32 batch;		/* cb[1]: requests in this batch */
	__u32 flags;		/* cb[2]: LAKE_CTX_F_* */
	__u32 queue_depth;	/* cb[3]: requests queued to laked */
	__u32 queue_delay_us;	/* cb[4]: scheduler's delay for kernel work */
};

/* ---- data plane: /dev/lake shared region ------------------------------ */

/*
 * Layout (the header describes it; readers use the offsets, never this
 * comment): the header at 0, the submission ring at LAKE_SQ_RING_OFF, the
 * submission entries right after it, then the completion ring and its
 * entries (64-byte aligned), then the heap from the next page to the end.
 *
 * Submissions: the kernel writes sqe[head & (entries - 1)], then publishes
 * head + 1 (release).  laked reads entries up to head (acquire), executes
 * them and advances tail.  Completions go the other way, laked producing.
 * A ring is full when head - tail == entries.  Completions may come in any
 * order; cqe.id echoes sqe.id.  laked sleeps in poll() on /dev/lake
 * (readable while submissions are pending) and rings the kernel with
 * LAKE_IOC_CQ_KICK after posting completions.
 */
#define LAKE_SQ_RING_OFF	4096

#define LAKE_REGION_MAGIC	0x454b414cU	/* "LAKE" little endian */
#define LAKE_REGION_VERSION	1
#define LAKE_SQ_ENTRIES		256
#define LAKE_CQ_ENTRIES		256
#define LAKE_HEAP_ALIGN		64

/*
 * Ring indices are free-running u32 counters; slot = index & (entries - 1).
 * Producer and consumer indices sit on separate cache lines.
 */
struct lake_ring {
	__u32 head;		/* next slot the producer fills */
	__u32 __pad0[15];
	__u32 tail;		/* next slot the consumer reads */
	__u32 __pad1[15];
};

/*
 * The region's header.  The kernel writes the layout; laked writes
 * daemon_flags and sched_delay_us, which the kernel only reads (and zeroes
 * when laked stops serving, so no stale value outlives it).
 * sched_delay_us: how long work from the kernel currently waits on the GPU
 * (the queue delay of the kernel's partition in laked's arbiter), in
 * microseconds; lake_infer() hands it to the policy as queue_delay_us.
 */
struct lake_region_hdr {
	__u32 magic;
	__u32 version;
	__u64 size;		/* whole region, bytes */
	__u64 sq_ring_off;	/* struct lake_ring for submissions */
	__u64 sq_off;		/* struct lake_sqe[sq_entries] */
	__u32 sq_entries;
	__u32 sqe_size;
	__u64 cq_ring_off;	/* struct lake_ring for completions */
	__u64 cq_off;		/* struct lake_cqe[cq_entries] */
	__u32 cq_entries;
	__u32 cqe_size;
	__u64 heap_off;		/* buffers: lake_cuMemAllocHost, payloads */
	__u64 heap_size;
	__u32 daemon_flags;	/* LAKE_DAEMON_F_*, written by laked */
	__u32 sched_delay_us;	/* laked: kernel work's GPU queue delay */
};

#define LAKE_DAEMON_F_REGISTERED	(1U << 0)	/* cuMemHostRegister ok */

enum lake_op {
	LAKE_OP_NULL = 0,		/* no-op round trip */
	LAKE_OP_INIT,			/* cuInit */
	LAKE_OP_DEVICE_GET,		/* a0 ordinal -> r0 device */
	LAKE_OP_CTX_CREATE,		/* a0 flags, a1 device -> r0 ctx */
	LAKE_OP_CTX_DESTROY,		/* a0 ctx */
	LAKE_OP_CTX_SYNC,		/* */
	LAKE_OP_MODULE_LOAD,		/* data = image -> r0 module */
	LAKE_OP_MODULE_UNLOAD,		/* a0 module */
	LAKE_OP_MODULE_GET_FUNCTION,	/* a0 module, data = name -> r0 func */
	LAKE_OP_MEM_ALLOC,		/* a0 bytes -> r0 dptr */
	LAKE_OP_MEM_FREE,		/* a0 dptr */
	LAKE_OP_MEMCPY_HTOD,		/* a0 dptr, a1 region off, a2 bytes, a3 stream */
	LAKE_OP_MEMCPY_DTOH,		/* a0 region off, a1 dptr, a2 bytes, a3 stream */
	LAKE_OP_LAUNCH,			/* a0 func, a1..a3 grid, a4..a6 block,
					 * a7 shared bytes, a8 stream,
					 * data = struct lake_launch_params */
	LAKE_OP_STREAM_CREATE,		/* a0 flags -> r0 stream */
	LAKE_OP_STREAM_DESTROY,		/* a0 stream */
	LAKE_OP_STREAM_SYNC,		/* a0 stream */
	LAKE_OP_SESSION_CLOSE,		/* free every object of the session */
	LAKE_OP_INFER,			/* a0 model id, a1 version, a2 blob off,
					 * a3 blob len, a4 batch, a5 n_in,
					 * a6 n_out; data = __s32 in[batch][n_in]
					 * then __s32 out[batch][n_out] (laked
					 * writes out) */
	__LAKE_OP_MAX,
};

#define LAKE_SQE_ARGS	10
#define LAKE_SQE_F_ASYNC	(1U << 0)	/* a3/a8 stream is honoured */

struct lake_sqe {
	__u64 id;		/* echoed by the completion */
	__u32 op;		/* enum lake_op */
	__u32 session;		/* caller's session, 0 = none */
	__u32 flags;		/* LAKE_SQE_F_* */
	__u32 __pad;
	__u64 args[LAKE_SQE_ARGS];
	__u64 data_off;		/* payload offset in the region */
	__u64 data_len;
};

struct lake_cqe {
	__u64 id;
	__s32 result;		/* CUresult */
	__u32 __pad;
	__u64 ret[2];
};

/*
 * Kernel launch parameters, by size: count, then count u32 sizes, then the
 * values, each at the next 8-byte boundary after the sizes.
 */
struct lake_launch_params {
	__u32 count;
	__u32 sizes[];
};

/*
 * CUresult values lake itself produces (the same numbers as CUDA's; laked
 * passes other CUresults through unchanged).
 */
enum lake_curesult {
	LAKE_CUDA_SUCCESS = 0,
	LAKE_CUDA_ERROR_INVALID_VALUE = 1,
	LAKE_CUDA_ERROR_OUT_OF_MEMORY = 2,
	LAKE_CUDA_ERROR_NOT_INITIALIZED = 3,
	LAKE_CUDA_ERROR_NO_DEVICE = 100,
	LAKE_CUDA_ERROR_INVALID_DEVICE = 101,
	LAKE_CUDA_ERROR_INVALID_IMAGE = 200,
	LAKE_CUDA_ERROR_INVALID_CONTEXT = 201,
	LAKE_CUDA_ERROR_INVALID_HANDLE = 400,
	LAKE_CUDA_ERROR_NOT_FOUND = 500,
	LAKE_CUDA_ERROR_NOT_READY = 600,
	LAKE_CUDA_ERROR_NOT_SUPPORTED = 801,
	LAKE_CUDA_ERROR_SYSTEM_NOT_READY = 802,	/* laked is not serving */
	LAKE_CUDA_ERROR_TIMEOUT = 909,		/* laked did not answer in time */
	LAKE_CUDA_ERROR_UNKNOWN = 999,
};

/* ---- ioctls on /dev/lake ------------------------------------------------ */

struct lake_region_info {
	__u64 size;
	__u32 version;
	__u32 __pad;
};

#define LAKE_IOC_MAGIC		0x4c
#define LAKE_IOC_NOP		_IO(LAKE_IOC_MAGIC, 0)	/* benchmark baseline */
#define LAKE_IOC_INFO		_IOR(LAKE_IOC_MAGIC, 1, struct lake_region_info)
#define LAKE_IOC_CQ_KICK	_IO(LAKE_IOC_MAGIC, 2)	/* laked: completions posted */
#define LAKE_IOC_NULL_RT	_IO(LAKE_IOC_MAGIC, 3)	/* kernel->laked->kernel no-op */
#define LAKE_IOC_SERVE		_IO(LAKE_IOC_MAGIC, 4)	/* laked: this file serves the rings */

#endif /* _UAPI_LAKE_H */
