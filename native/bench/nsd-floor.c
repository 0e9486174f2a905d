/* nsd-floor: the kernel's floor for nsd's per-tenant network work (scripts/bench).
 *
 *   nsd-floor create RUN_DIR PREFIX N
 *   nsd-floor check  RUN_DIR PREFIX N
 *
 * Run inside a bench-made "host" network namespace (nsenter --net=...). "create" builds,
 * for tenant i, what nsd builds (docs/operator-guide.md): the namespace file
 * RUN_DIR/PREFIX<i> (unshare + bind mount, as `ip netns add`), a veth pair PREFIX-f<i>
 * with its peer eth0 created directly in the namespace, lo and both ends up, a /32 and a
 * /64 address inside and the gateways outside, three routes inside and two outside, and
 * net.ipv4.ip_unprivileged_port_start=0 inside. It uses one netlink socket per namespace
 * (made while the thread is in the namespace), one acknowledged request per change and
 * one namespace switch there and back per tenant; it checks nothing it does not need. "check" reads back what nsd's
 * restart reconcile reads, the way it reads it: one listing of the host's addresses and
 * routes for all tenants, then per tenant the sysctl, the host link, the peer's
 * namespace id, the namespace's links, addresses and routes (one dump each, both
 * families). Both print one JSON line of timings.
 * Not installed: a bench tool (make bench).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_addr.h>
#include <linux/if_link.h>
#include <linux/net_namespace.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/veth.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define BUF 65536

/* <linux/mount.h> clashes with <sys/mount.h> in glibc 2.36: the new mount API's values */
#ifndef FSOPEN_CLOEXEC
#define FSOPEN_CLOEXEC 0x1
#define FSCONFIG_CMD_CREATE 6
#define FSMOUNT_CLOEXEC 0x1
#endif
#ifndef SYS_fsopen
#define SYS_fsopen 430
#define SYS_fsconfig 431
#define SYS_fsmount 432
#endif

struct req {
    unsigned char b[4096];
    size_t len;
};

static uint32_t seq;
static unsigned char rbuf[BUF];

static void die(const char *what) {
    fprintf(stderr, "nsd-floor: %s: %s\n", what, strerror(errno));
    exit(1);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int nl_open(void) {
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (fd < 0) die("socket");
    int one = 1;
    if (setsockopt(fd, SOL_NETLINK, NETLINK_GET_STRICT_CHK, &one, sizeof one) < 0)
        die("NETLINK_GET_STRICT_CHK");
    struct sockaddr_nl sa = {.nl_family = AF_NETLINK};
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    return fd;
}

static void *put(struct req *r, const void *data, size_t n) {
    void *at = r->b + r->len;
    memcpy(at, data, n);
    r->len += NLMSG_ALIGN(n);
    return at;
}

static void start(struct req *r, uint16_t type, uint16_t flags, const void *body, size_t n) {
    memset(r, 0, sizeof *r);
    struct nlmsghdr h = {.nlmsg_type = type, .nlmsg_flags = (uint16_t)(NLM_F_REQUEST | flags),
                         .nlmsg_seq = ++seq};
    put(r, &h, sizeof h);
    put(r, body, n);
}

static void attr(struct req *r, uint16_t type, const void *data, size_t n) {
    struct rtattr a = {.rta_len = (unsigned short)RTA_LENGTH(n), .rta_type = type};
    memcpy(r->b + r->len, &a, sizeof a);
    memcpy(r->b + r->len + RTA_LENGTH(0), data, n);
    r->len += RTA_ALIGN(RTA_LENGTH(n));
}

static size_t nest(struct req *r, uint16_t type) {
    size_t at = r->len;
    attr(r, type, NULL, 0);
    return at;
}

static void nest_end(struct req *r, size_t at) {
    ((struct rtattr *)(r->b + at))->rta_len = (unsigned short)(r->len - at);
}

static void u32attr(struct req *r, uint16_t type, uint32_t v) { attr(r, type, &v, sizeof v); }

/* Send; read until the ACK, the end of a dump or (a get) the one answer. Returns the
 * ifindex of the first RTM_NEWLINK answer, if any. */
static int talk(int fd, struct req *r, int want_link) {
    ((struct nlmsghdr *)r->b)->nlmsg_len = (uint32_t)r->len;
    if (send(fd, r->b, r->len, 0) < 0) die("send");
    uint16_t flags = ((struct nlmsghdr *)r->b)->nlmsg_flags;
    int single = !(flags & (NLM_F_DUMP | NLM_F_ACK));
    int index = 0;
    for (;;) {
        ssize_t n = recv(fd, rbuf, sizeof rbuf, 0);
        if (n < 0) die("recv");
        for (struct nlmsghdr *h = (struct nlmsghdr *)rbuf; NLMSG_OK(h, (size_t)n);
             h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_seq != seq) continue;
            if (h->nlmsg_type == NLMSG_ERROR) {
                int code = ((struct nlmsgerr *)NLMSG_DATA(h))->error;
                if (code) {
                    errno = -code;
                    die("netlink request");
                }
                return index;
            }
            if (h->nlmsg_type == NLMSG_DONE) return index;
            if (want_link && h->nlmsg_type == RTM_NEWLINK && !index)
                index = ((struct ifinfomsg *)NLMSG_DATA(h))->ifi_index;
            if (single) return index;
        }
    }
}

static int get_link(int fd, const char *name, int index) {
    struct req r;
    struct ifinfomsg ifi = {.ifi_family = AF_UNSPEC, .ifi_index = index};
    start(&r, RTM_GETLINK, 0, &ifi, sizeof ifi);
    if (name) attr(&r, IFLA_IFNAME, name, strlen(name) + 1);
    return talk(fd, &r, 1);
}

static void link_up(int fd, int index) {
    struct req r;
    struct ifinfomsg ifi = {.ifi_family = AF_UNSPEC, .ifi_index = index,
                            .ifi_flags = IFF_UP, .ifi_change = IFF_UP};
    start(&r, RTM_NEWLINK, NLM_F_ACK, &ifi, sizeof ifi);
    talk(fd, &r, 0);
}

static void addr_add(int fd, int family, int index, const void *a, unsigned char plen) {
    struct req r;
    struct ifaddrmsg ifa = {.ifa_family = (unsigned char)family, .ifa_prefixlen = plen,
                            .ifa_index = (uint32_t)index};
    size_t n = family == AF_INET ? 4 : 16;
    if (family == AF_INET6) ifa.ifa_flags = IFA_F_NODAD;
    start(&r, RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &ifa, sizeof ifa);
    if (family == AF_INET) attr(&r, IFA_LOCAL, a, n);
    attr(&r, IFA_ADDRESS, a, n);
    talk(fd, &r, 0);
}

static void route_add(int fd, int family, const void *dst, unsigned char plen, int oif,
                      const void *gw, const void *src, unsigned char scope, unsigned flags) {
    struct req r;
    struct rtmsg rt = {.rtm_family = (unsigned char)family, .rtm_dst_len = plen,
                       .rtm_table = RT_TABLE_MAIN, .rtm_protocol = RTPROT_STATIC,
                       .rtm_scope = scope, .rtm_type = RTN_UNICAST, .rtm_flags = flags};
    size_t n = family == AF_INET ? 4 : 16;
    start(&r, RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &rt, sizeof rt);
    u32attr(&r, RTA_TABLE, RT_TABLE_MAIN);
    attr(&r, RTA_DST, dst, n);
    u32attr(&r, RTA_OIF, (uint32_t)oif);
    if (gw) attr(&r, RTA_GATEWAY, gw, n);
    if (src) attr(&r, RTA_PREFSRC, src, n);
    talk(fd, &r, 0);
}

static void dump(int fd, uint16_t type, int family, int index) {
    struct req r;
    if (type == RTM_GETADDR) {
        struct ifaddrmsg ifa = {.ifa_family = (unsigned char)family, .ifa_index = (uint32_t)index};
        start(&r, type, NLM_F_DUMP, &ifa, sizeof ifa);
    } else {
        struct rtmsg rt = {.rtm_family = (unsigned char)family, .rtm_table = RT_TABLE_MAIN};
        start(&r, type, NLM_F_DUMP, &rt, sizeof rt);
        if (index) u32attr(&r, RTA_OIF, (uint32_t)index);
    }
    talk(fd, &r, 0);
}

static void veth_add(int fd, const char *host, const char *peer, int ns_fd) {
    struct req r;
    struct ifinfomsg ifi = {.ifi_family = AF_UNSPEC};
    start(&r, RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &ifi, sizeof ifi);
    attr(&r, IFLA_IFNAME, host, strlen(host) + 1);
    size_t info = nest(&r, IFLA_LINKINFO);
    attr(&r, IFLA_INFO_KIND, "veth", 4);
    size_t data = nest(&r, IFLA_INFO_DATA);
    size_t p = nest(&r, VETH_INFO_PEER);
    struct ifinfomsg pi = {.ifi_family = AF_UNSPEC};
    memcpy(r.b + r.len, &pi, sizeof pi);
    r.len += NLMSG_ALIGN(sizeof pi);
    attr(&r, IFLA_IFNAME, peer, strlen(peer) + 1);
    u32attr(&r, IFLA_NET_NS_FD, (uint32_t)ns_fd);
    nest_end(&r, p);
    nest_end(&r, data);
    nest_end(&r, info);
    talk(fd, &r, 0);
}

static void netnsid(int fd, int ns_fd) {
    struct req r;
    struct rtgenmsg g = {.rtgen_family = AF_UNSPEC};
    start(&r, RTM_GETNSID, 0, &g, sizeof g);
    u32attr(&r, NETNSA_FD, (uint32_t)ns_fd);
    talk(fd, &r, 0);
}

/* The sysctl is opened as nsd opens it (nsd/net/sysctl_files.py): through a procfs
 * instance of the program's own, mounted nowhere and renewed every RENEW_AFTER
 * namespaces. Through /proc, each open walks a dentry per namespace /proc has seen. */
#define RENEW_AFTER 32
#define SYSCTL "sys/net/ipv4/ip_unprivileged_port_start"
static int procfs = -1, procfs_uses;

static int sysctl_open(int flags) {
    if (procfs >= 0 && procfs_uses >= RENEW_AFTER) {
        close(procfs);
        procfs = -1;
    }
    if (procfs < 0) {
        int fs = (int)syscall(SYS_fsopen, "proc", FSOPEN_CLOEXEC);
        if (fs < 0) die("fsopen proc");
        if (syscall(SYS_fsconfig, fs, FSCONFIG_CMD_CREATE, NULL, NULL, 0) < 0) die("fsconfig");
        procfs = (int)syscall(SYS_fsmount, fs, FSMOUNT_CLOEXEC, 0);
        if (procfs < 0) die("fsmount");
        close(fs);
        procfs_uses = 0;
    }
    procfs_uses++;
    return openat(procfs, SYSCTL, flags | O_CLOEXEC);
}

static void sysctl_write(void) {
    int fd = sysctl_open(O_WRONLY);
    if (fd < 0 || write(fd, "0", 1) != 1) die("sysctl");
    close(fd);
}

static void sysctl_read(void) {
    char b[32];
    int fd = sysctl_open(O_RDONLY);
    if (fd < 0 || read(fd, b, sizeof b) < 0) die("sysctl");
    close(fd);
}

struct addrs {
    struct in_addr v4, gw4;
    struct in6_addr v6, v6net, gw6, any6;
    struct in_addr any4;
};

static void addrs_of(int i, struct addrs *a) {
    memset(a, 0, sizeof *a);
    a->gw4.s_addr = htonl(0x64420001u);                  /* 100.66.0.1 */
    a->v4.s_addr = htonl(0x64420002u + (uint32_t)i);     /* 100.66.0.2 + i */
    inet_pton(AF_INET6, "fd42:4e53:4443::", &a->v6net);  /* + (i + 1) << 64 */
    a->v6net.s6_addr[6] = (unsigned char)((i + 1) >> 8);
    a->v6net.s6_addr[7] = (unsigned char)(i + 1);
    a->v6 = a->v6net;
    a->v6.s6_addr[15] = 1;
    inet_pton(AF_INET6, "fe80::1", &a->gw6);
}

static int cmp(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: nsd-floor create|check RUN_DIR PREFIX N\n");
        return 2;
    }
    int create = strcmp(argv[1], "create") == 0;
    const char *dir = argv[2], *prefix = argv[3];
    int n = atoi(argv[4]);
    if (n <= 0) return 2;
    double *times = calloc((size_t)n, sizeof *times);
    if (!times) die("calloc");
    int home = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    if (home < 0) die("open home");
    int host = nl_open();
    if (create) {
        /* as `ip netns add` once: the run dir a shared mount point of its own */
        mkdir(dir, 0755);
        if (mount("", dir, "none", MS_SHARED | MS_REC, NULL) < 0) {
            if (mount(dir, dir, "none", MS_BIND | MS_REC, NULL) < 0) die("bind run dir");
            if (mount("", dir, "none", MS_PRIVATE | MS_REC, NULL) < 0) die("private run dir");
            if (mount("", dir, "none", MS_SHARED | MS_REC, NULL) < 0) die("shared run dir");
        }
    }
    double t_all = now();
    if (!create) {
        /* as nsd's restart: one listing of the host's addresses and routes for all */
        dump(host, RTM_GETADDR, AF_UNSPEC, 0);
        dump(host, RTM_GETROUTE, AF_UNSPEC, 0);
    }
    for (int i = 0; i < n; i++) {
        double t0 = now();
        char path[4096], hname[IFNAMSIZ];
        snprintf(path, sizeof path, "%s/%s%d", dir, prefix, i);
        snprintf(hname, sizeof hname, "%sf%d", prefix, i);
        struct addrs a;
        addrs_of(i, &a);
        int tenant, ns_fd;
        if (create) {
            int f = open(path, O_RDONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0);
            if (f < 0) die(path);
            close(f);
            if (unshare(CLONE_NEWNET) < 0) die("unshare");
            if (mount("/proc/thread-self/ns/net", path, "none", MS_BIND, NULL) < 0) die("mount");
            tenant = nl_open();
            sysctl_write();
            if (setns(home, CLONE_NEWNET) < 0) die("setns home");
            ns_fd = open(path, O_RDONLY | O_CLOEXEC);
            if (ns_fd < 0) die(path);
            veth_add(host, hname, "eth0", ns_fd);
            int hidx = get_link(host, hname, 0), pidx = get_link(tenant, "eth0", 0);
            link_up(tenant, 1);
            link_up(tenant, pidx);
            addr_add(tenant, AF_INET, pidx, &a.v4, 32);
            addr_add(tenant, AF_INET6, pidx, &a.v6, 64);
            route_add(tenant, AF_INET, &a.gw4, 32, pidx, NULL, NULL, RT_SCOPE_LINK, 0);
            route_add(tenant, AF_INET, &a.any4, 0, pidx, &a.gw4, NULL, RT_SCOPE_UNIVERSE,
                      RTNH_F_ONLINK);
            route_add(tenant, AF_INET6, &a.any6, 0, pidx, &a.gw6, NULL, RT_SCOPE_UNIVERSE, 0);
            link_up(host, hidx);
            addr_add(host, AF_INET, hidx, &a.gw4, 32);
            addr_add(host, AF_INET6, hidx, &a.gw6, 64);
            route_add(host, AF_INET, &a.v4, 32, hidx, NULL, &a.gw4, RT_SCOPE_LINK, 0);
            route_add(host, AF_INET6, &a.v6net, 64, hidx, NULL, NULL, RT_SCOPE_UNIVERSE, 0);
        } else {
            ns_fd = open(path, O_RDONLY | O_CLOEXEC);
            if (ns_fd < 0) die(path);
            if (setns(ns_fd, CLONE_NEWNET) < 0) die("setns");
            tenant = nl_open();
            sysctl_read();
            if (setns(home, CLONE_NEWNET) < 0) die("setns home");
            if (get_link(host, hname, 0) <= 0) die(hname);
            netnsid(host, ns_fd);
            /* nsd lists the namespace's links in one dump; one get costs the same */
            int pidx = get_link(tenant, "eth0", 0);
            if (pidx <= 0) die("eth0");
            dump(tenant, RTM_GETADDR, AF_UNSPEC, pidx);
            dump(tenant, RTM_GETROUTE, AF_UNSPEC, 0);
        }
        close(tenant);
        close(ns_fd);
        times[i] = now() - t0;
    }
    double total = now() - t_all;
    qsort(times, (size_t)n, sizeof *times, cmp);
    printf("{\"mode\": \"%s\", \"tenants\": %d, \"total_s\": %.6f, \"median_ms\": %.4f, "
           "\"p10_ms\": %.4f, \"p90_ms\": %.4f}\n",
           argv[1], n, total, times[n / 2] * 1e3, times[n / 10] * 1e3, times[n * 9 / 10] * 1e3);
    return 0;
}
