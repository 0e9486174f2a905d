/* nsd-exec: run a command as a tenant, inside the tenant's network namespace,
 * in this very process (no fork). docs/nsd-exec.md is the manual; in order:
 *
 *  1. resolve USER and its groups through NSS, in the host's namespace;
 *  2. io.nsd.Tenant.Enter: the namespace descriptor, umask, resource limits;
 *  3. check the tenant is the user NSS gave; setns(CLONE_NEWNET) and verify;
 *  4. resource limits (before dropping privileges) and umask;
 *  5. setgroups, setresgid, setresuid, and check they stuck;
 *  6. clean environment, home directory, no controlling terminal of the caller's,
 *     default signal dispositions and an empty mask, descriptors 3.. closed except
 *     socket-activation sockets;
 *  7. execve CMD.
 *
 * Exit status as env(1): 125 nsd-exec failed, 126 CMD not executable, 127 not found.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <json-c/json.h>
#include <limits.h>
#include <linux/capability.h>
#include <math.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "../lib/nsd_client.h"

#define EXIT_FAIL 125
#define EXIT_CANNOT_EXECUTE 126
#define EXIT_NOT_FOUND 127
#define DEFAULT_PATH "/usr/local/bin:/usr/bin:/bin"
#define DEFAULT_TIMEOUT_MS 90000 /* a unit's default start timeout: at boot nsd may still be reconciling */
#define SD_LISTEN_FDS_START 3
#define MAX_LISTEN_FDS 4096
#define MAX_SETENV 256

extern char **environ;

static const char usage_text[] =
    "usage: nsd-exec [OPTIONS] USER -- CMD [ARGS...]\n"
    "\n"
    "Run CMD as USER inside USER's nsd network namespace, replacing this process\n"
    "(no fork: CMD keeps nsd-exec's PID). Must run as root.\n"
    "\n"
    "options:\n"
    "  --socket PATH          nsd's varlink socket (default $NSD_SOCKET or\n"
    "                         /run/nsd/io.nsd.Tenant)\n"
    "  --no-create            fail instead of creating a missing tenant\n"
    "  --scope, --no-scope    move into a scope in the tenant's slice, or stay in this\n"
    "                         unit (default: nsd's policy, systemd.enter_scope)\n"
    "  --setenv NAME=VALUE    add NAME=VALUE to the workload's environment\n"
    "  --setenv NAME          copy NAME from nsd-exec's environment (repeatable)\n"
    "  --timeout SECONDS      how long to wait for nsd (default 90)\n"
    "  -h, --help             show this help and exit\n"
    "\n"
    "The workload's environment is HOME, USER, LOGNAME, SHELL, PATH plus a fixed\n"
    "list of service-manager and locale variables (see docs/nsd-exec.md).\n"
    "Exit status: the workload's; 125 nsd-exec failed; 126 CMD cannot be executed;\n"
    "127 CMD not found.\n";

/* Copied from nsd-exec's environment when present (keep in sync with docs/nsd-exec.md). */
static const char *const passthrough[] = {
    /* systemd service protocol (sd_notify, watchdog, journal, credentials, directories) */
    "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID", "JOURNAL_STREAM",
    "SYSTEMD_EXEC_PID", "CREDENTIALS_DIRECTORY", "RUNTIME_DIRECTORY", "STATE_DIRECTORY",
    "CACHE_DIRECTORY", "LOGS_DIRECTORY", "CONFIGURATION_DIRECTORY", "MEMORY_PRESSURE_WATCH",
    "MEMORY_PRESSURE_WRITE",
    /* supervisord's description of the program (not its control socket URL) */
    "SUPERVISOR_ENABLED", "SUPERVISOR_PROCESS_NAME", "SUPERVISOR_GROUP_NAME",
    /* locale and terminal */
    "LANG", "LANGUAGE", "TERM", "TZ",
    /* sd_listen_fds(3): only when LISTEN_PID names this process (see listen_fds) */
    "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
};
#define N_SOCKET_ACTIVATION 3

struct options {
    const char *socket_path;
    enum nsd_tristate create;
    enum nsd_tristate scope;
    const char *setenv[MAX_SETENV];
    size_t nsetenv;
    int timeout_ms;
    const char *user;
    char **argv;
};

struct user {
    char *name, *dir, *shell;
    uid_t uid;
    gid_t gid;
    gid_t *groups;
    int ngroups;
};

/* --- failing -------------------------------------------------------------------------- */

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    /* Unbuffered, one write: nothing is lost at exec, and a closed stderr is no error. */
    char line[2048];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    size_t len = (size_t)n < sizeof line - 1 ? (size_t)n : sizeof line - 2;
    for (size_t i = 0; i < len; i++) /* one line, whatever a name or path contains */
        if ((unsigned char)line[i] < 0x20 || line[i] == 0x7f)
            line[i] = '?';
    line[len] = '\n';
    ssize_t w = write(STDERR_FILENO, line, len + 1);
    (void)w;
}

#define fail(...)                                                                           \
    do {                                                                                    \
        say("nsd-exec: " __VA_ARGS__);                                                       \
        exit(EXIT_FAIL);                                                                    \
    } while (0)

#define usage_error(fmt, ...) fail(fmt " (try 'nsd-exec --help')", __VA_ARGS__)

/* --- arguments -------------------------------------------------------------------------- */

static int parse_timeout(const char *value)
{
    char *end;
    errno = 0;
    double t = strtod(value, &end);
    if (errno != 0 || end == value || *end != '\0' || !isfinite(t))
        usage_error("--timeout: not a number: '%s'", value);
    if (!(t > 0 && t <= 3600))
        usage_error("%s", "--timeout must be between 0 and 3600 seconds");
    int ms = (int)(t * 1000);
    return ms > 0 ? ms : 1;
}

static void parse_args(int argc, char **argv, struct options *o)
{
    const char *env_socket = getenv("NSD_SOCKET");
    o->socket_path = env_socket != NULL && *env_socket ? env_socket : NSD_DEFAULT_SOCKET;
    o->create = NSD_DEFAULT;
    o->scope = NSD_DEFAULT;
    o->timeout_ms = DEFAULT_TIMEOUT_MS;
    int i = 1;
    for (; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "-h") == 0 || strcmp(arg, "--help") == 0) {
            if (fputs(usage_text, stdout) == EOF || fflush(stdout) != 0)
                exit(EXIT_FAIL);
            exit(0);
        }
        if (strcmp(arg, "--no-create") == 0) {
            o->create = NSD_FALSE;
            continue;
        }
        if (strcmp(arg, "--scope") == 0 || strcmp(arg, "--no-scope") == 0) {
            o->scope = arg[2] == 's' ? NSD_TRUE : NSD_FALSE;
            continue;
        }
        const char *names[] = {"--socket", "--setenv", "--timeout"};
        const char *value = NULL;
        int which = -1;
        for (int k = 0; k < 3; k++) {
            size_t n = strlen(names[k]);
            if (strncmp(arg, names[k], n) == 0 && (arg[n] == '\0' || arg[n] == '=')) {
                which = k;
                if (arg[n] == '=') {
                    value = arg + n + 1;
                } else {
                    if (i + 1 >= argc)
                        usage_error("option %s needs a value", names[k]);
                    value = argv[++i];
                }
                break;
            }
        }
        if (which == 0) {
            if (*value == '\0')
                usage_error("%s", "--socket needs a non-empty path");
            o->socket_path = value;
        } else if (which == 1) {
            if (value[0] == '=' || value[0] == '\0')
                usage_error("--setenv: invalid assignment '%s'", value);
            if (o->nsetenv >= MAX_SETENV)
                usage_error("more than %d --setenv options", MAX_SETENV);
            o->setenv[o->nsetenv++] = value;
        } else if (which == 2) {
            o->timeout_ms = parse_timeout(value);
        } else if (arg[0] == '-') {
            usage_error("unknown option '%s'", arg);
        } else {
            break;
        }
    }
    if (i >= argc)
        usage_error("%s", "missing USER");
    if (i + 1 >= argc || strcmp(argv[i + 1], "--") != 0)
        usage_error("%s", "expected '--' after USER");
    if (i + 2 >= argc || argv[i + 2][0] == '\0')
        usage_error("%s", "missing CMD after '--'");
    o->user = argv[i];
    o->argv = argv + i + 2;
}

/* --- NSS, in the host's namespace -------------------------------------------------- */

static char *xstrdup(const char *s)
{
    char *copy = strdup(s);
    if (copy == NULL)
        fail("%s", "out of memory");
    return copy;
}

static void lookup_user(const char *name, struct user *u)
{
    errno = 0;
    struct passwd *pw = getpwnam(name);
    if (pw == NULL)
        fail("no such user: '%s'", name);
    u->name = xstrdup(pw->pw_name);
    u->dir = xstrdup(pw->pw_dir);
    u->shell = xstrdup(pw->pw_shell != NULL && *pw->pw_shell ? pw->pw_shell : "/bin/sh");
    u->uid = pw->pw_uid;
    u->gid = pw->pw_gid;
    /* The groups too, here: an NSS backend that talks to the network must not run
     * in the tenant's namespace. */
    int n = 32;
    for (;;) {
        gid_t *groups = reallocarray(u->groups, (size_t)n, sizeof *groups);
        if (groups == NULL)
            fail("%s", "out of memory");
        u->groups = groups;
        int got = n;
        if (getgrouplist(u->name, u->gid, u->groups, &got) >= 0) {
            u->ngroups = got;
            return;
        }
        if (got <= n || got > 65536)
            fail("cannot look up the groups of '%s'", u->name);
        n = got;
    }
}

/* --- the privileged steps ---------------------------------------------------------- */

static void apply_limits(const struct nsd_grant *g)
{
    for (size_t i = 0; i < g->nlimits; i++) {
        const struct nsd_limit *l = &g->limits[i];
        struct rlimit rl = {.rlim_cur = l->soft, .rlim_max = l->hard};
        if (setrlimit((__rlimit_resource_t)l->resource, &rl) != 0)
            fail("cannot set resource limit %s to (%llu, %llu): %s", l->name,
                 (unsigned long long)l->soft, (unsigned long long)l->hard, strerror(errno));
    }
    umask((mode_t)g->umask);
}

static void drop_privileges(const struct user *u)
{
    if (setgroups((size_t)u->ngroups, u->groups) != 0 || setresgid(u->gid, u->gid, u->gid) != 0 ||
        setresuid(u->uid, u->uid, u->uid) != 0)
        fail("cannot switch to user '%s': %s", u->name, strerror(errno));
    uid_t r, e, s;
    gid_t rg, eg, sg;
    if (getresuid(&r, &e, &s) != 0 || getresgid(&rg, &eg, &sg) != 0 || r != u->uid ||
        e != u->uid || s != u->uid || rg != u->gid || eg != u->gid || sg != u->gid)
        fail("switching to user '%s' did not take effect", u->name);
    if (u->uid == 0)
        return;
    if (setuid(0) == 0 || errno != EPERM)
        fail("%s", "could regain root after dropping privileges; refusing to continue");
    /* SECBIT_KEEP_CAPS / SECBIT_NO_SETUID_FIXUP in the caller would keep capabilities
     * across setresuid; the workload must start with none. The ambient set is a
     * subset of the permitted one. */
    struct __user_cap_header_struct hdr = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
    /* zeroed: valgrind only knows capget writes the first of the two */
    struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {{0}};
    if (syscall(SYS_capget, &hdr, data) != 0)
        fail("cannot verify capabilities: %s", strerror(errno));
    for (int i = 0; i < _LINUX_CAPABILITY_U32S_3; i++)
        if (data[i].permitted != 0 || data[i].effective != 0)
            fail("%s", "capabilities remain after dropping privileges");
}

/* --- the workload's process state -------------------------------------------------- */

/* How many socket-activation descriptors are meant for this process. */
static int listen_fds(void)
{
    const char *pid = getenv("LISTEN_PID"), *count = getenv("LISTEN_FDS");
    char self[32];
    snprintf(self, sizeof self, "%ld", (long)getpid());
    if (pid == NULL || count == NULL || strcmp(pid, self) != 0)
        return 0;
    char *end;
    errno = 0;
    long n = strtol(count, &end, 10);
    if (errno != 0 || end == count || *end != '\0' || count[0] < '0' || count[0] > '9' || n <= 0 ||
        n > MAX_LISTEN_FDS)
        return 0;
    return (int)n;
}

/* Only sockets are socket-activation descriptors: anything else a root caller left at
 * 3.. (a root-opened /etc/shadow) must not reach the workload. */
static void check_listen_fds(int n)
{
    for (int fd = SD_LISTEN_FDS_START; fd < SD_LISTEN_FDS_START + n; fd++) {
        struct stat st;
        if (fstat(fd, &st) != 0)
            fail("LISTEN_FDS=%d but descriptor %d is not open", n, fd);
        if (!S_ISSOCK(st.st_mode))
            fail("LISTEN_FDS=%d but descriptor %d is not a socket; refusing to pass it on", n, fd);
    }
}

static bool is_passthrough(const char *entry, bool activation)
{
    if (strncmp(entry, "LC_", 3) == 0)
        return true;
    size_t n = sizeof passthrough / sizeof passthrough[0];
    for (size_t i = 0; i < n; i++) {
        if (!activation && i >= n - N_SOCKET_ACTIVATION)
            break;
        size_t len = strlen(passthrough[i]);
        if (strncmp(entry, passthrough[i], len) == 0 && entry[len] == '=')
            return true;
    }
    return false;
}

struct env {
    char **vars;
    size_t n, cap;
};

/* Sets NAME=VALUE (`entry`, allocated: the environment owns it), replacing an
 * earlier NAME. */
static void env_put(struct env *e, char *entry)
{
    size_t len = strcspn(entry, "=");
    for (size_t i = 0; i < e->n; i++) {
        if (strncmp(e->vars[i], entry, len) == 0 && e->vars[i][len] == '=') {
            free(e->vars[i]);
            e->vars[i] = entry;
            return;
        }
    }
    if (e->n + 2 > e->cap) {
        size_t cap = e->cap ? e->cap * 2 : 32;
        char **bigger = reallocarray(e->vars, cap, sizeof *bigger);
        if (bigger == NULL)
            fail("%s", "out of memory");
        e->vars = bigger;
        e->cap = cap;
    }
    e->vars[e->n++] = entry;
    e->vars[e->n] = NULL;
}

static char *concat(const char *a, const char *b)
{
    char *s;
    if (asprintf(&s, "%s%s", a, b) < 0)
        fail("%s", "out of memory");
    return s;
}

static void env_free(char **vars)
{
    for (char **v = vars; v != NULL && *v != NULL; v++)
        free(*v);
    free(vars);
}

static char **build_environment(const struct user *u, const struct options *o, bool activation)
{
    struct env e = {0};
    for (char **v = environ; *v != NULL; v++)
        if (is_passthrough(*v, activation))
            env_put(&e, xstrdup(*v));
    env_put(&e, concat("HOME=", u->dir));
    env_put(&e, concat("USER=", u->name));
    env_put(&e, concat("LOGNAME=", u->name));
    env_put(&e, concat("SHELL=", u->shell));
    env_put(&e, concat("PATH=", DEFAULT_PATH));
    for (size_t i = 0; i < o->nsetenv; i++) {
        const char *s = o->setenv[i];
        if (strchr(s, '=') != NULL) {
            env_put(&e, xstrdup(s));
        } else {
            const char *value = getenv(s); /* --setenv NAME: copy it if set */
            char *entry;
            if (value != NULL) {
                if (asprintf(&entry, "%s=%s", s, value) < 0)
                    fail("%s", "out of memory");
                env_put(&e, entry);
            }
        }
    }
    return e.vars;
}

static void change_directory(const char *home)
{
    if (chdir(home) != 0) {
        say("nsd-exec: warning: cannot change directory to %s: %s; using /", home,
            strerror(errno));
        if (chdir("/") != 0)
            fail("cannot change directory to /: %s", strerror(errno));
    }
}

/* The workload must not keep the caller's controlling terminal: with it, TIOCSTI
 * (dev.tty.legacy_tiocsti=1) types commands into root's shell, which runs them as
 * root. TIOCNOTTY gives the terminal up without a fork; the kernel then refuses
 * TIOCSTI (not our controlling terminal, no CAP_SYS_ADMIN) and TIOCSCTTY (it is
 * another session's). Descriptors 0-2 may stay on the terminal: output still works. */
static void give_up_terminal(void)
{
    int fd = open("/dev/tty", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENXIO || errno == ENOENT)
            return; /* no controlling terminal */
        fail("cannot open the controlling terminal to give it up: %s", strerror(errno));
    }
    /* As a session leader, giving it up hangs up the session's foreground group
     * (perhaps this process): those signals are for the old session, not for us. */
    struct sigaction ign = {.sa_handler = SIG_IGN}, old_hup, old_cont;
    if (sigaction(SIGHUP, &ign, &old_hup) != 0 || sigaction(SIGCONT, &ign, &old_cont) != 0)
        fail("sigaction: %s", strerror(errno));
    if (ioctl(fd, TIOCNOTTY) != 0)
        fail("cannot give up the controlling terminal: %s", strerror(errno));
    if (close(fd) != 0)
        fail("close: %s", strerror(errno));
    int probe = open("/dev/tty", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (probe >= 0 || errno != ENXIO)
        fail("%s", "still attached to the caller's terminal after TIOCNOTTY");
}

static void reset_signals(void)
{
    /* exec resets caught signals but keeps ignored ones and the mask; the caller may
     * have ignored or blocked anything. */
    struct sigaction dfl = {.sa_handler = SIG_DFL};
    for (int sig = 1; sig < NSIG; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP)
            continue;
        if (sigaction(sig, &dfl, NULL) != 0 && errno != EINVAL) /* EINVAL: libc's own */
            fail("cannot reset signal %d: %s", sig, strerror(errno));
    }
    sigset_t none;
    if (sigemptyset(&none) != 0 || sigprocmask(SIG_SETMASK, &none, NULL) != 0)
        fail("cannot empty the signal mask: %s", strerror(errno));
}

static void close_descriptors(int keep)
{
    unsigned first = (unsigned)(SD_LISTEN_FDS_START + keep);
    if (close_range(first, ~0U, 0) == 0)
        return;
    if (errno != ENOSYS)
        fail("close_range: %s", strerror(errno));
    long max = sysconf(_SC_OPEN_MAX); /* kernels before 5.9 */
    for (long fd = first; fd < (max > 0 ? max : 65536); fd++)
        (void)close((int)fd); /* EBADF for the closed ones is the point */
}

/* Executes like execvp(3) along the new PATH; returns only on failure. */
static int execute(char **argv, char **envp)
{
    const char *cmd = argv[0];
    if (strchr(cmd, '/') != NULL) {
        execve(cmd, argv, envp);
        int err = errno;
        say("nsd-exec: %s: %s", cmd, strerror(err));
        return err == ENOENT || err == ENOTDIR ? EXIT_NOT_FOUND : EXIT_CANNOT_EXECUTE;
    }
    const char *path = DEFAULT_PATH;
    for (char **v = envp; *v != NULL; v++)
        if (strncmp(*v, "PATH=", 5) == 0)
            path = *v + 5;
    int denied = 0;
    size_t cmdlen = strlen(cmd);
    for (const char *p = path;; p++) {
        const char *end = strchrnul(p, ':');
        size_t dirlen = (size_t)(end - p);
        char full[PATH_MAX];
        if (dirlen + 1 + cmdlen < sizeof full) {
            if (dirlen == 0) {
                memcpy(full, cmd, cmdlen + 1); /* an empty entry is the current directory */
            } else {
                memcpy(full, p, dirlen);
                full[dirlen] = '/';
                memcpy(full + dirlen + 1, cmd, cmdlen + 1);
            }
            execve(full, argv, envp);
            int err = errno;
            if (err == EACCES) {
                denied = denied ? denied : err;
            } else if (err != ENOENT && err != ENOTDIR && err != ESTALE && err != ENODEV) {
                say("nsd-exec: %s: %s", full, strerror(err));
                return EXIT_CANNOT_EXECUTE;
            }
        }
        if (*end == '\0')
            break;
        p = end;
    }
    if (denied) {
        say("nsd-exec: %s: %s", cmd, strerror(denied));
        return EXIT_CANNOT_EXECUTE;
    }
    say("nsd-exec: %s: command not found", cmd);
    return EXIT_NOT_FOUND;
}

int main(int argc, char **argv)
{
    struct options o = {0};
    parse_args(argc, argv, &o);

    struct user u = {0};
    lookup_user(o.user, &u);

    struct nsd_grant g;
    struct nsd_error err;
    int ns_fd;
    if (nsd_enter(o.socket_path, o.user, o.create, o.scope, o.timeout_ms, &g, &ns_fd, &err) !=
        NSD_OK)
        fail("%s", err.message);
    if (g.uid != (int64_t)u.uid || strcmp(g.name, u.name) != 0) {
        (void)close(ns_fd);
        fail("identity mismatch: NSS says '%s' is uid %lu, nsd answered tenant '%s' with uid %lld",
             u.name, (unsigned long)u.uid, g.name, (long long)g.uid);
    }
    uint64_t inode;
    if (nsd_join_netns(ns_fd, &g, &inode, &err) != 0)
        fail("%s", err.message);
    apply_limits(&g);
    drop_privileges(&u);

    int keep = listen_fds();
    check_listen_fds(keep);
    char **envp = build_environment(&u, &o, keep > 0);
    change_directory(u.dir);
    give_up_terminal();
    reset_signals();
    close_descriptors(keep);
    int status = execute(o.argv, envp);
    env_free(envp);
    free(u.name);
    free(u.dir);
    free(u.shell);
    free(u.groups);
    return status;
}
