// SPDX-License-Identifier: GPL-2.0
/*
 * lake_vecadd: an example kernel client of lake's cu* API.  Writing N to
 * /sys/kernel/lake_vecadd/run adds two vectors of N u32 on the GPU
 * through laked (PTX loaded at run time, one operand copied from a
 * lake_cuMemAllocHost buffer the GPU reads directly, the other staged from
 * kmalloc memory), checks the sum on the CPU and leaves a one-line verdict
 * in /sys/kernel/lake_vecadd/result.
 */
#include <linux/kobject.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/slab.h>
#include <linux/sysfs.h>
#include "lake.h"

#define VECADD_MAX	(1 << 20)

/* c[i] = a[i] + b[i] (u32) for i < n; sm_50 PTX JITs on every newer GPU. */
static const char vecadd_ptx[] =
	".version 7.0\n.target sm_50\n.address_size 64\n"
	".visible .entry vecadd(.param .u64 pa, .param .u64 pb,\n"
	"	.param .u64 pc, .param .u32 pn)\n{\n"
	"	.reg .pred %p;\n	.reg .b32 %r<9>;\n"
	"	.reg .b64 %rd<11>;\n"
	"	ld.param.u64 %rd1, [pa];\n	ld.param.u64 %rd2, [pb];\n"
	"	ld.param.u64 %rd3, [pc];\n	ld.param.u32 %r1, [pn];\n"
	"	mov.u32 %r2, %ctaid.x;\n	mov.u32 %r3, %ntid.x;\n"
	"	mov.u32 %r4, %tid.x;\n	mad.lo.s32 %r5, %r2, %r3, %r4;\n"
	"	setp.ge.u32 %p, %r5, %r1;\n	@%p bra DONE;\n"
	"	cvta.to.global.u64 %rd4, %rd1;\n	cvta.to.global.u64 %rd5, %rd2;\n"
	"	cvta.to.global.u64 %rd6, %rd3;\n	mul.wide.u32 %rd7, %r5, 4;\n"
	"	add.s64 %rd8, %rd4, %rd7;\n	add.s64 %rd9, %rd5, %rd7;\n"
	"	add.s64 %rd10, %rd6, %rd7;\n"
	"	ld.global.u32 %r6, [%rd8];\n	ld.global.u32 %r7, [%rd9];\n"
	"	add.u32 %r8, %r6, %r7;\n	st.global.u32 [%rd10], %r8;\n"
	"DONE:\n	ret;\n}\n";

struct vecadd {
	struct lake_session *s;
	u32 n;
	u32 *ha;		/* lake_cuMemAllocHost: zero-copy */
	u32 *hc;		/* lake_cuMemAllocHost: zero-copy */
	u32 *kb;		/* kmalloc: staged by lake */
	lake_dptr_t da, db, dc;
	lake_handle_t ctx, mod, fn, stream;
	const char *step;	/* the call that failed */
};

static DEFINE_MUTEX(vecadd_lock);
static char vecadd_result[128] = "not run\n";
static struct kobject *vecadd_kobj;

#define TRY(v, call) do { int __r = (call); (v)->step = #call; \
	if (__r) return __r; } while (0)

static int vecadd_setup(struct vecadd *v)
{
	size_t bytes = v->n * sizeof(u32);
	int dev;

	TRY(v, lake_cuInit(v->s, 0));
	TRY(v, lake_cuDeviceGet(v->s, &dev, 0));
	TRY(v, lake_cuCtxCreate(v->s, &v->ctx, 0, dev));
	TRY(v, lake_cuModuleLoadData(v->s, &v->mod, vecadd_ptx, sizeof(vecadd_ptx)));
	TRY(v, lake_cuModuleGetFunction(v->s, &v->fn, v->mod, "vecadd"));
	TRY(v, lake_cuStreamCreate(v->s, &v->stream, 0));
	TRY(v, lake_cuMemAlloc(v->s, &v->da, bytes));
	TRY(v, lake_cuMemAlloc(v->s, &v->db, bytes));
	TRY(v, lake_cuMemAlloc(v->s, &v->dc, bytes));
	TRY(v, lake_cuMemAllocHost(v->s, (void **)&v->ha, bytes));
	TRY(v, lake_cuMemAllocHost(v->s, (void **)&v->hc, bytes));
	return 0;
}

static int vecadd_compute(struct vecadd *v)
{
	size_t bytes = v->n * sizeof(u32);
	void *params[] = { &v->da, &v->db, &v->dc, &v->n };
	u32 sizes[] = { 8, 8, 8, 4 };
	u32 i;

	for (i = 0; i < v->n; i++) {
		v->ha[i] = i;
		v->kb[i] = 2 * i;
	}
	TRY(v, lake_cuMemcpyHtoDAsync(v->s, v->da, v->ha, bytes, v->stream));
	TRY(v, lake_cuMemcpyHtoD(v->s, v->db, v->kb, bytes));
	TRY(v, lake_cuLaunchKernel(v->s, v->fn, DIV_ROUND_UP(v->n, 256), 1, 1,
				   256, 1, 1, 0, v->stream, params, sizes, 4));
	TRY(v, lake_cuMemcpyDtoHAsync(v->s, v->hc, v->dc, bytes, v->stream));
	TRY(v, lake_cuStreamSynchronize(v->s, v->stream));
	for (i = 0; i < v->n; i++)
		if (v->hc[i] != 3 * i)
			return -1;
	/* and back through a staged (non-region) destination */
	TRY(v, lake_cuMemcpyDtoH(v->s, v->kb, v->dc, bytes));
	for (i = 0; i < v->n; i++)
		if (v->kb[i] != 3 * i)
			return -1;
	return 0;
}

static void vecadd_run(u32 n)
{
	struct vecadd v = { .n = n };
	int res;

	v.kb = kvmalloc_array(n, sizeof(u32), GFP_KERNEL);
	v.s = lake_session_open("vecadd");
	if (!v.kb || IS_ERR(v.s)) {
		snprintf(vecadd_result, sizeof(vecadd_result), "error: out of memory\n");
		goto out;
	}
	res = vecadd_setup(&v);
	if (!res)
		res = vecadd_compute(&v);
	if (!res)
		snprintf(vecadd_result, sizeof(vecadd_result), "pass n=%u\n", n);
	else if (res < 0)
		snprintf(vecadd_result, sizeof(vecadd_result), "fail n=%u: wrong sum\n", n);
	else
		snprintf(vecadd_result, sizeof(vecadd_result), "error %d from %s\n",
			 res, v.step);
	pr_info("lake_vecadd: %s", vecadd_result);
out:
	if (!IS_ERR_OR_NULL(v.s))
		lake_session_close(v.s);	/* frees device and host buffers */
	kvfree(v.kb);
}

static ssize_t run_store(struct kobject *k, struct kobj_attribute *a,
			 const char *buf, size_t count)
{
	u32 n;

	if (kstrtou32(buf, 0, &n) || !n || n > VECADD_MAX)
		return -EINVAL;
	mutex_lock(&vecadd_lock);
	vecadd_run(n);
	mutex_unlock(&vecadd_lock);
	return count;
}

static ssize_t result_show(struct kobject *k, struct kobj_attribute *a,
			   char *buf)
{
	ssize_t len;

	mutex_lock(&vecadd_lock);
	len = sysfs_emit(buf, "%s", vecadd_result);
	mutex_unlock(&vecadd_lock);
	return len;
}

static struct kobj_attribute vecadd_run_attr = __ATTR_WO(run);
static struct kobj_attribute vecadd_result_attr = __ATTR_RO(result);
static struct attribute *vecadd_attrs[] = {
	&vecadd_run_attr.attr, &vecadd_result_attr.attr, NULL,
};
static const struct attribute_group vecadd_group = { .attrs = vecadd_attrs };

static int __init vecadd_init(void)
{
	int err;

	vecadd_kobj = kobject_create_and_add("lake_vecadd", kernel_kobj);
	if (!vecadd_kobj)
		return -ENOMEM;
	err = sysfs_create_group(vecadd_kobj, &vecadd_group);
	if (err)
		kobject_put(vecadd_kobj);
	return err;
}

static void __exit vecadd_exit(void)
{
	sysfs_remove_group(vecadd_kobj, &vecadd_group);
	kobject_put(vecadd_kobj);
}

module_init(vecadd_init);
module_exit(vecadd_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("lake example: vector add on the GPU from the kernel");
