#define _GNU_SOURCE
#include "vt.h"

#include <errno.h>
#include <stdio.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void save_error(vt_conn *c)
{
	const char *e = iscsi_get_error(c->iscsi);
	if (e != NULL && e[0] != 0) {
		strncpy(c->err, e, sizeof(c->err) - 1);
		c->err[sizeof(c->err) - 1] = 0;
	}
}

vt_conn *vt_new(const char *initiator, const char *target, int lun,
		const char *user, const char *pass, int timeout_s, int wakefd)
{
	vt_conn *c = calloc(1, sizeof(*c));
	if (c == NULL)
		return NULL;
	c->lun = lun;
	c->wakefd = wakefd;
	c->iscsi = iscsi_create_context(initiator);
	if (c->iscsi == NULL || c->wakefd < 0) {
		vt_free(c);
		return NULL;
	}
	iscsi_set_targetname(c->iscsi, target);
	iscsi_set_session_type(c->iscsi, ISCSI_SESSION_NORMAL);
	iscsi_set_header_digest(c->iscsi, ISCSI_HEADER_DIGEST_NONE_CRC32C);
	// We fail over and reconnect ourselves (possibly to another portal);
	// libiscsi's own reconnect would retry the same portal forever.
	iscsi_set_noautoreconnect(c->iscsi, 1);
	iscsi_set_reconnect_max_retries(c->iscsi, 0);
	if (timeout_s > 0) {
		iscsi_set_timeout(c->iscsi, timeout_s);
		iscsi_set_tcp_user_timeout(c->iscsi, timeout_s * 1000);
		iscsi_set_tcp_syncnt(c->iscsi, 3);
	}
	if (user != NULL && user[0] != 0)
		iscsi_set_initiator_username_pwd(c->iscsi, user, pass);
	return c;
}

void vt_free(vt_conn *c)
{
	if (c == NULL)
		return;
	if (c->iscsi != NULL)
		iscsi_destroy_context(c->iscsi);
	free(c);
}

const char *vt_error(vt_conn *c)
{
	if (c->err[0] == 0)
		save_error(c);
	return c->err;
}

static void connect_cb(struct iscsi_context *iscsi, int status, void *data, void *priv)
{
	vt_conn *c = priv;
	(void)iscsi;
	(void)data;
	if (c->connect_done) {
		// Second call: the established connection went down.
		c->dead = 1;
		return;
	}
	c->connect_done = 1;
	c->connect_status = status;
}

static void login_cb(struct iscsi_context *iscsi, int status, void *data, void *priv)
{
	vt_conn *c = priv;
	(void)iscsi;
	(void)data;
	c->login_done = 1;
	c->login_status = status;
	if (status != SCSI_STATUS_GOOD)
		save_error(c);
}

int vt_connect(vt_conn *c, const char *portal)
{
	int r = iscsi_connect_async(c->iscsi, portal, connect_cb, c);
	if (r != 0)
		save_error(c);
	return r;
}

int vt_login(vt_conn *c)
{
	int r = iscsi_login_async(c->iscsi, login_cb, c);
	if (r != 0)
		save_error(c);
	return r;
}

static void push_done(vt_conn *c, vt_req *r)
{
	r->done = 1;
	r->next = NULL;
	if (c->done_tail != NULL)
		c->done_tail->next = r;
	else
		c->done_head = r;
	c->done_tail = r;
}

static void task_cb(struct iscsi_context *iscsi, int status, void *data, void *priv)
{
	(void)iscsi;
	vt_req *r = priv;
	vt_conn *c = r->conn;
	struct scsi_task *t = r->task;
	(void)data;
	r->status = status;
	if (t != NULL) {
		if (status == SCSI_STATUS_CHECK_CONDITION) {
			r->sense_key = t->sense.key;
			r->ascq = t->sense.ascq;
		}
		r->residual_status = t->residual_status;
		r->residual = t->residual;
		if (status == SCSI_STATUS_GOOD && r->op == VT_RC16) {
			struct scsi_readcapacity16 *rc = scsi_datain_unmarshall(t);
			if (rc != NULL) {
				r->rc_lba = rc->returned_lba;
				r->rc_blocklen = rc->block_length;
				r->rc_lbpme = rc->lbpme;
			} else {
				r->rc_bad = 1;
			}
		} else if (status == SCSI_STATUS_GOOD && r->op == VT_RC10) {
			struct scsi_readcapacity10 *rc = scsi_datain_unmarshall(t);
			if (rc != NULL) {
				r->rc_lba = rc->lba;
				r->rc_blocklen = rc->block_size;
			} else {
				r->rc_bad = 1;
			}
		}
		scsi_free_scsi_task(t);
		r->task = NULL;
	}
	// Cancelled, timed out or failed at the transport: the session is
	// no longer trustworthy (libiscsi cancels everything when it drops).
	if (status == SCSI_STATUS_CANCELLED || status == SCSI_STATUS_ERROR ||
	    status == SCSI_STATUS_TIMEOUT) {
		if (!c->dead)
			save_error(c);
		c->dead = 1;
	}
	push_done(c, r);
}

int vt_submit(vt_conn *c, vt_req *r)
{
	struct iscsi_context *is = c->iscsi;
	struct scsi_task *t = NULL;
	struct unmap_list ul;
	uint32_t len = r->nblocks * r->blocksize;

	r->conn = c;
	r->done = 0;
	r->status = -1;
	switch (r->op) {
	case VT_READ16:
		t = iscsi_read16_iov_task(is, c->lun, r->lba, len, r->blocksize,
					  0, 0, 0, 0, 0, task_cb, r, &r->iov, 1);
		break;
	case VT_WRITE16:
		t = iscsi_write16_iov_task(is, c->lun, r->lba, NULL, len, r->blocksize,
					   0, 0, 0, 0, 0, task_cb, r, &r->iov, 1);
		break;
	case VT_SYNC16:
		t = iscsi_synchronizecache16_task(is, c->lun, 0, 0, 0, 0, task_cb, r);
		break;
	case VT_UNMAP:
		ul.lba = r->lba;
		ul.num = r->nblocks;
		t = iscsi_unmap_task(is, c->lun, 0, 0, &ul, 1, task_cb, r);
		break;
	case VT_RC16:
		t = iscsi_readcapacity16_task(is, c->lun, task_cb, r);
		break;
	case VT_RC10:
		t = iscsi_readcapacity10_task(is, c->lun, 0, 0, task_cb, r);
		break;
	case VT_TUR:
		t = iscsi_testunitready_task(is, c->lun, task_cb, r);
		break;
	default:
		return -1;
	}
	if (t == NULL) {
		save_error(c);
		return -1;
	}
	// The callback cannot have run yet: it only runs inside iscsi_service.
	r->task = t;
	return 0;
}

// vt_poll waits up to timeout_ms for the socket (and the wake eventfd when
// wake is set), services libiscsi, and runs its timeout scan about every
// 250 ms. It returns -1 when the connection is gone.
int vt_poll(vt_conn *c, int timeout_ms, int wake)
{
	struct pollfd pfd[2];
	int n, fd = iscsi_get_fd(c->iscsi);
	int64_t now;

	if (fd < 0) {
		c->dead = 1;
		return -1;
	}
	pfd[0].fd = fd;
	pfd[0].events = iscsi_which_events(c->iscsi) | POLLRDHUP;
	pfd[0].revents = 0;
	pfd[1].fd = c->wakefd;
	pfd[1].events = POLLIN;
	pfd[1].revents = 0;
	n = poll(pfd, wake ? 2 : 1, timeout_ms);
	if (n < 0 && errno != EINTR) {
		snprintf(c->err, sizeof(c->err), "poll: %s", strerror(errno));
		c->dead = 1;
		return -1;
	}
	if (n > 0 && (pfd[1].revents & POLLIN)) {
		uint64_t v;
		ssize_t r = read(c->wakefd, &v, sizeof(v));
		(void)r;
	}
	if (pfd[0].revents & (POLLERR | POLLHUP | POLLRDHUP)) {
		int err = 0;
		socklen_t l = sizeof(err);
		if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l) == 0 && err != 0)
			c->sock_errno = err;
	}
	if (pfd[0].revents != 0) {
		// Service POLLIN before giving up on a closed socket: responses
		// that arrived before the FIN are still good.
		int ev = pfd[0].revents & ~POLLRDHUP;
		if (iscsi_service(c->iscsi, ev) < 0) {
			save_error(c);
			c->dead = 1;
			return -1;
		}
		if (pfd[0].revents & (POLLERR | POLLHUP | POLLRDHUP)) {
			if (!c->dead) {
				save_error(c);
				if (c->err[0] == 0)
					snprintf(c->err, sizeof(c->err), "connection closed by target");
			}
			c->dead = 1;
			return -1;
		}
	}
	now = now_ms();
	if (now >= c->next_tick_ms) {
		c->next_tick_ms = now + 250;
		if (iscsi_service(c->iscsi, 0) < 0) {
			save_error(c);
			c->dead = 1;
			return -1;
		}
	}
	return c->dead ? -1 : 0;
}

vt_req *vt_pop(vt_conn *c)
{
	vt_req *r = c->done_head;
	if (r != NULL) {
		c->done_head = r->next;
		if (c->done_head == NULL)
			c->done_tail = NULL;
		r->next = NULL;
	}
	return r;
}

// vt_req_release frees a request and a task whose callback never ran (the
// context was destroyed with it in flight).
void vt_req_release(vt_req *r)
{
	if (r->task != NULL)
		scsi_free_scsi_task(r->task);
	free(r);
}
