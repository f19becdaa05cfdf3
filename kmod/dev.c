// SPDX-License-Identifier: GPL-2.0
/*
 * lake: /dev/lake, the data plane's doorbells.  laked opens it, says
 * LAKE_IOC_SERVE, maps the region, sleeps in poll() until submissions are
 * pending and rings LAKE_IOC_CQ_KICK after posting completions.  When the
 * serving file is released (exit, crash, SIGKILL) every pending request
 * fails at once instead of waiting for its timeout.
 */
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/poll.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>
#include "internal.h"

static struct file *lake_server;	/* the file laked serves through */
static DEFINE_MUTEX(lake_dev_lock);
static DECLARE_WAIT_QUEUE_HEAD(lake_poll_wq);

void lake_dev_notify_submission(void)
{
	if (wq_has_sleeper(&lake_poll_wq))
		wake_up_interruptible_poll(&lake_poll_wq, EPOLLIN | EPOLLRDNORM);
}

static int lake_dev_open(struct inode *inode, struct file *f)
{
	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	return 0;
}

static int lake_dev_release(struct inode *inode, struct file *f)
{
	mutex_lock(&lake_dev_lock);
	if (lake_server == f) {
		lake_server = NULL;
		lake_region_set_daemon_flags(0);
		lake_region_clear_sched_delay();
		lake_rpc_server_down();
		pr_info("lake: laked stopped serving /dev/lake\n");
	}
	mutex_unlock(&lake_dev_lock);
	return 0;
}

static int lake_dev_mmap(struct file *f, struct vm_area_struct *vma)
{
	unsigned long len = vma->vm_end - vma->vm_start;

	if (vma->vm_pgoff || len > lake_region_size())
		return -EINVAL;
	return remap_vmalloc_range(vma, lake_region_base(), 0);
}

static __poll_t lake_dev_poll(struct file *f, struct poll_table_struct *wait)
{
	poll_wait(f, &lake_poll_wq, wait);
	if (READ_ONCE(lake_server) == f && lake_sq_pending())
		return EPOLLIN | EPOLLRDNORM;
	return 0;
}

static int lake_dev_serve(struct file *f)
{
	int err = 0;

	mutex_lock(&lake_dev_lock);
	if (lake_server && lake_server != f) {
		err = -EBUSY;
	} else if (!lake_server) {
		lake_server = f;
		/* a value written before this laked served is not its delay */
		lake_region_clear_sched_delay();
		lake_rpc_server_up();
		pr_info("lake: pid %d serves /dev/lake\n", task_tgid_nr(current));
	}
	mutex_unlock(&lake_dev_lock);
	return err;
}

static long lake_null_rt(void)
{
	struct lake_req_args a = { .op = LAKE_OP_NULL };
	struct lake_cqe cqe;
	int err;

	err = lake_rpc_call(&a, &cqe);
	if (err)
		return err;
	if (cqe.result == LAKE_CUDA_ERROR_SYSTEM_NOT_READY)
		return -ENOTCONN;	/* laked went away while we waited */
	return cqe.result ? -EIO : 0;
}

static long lake_dev_ioctl(struct file *f, unsigned int cmd, unsigned long arg)
{
	struct lake_region_info info = {};

	switch (cmd) {
	case LAKE_IOC_NOP:
		return 0;
	case LAKE_IOC_INFO:
		info.size = lake_region_size();
		info.version = LAKE_REGION_VERSION;
		if (copy_to_user((void __user *)arg, &info, sizeof(info)))
			return -EFAULT;
		return 0;
	case LAKE_IOC_SERVE:
		return lake_dev_serve(f);
	case LAKE_IOC_CQ_KICK:
		if (READ_ONCE(lake_server) != f)
			return -EPERM;
		lake_rpc_drain();
		return 0;
	case LAKE_IOC_NULL_RT:
		return lake_null_rt();
	default:
		return -ENOTTY;
	}
}

static const struct file_operations lake_dev_fops = {
	.owner		= THIS_MODULE,
	.open		= lake_dev_open,
	.release	= lake_dev_release,
	.mmap		= lake_dev_mmap,
	.poll		= lake_dev_poll,
	.unlocked_ioctl	= lake_dev_ioctl,
	.llseek		= noop_llseek,
};

static struct miscdevice lake_miscdev = {
	.minor	= MISC_DYNAMIC_MINOR,
	.name	= "lake",
	.fops	= &lake_dev_fops,
	.mode	= 0600,
};

int lake_dev_init(void)
{
	return misc_register(&lake_miscdev);
}

void lake_dev_exit(void)
{
	misc_deregister(&lake_miscdev);
}
