/* SPDX-License-Identifier: GPL-2.0 */
/* lake: declarations shared by lake.ko's objects, not exported. */
#ifndef _LAKE_INTERNAL_H
#define _LAKE_INTERNAL_H

#include <linux/types.h>
#include <linux/netlink.h>
#include <net/genetlink.h>
#include <linux/kobject.h>
#include <linux/refcount.h>
#include <linux/rcupdate.h>
#include "lake.h"

/* knobs.c: /sys/kernel/lake values, declared once in a table */
enum lake_knob_id {
	LAKE_KNOB_ENABLED,
	LAKE_KNOB_GPU_BATCH,
	LAKE_KNOB_TIMEOUT_MS,
	LAKE_KNOB_NR,
};

u32 lake_knob(enum lake_knob_id id);
const char *lake_knob_name(enum lake_knob_id id);
int lake_knob_parse(enum lake_knob_id id, const char *buf, u32 *val);
void lake_knob_set(enum lake_knob_id id, u32 val);

/* stats.c: per-CPU event counters */
enum lake_stat_id {
	LAKE_STAT_CPU,
	LAKE_STAT_GPU,
	LAKE_STAT_POLICY_RUNS,
	LAKE_STAT_ERRORS,
	LAKE_STAT_NO_DAEMON,
	LAKE_STAT_REQUESTS,
	LAKE_STAT_TIMEOUTS,
	LAKE_STAT_SQ_FULL_WAITS,
	LAKE_STAT_NR,
};

void lake_stat_inc(enum lake_stat_id id);
u64 lake_stat_read(enum lake_stat_id id);
const char *lake_stat_name(enum lake_stat_id id);
int lake_stats_init(void);
void lake_stats_exit(void);

/* policy.c: the eBPF decision hook */
int lake_policy_attach(u32 fd, const char *name,
		       struct netlink_ext_ack *extack);
void lake_policy_detach(void);
/* Copies the attached policy's name (or "builtin"); returns its prog id. */
u32 lake_policy_get(char *name, size_t len);
int lake_policy_init(void);
void lake_policy_exit(void);

/* daemon.c: the one laked instance the module talks to */
int lake_daemon_hello(u32 portid, struct netlink_ext_ack *extack);
int lake_daemon_bye(u32 portid, struct netlink_ext_ack *extack);
bool lake_daemon_connected(void);
bool lake_daemon_is_sender(u32 portid);
pid_t lake_daemon_pid(void);
int lake_daemon_init(void);
void lake_daemon_exit(void);

/* control.c: generic netlink family "lake" */
int lake_reply(struct genl_info *info, u8 cmd, size_t size,
	       int (*fill)(struct sk_buff *msg, void *arg), void *arg);
int lake_control_init(void);
/* modelctl.c: its model commands */
int lake_cmd_model_push(struct sk_buff *skb, struct genl_info *info);
int lake_cmd_model_del(struct sk_buff *skb, struct genl_info *info);
int lake_cmd_infer(struct sk_buff *skb, struct genl_info *info);
void lake_control_exit(void);

/* region.c: the shared region of /dev/lake (rings and heap) */
struct lake_region;
extern struct lake_region *lake_rgn;

size_t lake_region_size(void);
void *lake_region_base(void);
/* Heap buffers; offsets are what crosses to laked.  Any context. */
void *lake_heap_alloc(size_t len);
void lake_heap_free(void *p, size_t len);
bool lake_region_contains(const void *p, size_t len);
u64 lake_region_off(const void *p);
/* Rings: caller serialises producers (rpc.c's lock). */
bool lake_sq_push(const struct lake_sqe *sqe);
bool lake_sq_pending(void);
bool lake_sq_full(void);
int lake_cq_pop(struct lake_cqe *cqe);
void lake_region_reset_rings(void);
void lake_region_set_daemon_flags(u32 flags);
/* laked's header word sched_delay_us: 0 unless laked serves the region */
u32 lake_region_sched_delay_us(void);
void lake_region_clear_sched_delay(void);
int lake_region_init(void);
void lake_region_exit(void);

/* rpc.c: requests to laked over the rings */
struct lake_req;
typedef void (*lake_req_done_t)(struct lake_req *req, const struct lake_cqe *cqe);

struct lake_req_args {
	u32 op;
	u32 session;
	u32 flags;
	u64 args[LAKE_SQE_ARGS];
	void *payload;		/* heap buffer owned by the request, or NULL */
	size_t payload_len;
	void *copy_out;		/* calls: payload copied here on success */
	size_t copy_out_off;	/* ... from this offset in the payload */
	size_t copy_out_len;	/* ... this many bytes (0: all of it) */
};

/* Submit and sleep until laked answers or timeout_ms passes. */
int lake_rpc_call(const struct lake_req_args *a, struct lake_cqe *out);
/* Submit without waiting; @done (may be NULL) runs on completion. */
int lake_rpc_submit_async(const struct lake_req_args *a, lake_req_done_t done,
			  void *priv);
void *lake_req_priv(struct lake_req *req);
void lake_rpc_drain(void);
void lake_rpc_server_up(void);
void lake_rpc_server_down(void);
bool lake_rpc_server_present(void);
u32 lake_rpc_inflight(void);
int lake_rpc_init(void);
void lake_rpc_exit(void);

/* dev.c: the /dev/lake character device */
void lake_dev_notify_submission(void);
int lake_dev_init(void);
void lake_dev_exit(void);

/* cuapi.c: sessions and the exported lake_cu* calls */
int lake_cuapi_init(void);
void lake_cuapi_exit(void);

/* sysfs.c: /sys/kernel/lake */
struct kobject *lake_sysfs_kobj(void);
bool lake_sysfs_name_ok(const char *name, size_t max);
int lake_sysfs_init(void);
void lake_sysfs_exit(void);

/* feature.c: the feature registry */
int lake_feature_init(void);
void lake_feature_exit(void);

/* model.c: the model store; mlp.c: the fixed-point CPU path */
enum lake_mstat_id {
	LAKE_MSTAT_CPU_RUNS,
	LAKE_MSTAT_CPU_ITEMS,
	LAKE_MSTAT_CPU_NS,
	LAKE_MSTAT_GPU_RUNS,
	LAKE_MSTAT_GPU_ITEMS,
	LAKE_MSTAT_GPU_NS,
	LAKE_MSTAT_FALLBACKS,
	LAKE_MSTAT_NR,
};

struct lake_wlayer {
	u32 n_in, n_out;
	const s32 *w;		/* [n_out][n_in] */
	const s32 *b;		/* [n_out] */
};

/* Immutable once published; freed after the last reference and RCU. */
struct lake_weights {
	struct rcu_head rcu;
	refcount_t ref;
	u32 version, frac, n_layers;
	u32 n_in, n_out, max_dim;
	struct lake_wlayer layer[LAKE_MODEL_LAYERS_MAX];
	void *blob;		/* struct lake_model_blob + layers, kvmalloc */
	size_t blob_len;
	void *rgn_blob;		/* its copy in the region, or NULL */
};

struct lake_model {
	struct kobject kobj;
	struct list_head node;
	u32 id;
	char name[LAKE_MODEL_NAME_MAX];
	struct lake_weights __rcu *w;
	atomic64_t stat[LAKE_MSTAT_NR];
};

struct lake_weights *lake_weights_get(struct lake_model *m);
void lake_weights_put(struct lake_weights *w);
int lake_model_push(const char *name, void *blob, size_t len, u32 *id,
		    u32 *version);
int lake_model_delete(const char *name);
struct lake_model *lake_model_lookup(const char *name);
int lake_model_init(void);
void lake_model_exit(void);
size_t lake_layer_bytes(u32 n_in, u32 n_out);
int lake_blob_check(const void *blob, size_t len);
int lake_mlp_run(const struct lake_weights *w, const s32 *in, u32 batch,
		 s32 *out, gfp_t gfp);

#endif /* _LAKE_INTERNAL_H */
