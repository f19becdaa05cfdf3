// SPDX-License-Identifier: GPL-2.0
/* lake: per-CPU event counters, summed when read. */
#include <linux/percpu.h>
#include <linux/cpumask.h>
#include "internal.h"

struct lake_stats {
	u64 v[LAKE_STAT_NR];
};

static struct lake_stats __percpu *lake_stats;

static const char * const lake_stat_names[LAKE_STAT_NR] = {
	[LAKE_STAT_CPU]		= "cpu",
	[LAKE_STAT_GPU]		= "gpu",
	[LAKE_STAT_POLICY_RUNS]	= "policy_runs",
	[LAKE_STAT_ERRORS]	= "errors",
	[LAKE_STAT_NO_DAEMON]	= "no_daemon",
	[LAKE_STAT_REQUESTS]	= "requests",
	[LAKE_STAT_TIMEOUTS]	= "timeouts",
	[LAKE_STAT_SQ_FULL_WAITS] = "sq_full_waits",
};

void lake_stat_inc(enum lake_stat_id id)
{
	this_cpu_inc(lake_stats->v[id]);
}

u64 lake_stat_read(enum lake_stat_id id)
{
	u64 sum = 0;
	int cpu;

	for_each_possible_cpu(cpu)
		sum += READ_ONCE(per_cpu_ptr(lake_stats, cpu)->v[id]);
	return sum;
}

const char *lake_stat_name(enum lake_stat_id id)
{
	return lake_stat_names[id];
}

int lake_stats_init(void)
{
	lake_stats = alloc_percpu(struct lake_stats);
	return lake_stats ? 0 : -ENOMEM;
}

void lake_stats_exit(void)
{
	free_percpu(lake_stats);
	lake_stats = NULL;
}
