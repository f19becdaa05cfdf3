// SPDX-License-Identifier: GPL-2.0
/*
 * lake: run-time knobs.  Every knob is declared once here with its range;
 * sysfs.c turns the table into files and never checks ranges itself.
 */
#include <linux/kernel.h>
#include <linux/kstrtox.h>
#include "internal.h"

struct lake_knob {
	const char *name;
	u32 min;
	u32 max;
	u32 val;
};

static struct lake_knob lake_knobs[LAKE_KNOB_NR] = {
	/* 0: every decision goes to the CPU */
	[LAKE_KNOB_ENABLED]	= { "enabled", 0, 1, 1 },
	/* built-in rule: GPU when laked is up and batch >= this */
	[LAKE_KNOB_GPU_BATCH]	= { "gpu_batch_threshold", 1, 1U << 20, 32 },
	/* how long a kernel caller waits for laked */
	[LAKE_KNOB_TIMEOUT_MS]	= { "timeout_ms", 1, 600000, 2000 },
};

u32 lake_knob(enum lake_knob_id id)
{
	return READ_ONCE(lake_knobs[id].val);
}

const char *lake_knob_name(enum lake_knob_id id)
{
	return lake_knobs[id].name;
}

/* Parses and range-checks; *val is untouched on error. */
int lake_knob_parse(enum lake_knob_id id, const char *buf, u32 *val)
{
	const struct lake_knob *k = &lake_knobs[id];
	u32 v;
	int err;

	err = kstrtou32(buf, 0, &v);
	if (err)
		return -EINVAL;
	if (v < k->min || v > k->max)
		return -EINVAL;
	*val = v;
	return 0;
}

void lake_knob_set(enum lake_knob_id id, u32 val)
{
	WRITE_ONCE(lake_knobs[id].val, val);
}
