/* nsd's varlink client for the native programs (nsd-exec, pam_nsd.so, nsd-ensure).
 *
 * One copy of the Enter exchange: connect with a deadline, check the peer is root,
 * send one call, receive one NUL-terminated reply and the descriptors sent with it
 * (MSG_CMSG_CLOEXEC), parse the reply with json-c, keep exactly the namespace
 * descriptor, join the namespace and verify (device, inode) afterwards.
 *
 * Every function writes a one-line, printable message into `err` on failure.
 * Nothing here prints, logs, forks or keeps a descriptor after returning.
 */
#ifndef NSD_CLIENT_H
#define NSD_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/resource.h>

#define NSD_DEFAULT_SOCKET "/run/nsd/io.nsd.Tenant"
#define NSD_MAX_REPLY (1u << 20)  /* bytes of one reply */
#define NSD_MAX_DEPTH 16          /* JSON nesting of one reply */
#define NSD_MAX_FDS 8             /* descriptors accepted with one reply */
#define NSD_MAX_LIMITS 32
#define NSD_ERR_LEN 1024
#define NSD_NAME_LEN 256

enum nsd_result {
    NSD_OK = 0,
    NSD_UNREACHABLE, /* connect, peer, timeout, I/O, size: nsd could not be asked */
    NSD_REFUSED,     /* a varlink error reply; `error_name` says which */
    NSD_MALFORMED,   /* a reply that does not say what Enter promises */
};

enum nsd_tristate { NSD_DEFAULT = -1, NSD_FALSE = 0, NSD_TRUE = 1 };

struct nsd_limit {
    char name[16];
    int resource;
    rlim_t soft, hard; /* RLIM_INFINITY for JSON null */
};

/* What a successful Enter reply says. */
struct nsd_grant {
    char name[NSD_NAME_LEN];
    int64_t uid;
    bool has_ns_inode;
    uint64_t ns_inode;
    char ns_path[NSD_NAME_LEN];
    size_t ns_index; /* namespaceFileDescriptor */
    unsigned umask;
    size_t nlimits;
    struct nsd_limit limits[NSD_MAX_LIMITS];
    char scope[NSD_NAME_LEN]; /* "" if the caller was not moved */
};

struct nsd_error {
    char name[NSD_NAME_LEN]; /* the varlink error for NSD_REFUSED, else "" */
    char message[NSD_ERR_LEN];
};

/* The raw reply of one call: the JSON text and the descriptors that came with it. */
struct nsd_reply {
    char *text; /* NUL-terminated, malloc'd */
    size_t len;
    int fds[NSD_MAX_FDS];
    size_t nfds;
};

struct json_object;

/* Calls `method` with the object `parameters` (borrowed) on the socket at `path`;
 * the whole exchange ends within `timeout_ms`. On NSD_OK the caller owns `reply`
 * (nsd_reply_free). */
enum nsd_result nsd_call(const char *path, const char *method, struct json_object *parameters,
                         int timeout_ms, struct nsd_reply *reply, struct nsd_error *err);

/* Frees the text and closes every descriptor still in `reply`. */
void nsd_reply_free(struct nsd_reply *reply);

/* The parameters of an Enter call (json_object_put them; NULL when out of memory). */
struct json_object *nsd_enter_parameters(const char *name, enum nsd_tristate create, enum nsd_tristate scope);

/* Parses an Enter reply of `len` bytes that came with `nfds` descriptors. Pure: the
 * fuzz target calls this. A varlink error gives NSD_REFUSED with its name, and a
 * one-line message "nsd refused: NAME {parameters}". */
enum nsd_result nsd_parse_enter(const char *text, size_t len, size_t nfds, struct nsd_grant *grant,
                                struct nsd_error *err);

/* Parses any reply: NSD_OK with the reply's parameters object (json_object *, to put)
 * or the varlink error as for nsd_parse_enter. */
enum nsd_result nsd_parse_reply(const char *text, size_t len, struct json_object **parameters,
                                struct nsd_error *err);

/* Calls Enter and parses the reply; on NSD_OK *ns_fd is the namespace descriptor
 * (close-on-exec, the caller's to close) and every other descriptor is closed. */
enum nsd_result nsd_enter(const char *path, const char *name, enum nsd_tristate create,
                          enum nsd_tristate scope, int timeout_ms, struct nsd_grant *grant,
                          int *ns_fd, struct nsd_error *err);

/* Joins the network namespace behind `fd` (and closes it): refuses the host's
 * namespace (/proc/1/ns/net) and a descriptor that is not `grant`'s namespace inode,
 * and checks (device, inode) of /proc/thread-self/ns/net afterwards. `*inode` is the
 * namespace now in effect. */
int nsd_join_netns(int fd, const struct nsd_grant *grant, uint64_t *inode, struct nsd_error *err);

/* setrlimit's number for a limit name of the wire ("nofile"); -1 if unknown. */
int nsd_rlimit_number(const char *name);

/* snprintf into err->message (never fails; truncates). */
void nsd_errorf(struct nsd_error *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
