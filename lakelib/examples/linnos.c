// SPDX-License-Identifier: GPL-2.0
/*
 * lake_linnos: an example kernel client of lake's feature registry and
 * model store, shaped like LinnOS (31 I/O features -> 256 -> 2), and the
 * kernel half of lake's stress tests and benchmarks.  Everything is driven
 * from /sys/kernel/lake_linnos:
 *
 *   capture   "THREADS RECORDS TIMER_US UNREG": THREADS kthreads capture
 *             RECORDS records each into feature "linnos_io" while an hrtimer
 *             captures from hard-IRQ context every TIMER_US; UNREG=1
 *             unregisters the feature while they run.  Field 0 is the
 *             producer (1000 = the timer), field 1 its sequence number.
 *   infer     "THREADS ITERS": kthreads run lake_infer() on model "linnos"
 *             with a fixed input, recording every distinct output.
 *   bench     "ITERS": per-call costs of capture, an empty call, the
 *             policy decision and CPU inference at several batch sizes.
 *   result    what the last command found, one "key value" per line.
 */
#include <linux/delay.h>
#include <linux/hrtimer.h>
#include <linux/kobject.h>
#include <linux/kthread.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/slab.h>
#include <linux/sort.h>
#include <linux/sysfs.h>
#include "lake.h"

#define LN_FIELDS	31
#define LN_OUT		2
#define LN_THREADS_MAX	16
#define LN_DISTINCT	8
#define LN_TIMER_ID	1000

static struct lake_feature __rcu *ln_feat;
static struct lake_model *ln_model;
static DEFINE_MUTEX(ln_lock);
static struct kobject *ln_kobj;
static char *ln_result;		/* PAGE_SIZE */

static struct {
	atomic64_t attempted, ok;
	struct hrtimer timer;
	ktime_t period;
	u64 timer_seq;
	bool stop;
} ln_cap;

static struct {
	atomic64_t runs, errors, fallbacks, gpu;
	spinlock_t lock;
	s32 seen[LN_DISTINCT][LN_OUT];
	int n_seen;
	bool overflow;
} ln_inf;

/* ---- capture ------------------------------------------------------------- */

static const struct lake_field ln_fields[LN_FIELDS] = {
	{ "producer", LAKE_FIELD_U32 }, { "seq", LAKE_FIELD_U64 },
	{ "queue_len", LAKE_FIELD_U32 }, { "latency_us", LAKE_FIELD_S32 },
#define F(n) { "hist" #n, LAKE_FIELD_U32 }
	F(0), F(1), F(2), F(3), F(4), F(5), F(6), F(7), F(8), F(9), F(10),
	F(11), F(12), F(13), F(14), F(15), F(16), F(17), F(18), F(19), F(20),
	F(21), F(22), F(23), F(24), F(25), F(26),
#undef F
};

static void ln_capture_one(u64 producer, u64 seq)
{
	u64 v[LN_FIELDS] = { producer, seq, seq % 64, (u64)(s64)-(s64)(seq % 7) };
	struct lake_feature *f;

	atomic64_inc(&ln_cap.attempted);
	rcu_read_lock();
	f = rcu_dereference(ln_feat);
	if (f && lake_feature_capture(f, v))
		atomic64_inc(&ln_cap.ok);
	rcu_read_unlock();
}

static enum hrtimer_restart ln_timer_fn(struct hrtimer *t)
{
	if (READ_ONCE(ln_cap.stop))
		return HRTIMER_NORESTART;
	ln_capture_one(LN_TIMER_ID, ln_cap.timer_seq++);
	hrtimer_forward_now(t, ln_cap.period);
	return HRTIMER_RESTART;
}

struct ln_worker {
	struct task_struct *task;
	struct completion done;
	u32 id;
	u64 iters;
};

static int ln_capture_thread(void *arg)
{
	struct ln_worker *w = arg;
	u64 i;

	for (i = 0; i < w->iters; i++) {
		ln_capture_one(w->id, i);
		if (!(i & 255))
			cond_resched();
	}
	complete(&w->done);
	return 0;
}

static int ln_register(void)
{
	struct lake_feature *f;

	f = lake_feature_register("linnos_io", ln_fields, LN_FIELDS, 4096);
	if (IS_ERR(f))
		return PTR_ERR(f);
	rcu_assign_pointer(ln_feat, f);
	return 0;
}

static void ln_unregister(void)
{
	struct lake_feature *f = rcu_replace_pointer(ln_feat, NULL, true);

	/* capturers hold rcu_read_lock(): unregister's grace period waits */
	lake_feature_unregister(f);
}

static int ln_run_workers(int (*fn)(void *), u32 n, u64 iters,
			  void (*during)(void))
{
	struct ln_worker *w;
	u32 i, started = 0;
	int err = 0;

	w = kcalloc(n, sizeof(*w), GFP_KERNEL);
	if (!w)
		return -ENOMEM;
	for (i = 0; i < n; i++, started++) {
		init_completion(&w[i].done);
		w[i].id = i;
		w[i].iters = iters;
		w[i].task = kthread_run(fn, &w[i], "lake_ln/%u", i);
		if (IS_ERR(w[i].task)) {
			err = PTR_ERR(w[i].task);
			break;
		}
	}
	if (during)
		during();
	for (i = 0; i < started; i++)
		wait_for_completion(&w[i].done);
	kfree(w);
	return err;
}

static void ln_unregister_midway(void)
{
	msleep(20);
	ln_unregister();
}

static int ln_capture(u32 threads, u64 records, u32 timer_us, bool unreg)
{
	int err;

	atomic64_set(&ln_cap.attempted, 0);
	atomic64_set(&ln_cap.ok, 0);
	ln_cap.timer_seq = 0;
	WRITE_ONCE(ln_cap.stop, false);
	if (!rcu_access_pointer(ln_feat)) {
		err = ln_register();
		if (err)
			return err;
	}
	if (timer_us) {
		ln_cap.period = ns_to_ktime((u64)timer_us * NSEC_PER_USEC);
		hrtimer_start(&ln_cap.timer, ln_cap.period, HRTIMER_MODE_REL_HARD);
	}
	err = ln_run_workers(ln_capture_thread, threads, records,
			     unreg ? ln_unregister_midway : NULL);
	WRITE_ONCE(ln_cap.stop, true);
	hrtimer_cancel(&ln_cap.timer);
	scnprintf(ln_result, PAGE_SIZE, "attempted %lld\nok %lld\ntimer %llu\n",
		  atomic64_read(&ln_cap.attempted), atomic64_read(&ln_cap.ok),
		  ln_cap.timer_seq);
	return err;
}

/* ---- inference ------------------------------------------------------------ */

static void ln_input(s32 *x, u32 batch)
{
	u32 i;

	for (i = 0; i < batch * LN_FIELDS; i++)
		x[i] = ((s32)(i % LN_FIELDS) - 15) * 4096;	/* fixed input */
}

static void ln_note_output(const s32 *out)
{
	int i;

	spin_lock(&ln_inf.lock);
	for (i = 0; i < ln_inf.n_seen; i++)
		if (!memcmp(ln_inf.seen[i], out, sizeof(ln_inf.seen[i])))
			goto out;
	if (ln_inf.n_seen < LN_DISTINCT)
		memcpy(ln_inf.seen[ln_inf.n_seen++], out, sizeof(ln_inf.seen[0]));
	else
		ln_inf.overflow = true;
out:
	spin_unlock(&ln_inf.lock);
}

static int ln_infer_thread(void *arg)
{
	struct ln_worker *w = arg;
	u32 batch = w->id & 1 ? 64 : 4;	/* both sides of the threshold */
	struct lake_infer_result res;
	s32 *x, *y;
	u64 i;

	x = kmalloc_array(batch, LN_FIELDS * sizeof(s32), GFP_KERNEL);
	y = kmalloc_array(batch, LN_OUT * sizeof(s32), GFP_KERNEL);
	for (i = 0; x && y && i < w->iters; i++) {
		ln_input(x, batch);
		if (lake_infer(ln_model, x, batch, LN_FIELDS, y, LN_OUT, 0, &res)) {
			atomic64_inc(&ln_inf.errors);
			continue;
		}
		atomic64_inc(&ln_inf.runs);
		if (res.fallback)
			atomic64_inc(&ln_inf.fallbacks);
		if (res.target == LAKE_DECIDE_GPU)
			atomic64_inc(&ln_inf.gpu);
		ln_note_output(y + (batch - 1) * LN_OUT);	/* the last item */
	}
	kfree(x);
	kfree(y);
	complete(&w->done);
	return 0;
}

static int ln_infer(u32 threads, u64 iters)
{
	int len, i, err;

	atomic64_set(&ln_inf.runs, 0);
	atomic64_set(&ln_inf.errors, 0);
	atomic64_set(&ln_inf.fallbacks, 0);
	atomic64_set(&ln_inf.gpu, 0);
	ln_inf.n_seen = 0;
	ln_inf.overflow = false;
	err = ln_run_workers(ln_infer_thread, threads, iters, NULL);
	len = scnprintf(ln_result, PAGE_SIZE,
			"runs %lld\nerrors %lld\nfallbacks %lld\ngpu %lld\noverflow %d\n",
			atomic64_read(&ln_inf.runs), atomic64_read(&ln_inf.errors),
			atomic64_read(&ln_inf.fallbacks),
			atomic64_read(&ln_inf.gpu), ln_inf.overflow);
	for (i = 0; i < ln_inf.n_seen; i++)
		len += scnprintf(ln_result + len, PAGE_SIZE - len, "seen %d %d\n",
				 ln_inf.seen[i][0], ln_inf.seen[i][1]);
	return err;
}

/* ---- benchmarks: per-call cost, median and p99 of ITERS-call samples ------ */

#define LN_SAMPLES	201

static noinline void ln_empty(struct lake_feature *f, const u64 *v)
{
	barrier();
}

static int ln_cmp_u64(const void *a, const void *b)
{
	u64 x = *(const u64 *)a, y = *(const u64 *)b;

	return x < y ? -1 : x > y;
}

typedef void (*ln_op_t)(void *arg);

/*
 * @op run @iters times per sample, @after (if any) between samples, off
 * the clock; median and p99 in picoseconds per call.
 */
static void ln_measure(ln_op_t op, void *arg, u32 iters, u64 *s,
		       u64 *med, u64 *p99, ln_op_t after)
{
	u64 t0;
	u32 i, j;

	for (i = 0; i < LN_SAMPLES; i++) {
		t0 = ktime_get_ns();
		for (j = 0; j < iters; j++)
			op(arg);
		s[i] = (ktime_get_ns() - t0) * 1000 / iters;
		if (after)
			after(arg);
		cond_resched();
	}
	sort(s, LN_SAMPLES, sizeof(u64), ln_cmp_u64, NULL);
	*med = s[LN_SAMPLES / 2];
	*p99 = s[LN_SAMPLES * 99 / 100];
}

static u64 ln_bench_vals[LN_FIELDS];

static void ln_op_empty(void *arg)
{
	ln_empty(arg, ln_bench_vals);
}

static void ln_op_capture(void *arg)
{
	lake_feature_capture(arg, ln_bench_vals);
}

static void *ln_drain_buf;
#define LN_BENCH_CAP	4096

/* empties the bench feature so every timed capture stores a record */
static void ln_op_drain(void *arg)
{
	while (lake_feature_read(arg, ln_drain_buf,
				 LN_BENCH_CAP * lake_feature_record_size(arg)) > 0)
		;
}

static void ln_op_decide(void *arg)
{
	struct lake_decide_ctx ctx = { .model = 1, .batch = 64 };

	lake_decide(&ctx, NULL);
}

struct ln_infer_arg {
	s32 *x, *y;
	u32 batch;
};

static void ln_op_infer(void *arg)
{
	struct ln_infer_arg *a = arg;

	lake_infer_cpu(ln_model, a->x, a->batch, LN_FIELDS, a->y, LN_OUT,
		       GFP_KERNEL);
}

static int ln_bench_infer(u64 *s, int len)
{
	static const u32 batches[] = { 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024 };
	struct ln_infer_arg a;
	u64 med, p99;
	int i;

	a.x = kvmalloc_array(1024, LN_FIELDS * sizeof(s32), GFP_KERNEL);
	a.y = kvmalloc_array(1024, LN_OUT * sizeof(s32), GFP_KERNEL);
	if (!a.x || !a.y || lake_infer_cpu(ln_model, a.x, 1, LN_FIELDS, a.y,
					   LN_OUT, GFP_KERNEL))
		goto out;	/* no weights pushed: no inference numbers */
	ln_input(a.x, 1024);
	for (i = 0; i < ARRAY_SIZE(batches); i++) {
		a.batch = batches[i];
		ln_measure(ln_op_infer, &a, max(1U, 64 / a.batch), s, &med, &p99,
			   NULL);
		len += scnprintf(ln_result + len, PAGE_SIZE - len,
				 "infer_cpu_b%u %llu %llu\n", a.batch, med, p99);
	}
out:
	kvfree(a.x);
	kvfree(a.y);
	return len;
}

static int ln_bench(u32 iters)
{
	static const struct { const char *name; ln_op_t op, after; } ops[] = {
		{ "empty_call", ln_op_empty, NULL },
		{ "capture", ln_op_capture, ln_op_drain },
		{ "decide", ln_op_decide, NULL },
	};
	struct lake_feature *f;
	u64 *s, med, p99;
	int i, len = 0, err = -ENOMEM;

	f = lake_feature_register("linnos_bench", ln_fields, LN_FIELDS,
				  LN_BENCH_CAP);
	if (IS_ERR(f))
		return PTR_ERR(f);
	s = kmalloc_array(LN_SAMPLES, sizeof(u64), GFP_KERNEL);
	ln_drain_buf = kvmalloc_array(LN_BENCH_CAP,
				      lake_feature_record_size(f), GFP_KERNEL);
	if (!s || !ln_drain_buf)
		goto out;
	iters = min_t(u32, iters, LN_BENCH_CAP);
	for (i = 0; i < ARRAY_SIZE(ops); i++) {
		ln_measure(ops[i].op, f, iters, s, &med, &p99, ops[i].after);
		len += scnprintf(ln_result + len, PAGE_SIZE - len,
				 "%s %llu %llu\n", ops[i].name, med, p99);
	}
	ln_bench_infer(s, len);
	err = 0;
out:
	kvfree(ln_drain_buf);
	ln_drain_buf = NULL;
	kfree(s);
	lake_feature_unregister(f);
	return err;
}

/* ---- sysfs ------------------------------------------------------------------ */

static ssize_t capture_store(struct kobject *k, struct kobj_attribute *a,
			     const char *buf, size_t count)
{
	u32 threads, timer_us, unreg;
	u64 records;
	int err;

	if (sscanf(buf, "%u %llu %u %u", &threads, &records, &timer_us,
		   &unreg) != 4 || !threads || threads > LN_THREADS_MAX ||
	    records > 100000000ULL || unreg > 1)
		return -EINVAL;
	mutex_lock(&ln_lock);
	err = ln_capture(threads, records, timer_us, unreg);
	mutex_unlock(&ln_lock);
	return err ?: count;
}

static ssize_t infer_store(struct kobject *k, struct kobj_attribute *a,
			   const char *buf, size_t count)
{
	u32 threads;
	u64 iters;
	int err;

	if (sscanf(buf, "%u %llu", &threads, &iters) != 2 || !threads ||
	    threads > LN_THREADS_MAX || iters > 10000000ULL)
		return -EINVAL;
	mutex_lock(&ln_lock);
	err = ln_infer(threads, iters);
	mutex_unlock(&ln_lock);
	return err ?: count;
}

static ssize_t bench_store(struct kobject *k, struct kobj_attribute *a,
			   const char *buf, size_t count)
{
	u32 iters;
	int err;

	if (kstrtou32(buf, 10, &iters) || !iters || iters > 1000000)
		return -EINVAL;
	mutex_lock(&ln_lock);
	err = ln_bench(iters);
	mutex_unlock(&ln_lock);
	return err ?: count;
}

static ssize_t result_show(struct kobject *k, struct kobj_attribute *a,
			   char *buf)
{
	ssize_t len;

	mutex_lock(&ln_lock);
	len = sysfs_emit(buf, "%s", ln_result);
	mutex_unlock(&ln_lock);
	return len;
}

static struct kobj_attribute ln_capture_attr = __ATTR_WO(capture);
static struct kobj_attribute ln_infer_attr = __ATTR_WO(infer);
static struct kobj_attribute ln_bench_attr = __ATTR_WO(bench);
static struct kobj_attribute ln_result_attr = __ATTR_RO(result);

static struct attribute *ln_attrs[] = {
	&ln_capture_attr.attr, &ln_infer_attr.attr, &ln_bench_attr.attr,
	&ln_result_attr.attr, NULL,
};

static const struct attribute_group ln_group = { .attrs = ln_attrs };

static int __init ln_init(void)
{
	int err = -ENOMEM;

	spin_lock_init(&ln_inf.lock);
	hrtimer_init(&ln_cap.timer, CLOCK_MONOTONIC, HRTIMER_MODE_REL_HARD);
	ln_cap.timer.function = ln_timer_fn;
	ln_result = kzalloc(PAGE_SIZE, GFP_KERNEL);
	if (!ln_result)
		return -ENOMEM;
	ln_model = lake_model_open("linnos");
	if (IS_ERR(ln_model)) {
		err = PTR_ERR(ln_model);
		goto free_result;
	}
	err = ln_register();
	if (err)
		goto close_model;
	ln_kobj = kobject_create_and_add("lake_linnos", kernel_kobj);
	if (!ln_kobj) {
		err = -ENOMEM;
		goto unregister;
	}
	err = sysfs_create_group(ln_kobj, &ln_group);
	if (err)
		goto put_kobj;
	return 0;
put_kobj:
	kobject_put(ln_kobj);
unregister:
	ln_unregister();
close_model:
	lake_model_close(ln_model);
free_result:
	kfree(ln_result);
	return err;
}

static void __exit ln_exit(void)
{
	sysfs_remove_group(ln_kobj, &ln_group);
	kobject_put(ln_kobj);
	ln_unregister();
	lake_model_close(ln_model);
	kfree(ln_result);
}

module_init(ln_init);
module_exit(ln_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("lake example: LinnOS-shaped features and model, stress and bench");
