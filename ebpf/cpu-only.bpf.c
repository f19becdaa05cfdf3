/* SPDX-License-Identifier: GPL-2.0 */
/*
 * cpu-only: every batch runs on the CPU in the kernel.  For machines whose
 * GPU belongs to someone else, and as the baseline in benchmarks.
 *
 * Reads: nothing.
 */
#include "lake_policy.h"

int decide(struct __sk_buff *skb)
{
	return LAKE_DECIDE_CPU;
}
