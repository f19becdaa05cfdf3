/* Rejected by the verifier: a map value used without its NULL check. */
#include "lake_policy.h"

BPF_ARRAY(gpu_util, u32, 1);

int decide(struct __sk_buff *skb)
{
	u32 key = 0;
	u32 *util = gpu_util.lookup(&key);

	return *util > 50;
}
