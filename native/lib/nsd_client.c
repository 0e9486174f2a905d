/* nsd's varlink client: see nsd_client.h. */
#define _GNU_SOURCE
#include "nsd_client.h"

#include <errno.h>
#include <fcntl.h>
#include <json-c/json.h>
#include <poll.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define CHUNK 65536

void nsd_errorf(struct nsd_error *err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
    if (n < 0)
        snprintf(err->message, sizeof err->message, "(unprintable message)");
}

static void close_quietly(int fd)
{
    if (fd >= 0) {
        int saved = errno;
        (void)close(fd); /* nothing to do about a failed close of a received descriptor */
        errno = saved;
    }
}

void nsd_reply_free(struct nsd_reply *reply)
{
    free(reply->text);
    reply->text = NULL;
    reply->len = 0;
    for (size_t i = 0; i < reply->nfds; i++)
        close_quietly(reply->fds[i]);
    reply->nfds = 0;
}

/* --- time ----------------------------------------------------------------------- */

static int64_t now_ms(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        return 0; /* CLOCK_MONOTONIC cannot fail on Linux; 0 ends the wait at once */
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits for `events` on fd until the deadline: 1 ready, 0 timed out, -1 error. */
static int wait_for(int fd, short events, int64_t deadline)
{
    for (;;) {
        int64_t left = deadline - now_ms();
        if (left <= 0)
            return 0;
        struct pollfd p = {.fd = fd, .events = events};
        int r = poll(&p, 1, left > 60000 ? 60000 : (int)left);
        if (r > 0)
            return 1;
        if (r < 0 && errno != EINTR)
            return -1;
    }
}

/* --- the exchange ------------------------------------------------------------------ */

static enum nsd_result unreachable(struct nsd_error *err, const char *path, const char *what)
{
    nsd_errorf(err, "cannot reach nsd at %s: %s", path, what);
    return NSD_UNREACHABLE;
}

static enum nsd_result timed_out(struct nsd_error *err, const char *path, int timeout_ms)
{
    nsd_errorf(err, "nsd at %s did not answer within %gs", path, timeout_ms / 1000.0);
    return NSD_UNREACHABLE;
}

static enum nsd_result connect_to(int fd, const char *path, int64_t deadline, int timeout_ms,
                                  struct nsd_error *err)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    size_t len = strlen(path);
    if (len == 0 || len >= sizeof addr.sun_path)
        return unreachable(err, path, "socket path too long");
    memcpy(addr.sun_path, path, len + 1);
    for (;;) {
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0)
            break;
        if (errno == EINTR)
            continue;
        if (errno == EINPROGRESS) {
            int r = wait_for(fd, POLLOUT, deadline);
            if (r == 0)
                return timed_out(err, path, timeout_ms);
            int soerr = 0;
            socklen_t sl = sizeof soerr;
            if (r < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0)
                return unreachable(err, path, strerror(errno));
            if (soerr != 0)
                return unreachable(err, path, strerror(soerr));
            break;
        }
        if (errno == EAGAIN) { /* the listener's backlog is full: try again shortly */
            if (now_ms() >= deadline)
                return timed_out(err, path, timeout_ms);
            (void)poll(NULL, 0, 10);
            continue;
        }
        return unreachable(err, path, strerror(errno));
    }
    /* The path is the trust anchor; root as the peer is a cheap second check that we
     * talk to nsd and not to something that took its place. */
    struct ucred cred;
    socklen_t cl = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) != 0)
        return unreachable(err, path, strerror(errno));
    if (cred.uid != 0) {
        nsd_errorf(err, "refusing to trust %s: its peer does not run as root", path);
        return NSD_UNREACHABLE;
    }
    return NSD_OK;
}

static enum nsd_result send_all(int fd, const char *buf, size_t len, const char *path,
                                int64_t deadline, int timeout_ms, struct nsd_error *err)
{
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n > 0) {
            buf += n;
            len -= (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            int r = wait_for(fd, POLLOUT, deadline);
            if (r == 0)
                return timed_out(err, path, timeout_ms);
            if (r < 0)
                return unreachable(err, path, strerror(errno));
            continue;
        }
        return unreachable(err, path, n < 0 ? strerror(errno) : "short write");
    }
    return NSD_OK;
}

/* Takes the descriptors of one message's control data into `reply`; more than
 * NSD_MAX_FDS in all are closed and make the call fail. */
static bool take_fds(struct msghdr *msg, struct nsd_reply *reply)
{
    bool ok = true;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c != NULL; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        const unsigned char *data = CMSG_DATA(c);
        for (size_t i = 0; i < n; i++) {
            int fd;
            memcpy(&fd, data + i * sizeof fd, sizeof fd);
            if (reply->nfds < NSD_MAX_FDS) {
                reply->fds[reply->nfds++] = fd;
            } else {
                close_quietly(fd);
                ok = false;
            }
        }
    }
    return ok;
}

static enum nsd_result receive_reply(int fd, const char *path, int64_t deadline, int timeout_ms,
                                     struct nsd_reply *reply, struct nsd_error *err)
{
    size_t cap = 0;
    union {
        char buf[CMSG_SPACE(NSD_MAX_FDS * sizeof(int))];
        struct cmsghdr align;
    } control;
    for (;;) {
        if (reply->len + CHUNK + 1 > cap) {
            size_t want = reply->len + CHUNK + 1;
            char *bigger = realloc(reply->text, want);
            if (bigger == NULL)
                return unreachable(err, path, "out of memory");
            reply->text = bigger;
            cap = want;
        }
        struct iovec iov = {.iov_base = reply->text + reply->len, .iov_len = CHUNK};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof control.buf;
        ssize_t n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                int r = wait_for(fd, POLLIN, deadline);
                if (r == 0)
                    return timed_out(err, path, timeout_ms);
                if (r < 0)
                    return unreachable(err, path, strerror(errno));
                continue;
            }
            return unreachable(err, path, strerror(errno));
        }
        bool fds_ok = take_fds(&msg, reply);
        if (!fds_ok || (msg.msg_flags & MSG_CTRUNC)) {
            nsd_errorf(err, "nsd at %s sent more file descriptors than expected", path);
            return NSD_UNREACHABLE;
        }
        if (n == 0) {
            nsd_errorf(err, "nsd at %s closed the connection without replying", path);
            return NSD_UNREACHABLE;
        }
        char *start = reply->text + reply->len;
        char *end = memchr(start, '\0', (size_t)n);
        reply->len += end != NULL ? (size_t)(end - start) : (size_t)n;
        if (reply->len > NSD_MAX_REPLY) {
            nsd_errorf(err, "nsd's reply is too large (more than %u bytes)", NSD_MAX_REPLY);
            return NSD_UNREACHABLE;
        }
        if (end != NULL) {
            reply->text[reply->len] = '\0';
            return NSD_OK;
        }
    }
}

enum nsd_result nsd_call(const char *path, const char *method, json_object *parameters,
                         int timeout_ms, struct nsd_reply *reply, struct nsd_error *err)
{
    memset(reply, 0, sizeof *reply);
    err->name[0] = '\0';
    int64_t deadline = now_ms() + timeout_ms;

    json_object *call = json_object_new_object();
    if (call == NULL ||
        json_object_object_add(call, "method", json_object_new_string(method)) != 0 ||
        json_object_object_add(call, "parameters", json_object_get(parameters)) != 0) {
        json_object_put(call);
        nsd_errorf(err, "cannot build the %s call", method);
        return NSD_UNREACHABLE;
    }
    size_t len = 0;
    const char *text = json_object_to_json_string_length(call, JSON_C_TO_STRING_PLAIN, &len);
    enum nsd_result r = NSD_UNREACHABLE;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        r = unreachable(err, path, strerror(errno));
    } else if (text == NULL) {
        nsd_errorf(err, "cannot build the %s call", method);
    } else if ((r = connect_to(fd, path, deadline, timeout_ms, err)) == NSD_OK &&
               (r = send_all(fd, text, len + 1 /* the NUL ends the message */, path, deadline,
                             timeout_ms, err)) == NSD_OK) {
        r = receive_reply(fd, path, deadline, timeout_ms, reply, err);
    }
    json_object_put(call);
    close_quietly(fd);
    if (r != NSD_OK)
        nsd_reply_free(reply);
    return r;
}

/* --- parsing ----------------------------------------------------------------------- */

json_object *nsd_enter_parameters(const char *name, enum nsd_tristate create,
                                  enum nsd_tristate scope)
{
    json_object *p = json_object_new_object();
    if (p == NULL)
        return NULL;
    bool ok = json_object_object_add(p, "name", json_object_new_string(name)) == 0;
    if (ok && create != NSD_DEFAULT)
        ok = json_object_object_add(p, "create", json_object_new_boolean(create == NSD_TRUE)) == 0;
    if (ok && scope != NSD_DEFAULT)
        ok = json_object_object_add(p, "scope", json_object_new_boolean(scope == NSD_TRUE)) == 0;
    if (!ok) {
        json_object_put(p);
        return NULL;
    }
    return p;
}

/* A value for a one-line message: JSON text, control characters escaped. */
static const char *as_json(json_object *o)
{
    const char *s = json_object_to_json_string_ext(
        o, JSON_C_TO_STRING_SPACED | JSON_C_TO_STRING_NOSLASHESCAPE);
    return s != NULL ? s : "?";
}

static enum nsd_result malformed(struct nsd_error *err, const char *what, json_object *value)
{
    if (value != NULL || what[strlen(what) - 1] == ':')
        nsd_errorf(err, "nsd's reply is malformed: %s %s", what, as_json(value));
    else
        nsd_errorf(err, "nsd's reply is malformed: %s", what);
    return NSD_MALFORMED;
}

enum nsd_result nsd_parse_reply(const char *text, size_t len, json_object **parameters,
                                struct nsd_error *err)
{
    *parameters = NULL;
    err->name[0] = '\0';
    if (len > NSD_MAX_REPLY || memchr(text, '\0', len) != NULL)
        return malformed(err, "not one JSON text", NULL);
    json_tokener *tok = json_tokener_new_ex(NSD_MAX_DEPTH);
    if (tok == NULL) {
        nsd_errorf(err, "out of memory");
        return NSD_MALFORMED;
    }
    json_tokener_set_flags(tok, JSON_TOKENER_STRICT);
    json_object *reply = json_tokener_parse_ex(tok, text, (int)len);
    enum json_tokener_error jerr = json_tokener_get_error(tok);
    size_t end = json_tokener_get_parse_end(tok);
    json_tokener_free(tok);
    if (jerr != json_tokener_success || reply == NULL) {
        json_object_put(reply);
        nsd_errorf(err, "nsd's reply is not valid JSON (%s)",
                   jerr == json_tokener_continue ? "incomplete" : json_tokener_error_desc(jerr));
        return NSD_MALFORMED;
    }
    for (; end < len; end++) {
        if (strchr(" \t\r\n", text[end]) == NULL) {
            json_object_put(reply);
            nsd_errorf(err, "nsd's reply is not valid JSON (extra data after the value)");
            return NSD_MALFORMED;
        }
    }
    if (!json_object_is_type(reply, json_type_object)) {
        json_object_put(reply);
        return malformed(err, "not an object", NULL);
    }
    json_object *error = NULL, *params = NULL;
    (void)json_object_object_get_ex(reply, "parameters", &params);
    if (json_object_object_get_ex(reply, "error", &error) && error != NULL) {
        enum nsd_result r = NSD_REFUSED;
        if (!json_object_is_type(error, json_type_string)) {
            r = malformed(err, "error:", error);
        } else {
            const char *quoted = as_json(error);
            size_t ql = strlen(quoted);
            snprintf(err->name, sizeof err->name, "%.*s", ql >= 2 ? (int)(ql - 2) : 0,
                     quoted + 1);
            nsd_errorf(err, "nsd refused: %s %s", err->name, params != NULL ? as_json(params) : "{}");
        }
        json_object_put(reply);
        return r;
    }
    if (!json_object_is_type(params, json_type_object)) {
        json_object_put(reply);
        return malformed(err, "no parameters", NULL);
    }
    *parameters = json_object_get(params);
    json_object_put(reply);
    return NSD_OK;
}

/* A JSON integer within [low, high); JSON true/false and floats are not integers. */
static bool get_int(json_object *o, int64_t low, int64_t high, int64_t *out)
{
    if (!json_object_is_type(o, json_type_int))
        return false;
    errno = 0;
    int64_t v = json_object_get_int64(o);
    /* get_int64 saturates values above INT64_MAX: compare with the unsigned reading */
    if (v < 0 ? v < low : (uint64_t)v != json_object_get_uint64(o))
        return false;
    if (v < low || v >= high)
        return false;
    *out = v;
    return true;
}

static bool get_string(json_object *o, char *buf, size_t size)
{
    if (!json_object_is_type(o, json_type_string))
        return false;
    size_t len = (size_t)json_object_get_string_len(o);
    const char *s = json_object_get_string(o);
    if (len >= size || strlen(s) != len) /* too long, or an embedded NUL */
        return false;
    memcpy(buf, s, len + 1);
    return true;
}

static json_object *member(json_object *o, const char *key)
{
    json_object *v = NULL;
    return json_object_object_get_ex(o, key, &v) ? v : NULL;
}

static const struct {
    const char *name;
    int number;
} rlimits[] = {
    {"as", RLIMIT_AS},           {"core", RLIMIT_CORE},
    {"cpu", RLIMIT_CPU},         {"data", RLIMIT_DATA},
    {"fsize", RLIMIT_FSIZE},     {"locks", RLIMIT_LOCKS},
    {"memlock", RLIMIT_MEMLOCK}, {"msgqueue", RLIMIT_MSGQUEUE},
    {"nice", RLIMIT_NICE},       {"nofile", RLIMIT_NOFILE},
    {"nproc", RLIMIT_NPROC},     {"rss", RLIMIT_RSS},
    {"rtprio", RLIMIT_RTPRIO},   {"rttime", RLIMIT_RTTIME},
    {"sigpending", RLIMIT_SIGPENDING}, {"stack", RLIMIT_STACK},
};

int nsd_rlimit_number(const char *name)
{
    for (size_t i = 0; i < sizeof rlimits / sizeof rlimits[0]; i++)
        if (strcmp(rlimits[i].name, name) == 0)
            return rlimits[i].number;
    return -1;
}

static enum nsd_result parse_limit(json_object *item, struct nsd_limit *limit,
                                   struct nsd_error *err)
{
    if (!json_object_is_type(item, json_type_object))
        return malformed(err, "resource limit is not an object", NULL);
    json_object *name = member(item, "name");
    bool ok = get_string(name, limit->name, sizeof limit->name) && limit->name[0] != '\0';
    for (const char *c = limit->name; ok && *c; c++)
        ok = *c >= 'a' && *c <= 'z';
    if (!ok)
        return malformed(err, "resource limit name", name);
    /* Unknown limits fail closed: skipping one would run the workload with less
     * restriction than nsd's policy asks for. */
    limit->resource = nsd_rlimit_number(limit->name);
    if (limit->resource < 0) {
        nsd_errorf(err, "nsd asks for resource limit '%s', which this system does not know",
                   limit->name);
        return NSD_MALFORMED;
    }
    json_object *values[2] = {member(item, "soft"), member(item, "hard")};
    rlim_t *out[2] = {&limit->soft, &limit->hard};
    for (int i = 0; i < 2; i++) {
        int64_t v;
        if (values[i] == NULL) {
            *out[i] = RLIM_INFINITY; /* null: unlimited */
        } else if (get_int(values[i], 0, INT64_MAX, &v)) {
            *out[i] = (rlim_t)v;
        } else {
            char what[64];
            snprintf(what, sizeof what, "resource limit %s:", limit->name);
            return malformed(err, what, values[i]);
        }
    }
    if (values[1] != NULL && (values[0] == NULL || limit->soft > limit->hard)) {
        nsd_errorf(err, "nsd's reply is malformed: resource limit %s: soft limit above hard limit",
                   limit->name);
        return NSD_MALFORMED;
    }
    return NSD_OK;
}

static enum nsd_result parse_enter_params(json_object *params, size_t nfds,
                                          struct nsd_grant *g, struct nsd_error *err)
{
    json_object *tenant = member(params, "tenant");
    if (!json_object_is_type(tenant, json_type_object))
        return malformed(err, "no tenant", NULL);
    if (!get_string(member(tenant, "name"), g->name, sizeof g->name))
        return malformed(err, "tenant has no name", NULL);
    int64_t v;
    json_object *o = member(tenant, "uid");
    if (!get_int(o, 0, UINT32_MAX, &v))
        return malformed(err, "tenant.uid:", o);
    g->uid = v;
    o = member(tenant, "namespaceInode");
    g->has_ns_inode = o != NULL;
    if (o != NULL) {
        if (!get_int(o, 0, INT64_MAX, &v))
            return malformed(err, "tenant.namespaceInode:", o);
        g->ns_inode = (uint64_t)v;
    }
    o = member(tenant, "namespacePath");
    if (o != NULL && !get_string(o, g->ns_path, sizeof g->ns_path))
        return malformed(err, "tenant.namespacePath:", o);
    o = member(params, "namespaceFileDescriptor");
    if (!get_int(o, 0, INT64_MAX, &v))
        return malformed(err, "namespaceFileDescriptor:", o);
    if ((uint64_t)v >= nfds) {
        nsd_errorf(err, "nsd's reply is malformed: namespaceFileDescriptor %lld but %zu descriptor(s)",
                   (long long)v, nfds);
        return NSD_MALFORMED;
    }
    g->ns_index = (size_t)v;
    o = member(params, "umask");
    if (!get_int(o, 0, 01000, &v))
        return malformed(err, "umask:", o);
    g->umask = (unsigned)v;
    json_object *limits = member(params, "resourceLimits");
    if (!json_object_is_type(limits, json_type_array))
        return malformed(err, "resourceLimits is not a list", NULL);
    size_t n = json_object_array_length(limits);
    if (n > NSD_MAX_LIMITS)
        return malformed(err, "too many resource limits", NULL);
    for (size_t i = 0; i < n; i++) {
        enum nsd_result r = parse_limit(json_object_array_get_idx(limits, i), &g->limits[i], err);
        if (r != NSD_OK)
            return r;
    }
    g->nlimits = n;
    o = member(params, "scope");
    if (o != NULL && !get_string(o, g->scope, sizeof g->scope))
        return malformed(err, "scope:", o);
    return NSD_OK;
}

enum nsd_result nsd_parse_enter(const char *text, size_t len, size_t nfds, struct nsd_grant *grant,
                                struct nsd_error *err)
{
    memset(grant, 0, sizeof *grant);
    json_object *params = NULL;
    enum nsd_result r = nsd_parse_reply(text, len, &params, err);
    if (r == NSD_OK)
        r = parse_enter_params(params, nfds, grant, err);
    json_object_put(params);
    return r;
}

enum nsd_result nsd_enter(const char *path, const char *name, enum nsd_tristate create,
                          enum nsd_tristate scope, int timeout_ms, struct nsd_grant *grant,
                          int *ns_fd, struct nsd_error *err)
{
    *ns_fd = -1;
    memset(grant, 0, sizeof *grant);
    json_object *params = nsd_enter_parameters(name, create, scope);
    if (params == NULL) {
        nsd_errorf(err, "out of memory");
        err->name[0] = '\0';
        return NSD_UNREACHABLE;
    }
    struct nsd_reply reply;
    enum nsd_result r = nsd_call(path, "io.nsd.Tenant.Enter", params, timeout_ms, &reply, err);
    json_object_put(params);
    if (r != NSD_OK)
        return r;
    r = nsd_parse_enter(reply.text, reply.len, reply.nfds, grant, err);
    if (r == NSD_OK) {
        /* Exactly one descriptor is kept; nsd_reply_free closes the others. */
        *ns_fd = reply.fds[grant->ns_index];
        reply.fds[grant->ns_index] = -1;
    }
    nsd_reply_free(&reply);
    return r;
}

/* --- the namespace ----------------------------------------------------------------- */

int nsd_join_netns(int fd, const struct nsd_grant *grant, uint64_t *inode, struct nsd_error *err)
{
    struct stat target, host, now;
    int rc = -1;
    if (fstat(fd, &target) != 0) {
        nsd_errorf(err, "cannot inspect the namespace descriptor: %s", strerror(errno));
    } else if (grant->has_ns_inode && target.st_ino != grant->ns_inode) {
        nsd_errorf(err, "nsd sent namespace inode %llu, but tenant '%s' has namespace inode %llu",
                   (unsigned long long)target.st_ino, grant->name,
                   (unsigned long long)grant->ns_inode);
    } else if (stat("/proc/1/ns/net", &host) == 0 && host.st_dev == target.st_dev &&
               host.st_ino == target.st_ino) {
        /* Defence in depth: a tenant must never be handed the host's namespace.
         * (/proc/1 is unreadable in some containers: then there is nothing to compare.) */
        nsd_errorf(err, "nsd sent the host's network namespace for tenant '%s'", grant->name);
    } else if (setns(fd, CLONE_NEWNET) != 0) {
        nsd_errorf(err, "cannot join the network namespace: setns: %s", strerror(errno));
    } else {
        rc = 0;
    }
    close_quietly(fd);
    if (rc != 0)
        return -1;
    if (stat("/proc/thread-self/ns/net", &now) != 0 || now.st_dev != target.st_dev ||
        now.st_ino != target.st_ino) {
        nsd_errorf(err, "still not in tenant '%s''s network namespace after setns", grant->name);
        return -1;
    }
    *inode = (uint64_t)now.st_ino;
    return 0;
}
