/* SPDX-License-Identifier: GPL-2.0 */
/*
 * cost: pick the side with the lower predicted latency for this batch,
 * from the latencies laked measures per model (map costs, indexed by model
 * id, struct lake_model_cost):
 *   CPU: cpu_ns_per_item * batch
 *   GPU: gpu_ns_fixed + gpu_ns_per_item * batch
 * A model with nothing measured yet (valid == 0) uses the threshold rule,
 * so its GPU side gets measured at all.  No daemon: the CPU.
 *
 * Reads: context model (cb[0]), batch (cb[1]), flags (cb[2]); map costs.
 * Parameters: -D BATCH_MIN=N (default 32) for unmeasured models.
 */
#include "lake_policy.h"

#ifndef BATCH_MIN
#define BATCH_MIN 32
#endif

BPF_ARRAY(costs, struct lake_model_cost, LAKE_MODEL_IDS);

int decide(struct __sk_buff *skb)
{
	u32 model = lake_model(skb);
	u64 batch = lake_batch(skb);
	struct lake_model_cost *c;

	if (!lake_daemon_up(skb))
		return LAKE_DECIDE_CPU;
	c = costs.lookup(&model);
	if (!c || !c->valid)
		return batch >= BATCH_MIN ? LAKE_DECIDE_GPU : LAKE_DECIDE_CPU;
	if ((u64)c->gpu_ns_fixed + (u64)c->gpu_ns_per_item * batch <
	    (u64)c->cpu_ns_per_item * batch)
		return LAKE_DECIDE_GPU;
	return LAKE_DECIDE_CPU;
}
