// SPDX-License-Identifier: GPL-2.0
/*
 * lake: the laked instance the module serves.  laked says HELLO from a
 * generic netlink socket; we remember that socket's port and notice when
 * it is released (clean exit, crash or SIGKILL alike).  The policy lives
 * with the daemon: it reads maps only laked keeps fresh, so it is
 * detached when laked goes.
 */
#include <linux/mutex.h>
#include <linux/netlink.h>
#include <linux/notifier.h>
#include <linux/sched.h>
#include <net/net_namespace.h>
#include "internal.h"

struct lake_daemon {
	bool connected;
	u32 portid;
	pid_t pid;
	struct net *net;	/* not a reference: only compared */
};

static struct lake_daemon lake_daemon;
static DEFINE_MUTEX(lake_daemon_lock);

bool lake_daemon_connected(void)
{
	return READ_ONCE(lake_daemon.connected);
}

bool lake_daemon_is_sender(u32 portid)
{
	bool ret;

	mutex_lock(&lake_daemon_lock);
	ret = lake_daemon.connected && lake_daemon.portid == portid &&
	      lake_daemon.net == current->nsproxy->net_ns;
	mutex_unlock(&lake_daemon_lock);
	return ret;
}

pid_t lake_daemon_pid(void)
{
	return READ_ONCE(lake_daemon.connected) ? READ_ONCE(lake_daemon.pid) : 0;
}

int lake_daemon_hello(u32 portid, struct netlink_ext_ack *extack)
{
	int err = 0;

	mutex_lock(&lake_daemon_lock);
	if (lake_daemon.connected && lake_daemon.portid != portid) {
		NL_SET_ERR_MSG(extack, "lake: another laked is connected");
		err = -EBUSY;
		goto out;
	}
	lake_daemon.portid = portid;
	lake_daemon.pid = task_tgid_nr(current);
	lake_daemon.net = current->nsproxy->net_ns;
	WRITE_ONCE(lake_daemon.connected, true);
	pr_info("lake: laked connected (pid %d, port %u)\n",
		lake_daemon.pid, portid);
out:
	mutex_unlock(&lake_daemon_lock);
	return err;
}

/* Caller holds lake_daemon_lock. */
static void lake_daemon_drop(const char *why)
{
	WRITE_ONCE(lake_daemon.connected, false);
	pr_info("lake: laked (pid %d) %s\n", lake_daemon.pid, why);
	lake_daemon.portid = 0;
	lake_daemon.pid = 0;
	lake_daemon.net = NULL;
}

int lake_daemon_bye(u32 portid, struct netlink_ext_ack *extack)
{
	mutex_lock(&lake_daemon_lock);
	if (!lake_daemon.connected || lake_daemon.portid != portid) {
		mutex_unlock(&lake_daemon_lock);
		NL_SET_ERR_MSG(extack, "lake: sender is not the connected laked");
		return -ENOTCONN;
	}
	lake_daemon_drop("said goodbye");
	mutex_unlock(&lake_daemon_lock);
	lake_policy_detach();
	return 0;
}

static int lake_daemon_notify(struct notifier_block *nb, unsigned long event,
			      void *data)
{
	struct netlink_notify *n = data;
	bool gone = false;

	if (event != NETLINK_URELEASE || n->protocol != NETLINK_GENERIC)
		return NOTIFY_DONE;
	mutex_lock(&lake_daemon_lock);
	if (lake_daemon.connected && lake_daemon.portid == n->portid &&
	    lake_daemon.net == n->net) {
		lake_daemon_drop("is gone (socket closed)");
		gone = true;
	}
	mutex_unlock(&lake_daemon_lock);
	if (gone)
		lake_policy_detach();
	return NOTIFY_DONE;
}

static struct notifier_block lake_daemon_nb = {
	.notifier_call = lake_daemon_notify,
};

int lake_daemon_init(void)
{
	return netlink_register_notifier(&lake_daemon_nb);
}

void lake_daemon_exit(void)
{
	netlink_unregister_notifier(&lake_daemon_nb);
	mutex_lock(&lake_daemon_lock);
	if (lake_daemon.connected)
		lake_daemon_drop("left behind: module unloading");
	mutex_unlock(&lake_daemon_lock);
}
