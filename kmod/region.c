// SPDX-License-Identifier: GPL-2.0
/*
 * lake: the shared region behind /dev/lake.  One vmalloc_user() area that
 * laked maps (and registers with CUDA, so the GPU reads it directly): a
 * header, the submission and completion rings, and a heap for caller
 * buffers and request payloads.  laked can write anything into the
 * mapping, so the kernel keeps its own copy of the indices it owns and
 * never trusts a value it reads back beyond masking it into range.
 */
#include <linux/genalloc.h>
#include <linux/moduleparam.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include "internal.h"

static unsigned int region_mb = 16;
module_param(region_mb, uint, 0444);
MODULE_PARM_DESC(region_mb, "size of the /dev/lake shared region in MiB (2..1024)");

struct lake_region {
	void *base;
	size_t size;
	struct lake_region_hdr *hdr;
	struct lake_ring *sq_ring;
	struct lake_sqe *sqes;
	struct lake_ring *cq_ring;
	struct lake_cqe *cqes;
	struct gen_pool *heap;
	u64 heap_off;		/* ours: laked may scribble on the header */
	u32 sq_head;		/* ours; mirrored into sq_ring->head */
	u32 cq_tail;		/* ours; mirrored into cq_ring->tail */
};

struct lake_region *lake_rgn;

size_t lake_region_size(void)
{
	return lake_rgn->size;
}

void *lake_region_base(void)
{
	return lake_rgn->base;
}

void *lake_heap_alloc(size_t len)
{
	return (void *)gen_pool_alloc(lake_rgn->heap, max_t(size_t, len, 1));
}

void lake_heap_free(void *p, size_t len)
{
	if (p)
		gen_pool_free(lake_rgn->heap, (unsigned long)p,
			      max_t(size_t, len, 1));
}

bool lake_region_contains(const void *p, size_t len)
{
	const char *b = lake_rgn->base + lake_rgn->heap_off;
	const char *e = lake_rgn->base + lake_rgn->size;

	return (const char *)p >= b && len <= e - (const char *)p;
}

u64 lake_region_off(const void *p)
{
	return (const char *)p - (const char *)lake_rgn->base;
}

bool lake_sq_push(const struct lake_sqe *sqe)
{
	struct lake_region *r = lake_rgn;
	u32 n = LAKE_SQ_ENTRIES;
	u32 tail = READ_ONCE(r->sq_ring->tail);

	if (r->sq_head - tail >= n)
		return false;
	r->sqes[r->sq_head & (n - 1)] = *sqe;
	r->sq_head++;
	smp_store_release(&r->sq_ring->head, r->sq_head);
	return true;
}

bool lake_sq_full(void)
{
	return lake_rgn->sq_head - READ_ONCE(lake_rgn->sq_ring->tail) >=
	       LAKE_SQ_ENTRIES;
}

bool lake_sq_pending(void)
{
	return READ_ONCE(lake_rgn->sq_ring->tail) != lake_rgn->sq_head;
}

/* Returns 1 with *cqe filled, 0 if the ring is empty. */
int lake_cq_pop(struct lake_cqe *cqe)
{
	struct lake_region *r = lake_rgn;
	u32 head = smp_load_acquire(&r->cq_ring->head);

	if (head == r->cq_tail)
		return 0;
	*cqe = r->cqes[r->cq_tail & (LAKE_CQ_ENTRIES - 1)];
	r->cq_tail++;
	smp_store_release(&r->cq_ring->tail, r->cq_tail);
	return 1;
}

/* A new laked starts from empty rings; callers hold the rpc lock. */
void lake_region_reset_rings(void)
{
	struct lake_region *r = lake_rgn;

	r->sq_head = 0;
	r->cq_tail = 0;
	WRITE_ONCE(r->sq_ring->head, 0);
	WRITE_ONCE(r->sq_ring->tail, 0);
	WRITE_ONCE(r->cq_ring->head, 0);
	WRITE_ONCE(r->cq_ring->tail, 0);
}

void lake_region_set_daemon_flags(u32 flags)
{
	WRITE_ONCE(lake_rgn->hdr->daemon_flags, flags);
}

/*
 * The arbiter's queue delay for kernel work, as laked last wrote it; 0 while
 * nobody serves the region, whatever the mapping says.  Any u32 is a valid
 * answer: it only feeds the policy's context.
 */
u32 lake_region_sched_delay_us(void)
{
	struct lake_region *r = READ_ONCE(lake_rgn);

	if (!r || !lake_rpc_server_present())
		return 0;
	return READ_ONCE(r->hdr->sched_delay_us);
}

/* laked starts or stops serving: its delay must not outlive it. */
void lake_region_clear_sched_delay(void)
{
	WRITE_ONCE(lake_rgn->hdr->sched_delay_us, 0);
}

static void lake_region_layout(struct lake_region *r)
{
	struct lake_region_hdr *h = r->base;
	u64 off = LAKE_SQ_RING_OFF;

	h->magic = LAKE_REGION_MAGIC;
	h->version = LAKE_REGION_VERSION;
	h->size = r->size;
	h->sq_ring_off = off;
	h->sq_entries = LAKE_SQ_ENTRIES;
	h->sqe_size = sizeof(struct lake_sqe);
	off += sizeof(struct lake_ring);
	h->sq_off = off;
	off = ALIGN(off + LAKE_SQ_ENTRIES * sizeof(struct lake_sqe), 64);
	h->cq_ring_off = off;
	h->cq_entries = LAKE_CQ_ENTRIES;
	h->cqe_size = sizeof(struct lake_cqe);
	off += sizeof(struct lake_ring);
	h->cq_off = off;
	off = PAGE_ALIGN(off + LAKE_CQ_ENTRIES * sizeof(struct lake_cqe));
	h->heap_off = off;
	h->heap_size = r->size - off;
	r->heap_off = off;
	r->hdr = h;
	r->sq_ring = r->base + h->sq_ring_off;
	r->sqes = r->base + h->sq_off;
	r->cq_ring = r->base + h->cq_ring_off;
	r->cqes = r->base + h->cq_off;
}

int lake_region_init(void)
{
	struct lake_region *r;
	int err = -ENOMEM;

	BUILD_BUG_ON(!is_power_of_2(LAKE_SQ_ENTRIES) || !is_power_of_2(LAKE_CQ_ENTRIES));
	if (region_mb < 2 || region_mb > 1024) {
		pr_err("lake: region_mb=%u is outside 2..1024\n", region_mb);
		return -EINVAL;
	}
	r = kzalloc(sizeof(*r), GFP_KERNEL);
	if (!r)
		return -ENOMEM;
	r->size = (size_t)region_mb << 20;
	r->base = vmalloc_user(r->size);
	if (!r->base)
		goto free_r;
	lake_region_layout(r);
	r->heap = gen_pool_create(ilog2(LAKE_HEAP_ALIGN), -1);
	if (!r->heap)
		goto free_base;
	err = gen_pool_add_virt(r->heap, (unsigned long)r->base + r->heap_off,
				-1, r->size - r->heap_off, -1);
	if (err)
		goto free_pool;
	lake_rgn = r;
	return 0;
free_pool:
	gen_pool_destroy(r->heap);
free_base:
	vfree(r->base);
free_r:
	kfree(r);
	return err;
}

void lake_region_exit(void)
{
	struct lake_region *r = lake_rgn;

	lake_rgn = NULL;
	if (gen_pool_avail(r->heap) != gen_pool_size(r->heap)) {
		/* gen_pool_destroy() would BUG; leaking is the lesser evil */
		pr_err("lake: %zu heap bytes still allocated at unload; leaking the region\n",
		       gen_pool_size(r->heap) - gen_pool_avail(r->heap));
		kfree(r);
		return;
	}
	gen_pool_destroy(r->heap);
	vfree(r->base);
	kfree(r);
}
