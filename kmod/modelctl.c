// SPDX-License-Identifier: GPL-2.0
/*
 * lake: the model commands of the "lake" family.  MODEL_PUSH carries one
 * LAKE_ATTR_MODEL_LAYER per layer (each a struct lake_layer with its
 * weights and biases), assembled here into a blob and checked whole before
 * anything changes.  INFER is a debug path into lake_infer() for tests and
 * benchmarks.
 */
#include <linux/mm.h>
#include <linux/slab.h>
#include <net/genetlink.h>
#include "internal.h"

#define LAKE_INFER_INPUT_MAX	(1U << 20)

static size_t lake_push_len(struct genl_info *info, u32 *n_layers)
{
	const struct nlattr *a;
	size_t len = sizeof(struct lake_model_blob);
	int rem;

	*n_layers = 0;
	nlmsg_for_each_attr(a, info->nlhdr, GENL_HDRLEN, rem) {
		if (nla_type(a) != LAKE_ATTR_MODEL_LAYER)
			continue;
		if (++*n_layers > LAKE_MODEL_LAYERS_MAX)
			return 0;
		len += nla_len(a);
	}
	return *n_layers ? len : 0;
}

/* Builds the blob from the message's layers; NULL with @extack set. */
static void *lake_push_blob(struct genl_info *info, size_t *lenp)
{
	struct lake_model_blob *hdr;
	const struct nlattr *a;
	size_t len, off;
	u32 n_layers;
	int rem;

	len = lake_push_len(info, &n_layers);
	if (!len) {
		NL_SET_ERR_MSG(info->extack, "lake: a model needs 1 to 8 layers");
		return NULL;
	}
	hdr = kvmalloc(len, GFP_KERNEL);
	if (!hdr)
		return NULL;
	hdr->n_layers = n_layers;
	hdr->frac = nla_get_u32(info->attrs[LAKE_ATTR_MODEL_FRAC]);
	off = sizeof(*hdr);
	nlmsg_for_each_attr(a, info->nlhdr, GENL_HDRLEN, rem) {
		if (nla_type(a) != LAKE_ATTR_MODEL_LAYER)
			continue;
		memcpy((u8 *)hdr + off, nla_data(a), nla_len(a));
		off += nla_len(a);
	}
	*lenp = len;
	return hdr;
}

struct lake_push_reply {
	u32 id;
	u32 version;
};

static int lake_fill_push(struct sk_buff *msg, void *arg)
{
	struct lake_push_reply *r = arg;

	if (nla_put_u32(msg, LAKE_ATTR_MODEL_ID, r->id) ||
	    nla_put_u32(msg, LAKE_ATTR_MODEL_VERSION, r->version))
		return -EMSGSIZE;
	return 0;
}

int lake_cmd_model_push(struct sk_buff *skb, struct genl_info *info)
{
	struct lake_push_reply r;
	size_t len;
	void *blob;
	int err;

	if (GENL_REQ_ATTR_CHECK(info, LAKE_ATTR_MODEL_NAME) ||
	    GENL_REQ_ATTR_CHECK(info, LAKE_ATTR_MODEL_FRAC))
		return -EINVAL;
	blob = lake_push_blob(info, &len);
	if (!blob)
		return info->extack->_msg ? -EINVAL : -ENOMEM;
	if (lake_blob_check(blob, len)) {
		kvfree(blob);
		NL_SET_ERR_MSG(info->extack,
			       "lake: layers must chain, 1..4096 wide, sizes exact");
		return -EINVAL;
	}
	err = lake_model_push(nla_data(info->attrs[LAKE_ATTR_MODEL_NAME]),
			      blob, len, &r.id, &r.version);
	if (err == -ENOSPC)
		NL_SET_ERR_MSG(info->extack, "lake: no free model id");
	if (err)
		return err;
	return lake_reply(info, LAKE_CMD_MODEL_PUSH, NLMSG_GOODSIZE,
			  lake_fill_push, &r);
}

int lake_cmd_model_del(struct sk_buff *skb, struct genl_info *info)
{
	if (GENL_REQ_ATTR_CHECK(info, LAKE_ATTR_MODEL_NAME))
		return -EINVAL;
	return lake_model_delete(nla_data(info->attrs[LAKE_ATTR_MODEL_NAME]));
}

struct lake_infer_reply {
	struct lake_infer_result res;
	const s32 *out;
	size_t out_len;
};

static int lake_fill_infer(struct sk_buff *msg, void *arg)
{
	struct lake_infer_reply *r = arg;

	if (nla_put(msg, LAKE_ATTR_INFER_OUTPUT, r->out_len, r->out) ||
	    nla_put_u32(msg, LAKE_ATTR_DECISION, r->res.target) ||
	    nla_put_u32(msg, LAKE_ATTR_DECIDED_BY, r->res.by) ||
	    nla_put_u8(msg, LAKE_ATTR_INFER_FALLBACK, r->res.fallback))
		return -EMSGSIZE;
	return 0;
}

/* Output rows of the model's current weights, 0 if it has none. */
static u32 lake_model_n_out(struct lake_model *m)
{
	struct lake_weights *w = lake_weights_get(m);
	u32 n = w ? w->n_out : 0;

	lake_weights_put(w);
	return n;
}

static int lake_infer_run(struct genl_info *info, struct lake_model *m,
			  u32 batch)
{
	const struct nlattr *in = info->attrs[LAKE_ATTR_INFER_INPUT];
	u32 mode = info->attrs[LAKE_ATTR_INFER_MODE] ?
		   nla_get_u32(info->attrs[LAKE_ATTR_INFER_MODE]) : 0;
	u32 n_out = lake_model_n_out(m), n_in;
	struct lake_infer_reply r = {};
	s32 *out;
	int err;

	if (!n_out)
		return -ENODATA;
	if (!batch || nla_len(in) % (batch * sizeof(s32)) ||
	    nla_len(in) > LAKE_INFER_INPUT_MAX) {
		NL_SET_ERR_MSG(info->extack,
			       "lake: input is not batch rows of s32");
		return -EINVAL;
	}
	n_in = nla_len(in) / sizeof(s32) / batch;
	r.out_len = array3_size(batch, n_out, sizeof(s32));
	out = kvmalloc(r.out_len, GFP_KERNEL);
	if (!out)
		return -ENOMEM;
	err = lake_infer(m, nla_data(in), batch, n_in, out, n_out, mode,
			 &r.res);
	if (!err) {
		r.out = out;
		err = lake_reply(info, LAKE_CMD_INFER,
				 nla_total_size(r.out_len) + NLMSG_GOODSIZE,
				 lake_fill_infer, &r);
	}
	kvfree(out);
	return err;
}

int lake_cmd_infer(struct sk_buff *skb, struct genl_info *info)
{
	struct lake_model *m;
	int err;

	if (GENL_REQ_ATTR_CHECK(info, LAKE_ATTR_MODEL_NAME) ||
	    GENL_REQ_ATTR_CHECK(info, LAKE_ATTR_CTX_BATCH) ||
	    GENL_REQ_ATTR_CHECK(info, LAKE_ATTR_INFER_INPUT))
		return -EINVAL;
	m = lake_model_lookup(nla_data(info->attrs[LAKE_ATTR_MODEL_NAME]));
	if (!m) {
		NL_SET_ERR_MSG(info->extack, "lake: no such model");
		return -ENOENT;
	}
	err = lake_infer_run(info, m,
			     nla_get_u32(info->attrs[LAKE_ATTR_CTX_BATCH]));
	lake_model_close(m);
	return err;
}
