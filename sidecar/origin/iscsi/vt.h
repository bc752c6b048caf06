// Thin C glue between Go and libiscsi's asynchronous interface. One vt_conn
// is one libiscsi context (one session, one TCP connection) driven by one
// Go goroutine: every call on a vt_conn comes from that goroutine, so no
// locking is needed here. Completions are queued on the conn and collected
// by Go after vt_poll, so libiscsi never calls back into Go.
#ifndef VT_H
#define VT_H

#include <stdint.h>
#include <stddef.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

enum vt_op { VT_READ16 = 1, VT_WRITE16, VT_SYNC16, VT_UNMAP, VT_RC16, VT_RC10, VT_TUR };

struct vt_conn;

typedef struct vt_req {
	// Set by Go before vt_submit.
	int op;
	uint64_t lba;
	uint32_t nblocks;
	uint32_t blocksize;
	struct scsi_iovec iov; // data buffer (pinned Go memory)
	uint64_t id;

	// Set on completion.
	int done;
	int status; // SCSI_STATUS_*
	int sense_key;
	int ascq;   // (ASC << 8) | ASCQ as libiscsi reports it
	int residual_status;
	uint64_t residual;
	uint64_t rc_lba;      // READ CAPACITY: last LBA
	uint32_t rc_blocklen; // READ CAPACITY: block length
	int rc_lbpme;         // READ CAPACITY(16): thin provisioned (UNMAP works)
	int rc_bad;           // READ CAPACITY data could not be decoded

	struct scsi_task *task; // owned until the callback frees it
	struct vt_conn *conn;
	struct vt_req *next;
} vt_req;

typedef struct vt_conn {
	struct iscsi_context *iscsi;
	int lun;
	int wakefd; // owned by Go: written to wake vt_poll
	vt_req *done_head, *done_tail;

	// Connect and login progress (callbacks may run twice: keep them here,
	// where they live as long as the context).
	int connect_done, connect_status;
	int login_done, login_status;

	int dead;       // the connection dropped: fail everything in flight
	int sock_errno; // errno of a failed connect / dropped socket, if known
	char err[512];  // libiscsi's last error, copied when it mattered
	int64_t next_tick_ms;
} vt_conn;

vt_conn *vt_new(const char *initiator, const char *target, int lun,
		const char *user, const char *pass, int timeout_s, int wakefd);
void vt_free(vt_conn *c);
int vt_connect(vt_conn *c, const char *portal);
int vt_login(vt_conn *c);
int vt_submit(vt_conn *c, vt_req *r);
int vt_poll(vt_conn *c, int timeout_ms, int wake);
vt_req *vt_pop(vt_conn *c);
void vt_req_release(vt_req *r);
const char *vt_error(vt_conn *c);

#endif
