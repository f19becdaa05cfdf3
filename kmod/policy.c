// SPDX-License-Identifier: GPL-2.0
/*
 * lake: the eBPF decision hook (the xt_bpf pattern).
 *
 * laked compiles a policy as a socket filter and hands us its fd; we keep
 * our own reference behind an RCU pointer.  Each decision copies the
 * context into a private, pre-allocated skb (cb[] and data) and runs the
 * program; its return value is the verdict.  One skb per CPU and per
 * context level, so a softirq or hard IRQ that interrupts a decision on
 * the same CPU never shares its skb.
 */
#include <linux/bpf.h>
#include <linux/filter.h>
#include <linux/skbuff.h>
#include <linux/slab.h>
#include <linux/rcupdate.h>
#include <linux/mutex.h>
#include <linux/percpu.h>
#include <linux/preempt.h>
#include <net/sch_generic.h>
#include "internal.h"

#define LAKE_CTX_LEVELS	3	/* task, softirq, hard IRQ; NMI uses builtin */

struct lake_policy {
	struct bpf_prog *prog;
	char name[LAKE_POLICY_NAME_MAX];
};

struct lake_policy_skbs {
	struct sk_buff *skb[LAKE_CTX_LEVELS];
};

static struct lake_policy __rcu *lake_policy_cur;
static DEFINE_MUTEX(lake_policy_lock);
static DEFINE_PER_CPU(struct lake_policy_skbs, lake_policy_skbs);

static u32 lake_builtin(const struct lake_decide_ctx *ctx)
{
	if (!(ctx->flags & LAKE_CTX_F_DAEMON))
		return LAKE_DECIDE_CPU;
	if (ctx->batch >= lake_knob(LAKE_KNOB_GPU_BATCH))
		return LAKE_DECIDE_GPU;
	return LAKE_DECIDE_CPU;
}

/* Returns the program's raw verdict, or -ENOENT with no policy attached. */
static s64 lake_policy_run(const struct lake_decide_ctx *ctx)
{
	struct lake_policy *pol;
	struct sk_buff *skb;
	unsigned int level;
	s64 ret = -ENOENT;

	BUILD_BUG_ON(sizeof(*ctx) != QDISC_CB_PRIV_LEN);
	rcu_read_lock();
	pol = rcu_dereference(lake_policy_cur);
	if (!pol)
		goto out;
	preempt_disable();
	level = interrupt_context_level();
	if (level < LAKE_CTX_LEVELS) {
		skb = this_cpu_read(lake_policy_skbs.skb[level]);
		memcpy(qdisc_skb_cb(skb)->data, ctx, sizeof(*ctx));
		memcpy(skb->data, ctx, sizeof(*ctx));
		ret = bpf_prog_run(pol->prog, skb);
		lake_stat_inc(LAKE_STAT_POLICY_RUNS);
	}
	preempt_enable();
out:
	rcu_read_unlock();
	return ret;
}

u32 lake_decide(struct lake_decide_ctx *ctx, enum lake_decided_by *by)
{
	enum lake_decided_by who = LAKE_BY_POLICY;
	u32 verdict;
	s64 ret;

	ctx->flags = lake_daemon_connected() ? LAKE_CTX_F_DAEMON : 0;
	if (!lake_knob(LAKE_KNOB_ENABLED)) {
		who = LAKE_BY_DISABLED;
		verdict = LAKE_DECIDE_CPU;
		goto done;
	}
	ret = lake_policy_run(ctx);
	if (ret == LAKE_DECIDE_CPU || ret == LAKE_DECIDE_GPU) {
		verdict = ret;
	} else {
		/* no policy (-ENOENT) or a verdict we do not know */
		if (ret != -ENOENT)
			lake_stat_inc(LAKE_STAT_ERRORS);
		who = ret == -ENOENT ? LAKE_BY_BUILTIN : LAKE_BY_FALLBACK;
		verdict = lake_builtin(ctx);
	}
	if (verdict == LAKE_DECIDE_GPU && !(ctx->flags & LAKE_CTX_F_DAEMON)) {
		/* a policy may not send work to a GPU nobody serves */
		lake_stat_inc(LAKE_STAT_NO_DAEMON);
		verdict = LAKE_DECIDE_CPU;
	}
done:
	lake_stat_inc(verdict == LAKE_DECIDE_GPU ? LAKE_STAT_GPU : LAKE_STAT_CPU);
	if (by)
		*by = who;
	return verdict;
}
EXPORT_SYMBOL_GPL(lake_decide);

static void lake_policy_replace(struct lake_policy *new)
{
	struct lake_policy *old;

	mutex_lock(&lake_policy_lock);
	old = rcu_replace_pointer(lake_policy_cur, new,
				  lockdep_is_held(&lake_policy_lock));
	mutex_unlock(&lake_policy_lock);
	if (!old)
		return;
	synchronize_rcu();
	pr_info("lake: policy %s (id %u) detached\n", old->name,
		old->prog->aux->id);
	bpf_prog_put(old->prog);
	kfree(old);
}

int lake_policy_attach(u32 fd, const char *name,
		       struct netlink_ext_ack *extack)
{
	struct lake_policy *pol;
	struct bpf_prog *prog;

	pol = kzalloc(sizeof(*pol), GFP_KERNEL);
	if (!pol)
		return -ENOMEM;
	prog = bpf_prog_get_type(fd, BPF_PROG_TYPE_SOCKET_FILTER);
	if (IS_ERR(prog)) {
		NL_SET_ERR_MSG(extack, "lake: fd is not a socket-filter BPF program");
		kfree(pol);
		return PTR_ERR(prog);
	}
	pol->prog = prog;
	strscpy(pol->name, name, sizeof(pol->name));
	lake_policy_replace(pol);
	pr_info("lake: policy %s (id %u) attached\n", pol->name,
		prog->aux->id);
	return 0;
}

void lake_policy_detach(void)
{
	lake_policy_replace(NULL);
}

u32 lake_policy_get(char *name, size_t len)
{
	struct lake_policy *pol;
	u32 id = 0;

	rcu_read_lock();
	pol = rcu_dereference(lake_policy_cur);
	if (pol) {
		strscpy(name, pol->name, len);
		id = pol->prog->aux->id;
	} else {
		strscpy(name, "builtin", len);
	}
	rcu_read_unlock();
	return id;
}

static void lake_policy_free_skbs(void)
{
	struct lake_policy_skbs *s;
	int cpu, i;

	for_each_possible_cpu(cpu) {
		s = per_cpu_ptr(&lake_policy_skbs, cpu);
		for (i = 0; i < LAKE_CTX_LEVELS; i++) {
			kfree_skb(s->skb[i]);
			s->skb[i] = NULL;
		}
	}
}

int lake_policy_init(void)
{
	struct lake_policy_skbs *s;
	struct sk_buff *skb;
	int cpu, i;

	for_each_possible_cpu(cpu) {
		s = per_cpu_ptr(&lake_policy_skbs, cpu);
		for (i = 0; i < LAKE_CTX_LEVELS; i++) {
			skb = alloc_skb(SKB_DATA_ALIGN(sizeof(struct lake_decide_ctx)),
					GFP_KERNEL);
			if (!skb)
				goto fail;
			skb_put_zero(skb, sizeof(struct lake_decide_ctx));
			s->skb[i] = skb;
		}
	}
	return 0;
fail:
	lake_policy_free_skbs();
	return -ENOMEM;
}

void lake_policy_exit(void)
{
	lake_policy_detach();
	lake_policy_free_skbs();
}
