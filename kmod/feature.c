// SPDX-License-Identifier: GPL-2.0
/*
 * lake: the feature registry.  A kernel subsystem registers a feature set
 * and captures vectors from any context but NMI.  Each CPU has its own
 * ring with one producer (that CPU, interrupts off for the few stores) and
 * one consumer (readers, serialised by a mutex), so capture takes no lock
 * and never waits: a full ring drops the record and counts it.
 *
 * Unregister clears ->live and waits for an RCU grace period, which also
 * waits for every interrupts-off capture already running, before the rings
 * go away.  Sysfs: /sys/kernel/lake/features/NAME/.
 */
#include <linux/kobject.h>
#include <linux/list.h>
#include <linux/log2.h>
#include <linux/mutex.h>
#include <linux/percpu.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/sysfs.h>
#include <linux/timekeeping.h>
#include <linux/vmalloc.h>
#include "internal.h"

#define LAKE_FEATURE_CAP_MAX	(1U << 20)

struct lake_feat_ring {
	u32 head;		/* written by the owning CPU only */
	u32 tail;		/* written by readers only */
	u64 captured;
	u64 dropped;
	u8 *recs;
};

struct lake_feature {
	struct kobject kobj;
	struct list_head node;
	char name[LAKE_FEATURE_NAME_MAX];
	u32 n_fields;
	u32 types[LAKE_FEATURE_FIELDS_MAX];
	char *field_names;	/* "name type\n" lines, for sysfs */
	u32 cap;		/* records per CPU, a power of two */
	u32 rec_size;
	bool live;
	struct mutex read_lock;
	struct lake_feat_ring __percpu *rings;
};

static LIST_HEAD(lake_features);
static DEFINE_MUTEX(lake_features_lock);
static struct kobject *lake_features_kobj;

static const char *const lake_field_type_names[] = {
	[LAKE_FIELD_U64] = "u64", [LAKE_FIELD_S64] = "s64",
	[LAKE_FIELD_U32] = "u32", [LAKE_FIELD_S32] = "s32",
};

/* ---- capture: any context but NMI, no locks ---------------------------- */

static void lake_feat_store(struct lake_feature *f, struct lake_feat_ring *r,
			    u32 head, const u64 *vals)
{
	struct lake_feature_rec *rec;

	rec = (void *)(r->recs + (size_t)(head & (f->cap - 1)) * f->rec_size);
	rec->ts_ns = ktime_get_mono_fast_ns();
	rec->cpu = smp_processor_id();
	rec->n_fields = f->n_fields;
	memcpy(rec->v, vals, f->n_fields * sizeof(u64));
}

bool lake_feature_capture(struct lake_feature *f, const u64 *vals)
{
	struct lake_feat_ring *r;
	unsigned long flags;
	bool ok = false;
	u32 head;

	/* interrupts off: an RCU reader, and alone on this CPU's ring */
	local_irq_save(flags);
	if (!READ_ONCE(f->live))
		goto out;
	r = this_cpu_ptr(f->rings);
	head = r->head;
	if (head - smp_load_acquire(&r->tail) >= f->cap) {
		r->dropped++;
		goto out;
	}
	lake_feat_store(f, r, head, vals);
	smp_store_release(&r->head, head + 1);
	r->captured++;
	ok = true;
out:
	local_irq_restore(flags);
	return ok;
}
EXPORT_SYMBOL_GPL(lake_feature_capture);

/* ---- read side ---------------------------------------------------------- */

static size_t lake_feat_drain_cpu(struct lake_feature *f,
				  struct lake_feat_ring *r, u8 *buf, size_t len)
{
	u32 tail = r->tail, head = smp_load_acquire(&r->head);
	size_t done = 0;

	while (tail != head && done + f->rec_size <= len) {
		memcpy(buf + done,
		       r->recs + (size_t)(tail & (f->cap - 1)) * f->rec_size,
		       f->rec_size);
		done += f->rec_size;
		tail++;
	}
	smp_store_release(&r->tail, tail);
	return done;
}

ssize_t lake_feature_read(struct lake_feature *f, void *buf, size_t len)
{
	size_t done = 0;
	int cpu;

	if (len < f->rec_size)
		return -EINVAL;
	mutex_lock(&f->read_lock);
	for_each_possible_cpu(cpu)
		done += lake_feat_drain_cpu(f, per_cpu_ptr(f->rings, cpu),
					    (u8 *)buf + done, len - done);
	mutex_unlock(&f->read_lock);
	return done;
}
EXPORT_SYMBOL_GPL(lake_feature_read);

u32 lake_feature_record_size(const struct lake_feature *f)
{
	return f->rec_size;
}
EXPORT_SYMBOL_GPL(lake_feature_record_size);

static void lake_feat_counts(struct lake_feature *f, u64 *captured,
			     u64 *dropped)
{
	struct lake_feat_ring *r;
	int cpu;

	*captured = 0;
	*dropped = 0;
	for_each_possible_cpu(cpu) {
		r = per_cpu_ptr(f->rings, cpu);
		*captured += READ_ONCE(r->captured);
		*dropped += READ_ONCE(r->dropped);
	}
}

/* ---- sysfs -------------------------------------------------------------- */

#define to_feat(k) container_of(k, struct lake_feature, kobj)

static ssize_t fields_show(struct kobject *k, struct kobj_attribute *a,
			   char *buf)
{
	return sysfs_emit(buf, "%s", to_feat(k)->field_names);
}

static ssize_t capacity_show(struct kobject *k, struct kobj_attribute *a,
			     char *buf)
{
	return sysfs_emit(buf, "%u\n", to_feat(k)->cap);
}

static ssize_t stats_show(struct kobject *k, struct kobj_attribute *a,
			  char *buf)
{
	u64 captured, dropped;

	lake_feat_counts(to_feat(k), &captured, &dropped);
	return sysfs_emit(buf, "captured %llu\ndropped %llu\n", captured,
			  dropped);
}

static struct kobj_attribute lake_feat_fields = __ATTR_RO(fields);
static struct kobj_attribute lake_feat_capacity = __ATTR_RO(capacity);
static struct kobj_attribute lake_feat_stats = __ATTR_RO(stats);

static struct attribute *lake_feat_attrs[] = {
	&lake_feat_fields.attr, &lake_feat_capacity.attr,
	&lake_feat_stats.attr, NULL,
};

/* Reading drains: each read hands out whole records, 0 when empty. */
static ssize_t records_read(struct file *file, struct kobject *k,
			    struct bin_attribute *a, char *buf, loff_t off,
			    size_t count)
{
	struct lake_feature *f = to_feat(k);

	if (count < f->rec_size)
		return -EINVAL;
	return lake_feature_read(f, buf, count);
}

static BIN_ATTR_ADMIN_RO(records, 0);

static struct bin_attribute *lake_feat_bin_attrs[] = {
	&bin_attr_records, NULL,
};

static const struct attribute_group lake_feat_group = {
	.attrs = lake_feat_attrs,
	.bin_attrs = lake_feat_bin_attrs,
};
__ATTRIBUTE_GROUPS(lake_feat);

static void lake_feat_release(struct kobject *k)
{
	struct lake_feature *f = to_feat(k);
	int cpu;

	if (f->rings) {
		for_each_possible_cpu(cpu)
			vfree(per_cpu_ptr(f->rings, cpu)->recs);
		free_percpu(f->rings);
	}
	kfree(f->field_names);
	kfree(f);
}

static const struct kobj_type lake_feat_ktype = {
	.release = lake_feat_release,
	.sysfs_ops = &kobj_sysfs_ops,
	.default_groups = lake_feat_groups,
};

/* ---- register / unregister ---------------------------------------------- */

static int lake_feat_alloc_rings(struct lake_feature *f)
{
	struct lake_feat_ring *r;
	int cpu;

	f->rings = alloc_percpu(struct lake_feat_ring);
	if (!f->rings)
		return -ENOMEM;
	for_each_possible_cpu(cpu) {
		r = per_cpu_ptr(f->rings, cpu);
		r->recs = vzalloc_node(array_size(f->cap, f->rec_size),
				       cpu_to_node(cpu));
		if (!r->recs)
			return -ENOMEM;	/* the kobject release frees the rest */
	}
	return 0;
}

static int lake_feat_describe(struct lake_feature *f,
			      const struct lake_field *fields)
{
	size_t len = 0, room = f->n_fields * (LAKE_FEATURE_NAME_MAX + 8) + 1;
	u32 i;

	f->field_names = kzalloc(room, GFP_KERNEL);
	if (!f->field_names)
		return -ENOMEM;
	for (i = 0; i < f->n_fields; i++) {
		if (fields[i].type >= ARRAY_SIZE(lake_field_type_names) ||
		    !fields[i].name || !fields[i].name[0] ||
		    strlen(fields[i].name) >= LAKE_FEATURE_NAME_MAX)
			return -EINVAL;
		f->types[i] = fields[i].type;
		len += scnprintf(f->field_names + len, room - len, "%s %s\n",
				 fields[i].name,
				 lake_field_type_names[fields[i].type]);
	}
	return 0;
}

static struct lake_feature *lake_feat_find(const char *name)
{
	struct lake_feature *f;

	list_for_each_entry(f, &lake_features, node)
		if (!strcmp(f->name, name))
			return f;
	return NULL;
}

static int lake_feat_publish(struct lake_feature *f)
{
	int err;

	mutex_lock(&lake_features_lock);
	if (!lake_features_kobj) {
		err = -ENODEV;
	} else if (lake_feat_find(f->name)) {
		err = -EEXIST;
	} else {
		err = kobject_add(&f->kobj, lake_features_kobj, "%s", f->name);
		if (!err) {
			WRITE_ONCE(f->live, true);
			list_add_tail(&f->node, &lake_features);
		}
	}
	mutex_unlock(&lake_features_lock);
	return err;
}

static bool lake_feat_args_ok(const char *name, u32 n_fields, u32 capacity)
{
	return lake_sysfs_name_ok(name, LAKE_FEATURE_NAME_MAX) && n_fields >= 1 &&
	       n_fields <= LAKE_FEATURE_FIELDS_MAX && capacity >= 1 &&
	       capacity <= LAKE_FEATURE_CAP_MAX;
}

struct lake_feature *lake_feature_register(const char *name,
					   const struct lake_field *fields,
					   u32 n_fields, u32 capacity)
{
	struct lake_feature *f;
	int err;

	if (!fields || !lake_feat_args_ok(name, n_fields, capacity))
		return ERR_PTR(-EINVAL);
	f = kzalloc(sizeof(*f), GFP_KERNEL);
	if (!f)
		return ERR_PTR(-ENOMEM);
	kobject_init(&f->kobj, &lake_feat_ktype);
	strscpy(f->name, name, sizeof(f->name));
	mutex_init(&f->read_lock);
	f->n_fields = n_fields;
	f->cap = roundup_pow_of_two(capacity);
	f->rec_size = struct_size((struct lake_feature_rec *)NULL, v, n_fields);
	err = lake_feat_describe(f, fields);
	if (!err)
		err = lake_feat_alloc_rings(f);
	if (!err)
		err = lake_feat_publish(f);
	if (err) {
		kobject_put(&f->kobj);
		return ERR_PTR(err);
	}
	pr_info("lake: feature %s registered (%u fields, %u records/cpu)\n",
		f->name, f->n_fields, f->cap);
	return f;
}
EXPORT_SYMBOL_GPL(lake_feature_register);

void lake_feature_unregister(struct lake_feature *f)
{
	if (IS_ERR_OR_NULL(f))
		return;
	mutex_lock(&lake_features_lock);
	list_del(&f->node);
	mutex_unlock(&lake_features_lock);
	WRITE_ONCE(f->live, false);
	/* waits for captures in flight: they run with interrupts off */
	synchronize_rcu();
	kobject_del(&f->kobj);	/* waits for sysfs readers */
	pr_info("lake: feature %s unregistered\n", f->name);
	kobject_put(&f->kobj);
}
EXPORT_SYMBOL_GPL(lake_feature_unregister);

int lake_feature_init(void)
{
	lake_features_kobj = kobject_create_and_add("features", lake_sysfs_kobj());
	return lake_features_kobj ? 0 : -ENOMEM;
}

/* Features outlive nobody: their owners depend on lake.ko's symbols. */
void lake_feature_exit(void)
{
	mutex_lock(&lake_features_lock);
	WARN_ON(!list_empty(&lake_features));
	kobject_put(lake_features_kobj);
	lake_features_kobj = NULL;
	mutex_unlock(&lake_features_lock);
}
