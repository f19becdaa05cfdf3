// SPDX-License-Identifier: GPL-2.0
/*
 * lake: sessions and the exported lake_cu* calls.  Each call becomes one
 * request on the submission ring (lake.h says which ones wait).
 */
#include <linux/idr.h>
#include <linux/kref.h>
#include <linux/list.h>
#include <linux/module.h>
#include <linux/slab.h>
#include <linux/string.h>
#include "internal.h"

#define LAKE_MAX_PARAMS		64
#define LAKE_MAX_PARAM_BYTES	4096

struct lake_session {
	u32 id;
	struct kref ref;	/* the owner's, and one per async request */
	char name[32];
	struct list_head node;
	struct list_head host_bufs;
	spinlock_t lock;
	int async_err;		/* first async failure, reported at sync */
};

struct lake_hostbuf {
	struct list_head node;
	void *p;
	size_t len;
};

static DEFINE_IDA(lake_session_ida);
static LIST_HEAD(lake_sessions);
static DEFINE_MUTEX(lake_sessions_lock);

static int lake_errno_to_cu(int err)
{
	switch (err) {
	case 0:
		return LAKE_CUDA_SUCCESS;
	case -ENOTCONN:
		return LAKE_CUDA_ERROR_SYSTEM_NOT_READY;
	case -ETIMEDOUT:
		return LAKE_CUDA_ERROR_TIMEOUT;
	case -ENOMEM:
		return LAKE_CUDA_ERROR_OUT_OF_MEMORY;
	case -EINVAL:
		return LAKE_CUDA_ERROR_INVALID_VALUE;
	default:
		return LAKE_CUDA_ERROR_UNKNOWN;
	}
}

/* A payload copied into the heap; owned by the request it is given to. */
static void *lake_payload(const void *src, size_t len)
{
	void *p = lake_heap_alloc(len);

	if (p && src)
		memcpy(p, src, len);
	return p;
}

static int lake_call(struct lake_session *s, struct lake_req_args *a,
		     struct lake_cqe *cqe)
{
	int err;

	if (!s)
		return LAKE_CUDA_ERROR_INVALID_VALUE;
	a->session = s->id;
	err = lake_rpc_call(a, cqe);
	if (err)
		return lake_errno_to_cu(err);
	return cqe->result;
}

static int lake_call0(struct lake_session *s, u32 op, u64 a0)
{
	struct lake_req_args a = { .op = op, .args = { a0 } };
	struct lake_cqe cqe;

	return lake_call(s, &a, &cqe);
}

/* Calls that hand back a handle in ret[0]. */
static int lake_call_ret(struct lake_session *s, struct lake_req_args *a,
			 u64 *out)
{
	struct lake_cqe cqe;
	int res = lake_call(s, a, &cqe);

	if (res == LAKE_CUDA_SUCCESS && out)
		*out = cqe.ret[0];
	return res;
}

static void lake_session_free(struct kref *ref)
{
	struct lake_session *s = container_of(ref, struct lake_session, ref);

	ida_free(&lake_session_ida, s->id);
	kfree(s);
}

static void lake_async_done(struct lake_req *req, const struct lake_cqe *cqe)
{
	struct lake_session *s = lake_req_priv(req);

	spin_lock(&s->lock);
	if (cqe->result && !s->async_err)
		s->async_err = cqe->result;
	spin_unlock(&s->lock);
	kref_put(&s->ref, lake_session_free);
}

static int lake_submit_async(struct lake_session *s, struct lake_req_args *a)
{
	int err;

	a->session = s->id;
	a->flags |= LAKE_SQE_F_ASYNC;
	kref_get(&s->ref);
	err = lake_rpc_submit_async(a, lake_async_done, s);
	if (err) {
		kref_put(&s->ref, lake_session_free);
		return lake_errno_to_cu(err);
	}
	return LAKE_CUDA_SUCCESS;
}

static int lake_take_async_err(struct lake_session *s, int res)
{
	int err;

	spin_lock(&s->lock);
	err = s->async_err;
	s->async_err = 0;
	spin_unlock(&s->lock);
	return res ? res : err;
}

struct lake_session *lake_session_open(const char *name)
{
	struct lake_session *s;
	int id;

	s = kzalloc(sizeof(*s), GFP_KERNEL);
	if (!s)
		return ERR_PTR(-ENOMEM);
	id = ida_alloc_range(&lake_session_ida, 1, INT_MAX, GFP_KERNEL);
	if (id < 0) {
		kfree(s);
		return ERR_PTR(id);
	}
	s->id = id;
	kref_init(&s->ref);
	strscpy(s->name, name ? name : "anon", sizeof(s->name));
	INIT_LIST_HEAD(&s->host_bufs);
	spin_lock_init(&s->lock);
	mutex_lock(&lake_sessions_lock);
	list_add(&s->node, &lake_sessions);
	mutex_unlock(&lake_sessions_lock);
	return s;
}
EXPORT_SYMBOL_GPL(lake_session_open);

static void lake_session_free_host_bufs(struct lake_session *s)
{
	struct lake_hostbuf *b, *tmp;

	list_for_each_entry_safe(b, tmp, &s->host_bufs, node) {
		list_del(&b->node);
		lake_heap_free(b->p, b->len);
		kfree(b);
	}
}

/* Frees laked's objects of the session (if laked is there) and ours. */
static void lake_session_teardown(struct lake_session *s)
{
	if (lake_rpc_server_present())
		lake_call0(s, LAKE_OP_SESSION_CLOSE, 0);
	spin_lock(&s->lock);
	lake_session_free_host_bufs(s);
	spin_unlock(&s->lock);
	kref_put(&s->ref, lake_session_free);
}

void lake_session_close(struct lake_session *s)
{
	if (IS_ERR_OR_NULL(s))
		return;
	mutex_lock(&lake_sessions_lock);
	list_del(&s->node);
	mutex_unlock(&lake_sessions_lock);
	lake_session_teardown(s);
}
EXPORT_SYMBOL_GPL(lake_session_close);

int lake_cuInit(struct lake_session *s, unsigned int flags)
{
	return lake_call0(s, LAKE_OP_INIT, flags);
}
EXPORT_SYMBOL_GPL(lake_cuInit);

int lake_cuDeviceGet(struct lake_session *s, int *dev, int ordinal)
{
	struct lake_req_args a = { .op = LAKE_OP_DEVICE_GET, .args = { ordinal } };
	u64 v = 0;
	int res = lake_call_ret(s, &a, &v);

	if (res == LAKE_CUDA_SUCCESS)
		*dev = v;
	return res;
}
EXPORT_SYMBOL_GPL(lake_cuDeviceGet);

int lake_cuCtxCreate(struct lake_session *s, lake_handle_t *ctx,
		     unsigned int flags, int dev)
{
	struct lake_req_args a = { .op = LAKE_OP_CTX_CREATE, .args = { flags, dev } };

	return lake_call_ret(s, &a, ctx);
}
EXPORT_SYMBOL_GPL(lake_cuCtxCreate);

int lake_cuCtxDestroy(struct lake_session *s, lake_handle_t ctx)
{
	return lake_call0(s, LAKE_OP_CTX_DESTROY, ctx);
}
EXPORT_SYMBOL_GPL(lake_cuCtxDestroy);

int lake_cuCtxSynchronize(struct lake_session *s)
{
	return lake_take_async_err(s, lake_call0(s, LAKE_OP_CTX_SYNC, 0));
}
EXPORT_SYMBOL_GPL(lake_cuCtxSynchronize);

int lake_cuModuleLoadData(struct lake_session *s, lake_handle_t *mod,
			  const void *image, size_t len)
{
	struct lake_req_args a = { .op = LAKE_OP_MODULE_LOAD };

	if (!image || !len)
		return LAKE_CUDA_ERROR_INVALID_VALUE;
	a.payload = lake_payload(image, len);
	if (!a.payload)
		return LAKE_CUDA_ERROR_OUT_OF_MEMORY;
	a.payload_len = len;
	return lake_call_ret(s, &a, mod);
}
EXPORT_SYMBOL_GPL(lake_cuModuleLoadData);

int lake_cuModuleUnload(struct lake_session *s, lake_handle_t mod)
{
	return lake_call0(s, LAKE_OP_MODULE_UNLOAD, mod);
}
EXPORT_SYMBOL_GPL(lake_cuModuleUnload);

int lake_cuModuleGetFunction(struct lake_session *s, lake_handle_t *fn,
			     lake_handle_t mod, const char *name)
{
	struct lake_req_args a = { .op = LAKE_OP_MODULE_GET_FUNCTION,
				   .args = { mod } };
	size_t len;

	if (!name)
		return LAKE_CUDA_ERROR_INVALID_VALUE;
	len = strnlen(name, 1024) + 1;
	if (len > 1024)
		return LAKE_CUDA_ERROR_INVALID_VALUE;
	a.payload = lake_payload(name, len);
	if (!a.payload)
		return LAKE_CUDA_ERROR_OUT_OF_MEMORY;
	a.payload_len = len;
	return lake_call_ret(s, &a, fn);
}
EXPORT_SYMBOL_GPL(lake_cuModuleGetFunction);

int lake_cuMemAlloc(struct lake_session *s, lake_dptr_t *dptr, size_t bytes)
{
	struct lake_req_args a = { .op = LAKE_OP_MEM_ALLOC, .args = { bytes } };

	return lake_call_ret(s, &a, dptr);
}
EXPORT_SYMBOL_GPL(lake_cuMemAlloc);

int lake_cuMemFree(struct lake_session *s, lake_dptr_t dptr)
{
	return lake_call0(s, LAKE_OP_MEM_FREE, dptr);
}
EXPORT_SYMBOL_GPL(lake_cuMemFree);

int lake_cuMemAllocHost(struct lake_session *s, void **p, size_t bytes)
{
	struct lake_hostbuf *b;

	if (!s || !p || !bytes)
		return LAKE_CUDA_ERROR_INVALID_VALUE;
	b = kzalloc(sizeof(*b), GFP_KERNEL);
	if (!b)
		return LAKE_CUDA_ERROR_OUT_OF_MEMORY;
	b->p = lake_heap_alloc(bytes);
	if (!b->p) {
		kfree(b);
		return LAKE_CUDA_ERROR_OUT_OF_MEMORY;
	}
	b->len = bytes;
	spin_lock(&s->lock);
	list_add(&b->node, &s->host_bufs);
	spin_unlock(&s->lock);
	*p = b->p;
	return LAKE_CUDA_SUCCESS;
}
EXPORT_SYMBOL_GPL(lake_cuMemAllocHost);

int lake_cuMemFreeHost(struct lake_session *s, void *p)
{
	struct lake_hostbuf *b, *found = NULL;

	if (!s)
		return LAKE_CUDA_ERROR_INVALID_VALUE;
	spin_lock(&s->lock);
	list_for_each_entry(b, &s->host_bufs, node) {
		if (b->p == p) {
			found = b;
			list_del(&b->node);
			break;
		}
	}
	spin_unlock(&s->lock);
	if (!found)
		return LAKE_CUDA_ERROR_INVALID_VALUE;
	lake_heap_free(found->p, found->len);
	kfree(found);
	return LAKE_CUDA_SUCCESS;
}
EXPORT_SYMBOL_GPL(lake_cuMemFreeHost);

/* HtoD: a region source goes by offset; anything else is staged. */
static int lake_htod(struct lake_session *s, lake_dptr_t dst, const void *src,
		     size_t bytes, lake_handle_t stream, bool async)
{
	struct lake_req_args a = { .op = LAKE_OP_MEMCPY_HTOD };
	struct lake_cqe cqe;
	u64 off;

	if (!s || !src || !bytes)
		return LAKE_CUDA_ERROR_INVALID_VALUE;
	if (lake_region_contains(src, bytes)) {
		off = lake_region_off(src);
	} else {
		a.payload = lake_payload(src, bytes);
		if (!a.payload)
			return LAKE_CUDA_ERROR_OUT_OF_MEMORY;
		a.payload_len = bytes;
		off = lake_region_off(a.payload);
	}
	a.args[0] = dst;
	a.args[1] = off;
	a.args[2] = bytes;
	a.args[3] = stream;
	if (async)
		return lake_submit_async(s, &a);
	return lake_call(s, &a, &cqe);
}

int lake_cuMemcpyHtoD(struct lake_session *s, lake_dptr_t dst,
		      const void *src, size_t bytes)
{
	return lake_htod(s, dst, src, bytes, 0, false);
}
EXPORT_SYMBOL_GPL(lake_cuMemcpyHtoD);

int lake_cuMemcpyHtoDAsync(struct lake_session *s, lake_dptr_t dst,
			   const void *src, size_t bytes, lake_handle_t stream)
{
	return lake_htod(s, dst, src, bytes, stream, true);
}
EXPORT_SYMBOL_GPL(lake_cuMemcpyHtoDAsync);

int lake_cuMemcpyDtoH(struct lake_session *s, void *dst, lake_dptr_t src,
		      size_t bytes)
{
	struct lake_req_args a = { .op = LAKE_OP_MEMCPY_DTOH };
	struct lake_cqe cqe;
	bool staged;
	int res;

	if (!s || !dst || !bytes)
		return LAKE_CUDA_ERROR_INVALID_VALUE;
	staged = !lake_region_contains(dst, bytes);
	if (staged) {
		a.payload = lake_payload(NULL, bytes);
		if (!a.payload)
			return LAKE_CUDA_ERROR_OUT_OF_MEMORY;
		a.payload_len = bytes;
		a.copy_out = dst;
	}
	a.args[0] = lake_region_off(staged ? a.payload : dst);
	a.args[1] = src;
	a.args[2] = bytes;
	res = lake_call(s, &a, &cqe);
	return res;
}
EXPORT_SYMBOL_GPL(lake_cuMemcpyDtoH);

int lake_cuMemcpyDtoHAsync(struct lake_session *s, void *dst, lake_dptr_t src,
			   size_t bytes, lake_handle_t stream)
{
	struct lake_req_args a = { .op = LAKE_OP_MEMCPY_DTOH };

	if (!s || !dst || !bytes || !lake_region_contains(dst, bytes))
		return LAKE_CUDA_ERROR_INVALID_VALUE;
	a.args[0] = lake_region_off(dst);
	a.args[1] = src;
	a.args[2] = bytes;
	a.args[3] = stream;
	return lake_submit_async(s, &a);
}
EXPORT_SYMBOL_GPL(lake_cuMemcpyDtoHAsync);

/* struct lake_launch_params: count, sizes[], then 8-aligned values. */
static void *lake_pack_params(void **params, const u32 *sizes, u32 n,
			      size_t *len)
{
	size_t off = ALIGN(sizeof(u32) * (n + 1), 8);
	size_t total = off;
	char *buf;
	u32 i;

	for (i = 0; i < n; i++) {
		if (!sizes[i] || sizes[i] > LAKE_MAX_PARAM_BYTES || !params[i])
			return NULL;
		total += ALIGN(sizes[i], 8);
	}
	if (total > LAKE_MAX_PARAM_BYTES)
		return NULL;
	buf = lake_payload(NULL, total);
	if (!buf)
		return NULL;
	((u32 *)buf)[0] = n;
	for (i = 0; i < n; i++) {
		((u32 *)buf)[i + 1] = sizes[i];
		memcpy(buf + off, params[i], sizes[i]);
		off += ALIGN(sizes[i], 8);
	}
	*len = total;
	return buf;
}

int lake_cuLaunchKernel(struct lake_session *s, lake_handle_t fn,
			u32 gx, u32 gy, u32 gz, u32 bx, u32 by, u32 bz,
			u32 shared_bytes, lake_handle_t stream,
			void **params, const u32 *sizes, u32 nparams)
{
	struct lake_req_args a = {
		.op = LAKE_OP_LAUNCH,
		.args = { fn, gx, gy, gz, bx, by, bz, shared_bytes, stream },
	};

	if (!s || nparams > LAKE_MAX_PARAMS || (nparams && (!params || !sizes)))
		return LAKE_CUDA_ERROR_INVALID_VALUE;
	a.payload = lake_pack_params(params, sizes, nparams, &a.payload_len);
	if (!a.payload)
		return LAKE_CUDA_ERROR_INVALID_VALUE;
	return lake_submit_async(s, &a);
}
EXPORT_SYMBOL_GPL(lake_cuLaunchKernel);

int lake_cuStreamCreate(struct lake_session *s, lake_handle_t *stream,
			unsigned int flags)
{
	struct lake_req_args a = { .op = LAKE_OP_STREAM_CREATE, .args = { flags } };

	return lake_call_ret(s, &a, stream);
}
EXPORT_SYMBOL_GPL(lake_cuStreamCreate);

int lake_cuStreamDestroy(struct lake_session *s, lake_handle_t stream)
{
	return lake_call0(s, LAKE_OP_STREAM_DESTROY, stream);
}
EXPORT_SYMBOL_GPL(lake_cuStreamDestroy);

int lake_cuStreamSynchronize(struct lake_session *s, lake_handle_t stream)
{
	return lake_take_async_err(s, lake_call0(s, LAKE_OP_STREAM_SYNC, stream));
}
EXPORT_SYMBOL_GPL(lake_cuStreamSynchronize);

int lake_cuapi_init(void)
{
	return 0;
}

/* Unload: close what callers left open (laked is gone by now). */
void lake_cuapi_exit(void)
{
	struct lake_session *s, *tmp;

	mutex_lock(&lake_sessions_lock);
	list_for_each_entry_safe(s, tmp, &lake_sessions, node) {
		pr_warn("lake: session %s left open at unload; closing it\n", s->name);
		list_del(&s->node);
		lake_session_teardown(s);
	}
	mutex_unlock(&lake_sessions_lock);
	ida_destroy(&lake_session_ida);
}
