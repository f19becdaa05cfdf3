/* SPDX-License-Identifier: GPL-2.0 */
/*
 * gpu-only: every batch goes to the GPU while laked is connected (the
 * module sends it to the CPU anyway when nobody serves the GPU).  For
 * measuring the GPU side alone.
 *
 * Reads: context flags (cb[2], daemon connected).
 */
#include "lake_policy.h"

int decide(struct __sk_buff *skb)
{
	return lake_daemon_up(skb) ? LAKE_DECIDE_GPU : LAKE_DECIDE_CPU;
}
