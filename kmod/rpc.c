// SPDX-License-Identifier: GPL-2.0
/*
 * lake: requests from kernel callers to laked.  A request gets an id, is
 * published in a table, pushed on the submission ring and (for calls)
 * waited for with the timeout_ms knob.  laked's CQ_KICK drains the
 * completion ring and completes requests by id.  A caller that gives up
 * leaves its request in the table; whoever drops the last reference frees
 * it and its payload, so a late completion is harmless.  When laked goes,
 * every pending request completes with CUDA_ERROR_SYSTEM_NOT_READY.
 */
#include <linux/completion.h>
#include <linux/refcount.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/wait.h>
#include <linux/xarray.h>
#include "internal.h"

struct lake_req {
	u32 id;
	refcount_t ref;
	struct completion done;
	struct lake_cqe cqe;
	void *payload;
	size_t payload_len;
	lake_req_done_t cb;
	void *priv;
	bool pushed;		/* on the ring: only laked or server_down end it */
};

static DEFINE_XARRAY_ALLOC1(lake_reqs);
static u32 lake_next_id;
static DEFINE_SPINLOCK(lake_sq_lock);	/* producers and server state */
static DEFINE_MUTEX(lake_cq_lock);	/* the one completion consumer */
static DECLARE_WAIT_QUEUE_HEAD(lake_sq_space);
static bool lake_server_up;
static atomic_t lake_inflight = ATOMIC_INIT(0);

void *lake_req_priv(struct lake_req *req)
{
	return req->priv;
}

static void lake_req_put(struct lake_req *req)
{
	if (!refcount_dec_and_test(&req->ref))
		return;
	lake_heap_free(req->payload, req->payload_len);
	atomic_dec(&lake_inflight);
	kfree(req);
}

static struct lake_req *lake_req_new(const struct lake_req_args *a, int refs)
{
	struct lake_req *req;
	int err;

	req = kzalloc(sizeof(*req), GFP_KERNEL);
	if (!req)
		return ERR_PTR(-ENOMEM);
	refcount_set(&req->ref, refs);
	init_completion(&req->done);
	err = xa_alloc_cyclic(&lake_reqs, &req->id, req, xa_limit_32b,
			      &lake_next_id, GFP_KERNEL);
	if (err < 0) {
		kfree(req);
		return ERR_PTR(err);
	}
	/* the request owns the payload from here on */
	req->payload = a->payload;
	req->payload_len = a->payload_len;
	atomic_inc(&lake_inflight);
	return req;
}

static bool lake_sq_has_room(void)
{
	return !READ_ONCE(lake_server_up) || !lake_sq_full();
}

static int lake_rpc_push(struct lake_req *req, const struct lake_req_args *a,
			 long *timeout)
{
	struct lake_sqe sqe = {
		.id = req->id, .op = a->op, .session = a->session,
		.flags = a->flags,
	};
	bool pushed;

	memcpy(sqe.args, a->args, sizeof(sqe.args));
	if (req->payload) {
		sqe.data_off = lake_region_off(req->payload);
		sqe.data_len = req->payload_len;
	}
	for (;;) {
		spin_lock(&lake_sq_lock);
		if (!lake_server_up) {
			spin_unlock(&lake_sq_lock);
			return -ENOTCONN;
		}
		/* marked first: laked may complete it the moment it is pushed */
		WRITE_ONCE(req->pushed, true);
		pushed = lake_sq_push(&sqe);
		if (!pushed)
			WRITE_ONCE(req->pushed, false);
		spin_unlock(&lake_sq_lock);
		if (pushed)
			break;
		/* ring full: back-pressure, never drop */
		lake_stat_inc(LAKE_STAT_SQ_FULL_WAITS);
		lake_dev_notify_submission();
		*timeout = wait_event_killable_timeout(lake_sq_space,
						       lake_sq_has_room(), *timeout);
		if (*timeout == 0)
			return -ETIMEDOUT;
		if (*timeout < 0)
			return *timeout;
	}
	lake_stat_inc(LAKE_STAT_REQUESTS);
	lake_dev_notify_submission();
	return 0;
}

/* Undo lake_req_new() for a request that never reached the ring. */
static void lake_req_unpublish(struct lake_req *req, int refs)
{
	xa_erase(&lake_reqs, req->id);
	while (refs-- > 0)
		lake_req_put(req);
}

int lake_rpc_call(const struct lake_req_args *a, struct lake_cqe *out)
{
	long timeout = msecs_to_jiffies(lake_knob(LAKE_KNOB_TIMEOUT_MS));
	struct lake_req *req;
	long left;
	int err;

	req = lake_req_new(a, 2);	/* the waiter's and the table's */
	if (IS_ERR(req)) {
		lake_heap_free(a->payload, a->payload_len);
		return PTR_ERR(req);
	}
	err = lake_rpc_push(req, a, &timeout);
	if (err) {
		lake_req_unpublish(req, 2);
		return err;
	}
	left = wait_for_completion_killable_timeout(&req->done, timeout);
	if (left > 0) {
		*out = req->cqe;
		if (a->copy_out && !req->cqe.result)
			memcpy(a->copy_out, req->payload + a->copy_out_off,
			       a->copy_out_len ?: req->payload_len);
		err = 0;
	} else {
		err = left ? left : -ETIMEDOUT;
		if (!left)
			lake_stat_inc(LAKE_STAT_TIMEOUTS);
	}
	lake_req_put(req);
	return err;
}

int lake_rpc_submit_async(const struct lake_req_args *a, lake_req_done_t done,
			  void *priv)
{
	long timeout = msecs_to_jiffies(lake_knob(LAKE_KNOB_TIMEOUT_MS));
	struct lake_req *req;
	int err;

	req = lake_req_new(a, 1);	/* the table's only */
	if (IS_ERR(req)) {
		lake_heap_free(a->payload, a->payload_len);
		return PTR_ERR(req);
	}
	req->cb = done;
	req->priv = priv;
	err = lake_rpc_push(req, a, &timeout);
	if (err)
		lake_req_unpublish(req, 1);
	return err;
}

static void lake_req_finish(struct lake_req *req, const struct lake_cqe *cqe)
{
	req->cqe = *cqe;
	req->cqe.id = req->id;
	if (req->cb)
		req->cb(req, &req->cqe);
	complete(&req->done);
	lake_req_put(req);
}

/* laked rang: complete everything on the completion ring. */
void lake_rpc_drain(void)
{
	struct lake_req *req;
	struct lake_cqe cqe;
	int budget = LAKE_CQ_ENTRIES;

	mutex_lock(&lake_cq_lock);
	while (budget-- && lake_cq_pop(&cqe)) {
		if (cqe.id > U32_MAX)
			continue;	/* never ours: laked is confused */
		req = xa_load(&lake_reqs, cqe.id);
		if (!req || !READ_ONCE(req->pushed))
			continue;	/* a stale or forged id */
		xa_erase(&lake_reqs, cqe.id);
		lake_req_finish(req, &cqe);
	}
	mutex_unlock(&lake_cq_lock);
	wake_up_all(&lake_sq_space);
}

void lake_rpc_server_up(void)
{
	spin_lock(&lake_sq_lock);
	lake_region_reset_rings();
	lake_server_up = true;
	spin_unlock(&lake_sq_lock);
}

/* laked is gone: fail everything it had, then let waiters see it. */
void lake_rpc_server_down(void)
{
	struct lake_cqe cqe = { .result = LAKE_CUDA_ERROR_SYSTEM_NOT_READY };
	struct lake_req *req;
	unsigned long id;

	spin_lock(&lake_sq_lock);
	lake_server_up = false;
	spin_unlock(&lake_sq_lock);
	mutex_lock(&lake_cq_lock);
	xa_for_each(&lake_reqs, id, req) {
		/* unpushed ones belong to their submitter, who sees -ENOTCONN */
		if (READ_ONCE(req->pushed) && xa_erase(&lake_reqs, id) == req)
			lake_req_finish(req, &cqe);
	}
	spin_lock(&lake_sq_lock);
	lake_region_reset_rings();
	spin_unlock(&lake_sq_lock);
	mutex_unlock(&lake_cq_lock);
	wake_up_all(&lake_sq_space);
}

bool lake_rpc_server_present(void)
{
	return READ_ONCE(lake_server_up);
}

u32 lake_rpc_inflight(void)
{
	return atomic_read(&lake_inflight);
}

int lake_rpc_init(void)
{
	return 0;
}

void lake_rpc_exit(void)
{
	lake_rpc_server_down();
	xa_destroy(&lake_reqs);
}
