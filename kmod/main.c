// SPDX-License-Identifier: GPL-2.0
/*
 * lake: machine learning for the kernel, on the CPU or on a GPU served by
 * laked.  This file only wires the objects together: each init has an
 * exit, called in reverse order.
 */
#include <linux/module.h>
#include <net/genetlink.h>
#include "internal.h"

struct lake_part {
	const char *name;
	int (*init)(void);
	void (*exit)(void);
};

static const struct lake_part lake_parts[] = {
	{ "stats",	lake_stats_init,	lake_stats_exit },
	{ "policy",	lake_policy_init,	lake_policy_exit },
	{ "daemon",	lake_daemon_init,	lake_daemon_exit },
	{ "region",	lake_region_init,	lake_region_exit },
	{ "rpc",	lake_rpc_init,		lake_rpc_exit },
	{ "cuapi",	lake_cuapi_init,	lake_cuapi_exit },
	{ "dev",	lake_dev_init,		lake_dev_exit },
	{ "sysfs",	lake_sysfs_init,	lake_sysfs_exit },
	{ "feature",	lake_feature_init,	lake_feature_exit },
	{ "model",	lake_model_init,	lake_model_exit },
	/* last: no request arrives before everything it uses exists */
	{ "control",	lake_control_init,	lake_control_exit },
};

static void lake_unwind(int n)
{
	while (n-- > 0)
		lake_parts[n].exit();
}

static int __init lake_init(void)
{
	int i, err;

	for (i = 0; i < ARRAY_SIZE(lake_parts); i++) {
		err = lake_parts[i].init();
		if (err) {
			pr_err("lake: %s init failed: %d\n",
			       lake_parts[i].name, err);
			lake_unwind(i);
			return err;
		}
	}
	pr_info("lake: loaded (ABI %u)\n", LAKE_ABI_VERSION);
	return 0;
}

static void __exit lake_exit(void)
{
	lake_unwind(ARRAY_SIZE(lake_parts));
	pr_info("lake: unloaded\n");
}

module_init(lake_init);
module_exit(lake_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("lake: kernel ML on CPU or GPU via the laked daemon");
MODULE_AUTHOR("lake developers");
MODULE_ALIAS_GENL_FAMILY(LAKE_GENL_NAME);
