/*
 * Proves the context reaches the policy, through cb[] and through the
 * skb's data alike: GPU only when queue_depth (cb[3]) equals the model id
 * read with bpf_skb_load_bytes from the data copy.
 */
#include "lake_policy.h"

int decide(struct __sk_buff *skb)
{
	struct lake_decide_ctx ctx;

	if (bpf_skb_load_bytes(skb, 0, &ctx, sizeof(ctx)) < 0)
		return 9;
	if (ctx.batch != lake_batch(skb))
		return 9;
	return lake_queue_depth(skb) == ctx.model ? LAKE_DECIDE_GPU : LAKE_DECIDE_CPU;
}
