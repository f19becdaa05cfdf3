// SPDX-License-Identifier: GPL-2.0
/*
 * lake: the control plane, generic netlink family "lake".  Control
 * messages only (hello, policy, status, debug decisions): data goes
 * through /dev/lake.  The attribute policy rejects malformed messages
 * before any handler runs; state-changing commands are admin-only.
 */
#include <linux/module.h>
#include <net/genetlink.h>
#include "internal.h"

static const struct nla_policy lake_genl_policy[LAKE_ATTR_MAX + 1] = {
	[LAKE_ATTR_VERSION]		= { .type = NLA_U32 },
	[LAKE_ATTR_DAEMON_PID]		= { .type = NLA_U32 },
	[LAKE_ATTR_DAEMON_CONNECTED]	= { .type = NLA_U8 },
	[LAKE_ATTR_ENABLED]		= { .type = NLA_U8 },
	[LAKE_ATTR_POLICY_FD]		= { .type = NLA_U32 },
	[LAKE_ATTR_POLICY_NAME]		= { .type = NLA_NUL_STRING,
					    .len = LAKE_POLICY_NAME_MAX - 1 },
	[LAKE_ATTR_POLICY_ID]		= { .type = NLA_U32 },
	[LAKE_ATTR_CTX_MODEL]		= { .type = NLA_U32 },
	[LAKE_ATTR_CTX_BATCH]		= { .type = NLA_U32 },
	[LAKE_ATTR_CTX_QUEUE_DEPTH]	= { .type = NLA_U32 },
	[LAKE_ATTR_CTX_QUEUE_DELAY_US]	= { .type = NLA_U32 },
	[LAKE_ATTR_DECISION]		= { .type = NLA_U32 },
	[LAKE_ATTR_DECIDED_BY]		= { .type = NLA_U32 },
	[LAKE_ATTR_STAT_CPU]		= { .type = NLA_U64 },
	[LAKE_ATTR_STAT_GPU]		= { .type = NLA_U64 },
	[LAKE_ATTR_STAT_POLICY_RUNS]	= { .type = NLA_U64 },
	[LAKE_ATTR_STAT_ERRORS]		= { .type = NLA_U64 },
	[LAKE_ATTR_STAT_NO_DAEMON]	= { .type = NLA_U64 },
	[LAKE_ATTR_STAT_REQUESTS]	= { .type = NLA_U64 },
	[LAKE_ATTR_STAT_TIMEOUTS]	= { .type = NLA_U64 },
	[LAKE_ATTR_STAT_SQ_FULL_WAITS]	= { .type = NLA_U64 },
	[LAKE_ATTR_MODEL_NAME]		= { .type = NLA_NUL_STRING,
					    .len = LAKE_MODEL_NAME_MAX - 1 },
	[LAKE_ATTR_MODEL_FRAC]		= NLA_POLICY_MAX(NLA_U32,
							 LAKE_MODEL_FRAC_MAX),
	[LAKE_ATTR_MODEL_LAYER]		= { .type = NLA_BINARY },
	[LAKE_ATTR_MODEL_ID]		= { .type = NLA_U32 },
	[LAKE_ATTR_MODEL_VERSION]	= { .type = NLA_U32 },
	[LAKE_ATTR_INFER_INPUT]		= { .type = NLA_BINARY },
	[LAKE_ATTR_INFER_OUTPUT]	= { .type = NLA_BINARY },
	[LAKE_ATTR_INFER_MODE]		= NLA_POLICY_MAX(NLA_U32, LAKE_INFER_GPU),
	[LAKE_ATTR_INFER_FALLBACK]	= { .type = NLA_U8 },
};

static struct genl_family lake_genl_family;

static int lake_cmd_hello(struct sk_buff *skb, struct genl_info *info)
{
	u32 version;

	if (GENL_REQ_ATTR_CHECK(info, LAKE_ATTR_VERSION))
		return -EINVAL;
	version = nla_get_u32(info->attrs[LAKE_ATTR_VERSION]);
	if (version != LAKE_ABI_VERSION) {
		NL_SET_ERR_MSG(info->extack,
			       "lake: laked and lake.ko ABI versions differ");
		return -EPROTO;
	}
	return lake_daemon_hello(info->snd_portid, info->extack);
}

static int lake_cmd_bye(struct sk_buff *skb, struct genl_info *info)
{
	return lake_daemon_bye(info->snd_portid, info->extack);
}

static int lake_cmd_policy_set(struct sk_buff *skb, struct genl_info *info)
{
	struct nlattr *fd = info->attrs[LAKE_ATTR_POLICY_FD];
	struct nlattr *name = info->attrs[LAKE_ATTR_POLICY_NAME];

	if (!lake_daemon_is_sender(info->snd_portid)) {
		NL_SET_ERR_MSG(info->extack,
			       "lake: only the connected laked sets policies");
		return -EPERM;
	}
	if (!fd && !name) {
		lake_policy_detach();
		return 0;
	}
	if (!fd || !name) {
		NL_SET_ERR_MSG(info->extack,
			       "lake: a policy needs both an fd and a name");
		return -EINVAL;
	}
	return lake_policy_attach(nla_get_u32(fd), nla_data(name),
				  info->extack);
}

static int lake_put_stats(struct sk_buff *msg)
{
	static const u16 attr[LAKE_STAT_NR] = {
		[LAKE_STAT_CPU]		= LAKE_ATTR_STAT_CPU,
		[LAKE_STAT_GPU]		= LAKE_ATTR_STAT_GPU,
		[LAKE_STAT_POLICY_RUNS]	= LAKE_ATTR_STAT_POLICY_RUNS,
		[LAKE_STAT_ERRORS]	= LAKE_ATTR_STAT_ERRORS,
		[LAKE_STAT_NO_DAEMON]	= LAKE_ATTR_STAT_NO_DAEMON,
		[LAKE_STAT_REQUESTS]	= LAKE_ATTR_STAT_REQUESTS,
		[LAKE_STAT_TIMEOUTS]	= LAKE_ATTR_STAT_TIMEOUTS,
		[LAKE_STAT_SQ_FULL_WAITS] = LAKE_ATTR_STAT_SQ_FULL_WAITS,
	};
	int i;

	BUILD_BUG_ON(ARRAY_SIZE(attr) != LAKE_STAT_NR);
	for (i = 0; i < LAKE_STAT_NR; i++)
		if (nla_put_u64_64bit(msg, attr[i], lake_stat_read(i),
				      LAKE_ATTR_PAD))
			return -EMSGSIZE;
	return 0;
}

static int lake_put_status(struct sk_buff *msg)
{
	char name[LAKE_POLICY_NAME_MAX];
	u32 id = lake_policy_get(name, sizeof(name));

	if (nla_put_u32(msg, LAKE_ATTR_VERSION, LAKE_ABI_VERSION) ||
	    nla_put_u8(msg, LAKE_ATTR_ENABLED, lake_knob(LAKE_KNOB_ENABLED)) ||
	    nla_put_u8(msg, LAKE_ATTR_DAEMON_CONNECTED,
		       lake_daemon_connected()) ||
	    nla_put_u32(msg, LAKE_ATTR_DAEMON_PID, lake_daemon_pid()) ||
	    nla_put_string(msg, LAKE_ATTR_POLICY_NAME, name) ||
	    nla_put_u32(msg, LAKE_ATTR_POLICY_ID, id))
		return -EMSGSIZE;
	return lake_put_stats(msg);
}

/* Builds a reply of @cmd, lets @fill add attributes, and sends it. */
int lake_reply(struct genl_info *info, u8 cmd, size_t size,
	       int (*fill)(struct sk_buff *msg, void *arg), void *arg)
{
	struct sk_buff *msg;
	void *hdr;
	int err;

	msg = genlmsg_new(size, GFP_KERNEL);
	if (!msg)
		return -ENOMEM;
	hdr = genlmsg_put_reply(msg, info, &lake_genl_family, 0, cmd);
	if (!hdr) {
		err = -EMSGSIZE;
		goto free;
	}
	err = fill(msg, arg);
	if (err)
		goto free;
	genlmsg_end(msg, hdr);
	return genlmsg_reply(msg, info);
free:
	nlmsg_free(msg);
	return err;
}

static int lake_fill_status(struct sk_buff *msg, void *arg)
{
	return lake_put_status(msg);
}

static int lake_cmd_status(struct sk_buff *skb, struct genl_info *info)
{
	return lake_reply(info, LAKE_CMD_STATUS, NLMSG_GOODSIZE,
			  lake_fill_status, NULL);
}

struct lake_decision_reply {
	u32 verdict;
	u32 by;
};

static int lake_fill_decision(struct sk_buff *msg, void *arg)
{
	struct lake_decision_reply *d = arg;

	if (nla_put_u32(msg, LAKE_ATTR_DECISION, d->verdict) ||
	    nla_put_u32(msg, LAKE_ATTR_DECIDED_BY, d->by))
		return -EMSGSIZE;
	return 0;
}

static u32 lake_attr_u32(struct genl_info *info, int attr)
{
	return info->attrs[attr] ? nla_get_u32(info->attrs[attr]) : 0;
}

static int lake_cmd_decide(struct sk_buff *skb, struct genl_info *info)
{
	struct lake_decide_ctx ctx = {};
	struct lake_decision_reply d;
	enum lake_decided_by by;

	if (GENL_REQ_ATTR_CHECK(info, LAKE_ATTR_CTX_BATCH))
		return -EINVAL;
	ctx.batch = lake_attr_u32(info, LAKE_ATTR_CTX_BATCH);
	ctx.model = lake_attr_u32(info, LAKE_ATTR_CTX_MODEL);
	ctx.queue_depth = lake_attr_u32(info, LAKE_ATTR_CTX_QUEUE_DEPTH);
	ctx.queue_delay_us = lake_attr_u32(info, LAKE_ATTR_CTX_QUEUE_DELAY_US);
	d.verdict = lake_decide(&ctx, &by);
	d.by = by;
	return lake_reply(info, LAKE_CMD_DECIDE, NLMSG_GOODSIZE,
			  lake_fill_decision, &d);
}

static const struct genl_small_ops lake_genl_ops[] = {
	{
		.cmd	= LAKE_CMD_HELLO,
		.doit	= lake_cmd_hello,
		.flags	= GENL_ADMIN_PERM,
	},
	{
		.cmd	= LAKE_CMD_BYE,
		.doit	= lake_cmd_bye,
		.flags	= GENL_ADMIN_PERM,
	},
	{
		.cmd	= LAKE_CMD_POLICY_SET,
		.doit	= lake_cmd_policy_set,
		.flags	= GENL_ADMIN_PERM,
	},
	{
		.cmd	= LAKE_CMD_STATUS,
		.doit	= lake_cmd_status,
	},
	{
		.cmd	= LAKE_CMD_DECIDE,
		.doit	= lake_cmd_decide,
		.flags	= GENL_ADMIN_PERM,
	},
	{
		.cmd	= LAKE_CMD_MODEL_PUSH,
		.doit	= lake_cmd_model_push,
		.flags	= GENL_ADMIN_PERM,
	},
	{
		.cmd	= LAKE_CMD_MODEL_DEL,
		.doit	= lake_cmd_model_del,
		.flags	= GENL_ADMIN_PERM,
	},
	{
		.cmd	= LAKE_CMD_INFER,
		.doit	= lake_cmd_infer,
		.flags	= GENL_ADMIN_PERM,
	},
};

static struct genl_family lake_genl_family __ro_after_init = {
	.name		= LAKE_GENL_NAME,
	.version	= LAKE_GENL_VERSION,
	.maxattr	= LAKE_ATTR_MAX,
	.policy		= lake_genl_policy,
	.netnsok	= false,
	.module		= THIS_MODULE,
	.small_ops	= lake_genl_ops,
	.n_small_ops	= ARRAY_SIZE(lake_genl_ops),
};

int lake_control_init(void)
{
	return genl_register_family(&lake_genl_family);
}

void lake_control_exit(void)
{
	genl_unregister_family(&lake_genl_family);
}
