/* SPDX-License-Identifier: GPL-2.0 */
/*
 * threshold: LAKE's rule.  Send a batch to the GPU when it holds at least
 * BATCH_MIN requests and the GPU is less than UTIL_MAX percent busy;
 * otherwise run it on the CPU in the kernel.  Small batches lose on the GPU
 * to the round trip, and a busy GPU adds queueing the CPU does not have.
 *
 * Reads: context batch (cb[1]) and flags (cb[2], daemon connected);
 *        map gpu_util[0]: GPU utilisation in percent, kept by laked.
 * Parameters: -D BATCH_MIN=N (default 32), -D UTIL_MAX=U (default 80).
 */
#include "lake_policy.h"

#ifndef BATCH_MIN
#define BATCH_MIN 32
#endif
#ifndef UTIL_MAX
#define UTIL_MAX 80
#endif

BPF_ARRAY(gpu_util, u32, 1);

int decide(struct __sk_buff *skb)
{
	u32 key = 0;
	u32 *util;

	if (!lake_daemon_up(skb) || lake_batch(skb) < BATCH_MIN)
		return LAKE_DECIDE_CPU;
	util = gpu_util.lookup(&key);
	if (util && *util >= UTIL_MAX)
		return LAKE_DECIDE_CPU;
	return LAKE_DECIDE_GPU;
}
