// SPDX-License-Identifier: GPL-2.0
/*
 * lake: the model store.  A model is a name, an id (the index of a cost
 * policy's map) and RCU-published immutable weights, swapped whole by
 * every push from laked: an inference holds a reference on the weights it
 * started with, so a swap never changes answers mid-batch.  The weights
 * are kept in the blob format laked reads (struct lake_model_blob), and a
 * copy of that blob sits in the shared region for the GPU path.
 */
#include <linux/idr.h>
#include <linux/kobject.h>
#include <linux/list.h>
#include <linux/mm.h>
#include <linux/mutex.h>
#include <linux/rcupdate.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/sysfs.h>
#include "internal.h"

static LIST_HEAD(lake_models);
static DEFINE_MUTEX(lake_models_lock);
static DEFINE_IDA(lake_model_ids);
static struct kobject *lake_models_kobj;
static u32 lake_model_versions;

static const char *const lake_mstat_names[LAKE_MSTAT_NR] = {
	[LAKE_MSTAT_CPU_RUNS] = "cpu_runs", [LAKE_MSTAT_CPU_ITEMS] = "cpu_items",
	[LAKE_MSTAT_CPU_NS] = "cpu_ns", [LAKE_MSTAT_GPU_RUNS] = "gpu_runs",
	[LAKE_MSTAT_GPU_ITEMS] = "gpu_items", [LAKE_MSTAT_GPU_NS] = "gpu_ns",
	[LAKE_MSTAT_FALLBACKS] = "fallbacks",
};

/* ---- weights ------------------------------------------------------------ */

static void lake_weights_free_rcu(struct rcu_head *rcu)
{
	struct lake_weights *w = container_of(rcu, struct lake_weights, rcu);

	lake_heap_free(w->rgn_blob, w->blob_len);
	kvfree(w->blob);
	kfree(w);
}

void lake_weights_put(struct lake_weights *w)
{
	if (w && refcount_dec_and_test(&w->ref))
		call_rcu(&w->rcu, lake_weights_free_rcu);
}

struct lake_weights *lake_weights_get(struct lake_model *m)
{
	struct lake_weights *w;

	rcu_read_lock();
	w = rcu_dereference(m->w);
	if (w && !refcount_inc_not_zero(&w->ref))
		w = NULL;
	rcu_read_unlock();
	return w;
}

/* Fills w->layer[] from the blob; the blob was checked by lake_blob_check. */
static void lake_weights_index(struct lake_weights *w)
{
	const struct lake_model_blob *hdr = w->blob;
	const u8 *p = (const u8 *)(hdr + 1);
	const struct lake_layer *l;
	u32 i;

	w->n_layers = hdr->n_layers;
	w->frac = hdr->frac;
	w->max_dim = 0;
	for (i = 0; i < w->n_layers; i++) {
		l = (const void *)p;
		w->layer[i].n_in = l->n_in;
		w->layer[i].n_out = l->n_out;
		w->layer[i].w = (const s32 *)(l + 1);
		w->layer[i].b = w->layer[i].w + (size_t)l->n_in * l->n_out;
		w->max_dim = max3(w->max_dim, l->n_in, l->n_out);
		p += lake_layer_bytes(l->n_in, l->n_out);
	}
	w->n_in = w->layer[0].n_in;
	w->n_out = w->layer[w->n_layers - 1].n_out;
}

/* Takes ownership of @blob (kvmalloc'd, already checked). */
static struct lake_weights *lake_weights_new(void *blob, size_t len)
{
	struct lake_weights *w;

	w = kzalloc(sizeof(*w), GFP_KERNEL);
	if (!w) {
		kvfree(blob);
		return NULL;
	}
	refcount_set(&w->ref, 1);
	w->blob = blob;
	w->blob_len = len;
	lake_weights_index(w);
	/* no room in the region only costs the GPU path: say so, go on */
	w->rgn_blob = lake_heap_alloc(len);
	if (w->rgn_blob)
		memcpy(w->rgn_blob, blob, len);
	return w;
}

/* ---- models ------------------------------------------------------------- */

#define to_model(k) container_of(k, struct lake_model, kobj)

static ssize_t id_show(struct kobject *k, struct kobj_attribute *a, char *buf)
{
	return sysfs_emit(buf, "%u\n", to_model(k)->id);
}

static ssize_t weights_show(struct kobject *k, struct kobj_attribute *a,
			    char *buf)
{
	struct lake_weights *w = lake_weights_get(to_model(k));
	int len, i;

	if (!w)
		return sysfs_emit(buf, "none\n");
	len = sysfs_emit(buf, "version %u frac %u shape %u", w->version,
			 w->frac, w->n_in);
	for (i = 0; i < w->n_layers; i++)
		len += sysfs_emit_at(buf, len, "x%u", w->layer[i].n_out);
	len += sysfs_emit_at(buf, len, " gpu %s\n",
			     w->rgn_blob ? "ready" : "no-region-space");
	lake_weights_put(w);
	return len;
}

static ssize_t stats_show(struct kobject *k, struct kobj_attribute *a,
			  char *buf)
{
	struct lake_model *m = to_model(k);
	int len = 0, i;

	for (i = 0; i < LAKE_MSTAT_NR; i++)
		len += sysfs_emit_at(buf, len, "%s %llu\n", lake_mstat_names[i],
				     (u64)atomic64_read(&m->stat[i]));
	return len;
}

static struct kobj_attribute lake_model_id_attr = __ATTR_RO(id);
static struct kobj_attribute lake_model_weights_attr = __ATTR_RO(weights);
static struct kobj_attribute lake_model_stats_attr = __ATTR_RO(stats);

static struct attribute *lake_model_attrs[] = {
	&lake_model_id_attr.attr, &lake_model_weights_attr.attr,
	&lake_model_stats_attr.attr, NULL,
};
ATTRIBUTE_GROUPS(lake_model);

static void lake_model_release(struct kobject *k)
{
	struct lake_model *m = to_model(k);

	lake_weights_put(rcu_dereference_protected(m->w, true));
	if (m->id)
		ida_free(&lake_model_ids, m->id);
	kfree(m);
}

static const struct kobj_type lake_model_ktype = {
	.release = lake_model_release,
	.sysfs_ops = &kobj_sysfs_ops,
	.default_groups = lake_model_groups,
};

static struct lake_model *lake_model_find(const char *name)
{
	struct lake_model *m;

	list_for_each_entry(m, &lake_models, node)
		if (!strcmp(m->name, name))
			return m;
	return NULL;
}

/* Called with lake_models_lock held. */
static struct lake_model *lake_model_create(const char *name)
{
	struct lake_model *m;
	int id, err;

	if (!lake_models_kobj)
		return ERR_PTR(-ENODEV);
	m = kzalloc(sizeof(*m), GFP_KERNEL);
	if (!m)
		return ERR_PTR(-ENOMEM);
	kobject_init(&m->kobj, &lake_model_ktype);
	strscpy(m->name, name, sizeof(m->name));
	id = ida_alloc_range(&lake_model_ids, 1, LAKE_MODEL_IDS - 1, GFP_KERNEL);
	if (id < 0) {
		err = id == -ENOSPC ? -ENOSPC : id;
		goto fail;
	}
	m->id = id;
	err = kobject_add(&m->kobj, lake_models_kobj, "%s", m->name);
	if (err)
		goto fail;
	list_add_tail(&m->node, &lake_models);
	return m;
fail:
	kobject_put(&m->kobj);
	return ERR_PTR(err);
}

struct lake_model *lake_model_open(const char *name)
{
	struct lake_model *m;

	if (!lake_sysfs_name_ok(name, LAKE_MODEL_NAME_MAX))
		return ERR_PTR(-EINVAL);
	mutex_lock(&lake_models_lock);
	m = lake_model_find(name);
	if (!m)
		m = lake_model_create(name);
	if (!IS_ERR(m))
		kobject_get(&m->kobj);
	mutex_unlock(&lake_models_lock);
	return m;
}
EXPORT_SYMBOL_GPL(lake_model_open);

/* A reference to an existing model, or NULL: never creates one. */
struct lake_model *lake_model_lookup(const char *name)
{
	struct lake_model *m;

	mutex_lock(&lake_models_lock);
	m = lake_model_find(name);
	if (m)
		kobject_get(&m->kobj);
	mutex_unlock(&lake_models_lock);
	return m;
}

void lake_model_close(struct lake_model *m)
{
	if (!IS_ERR_OR_NULL(m))
		kobject_put(&m->kobj);
}
EXPORT_SYMBOL_GPL(lake_model_close);

u32 lake_model_id(const struct lake_model *m)
{
	return m->id;
}
EXPORT_SYMBOL_GPL(lake_model_id);

/* ---- push and delete (netlink, admin) ----------------------------------- */

/* Publishes @blob as @name's weights; returns the model id and version. */
int lake_model_push(const char *name, void *blob, size_t len, u32 *id,
		    u32 *version)
{
	struct lake_weights *w, *old;
	struct lake_model *m;

	if (!lake_sysfs_name_ok(name, LAKE_MODEL_NAME_MAX)) {
		kvfree(blob);
		return -EINVAL;
	}
	w = lake_weights_new(blob, len);
	if (!w)
		return -ENOMEM;
	mutex_lock(&lake_models_lock);
	m = lake_model_find(name);
	if (!m)
		m = lake_model_create(name);
	if (IS_ERR(m)) {
		mutex_unlock(&lake_models_lock);
		lake_weights_put(w);
		return PTR_ERR(m);
	}
	w->version = ++lake_model_versions;
	old = rcu_replace_pointer(m->w, w, lockdep_is_held(&lake_models_lock));
	*id = m->id;
	*version = w->version;
	mutex_unlock(&lake_models_lock);
	lake_weights_put(old);
	pr_info("lake: model %s (id %u) weights version %u, %u layers%s\n",
		name, *id, *version, w->n_layers,
		w->rgn_blob ? "" : ", no region space: CPU only");
	return 0;
}

static void lake_model_unlink(struct lake_model *m)
{
	list_del(&m->node);
	kobject_del(&m->kobj);
	kobject_put(&m->kobj);	/* the store's reference */
}

int lake_model_delete(const char *name)
{
	struct lake_model *m;

	mutex_lock(&lake_models_lock);
	m = lake_model_find(name);
	if (m)
		lake_model_unlink(m);
	mutex_unlock(&lake_models_lock);
	return m ? 0 : -ENOENT;
}

int lake_model_init(void)
{
	lake_models_kobj = kobject_create_and_add("models", lake_sysfs_kobj());
	return lake_models_kobj ? 0 : -ENOMEM;
}

void lake_model_exit(void)
{
	struct lake_model *m, *tmp;

	mutex_lock(&lake_models_lock);
	list_for_each_entry_safe(m, tmp, &lake_models, node)
		lake_model_unlink(m);
	kobject_put(lake_models_kobj);
	lake_models_kobj = NULL;
	mutex_unlock(&lake_models_lock);
	rcu_barrier();	/* weights freed by call_rcu before the code goes */
}
