// SPDX-License-Identifier: GPL-2.0
/*
 * lake: fixed-point multilayer perceptron on the CPU, integers only so no
 * FPU state is touched.  The arithmetic is the one lakelib/uapi/lake.h
 * defines for struct lake_layer; laked's CPU and GPU executors compute the
 * same bits.
 */
#include <linux/overflow.h>
#include <linux/sched.h>
#include <linux/slab.h>
#include "internal.h"

size_t lake_layer_bytes(u32 n_in, u32 n_out)
{
	return sizeof(struct lake_layer) +
	       ((size_t)n_in * n_out + n_out) * sizeof(s32);
}

static bool lake_dims_ok(u32 n_in, u32 n_out)
{
	return n_in >= 1 && n_in <= LAKE_MODEL_DIM_MAX &&
	       n_out >= 1 && n_out <= LAKE_MODEL_DIM_MAX;
}

/* A model blob from user space: header, then chained layers, exactly. */
int lake_blob_check(const void *blob, size_t len)
{
	const struct lake_model_blob *hdr = blob;
	const struct lake_layer *l;
	size_t off = sizeof(*hdr);
	u32 i, prev_out = 0;

	if (len < sizeof(*hdr) || !hdr->n_layers ||
	    hdr->n_layers > LAKE_MODEL_LAYERS_MAX ||
	    hdr->frac > LAKE_MODEL_FRAC_MAX)
		return -EINVAL;
	for (i = 0; i < hdr->n_layers; i++) {
		if (len - off < sizeof(*l))
			return -EINVAL;
		l = blob + off;
		if (!lake_dims_ok(l->n_in, l->n_out) ||
		    (i && l->n_in != prev_out))
			return -EINVAL;
		if (len - off < lake_layer_bytes(l->n_in, l->n_out))
			return -EINVAL;
		off += lake_layer_bytes(l->n_in, l->n_out);
		prev_out = l->n_out;
	}
	return off == len ? 0 : -EINVAL;
}

static s32 lake_sat32(s64 v)
{
	return clamp_t(s64, v, S32_MIN, S32_MAX);
}

static void lake_layer_run(const struct lake_wlayer *l, u32 frac,
			   const s32 *in, s32 *out, bool relu)
{
	const s32 *row = l->w;
	u32 o, i;
	s32 v;
	u64 acc;

	for (o = 0; o < l->n_out; o++, row += l->n_in) {
		acc = 0;	/* wrapping 64-bit sum, as the ABI says */
		for (i = 0; i < l->n_in; i++)
			acc += (u64)((s64)row[i] * in[i]);
		v = lake_sat32(((s64)acc >> frac) + l->b[o]);
		out[o] = relu && v < 0 ? 0 : v;
	}
}

/* One item through every layer, ping-ponging between two scratch rows. */
static void lake_mlp_item(const struct lake_weights *w, const s32 *in,
			  s32 *out, s32 *a, s32 *b)
{
	const s32 *src = in;
	s32 *dst;
	u32 i;

	for (i = 0; i < w->n_layers; i++) {
		dst = i == w->n_layers - 1 ? out : (i & 1 ? b : a);
		lake_layer_run(&w->layer[i], w->frac, src, dst,
			       i != w->n_layers - 1);
		src = dst;
	}
}

int lake_mlp_run(const struct lake_weights *w, const s32 *in, u32 batch,
		 s32 *out, gfp_t gfp)
{
	s32 *scratch;
	u32 k;

	scratch = kmalloc_array(2 * w->max_dim, sizeof(s32), gfp);
	if (!scratch)
		return -ENOMEM;
	for (k = 0; k < batch; k++) {
		lake_mlp_item(w, in + (size_t)k * w->n_in,
			      out + (size_t)k * w->n_out, scratch,
			      scratch + w->max_dim);
		/* a large batch is milliseconds of work: let others run */
		if (gfpflags_allow_blocking(gfp) && !(k & 63))
			cond_resched();
	}
	kfree(scratch);
	return 0;
}
