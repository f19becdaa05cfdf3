/* SPDX-License-Identifier: GPL-2.0 */
/*
 * contended: send a batch to the GPU only while kernel work gets through
 * laked's arbiter quickly.  GPU when laked is connected, the batch holds at
 * least BATCH_MIN requests and the arbiter's current queue delay for kernel
 * work is at most DELAY_MAX_US; otherwise the CPU in the kernel.  A GPU
 * shared with busy tenants can keep a kernel batch waiting longer than the
 * CPU takes to run it; the delay says so before the batch is sent.
 *
 * Reads: context batch (cb[1]), flags (cb[2], daemon connected) and
 *        queue_delay_us (cb[4]: laked's sched_delay_us, 0 without laked);
 *        no maps.
 * Parameters: -D BATCH_MIN=N (default 32), -D DELAY_MAX_US=D (default 2000).
 */
#include "lake_policy.h"

#ifndef BATCH_MIN
#define BATCH_MIN 32
#endif
#ifndef DELAY_MAX_US
#define DELAY_MAX_US 2000
#endif

int decide(struct __sk_buff *skb)
{
	if (!lake_daemon_up(skb) || lake_batch(skb) < BATCH_MIN)
		return LAKE_DECIDE_CPU;
	if (lake_queue_delay_us(skb) > DELAY_MAX_US)
		return LAKE_DECIDE_CPU;
	return LAKE_DECIDE_GPU;
}
