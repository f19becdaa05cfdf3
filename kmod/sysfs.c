// SPDX-License-Identifier: GPL-2.0
/*
 * lake: /sys/kernel/lake.  Writable knobs come from knobs.c's table (one
 * file each, range-checked there); the rest are read-only status.
 */
#include <linux/kobject.h>
#include <linux/sysfs.h>
#include <linux/slab.h>
#include "internal.h"

struct lake_knob_attr {
	struct kobj_attribute attr;
	enum lake_knob_id id;
};

static struct kobject *lake_kobj;
static struct lake_knob_attr lake_knob_attrs[LAKE_KNOB_NR];

static ssize_t lake_knob_show(struct kobject *kobj, struct kobj_attribute *a,
			      char *buf)
{
	struct lake_knob_attr *k = container_of(a, struct lake_knob_attr, attr);

	return sysfs_emit(buf, "%u\n", lake_knob(k->id));
}

static ssize_t lake_knob_store(struct kobject *kobj, struct kobj_attribute *a,
			       const char *buf, size_t count)
{
	struct lake_knob_attr *k = container_of(a, struct lake_knob_attr, attr);
	u32 val;
	int err;

	err = lake_knob_parse(k->id, buf, &val);
	if (err)
		return err;
	lake_knob_set(k->id, val);
	return count;
}

static ssize_t daemon_show(struct kobject *kobj, struct kobj_attribute *a,
			   char *buf)
{
	pid_t pid = lake_daemon_pid();

	if (!pid)
		return sysfs_emit(buf, "disconnected\n");
	return sysfs_emit(buf, "connected pid=%d\n", pid);
}

static ssize_t policy_show(struct kobject *kobj, struct kobj_attribute *a,
			   char *buf)
{
	char name[LAKE_POLICY_NAME_MAX];
	u32 id = lake_policy_get(name, sizeof(name));

	if (!id)
		return sysfs_emit(buf, "builtin\n");
	return sysfs_emit(buf, "%s id=%u\n", name, id);
}

static ssize_t stats_show(struct kobject *kobj, struct kobj_attribute *a,
			  char *buf)
{
	int len = 0;
	int i;

	for (i = 0; i < LAKE_STAT_NR; i++)
		len += sysfs_emit_at(buf, len, "%s %llu\n", lake_stat_name(i),
				     lake_stat_read(i));
	return len;
}

static ssize_t version_show(struct kobject *kobj, struct kobj_attribute *a,
			    char *buf)
{
	return sysfs_emit(buf, "%u\n", LAKE_ABI_VERSION);
}

static struct kobj_attribute lake_attr_daemon = __ATTR_RO(daemon);
static struct kobj_attribute lake_attr_policy = __ATTR_RO(policy);
static struct kobj_attribute lake_attr_stats = __ATTR_RO(stats);
static struct kobj_attribute lake_attr_version = __ATTR_RO(version);

static struct attribute *lake_attrs[LAKE_KNOB_NR + 5];

static const struct attribute_group lake_group = {
	.attrs = lake_attrs,
};

static void lake_sysfs_build(void)
{
	struct lake_knob_attr *k;
	int i, n = 0;

	for (i = 0; i < LAKE_KNOB_NR; i++) {
		k = &lake_knob_attrs[i];
		k->id = i;
		sysfs_attr_init(&k->attr.attr);
		k->attr.attr.name = lake_knob_name(i);
		k->attr.attr.mode = 0644;
		k->attr.show = lake_knob_show;
		k->attr.store = lake_knob_store;
		lake_attrs[n++] = &k->attr.attr;
	}
	lake_attrs[n++] = &lake_attr_daemon.attr;
	lake_attrs[n++] = &lake_attr_policy.attr;
	lake_attrs[n++] = &lake_attr_stats.attr;
	lake_attrs[n++] = &lake_attr_version.attr;
	lake_attrs[n] = NULL;
}

/* A name that can be a directory under /sys/kernel/lake, shorter than @max. */
bool lake_sysfs_name_ok(const char *name, size_t max)
{
	return name && name[0] && strnlen(name, max) < max && !strchr(name, '/') &&
	       strcmp(name, ".") && strcmp(name, "..");
}

struct kobject *lake_sysfs_kobj(void)
{
	return lake_kobj;
}

int lake_sysfs_init(void)
{
	int err;

	lake_sysfs_build();
	lake_kobj = kobject_create_and_add("lake", kernel_kobj);
	if (!lake_kobj)
		return -ENOMEM;
	err = sysfs_create_group(lake_kobj, &lake_group);
	if (err) {
		kobject_put(lake_kobj);
		lake_kobj = NULL;
	}
	return err;
}

void lake_sysfs_exit(void)
{
	sysfs_remove_group(lake_kobj, &lake_group);
	kobject_put(lake_kobj);
	lake_kobj = NULL;
}
