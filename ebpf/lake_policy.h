/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What every lake policy sees.  A policy is a BPF socket filter named
 * decide(); lake.ko copies struct lake_decide_ctx (lakelib/uapi/lake.h)
 * into __sk_buff->cb[0..4] and returns the program's value as the verdict:
 * LAKE_DECIDE_CPU (0) or LAKE_DECIDE_GPU (1).  Anything else is an error:
 * the module counts it and uses its built-in rule.
 */
#ifndef LAKE_POLICY_H
#define LAKE_POLICY_H

#include "uapi/lake.h"

#define lake_model(skb)		((skb)->cb[0])
#define lake_batch(skb)		((skb)->cb[1])
#define lake_flags(skb)		((skb)->cb[2])
#define lake_queue_depth(skb)	((skb)->cb[3])
#define lake_queue_delay_us(skb) ((skb)->cb[4])

#define lake_daemon_up(skb)	(lake_flags(skb) & LAKE_CTX_F_DAEMON)

#endif /* LAKE_POLICY_H */
