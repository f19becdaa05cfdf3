// SPDX-License-Identifier: GPL-2.0
/*
 * lake: lake_infer(), the arbitrated inference call.  The policy picks the
 * side per batch; the CPU side runs here, the GPU side is one LAKE_OP_INFER
 * request to laked.  If laked fails or is late, the CPU answers instead and
 * the model's "fallbacks" counter says so: a caller always gets a result.
 */
#include <linux/err.h>
#include <linux/ktime.h>
#include <linux/slab.h>
#include "internal.h"

#define LAKE_INFER_BATCH_MAX	(1U << 16)

static void lake_mstat_add(struct lake_model *m, enum lake_mstat_id id, u64 v)
{
	atomic64_add(v, &m->stat[id]);
}

static void lake_infer_account(struct lake_model *m, bool gpu, u32 batch,
			       u64 t0)
{
	u64 ns = ktime_get_ns() - t0;

	lake_mstat_add(m, gpu ? LAKE_MSTAT_GPU_RUNS : LAKE_MSTAT_CPU_RUNS, 1);
	lake_mstat_add(m, gpu ? LAKE_MSTAT_GPU_ITEMS : LAKE_MSTAT_CPU_ITEMS,
		       batch);
	lake_mstat_add(m, gpu ? LAKE_MSTAT_GPU_NS : LAKE_MSTAT_CPU_NS, ns);
}

/* The GPU side: inputs and outputs share one region payload. */
static int lake_infer_gpu(struct lake_model *m, struct lake_weights *w,
			  const s32 *in, u32 batch, s32 *out)
{
	size_t in_len = (size_t)batch * w->n_in * sizeof(s32);
	size_t out_len = (size_t)batch * w->n_out * sizeof(s32);
	struct lake_req_args a = {
		.op = LAKE_OP_INFER,
		.args = { m->id, w->version, 0, w->blob_len, batch, w->n_in,
			  w->n_out },
		.payload_len = in_len + out_len,
		.copy_out = out,
		.copy_out_off = in_len,
		.copy_out_len = out_len,
	};
	struct lake_cqe cqe;
	int err;

	if (!w->rgn_blob)
		return -ENOSPC;
	a.args[2] = lake_region_off(w->rgn_blob);
	a.payload = lake_heap_alloc(a.payload_len);
	if (!a.payload)
		return -ENOMEM;
	memcpy(a.payload, in, in_len);
	err = lake_rpc_call(&a, &cqe);	/* frees the payload */
	if (err)
		return err;
	return cqe.result ? -EIO : 0;
}

static u32 lake_infer_choose(struct lake_model *m, u32 batch, u32 mode,
			     struct lake_infer_result *res)
{
	struct lake_decide_ctx ctx = {
		.model = m->id,
		.batch = batch,
		.queue_depth = lake_rpc_inflight(),
	};

	if (mode == LAKE_INFER_CPU || mode == LAKE_INFER_GPU) {
		res->by = LAKE_BY_DISABLED;
		return mode == LAKE_INFER_GPU ? LAKE_DECIDE_GPU : LAKE_DECIDE_CPU;
	}
	/* laked's arbiter knows how long kernel work waits on the GPU */
	if (lake_daemon_connected())
		ctx.queue_delay_us = lake_region_sched_delay_us();
	return lake_decide(&ctx, &res->by);
}

static int lake_infer_cpu_timed(struct lake_model *m, struct lake_weights *w,
				const s32 *in, u32 batch, s32 *out)
{
	u64 t0 = ktime_get_ns();
	int err;

	err = lake_mlp_run(w, in, batch, out, GFP_KERNEL);
	if (!err)
		lake_infer_account(m, false, batch, t0);
	return err;
}

/* The weights to run @batch rows of n_in -> n_out on, or an ERR_PTR. */
static struct lake_weights *lake_infer_weights(struct lake_model *m, u32 batch,
					       u32 n_in, u32 n_out)
{
	struct lake_weights *w;

	if (!batch || batch > LAKE_INFER_BATCH_MAX)
		return ERR_PTR(-EINVAL);
	w = lake_weights_get(m);
	if (!w)
		return ERR_PTR(-ENODATA);
	if (w->n_in != n_in || w->n_out != n_out) {
		lake_weights_put(w);
		return ERR_PTR(-EINVAL);
	}
	return w;
}

int lake_infer(struct lake_model *m, const s32 *in, u32 batch, u32 n_in,
	       s32 *out, u32 n_out, u32 mode, struct lake_infer_result *res)
{
	struct lake_infer_result dummy;
	struct lake_weights *w;
	u64 t0;
	int err;

	res = res ?: &dummy;
	memset(res, 0, sizeof(*res));
	if (mode > LAKE_INFER_GPU)
		return -EINVAL;
	w = lake_infer_weights(m, batch, n_in, n_out);
	if (IS_ERR(w))
		return PTR_ERR(w);
	res->target = lake_infer_choose(m, batch, mode, res);
	if (res->target == LAKE_DECIDE_GPU) {
		t0 = ktime_get_ns();
		err = lake_infer_gpu(m, w, in, batch, out);
		if (!err) {
			lake_infer_account(m, true, batch, t0);
			goto out;
		}
		res->fallback = true;
		lake_mstat_add(m, LAKE_MSTAT_FALLBACKS, 1);
	}
	err = lake_infer_cpu_timed(m, w, in, batch, out);
out:
	lake_weights_put(w);
	return err;
}
EXPORT_SYMBOL_GPL(lake_infer);

int lake_infer_cpu(struct lake_model *m, const s32 *in, u32 batch, u32 n_in,
		   s32 *out, u32 n_out, gfp_t gfp)
{
	struct lake_weights *w = lake_infer_weights(m, batch, n_in, n_out);
	int err;

	if (IS_ERR(w))
		return PTR_ERR(w);
	err = lake_mlp_run(w, in, batch, out, gfp);
	lake_weights_put(w);
	return err;
}
EXPORT_SYMBOL_GPL(lake_infer_cpu);
