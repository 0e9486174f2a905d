/* pam_nsd: a PAM session module that puts a tenant's login into its nsd namespace.
 *
 * Runs inside the process that opens the session (sshd's privileged sshd-session,
 * cron's job child, su, runuser): calls io.nsd.Tenant.Enter, receives the tenant's
 * network namespace as a descriptor and joins it with setns(CLONE_NEWNET) before the
 * session's shell or job is forked. No fork, nothing resident, every descriptor it
 * opens is close-on-exec and closed before it returns. docs/logins.md is the manual.
 *
 *   session required pam_nsd.so [socket=PATH] [unreachable=skip|deny]
 *       [nontenant=skip|deny] [uid_min=N] [create=auto|yes|no]
 *       [scope=auto|always|never] [timeout=SECONDS] [debug]
 *
 * Root and every UID below uid_min are never sent to nsd: no setting locks them out.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <syslog.h>
#include <unistd.h>

#define PAM_SM_SESSION
#include <security/pam_modules.h>

#include "../lib/nsd_client.h"

#define PUBLIC __attribute__((visibility("default")))
#define DEFAULT_TIMEOUT_MS 5000 /* logins wait for this at most */
#define DEFAULT_UID_MIN 1000
#define SYSLOG_PATH "/dev/log"

enum action { JOIN, SKIP, DENY };
enum scope_policy { SCOPE_AUTO, SCOPE_ALWAYS, SCOPE_NEVER };

struct options {
    const char *socket;
    enum action unreachable, nontenant;
    unsigned long uid_min;
    enum nsd_tristate create;
    enum scope_policy scope;
    int timeout_ms;
    bool debug;
};

/* --- syslog ---------------------------------------------------------------------------- */

/* One line to syslog as "pam_nsd[PID]", facility authpriv, straight to /dev/log rather
 * than through openlog(): sshd and cron keep their own syslog identity and facility. */
static void log_line(int severity, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void log_line(int severity, const char *fmt, ...)
{
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    for (char *c = msg; *c; c++) /* one line, whatever a user name contains */
        if ((unsigned char)*c < 0x20 || *c == 0x7f)
            *c = '?';
    char line[2200];
    n = snprintf(line, sizeof line, "<%d>pam_nsd[%ld]: %s", LOG_AUTHPRIV | severity,
                 (long)getpid(), msg);
    if (n < 0)
        return;
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return;
    struct sockaddr_un addr = {.sun_family = AF_UNIX, .sun_path = SYSLOG_PATH};
    size_t len = (size_t)n < sizeof line ? (size_t)n : sizeof line - 1;
    /* No syslog socket: nothing better to do inside a login. */
    (void)sendto(fd, line, len, MSG_NOSIGNAL | MSG_DONTWAIT, (struct sockaddr *)&addr,
                 sizeof addr);
    (void)close(fd);
}

/* --- arguments ------------------------------------------------------------------------- */

/* Parses the module's arguments; on error writes why into `why` and returns false. */
static bool parse_args(int argc, const char **argv, struct options *o, char *why, size_t size)
{
    *o = (struct options){.socket = NSD_DEFAULT_SOCKET, .unreachable = SKIP, .nontenant = SKIP,
                          .uid_min = DEFAULT_UID_MIN, .create = NSD_DEFAULT,
                          .scope = SCOPE_AUTO, .timeout_ms = DEFAULT_TIMEOUT_MS};
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        const char *eq = strchr(arg, '=');
        const char *v = eq != NULL ? eq + 1 : NULL;
        size_t klen = eq != NULL ? (size_t)(eq - arg) : strlen(arg);
#define KEY(k) (klen == sizeof(k) - 1 && strncmp(arg, k, klen) == 0 && v != NULL)
        if (strcmp(arg, "debug") == 0) {
            o->debug = true;
        } else if (KEY("socket")) {
            if (v[0] != '/' || strlen(v) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
                snprintf(why, size, "socket='%s': expected an absolute path", v);
                return false;
            }
            o->socket = v;
        } else if (KEY("unreachable") || KEY("nontenant")) {
            enum action *a = arg[0] == 'u' ? &o->unreachable : &o->nontenant;
            if (strcmp(v, "skip") == 0) {
                *a = SKIP;
            } else if (strcmp(v, "deny") == 0) {
                *a = DENY;
            } else {
                snprintf(why, size, "%.*s='%s': expected one of skip, deny", (int)klen, arg, v);
                return false;
            }
        } else if (KEY("create")) {
            if (strcmp(v, "auto") == 0) {
                o->create = NSD_DEFAULT;
            } else if (strcmp(v, "yes") == 0) {
                o->create = NSD_TRUE;
            } else if (strcmp(v, "no") == 0) {
                o->create = NSD_FALSE;
            } else {
                snprintf(why, size, "create='%s': expected one of auto, yes, no", v);
                return false;
            }
        } else if (KEY("scope")) {
            if (strcmp(v, "auto") == 0) {
                o->scope = SCOPE_AUTO;
            } else if (strcmp(v, "always") == 0) {
                o->scope = SCOPE_ALWAYS;
            } else if (strcmp(v, "never") == 0) {
                o->scope = SCOPE_NEVER;
            } else {
                snprintf(why, size, "scope='%s': expected one of auto, always, never", v);
                return false;
            }
        } else if (KEY("timeout")) {
            char *end;
            errno = 0;
            double t = strtod(v, &end);
            if (errno != 0 || end == v || *end != '\0' || !isfinite(t)) {
                snprintf(why, size, "timeout='%s': not a number", v);
                return false;
            }
            if (!(t > 0 && t <= 300)) {
                snprintf(why, size, "timeout='%s': must be between 0 and 300 seconds", v);
                return false;
            }
            o->timeout_ms = (int)(t * 1000) > 0 ? (int)(t * 1000) : 1;
        } else if (KEY("uid_min")) {
            char *end;
            errno = 0;
            unsigned long n = strtoul(v, &end, 10);
            if (v[0] < '0' || v[0] > '9' || *end != '\0' || errno != 0) {
                snprintf(why, size, "uid_min='%s': not a number", v);
                return false;
            }
            o->uid_min = n > 0 ? n : 1; /* root is never sent to nsd */
        } else {
            snprintf(why, size, "unknown argument '%s'", arg);
            return false;
        }
#undef KEY
    }
    return true;
}

/* --- where the process runs --------------------------------------------------------- */

/* The process's cgroup v2 path (or the v1 name=systemd one on hybrid hosts) into buf;
 * false if unknown. The rule of nsd.observe.procscan.parse_cgroup. */
static bool own_cgroup(long pid, char *buf, size_t size)
{
    char path[64];
    if (pid > 0)
        snprintf(path, sizeof path, "/proc/%ld/cgroup", pid);
    else
        snprintf(path, sizeof path, "/proc/self/cgroup");
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return false;
    char line[4096];
    bool found = false;
    while (fgets(line, sizeof line, f) != NULL) {
        size_t len = strcspn(line, "\n");
        if (line[len] != '\n' && !feof(f)) {
            /* A line longer than the buffer (a deep cgroup path): skip the rest of it,
             * so that its tail can never be read as a line of its own ("0::/..."). */
            int ch;
            do
                ch = fgetc(f);
            while (ch != EOF && ch != '\n');
            continue;
        }
        line[len] = '\0';
        char *c1 = strchr(line, ':');
        char *c2 = c1 != NULL ? strchr(c1 + 1, ':') : NULL;
        if (c2 == NULL)
            continue;
        *c1 = *c2 = '\0';
        const char *controllers = c1 + 1, *cgpath = c2 + 1;
        if (strcmp(line, "0") == 0 && controllers[0] == '\0') {
            snprintf(buf, size, "%s", cgpath);
            found = true;
            break;
        }
        if (strcmp(controllers, "name=systemd") == 0) {
            snprintf(buf, size, "%s", cgpath);
            found = true; /* v1: keep looking for the unified line */
        }
    }
    (void)fclose(f);
    return found;
}

static bool ends_with(const char *s, size_t len, const char *suffix)
{
    size_t n = strlen(suffix);
    return len >= n && memcmp(s + len - n, suffix, n) == 0;
}

/* Enter's scope parameter. A logind session is never moved (its scope would empty and
 * logind end the session), nor a user manager. A process in a service whose parent is
 * in the same cgroup was forked by the service's daemon to run this login or job (cron,
 * atd, sshd without pam_systemd): it moves, or the tenant's work would count against
 * that service. Anything else (a service's own main process, PAMName=) is nsd's call. */
static enum nsd_tristate scope_request(enum scope_policy policy)
{
    if (policy == SCOPE_ALWAYS)
        return NSD_TRUE;
    if (policy == SCOPE_NEVER)
        return NSD_FALSE;
    char cgroup[4096], parent[4096];
    if (!own_cgroup(0, cgroup, sizeof cgroup))
        return NSD_DEFAULT;
    const char *last = NULL;
    size_t last_len = 0;
    for (const char *p = cgroup; *p;) {
        p += strspn(p, "/");
        size_t len = strcspn(p, "/");
        if (len > 0 && (ends_with(p, len, ".service") || ends_with(p, len, ".scope"))) {
            if (len >= 5 && strncmp(p, "user@", 5) == 0)
                return NSD_FALSE;
            last = p;
            last_len = len;
        }
        p += len;
    }
    if (last == NULL)
        return NSD_DEFAULT;
    if (strncmp(last, "session-", 8) == 0 && ends_with(last, last_len, ".scope"))
        return NSD_FALSE;
    if (ends_with(last, last_len, ".service") && own_cgroup(getppid(), parent, sizeof parent) &&
        strcmp(cgroup, parent) == 0)
        return NSD_TRUE;
    return NSD_DEFAULT;
}

/* --- the session ---------------------------------------------------------------------- */

/* Enter's errors that mean "this user is not (and will not become) a tenant". */
static bool is_nontenant_error(const char *name)
{
    static const char *const errors[] = {"NoSuchTenant", "NoSuchUser", "UidOutOfRange",
                                         "InvalidTenantName"};
    const char *prefix = "io.nsd.Tenant.";
    if (strncmp(name, prefix, strlen(prefix)) != 0)
        return false;
    for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++)
        if (strcmp(name + strlen(prefix), errors[i]) == 0)
            return true;
    return false;
}

static bool lookup_uid(const char *user, uid_t *uid)
{
    struct passwd pw, *found = NULL;
    char buf[4096];
    if (getpwnam_r(user, &pw, buf, sizeof buf, &found) != 0 || found == NULL)
        return false;
    *uid = found->pw_uid;
    return true;
}

static int open_session(const char *user, const char *service, int argc, const char **argv)
{
    char svc[NSD_NAME_LEN + 2] = "";
    if (service != NULL && *service)
        snprintf(svc, sizeof svc, "%.*s: ", NSD_NAME_LEN - 1, service);
    uid_t uid = 0;
    bool known = lookup_uid(user, &uid);

    struct options o;
    char why[512];
    if (!parse_args(argc, argv, &o, why, sizeof why)) {
        /* A broken PAM line fails closed, except for root, who must be able to fix it. */
        bool root = known && uid == 0;
        log_line(LOG_ERR, "%sinvalid module arguments (%s); %s %s", svc, why,
                 root ? "skip" : "deny", user);
        return root ? PAM_IGNORE : PAM_SESSION_ERR;
    }
    if (!known || uid < o.uid_min) {
        if (o.debug) {
            if (known)
                log_line(LOG_DEBUG, "%s%s: uid %lu below uid_min=%lu; skipped", svc, user,
                         (unsigned long)uid, o.uid_min);
            else
                log_line(LOG_DEBUG, "%s%s: unknown user; skipped", svc, user);
        }
        return PAM_IGNORE;
    }

    struct nsd_grant g;
    struct nsd_error err;
    int fd;
    uint64_t inode = 0;
    enum nsd_result r =
        nsd_enter(o.socket, user, o.create, scope_request(o.scope), o.timeout_ms, &g, &fd, &err);
    if (r == NSD_OK && g.uid != (int64_t)uid) {
        (void)close(fd);
        nsd_errorf(&err, "nsd answered for uid %lld, not %lu", (long long)g.uid,
                   (unsigned long)uid);
        r = NSD_MALFORMED;
    }
    if (r == NSD_OK && nsd_join_netns(fd, &g, &inode, &err) != 0)
        r = NSD_MALFORMED;
    if (r == NSD_REFUSED && is_nontenant_error(err.name)) {
        /* "nsd refused: " is for the unavailable case; here the error is the news */
        const char *detail = err.message + strlen("nsd refused: ");
        if (o.nontenant == DENY) {
            log_line(LOG_WARNING, "%s%s is not an nsd tenant (%s): login denied (nontenant=deny)",
                     svc, user, detail);
            return PAM_SESSION_ERR;
        }
        if (o.debug)
            log_line(LOG_INFO,
                     "%s%s is not an nsd tenant (%s): login continues in the host namespace "
                     "(nontenant=skip)",
                     svc, user, detail);
        return PAM_IGNORE;
    }
    if (r != NSD_OK) {
        if (o.unreachable == DENY) {
            log_line(LOG_ERR, "%s%s: nsd unavailable (%s): login denied (unreachable=deny)", svc,
                     user, err.message);
            return PAM_SESSION_ERR;
        }
        log_line(LOG_WARNING,
                 "%s%s: nsd unavailable (%s): login continues OUTSIDE the tenant's namespace "
                 "(unreachable=skip)",
                 svc, user, err.message);
        return PAM_IGNORE;
    }
    log_line(LOG_INFO, "%s%s: joined namespace %s (inode %llu)%s%s", svc, user, g.ns_path,
             (unsigned long long)inode, g.scope[0] ? ", moved to " : "", g.scope);
    return PAM_SUCCESS;
}

PUBLIC int pam_sm_open_session(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)flags;
    const void *user = NULL, *service = NULL;
    if (pam_get_item(pamh, PAM_USER, &user) != PAM_SUCCESS || user == NULL ||
        *(const char *)user == '\0') {
        log_line(LOG_ERR, "no user name in the PAM handle; session denied");
        return PAM_SESSION_ERR;
    }
    if (pam_get_item(pamh, PAM_SERVICE, &service) != PAM_SUCCESS)
        service = NULL;
    return open_session(user, service, argc, argv);
}

PUBLIC int pam_sm_close_session(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh;
    (void)flags;
    (void)argc;
    (void)argv;
    return PAM_SUCCESS; /* nothing to undo: the namespace ends with the session's processes */
}
