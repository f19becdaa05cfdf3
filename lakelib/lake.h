/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lake: the kernel API that other kernel code builds against.
 * Everything here is exported GPL from lake.ko.
 */
#ifndef _LAKE_H
#define _LAKE_H

#include <linux/types.h>
#include "uapi/lake.h"

/**
 * lake_decide - choose CPU or GPU for one batch
 * @ctx: the caller fills model, batch, queue_depth and queue_delay_us;
 *	lake fills flags (daemon connected) before the policy sees it
 * @by: if not NULL, set to who decided (enum lake_decided_by)
 *
 * Runs the attached eBPF policy, or the built-in rule when none is
 * attached.  Never sleeps; callable from any context but NMI.
 * Return: LAKE_DECIDE_CPU or LAKE_DECIDE_GPU.
 */
u32 lake_decide(struct lake_decide_ctx *ctx, enum lake_decided_by *by);

/*
 * The cuXXX-like API.  Each kernel caller opens a session; every GPU object
 * it creates belongs to the session and is freed when the session closes
 * (or lake.ko unloads).  Calls return CUresult numbers (enum lake_curesult;
 * laked passes CUDA's own codes through).  They sleep: process context
 * only.  A call waits for laked at most /sys/kernel/lake/timeout_ms, then
 * returns LAKE_CUDA_ERROR_TIMEOUT; with no laked serving it returns
 * LAKE_CUDA_ERROR_SYSTEM_NOT_READY at once.
 *
 * Why a session argument: the kernel has no per-thread "current context",
 * so the owner of every object is named explicitly.
 *
 * lake_cuLaunchKernel and the *Async calls return once the request is
 * queued; their errors are reported by the next lake_cuStreamSynchronize
 * or lake_cuCtxSynchronize, as CUDA reports asynchronous errors.  An async
 * DtoH copy needs a lake_cuMemAllocHost destination; an async HtoD copy
 * from other memory is staged, so the source may be reused at once.
 * lake_cuMemAllocHost buffers live in the region laked maps and the GPU
 * reads directly: copies from and to them need no staging.
 */
struct lake_session;
typedef u64 lake_handle_t;	/* CUcontext, CUmodule, CUfunction, CUstream */
typedef u64 lake_dptr_t;	/* CUdeviceptr */

struct lake_session *lake_session_open(const char *name);
void lake_session_close(struct lake_session *s);

int lake_cuInit(struct lake_session *s, unsigned int flags);
int lake_cuDeviceGet(struct lake_session *s, int *dev, int ordinal);
int lake_cuCtxCreate(struct lake_session *s, lake_handle_t *ctx,
		     unsigned int flags, int dev);
int lake_cuCtxDestroy(struct lake_session *s, lake_handle_t ctx);
int lake_cuCtxSynchronize(struct lake_session *s);
int lake_cuModuleLoadData(struct lake_session *s, lake_handle_t *mod,
			  const void *image, size_t len);
int lake_cuModuleUnload(struct lake_session *s, lake_handle_t mod);
int lake_cuModuleGetFunction(struct lake_session *s, lake_handle_t *fn,
			     lake_handle_t mod, const char *name);
int lake_cuMemAlloc(struct lake_session *s, lake_dptr_t *dptr, size_t bytes);
int lake_cuMemFree(struct lake_session *s, lake_dptr_t dptr);
int lake_cuMemAllocHost(struct lake_session *s, void **p, size_t bytes);
int lake_cuMemFreeHost(struct lake_session *s, void *p);
int lake_cuMemcpyHtoD(struct lake_session *s, lake_dptr_t dst,
		      const void *src, size_t bytes);
int lake_cuMemcpyDtoH(struct lake_session *s, void *dst, lake_dptr_t src,
		      size_t bytes);
int lake_cuMemcpyHtoDAsync(struct lake_session *s, lake_dptr_t dst,
			   const void *src, size_t bytes, lake_handle_t stream);
int lake_cuMemcpyDtoHAsync(struct lake_session *s, void *dst, lake_dptr_t src,
			   size_t bytes, lake_handle_t stream);
int lake_cuLaunchKernel(struct lake_session *s, lake_handle_t fn,
			u32 gx, u32 gy, u32 gz, u32 bx, u32 by, u32 bz,
			u32 shared_bytes, lake_handle_t stream,
			void **params, const u32 *sizes, u32 nparams);
int lake_cuStreamCreate(struct lake_session *s, lake_handle_t *stream,
			unsigned int flags);
int lake_cuStreamDestroy(struct lake_session *s, lake_handle_t stream);
int lake_cuStreamSynchronize(struct lake_session *s, lake_handle_t stream);

/*
 * Features.  A feature set is registered once; lake_feature_capture() then
 * stores one vector (n_fields values, each sign-extended to 64 bits) on
 * this CPU's ring without locks or waiting, from any context but NMI, and
 * returns false when the ring is full (the drop is counted).  Records are
 * read by lake_feature_read() (process context) or by user space from
 * /sys/kernel/lake/features/NAME/records.  Unregister waits for captures
 * in flight; captures after it are dropped.
 */
struct lake_feature;

struct lake_field {
	const char *name;
	u32 type;		/* enum lake_field_type */
};

struct lake_feature *lake_feature_register(const char *name,
					   const struct lake_field *fields,
					   u32 n_fields, u32 capacity);
void lake_feature_unregister(struct lake_feature *f);
bool lake_feature_capture(struct lake_feature *f, const u64 *vals);
ssize_t lake_feature_read(struct lake_feature *f, void *buf, size_t len);
u32 lake_feature_record_size(const struct lake_feature *f);

/*
 * Models.  lake_model_open() finds or creates a model by name; its weights
 * come from user space (laked model push NAME FILE) and may be swapped at
 * any time: an inference uses the weights it started with.  Inputs and
 * outputs are fixed point with the model's fraction bits (see struct
 * lake_layer).
 *
 * lake_infer() asks the policy (or obeys @mode), runs the batch on the CPU
 * here or on the GPU through laked, and falls back to the CPU when the GPU
 * path fails; it sleeps (process context).  -ENODATA: no weights yet;
 * -EINVAL: the weights' shape is not n_in -> n_out.  lake_infer_cpu()
 * never sleeps when @gfp does not.
 */
struct lake_model;

struct lake_infer_result {
	u32 target;		/* enum lake_decision actually asked for */
	enum lake_decided_by by;
	bool fallback;		/* the GPU failed; the CPU answered */
};

struct lake_model *lake_model_open(const char *name);
void lake_model_close(struct lake_model *m);
u32 lake_model_id(const struct lake_model *m);
int lake_infer(struct lake_model *m, const s32 *in, u32 batch, u32 n_in,
	       s32 *out, u32 n_out, u32 mode, struct lake_infer_result *res);
int lake_infer_cpu(struct lake_model *m, const s32 *in, u32 batch, u32 n_in,
		   s32 *out, u32 n_out, gfp_t gfp);

#endif /* _LAKE_H */
