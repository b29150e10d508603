/*
 * bench: the manhole measured against its physical floor (`make bench`).
 *
 * Everything runs in one go on this machine, so every speed is also given
 * as a ratio to a floor measured in the same run:
 *  - the floor: a raw UNIX-socket echo round trip between this client and
 *    a trivial C echo server, and the in-process cost of one `1+1` through
 *    the library's own compile/run path (bench/floor);
 *  - `1+1` round trips, threaded and non-threaded, measured together
 *    (interleaved), and the ratio of the two;
 *  - statements per second with 1, 10, 100, 500 clients in lock-step, every
 *    reply checked (a lost or misrouted byte fails the benchmark);
 *  - 500 clients at once each running a statement that prints, sleeps
 *    50 ms and prints again, every byte checked;
 *  - bulk output, 50 MB in lines, against raw socket throughput;
 *  - the idle cost of manhole_poll(mh, 0), and select() wake-ups of an
 *    idle fd-set host with 100 idle clients;
 *  - the host loop's turn while 10 clients burn CPU in Python;
 *  - RSS per client, idle and after a statement that printed, the worst
 *    case per client at the default limits, and connects per second;
 *  - the machine's load average, start and end, to read the rest by.
 *
 *   bench [--quick] [--baseline DIR]
 *
 * (run from the build directory's bench/). --baseline DIR: DIR holds the
 * bench-host of another build (say, the previous release's): the round
 * trips and the client rows then run against both, interleaved, in this
 * same run, and each such row says how the two compare.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char bin_dir[PATH_MAX];
static char base_dir[PATH_MAX]; /* --baseline: another build's bench/ */

/* Where the processes run. A wake-up across CPUs costs tens of
 * microseconds on a VM and one on the same CPU a few: left to the
 * scheduler, the floor and the figures would each land one way or the
 * other from run to run. So the client (this process) runs on one CPU and
 * the server under test (echo server or manhole host) on another, and
 * every round trip pays the same crossings. Throughput, bulk output and
 * the CPU-burn measurements run on every CPU, as a deployment would. */
static int cpu_client = -1, cpu_server = -1;
static void unpin(void);

static void pin_to(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set);
}

static void unpin(void)
{
    cpu_set_t all;
    CPU_ZERO(&all);
    for (int c = 0; c < CPU_SETSIZE; c++)
        CPU_SET(c, &all);
    sched_setaffinity(0, sizeof all, &all);
}

static void pick_cpus(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0 || CPU_COUNT(&set) < 2)
        return;
    for (int c = 0; c < CPU_SETSIZE; c++) {
        if (!CPU_ISSET(c, &set))
            continue;
        if (cpu_client < 0)
            cpu_client = c;
        else if (cpu_server < 0)
            cpu_server = c;
    }
}
static char tmp_dir[64];
static int quick;
static int failures;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "bench: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

typedef struct {
    double med, p99, min, max;
} stat_t;

static stat_t stats_of(double *v, size_t n)
{
    qsort(v, n, sizeof *v, cmp_d);
    stat_t s = {v[n / 2], v[n * 99 / 100], v[0], v[n - 1]};
    return s;
}

/* ---- The table -------------------------------------------------------- */

#define MAX_ROWS 64
static struct {
    char what[72], value[24], spread[24], ratio[28], target[20], verdict[8];
} rows[MAX_ROWS];
static int nrows;

static void row(const char *what, const char *value, const char *spread,
                const char *ratio, const char *target, int ok)
{
    if (nrows == MAX_ROWS)
        return;
    snprintf(rows[nrows].what, sizeof rows[0].what, "%s", what);
    snprintf(rows[nrows].value, sizeof rows[0].value, "%s", value);
    snprintf(rows[nrows].spread, sizeof rows[0].spread, "%s", spread);
    snprintf(rows[nrows].ratio, sizeof rows[0].ratio, "%s", ratio);
    snprintf(rows[nrows].target, sizeof rows[0].target, "%s", target);
    snprintf(rows[nrows].verdict, sizeof rows[0].verdict, "%s",
             !target[0] ? "" : ok ? "ok" : "MISS");
    nrows++;
    fprintf(stderr, ".");
}

static char *fmt(char *buf, size_t n, const char *f, ...)
{
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, n, f, ap);
    va_end(ap);
    return buf;
}

/* ---- Sockets ---------------------------------------------------------- */

static int connect_unix(const char *path)
{
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof sa.sun_path)
        die("path too long: %s", path);
    memcpy(sa.sun_path, path, strlen(path) + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t r = write(fd, p, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            die("write: %s", strerror(errno));
        p += r;
        n -= (size_t)r;
    }
}

/* Read until the data ends with ">>> "; return the length. */
static size_t read_prompt(int fd, char *buf, size_t cap)
{
    size_t len = 0;
    for (;;) {
        ssize_t r = read(fd, buf + len, cap - len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            die("read: %s", r ? strerror(errno) : "connection closed");
        len += (size_t)r;
        if (len >= 4 && memcmp(buf + len - 4, ">>> ", 4) == 0)
            return len;
        if (len == cap)
            die("reply too long");
    }
}

/* ---- Processes -------------------------------------------------------- */

typedef struct {
    pid_t pid;
    int in;
    FILE *out;
} proc_t;

/* Start dir/bench-host; prio is "nice" (the library's default) or "idle";
 * pinned: on the server CPU. */
static proc_t start_host_in(const char *dir, const char *path, const char *mode,
                            const char *timeout, const char *prio, int pinned)
{
    int pin[2], pout[2];
    if (pipe(pin) < 0 || pipe(pout) < 0)
        die("pipe: %s", strerror(errno));
    proc_t p;
    p.pid = fork();
    if (p.pid == 0) {
        if (pinned)
            pin_to(cpu_server);
        else
            unpin();
        dup2(pin[0], 0);
        dup2(pout[1], 1);
        close(pin[1]);
        close(pout[0]);
        char exe[PATH_MAX + 32];
        snprintf(exe, sizeof exe, "%s/bench-host", dir);
        execl(exe, exe, path, mode, timeout, prio, (char *)NULL);
        _exit(127);
    }
    close(pin[0]);
    close(pout[1]);
    p.in = pin[1];
    p.out = fdopen(pout[0], "r");
    char line[64];
    if (!fgets(line, sizeof line, p.out) || strcmp(line, "ready\n") != 0)
        die("bench-host did not start");
    return p;
}

static proc_t start_host_prio(const char *path, const char *mode, const char *timeout,
                              const char *prio, int pinned)
{
    return start_host_in(bin_dir, path, mode, timeout, prio, pinned);
}

static proc_t start_host(const char *path, const char *mode, const char *timeout)
{
    return start_host_prio(path, mode, timeout, "nice", 1);
}

static void host_cmd(proc_t *p, const char *cmd, char *out, size_t n)
{
    write_all(p->in, cmd, strlen(cmd));
    write_all(p->in, "\n", 1);
    if (!fgets(out, (int)n, p->out))
        die("bench-host: no answer to %s", cmd);
}

static void stop_host(proc_t *p)
{
    write_all(p->in, "quit\n", 5);
    close(p->in);
    fclose(p->out);
    int st;
    waitpid(p->pid, &st, 0);
}

/* The floor's echo server: one connection at a time, echoes what it
 * reads; "bulk\n" makes it send 50 MB instead. */
#define BULK_BYTES 50000000L

static pid_t start_echo(const char *path)
{
    unlink(path);
    int lfd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, path, strlen(path) + 1);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 16) < 0)
        die("echo bind: %s", strerror(errno));
    pid_t pid = fork();
    if (pid == 0) {
        pin_to(cpu_server);
        static char buf[1 << 20];
        for (;;) {
            int fd = accept(lfd, NULL, NULL);
            if (fd < 0)
                _exit(0);
            for (;;) {
                ssize_t r = read(fd, buf, sizeof buf);
                if (r <= 0)
                    break;
                if (r == 5 && memcmp(buf, "bulk\n", 5) == 0) {
                    memset(buf, 'x', sizeof buf);
                    for (long sent = 0; sent < BULK_BYTES;) {
                        long k = BULK_BYTES - sent < (long)sizeof buf ? BULK_BYTES - sent
                                                                      : (long)sizeof buf;
                        ssize_t w = write(fd, buf, (size_t)k);
                        if (w <= 0)
                            break;
                        sent += w;
                    }
                } else if (write(fd, buf, (size_t)r) != r) {
                    break;
                }
            }
            close(fd);
        }
    }
    close(lfd);
    return pid;
}

/* ---- Measurements ----------------------------------------------------- */

static stat_t echo_rtt(const char *path, int n)
{
    int fd = connect_unix(path);
    double *t = malloc((size_t)n * sizeof *t);
    char buf[16];
    for (int i = -n / 10; i < n; i++) {
        double t0 = now_s();
        write_all(fd, "1+1\n", 4);
        size_t got = 0;
        while (got < 4) {
            ssize_t r = read(fd, buf + got, 4 - got);
            if (r <= 0)
                die("echo read");
            got += (size_t)r;
        }
        if (i >= 0)
            t[i] = (now_s() - t0) * 1e6;
    }
    close(fd);
    stat_t s = stats_of(t, (size_t)n);
    free(t);
    return s;
}

static double raw_bulk(const char *path)
{
    int fd = connect_unix(path);
    static char buf[1 << 20];
    double t0 = now_s();
    write_all(fd, "bulk\n", 5);
    long got = 0;
    while (got < BULK_BYTES) {
        ssize_t r = read(fd, buf, sizeof buf);
        if (r <= 0)
            die("bulk read");
        got += r;
    }
    double t = now_s() - t0;
    close(fd);
    return (double)BULK_BYTES / 1e6 / t;
}

/* Round trips against k hosts at once, in turns of 200, so that whatever
 * else the machine does at the time lands on each of them alike: their
 * ratio is then worth reading even on a busy machine. */
#define MAX_HOSTS 4
static void manhole_rtt_multi(const char **paths, int k, int n, stat_t *out)
{
    int fds[MAX_HOSTS];
    double *t[MAX_HOSTS];
    char buf[256];
    enum { TURN = 200 };
    for (int j = 0; j < k; j++) {
        fds[j] = connect_unix(paths[j]);
        if (fds[j] < 0)
            die("connect %s: %s", paths[j], strerror(errno));
        read_prompt(fds[j], buf, sizeof buf);
        t[j] = malloc((size_t)n * sizeof *t[j]);
    }
    for (int i0 = -n / 10; i0 < n; i0 += TURN) {
        for (int j = 0; j < k; j++) {
            for (int i = i0; i < i0 + TURN && i < n; i++) {
                double t0 = now_s();
                write_all(fds[j], "1+1\n", 4);
                size_t len = read_prompt(fds[j], buf, sizeof buf);
                if (len != 6 || memcmp(buf, "2\n>>> ", 6) != 0)
                    die("wrong reply to 1+1: %.*s", (int)len, buf);
                if (i >= 0)
                    t[j][i] = (now_s() - t0) * 1e6;
            }
        }
    }
    for (int j = 0; j < k; j++) {
        close(fds[j]);
        out[j] = stats_of(t[j], (size_t)n);
        free(t[j]);
    }
}

/* Lock-step clients: each sends "a+b", checks the sum, sends the next. */
typedef struct {
    int fd;
    long a, b;
    char buf[64];
    size_t len;
} lclient;

static double lockstep(const char *path, int n, double seconds, double *connects_per_s)
{
    lclient *cl = calloc((size_t)n, sizeof *cl);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    double c0 = now_s();
    for (int i = 0; i < n; i++) {
        cl[i].fd = connect_unix(path);
        if (cl[i].fd < 0)
            die("connect %d: %s", i, strerror(errno));
        char g[64];
        read_prompt(cl[i].fd, g, sizeof g);
    }
    if (connects_per_s)
        *connects_per_s = n / (now_s() - c0);
    for (int i = 0; i < n; i++) {
        struct epoll_event e = {EPOLLIN, {.ptr = &cl[i]}};
        epoll_ctl(ep, EPOLL_CTL_ADD, cl[i].fd, &e);
    }
    char line[64];
    for (int i = 0; i < n; i++) {
        cl[i].a = i;
        cl[i].b = 1;
        int k = snprintf(line, sizeof line, "%ld+%ld\n", cl[i].a, cl[i].b);
        write_all(cl[i].fd, line, (size_t)k);
    }
    long done = 0, outstanding = n;
    double warm_end = now_s() + (quick ? 0.1 : 0.3), t0 = 0, end = 0;
    int measuring = 0, stopping = 0;
    struct epoll_event evs[256];
    while (outstanding > 0) {
        int k = epoll_wait(ep, evs, 256, 10000);
        if (k <= 0)
            die("lock-step: no reply for 10 s (%ld outstanding)", outstanding);
        double now = now_s();
        if (!measuring && now >= warm_end) {
            measuring = 1;
            t0 = now;
            end = now + seconds;
            done = 0;
        }
        if (measuring && !stopping && now >= end)
            stopping = 1;
        for (int j = 0; j < k; j++) {
            lclient *c = evs[j].data.ptr;
            ssize_t r = read(c->fd, c->buf + c->len, sizeof c->buf - c->len);
            if (r <= 0)
                die("lock-step read: %s", r ? strerror(errno) : "closed");
            c->len += (size_t)r;
            if (c->len < 4 || memcmp(c->buf + c->len - 4, ">>> ", 4) != 0) {
                if (c->len == sizeof c->buf)
                    die("lock-step: reply too long");
                continue;
            }
            char want[48];
            int wl = snprintf(want, sizeof want, "%ld\n>>> ", c->a + c->b);
            if ((size_t)wl != c->len || memcmp(want, c->buf, c->len) != 0)
                die("lock-step: wrong reply %.*s for %ld+%ld", (int)c->len, c->buf, c->a, c->b);
            c->len = 0;
            done++;
            outstanding--;
            if (!stopping) {
                c->b++;
                int l = snprintf(line, sizeof line, "%ld+%ld\n", c->a, c->b);
                write_all(c->fd, line, (size_t)l);
                outstanding++;
            }
        }
    }
    double rate = done / (now_s() - t0);
    for (int i = 0; i < n; i++)
        close(cl[i].fd);
    close(ep);
    free(cl);
    return rate;
}

/* n clients connected at once, each running a statement that prints,
 * sleeps 50 ms and prints again (the sleep holds a worker: the pool grows
 * to max_workers). Returns the seconds from the first statement sent to
 * the last reply; every reply must be exactly its own client's. */
static double sleepers(const char *path, int n)
{
    int *fds = calloc((size_t)n, sizeof *fds);
    char (*got)[64] = calloc((size_t)n, sizeof *got);
    size_t *len = calloc((size_t)n, sizeof *len);
    char buf[256];
    int ep = epoll_create1(EPOLL_CLOEXEC);
    for (int i = 0; i < n; i++) {
        fds[i] = connect_unix(path);
        if (fds[i] < 0)
            die("sleepers: connect %d: %s", i, strerror(errno));
        read_prompt(fds[i], buf, sizeof buf);
        write_all(fds[i], "import time\n", 12);
        read_prompt(fds[i], buf, sizeof buf);
        struct epoll_event e = {EPOLLIN, {.u32 = (uint32_t)i}};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &e);
    }
    double t0 = now_s();
    for (int i = 0; i < n; i++) {
        int k = snprintf(buf, sizeof buf,
                         "print('a%d'); time.sleep(0.05); print('b%d')\n", i, i);
        write_all(fds[i], buf, (size_t)k);
    }
    int left = n;
    struct epoll_event evs[256];
    while (left > 0) {
        int k = epoll_wait(ep, evs, 256, 20000);
        if (k <= 0)
            die("sleepers: no reply for 20 s (%d left)", left);
        for (int j = 0; j < k; j++) {
            int i = (int)evs[j].data.u32;
            ssize_t r = read(fds[i], got[i] + len[i], sizeof got[i] - len[i]);
            if (r <= 0)
                die("sleepers: read: %s", r ? strerror(errno) : "closed");
            len[i] += (size_t)r;
            char want[64];
            int wl = snprintf(want, sizeof want, "a%d\nb%d\n>>> ", i, i);
            if (len[i] > (size_t)wl || memcmp(got[i], want, len[i]) != 0)
                die("sleepers: client %d got %.*s", i, (int)len[i], got[i]);
            if (len[i] == (size_t)wl) {
                epoll_ctl(ep, EPOLL_CTL_DEL, fds[i], NULL);
                left--;
            }
        }
    }
    double t = now_s() - t0;
    for (int i = 0; i < n; i++)
        close(fds[i]);
    close(ep);
    free(fds);
    free(got);
    free(len);
    return t;
}

static double manhole_bulk(const char *path, const char *stmt)
{
    int fd = connect_unix(path);
    static char buf[1 << 20];
    read_prompt(fd, buf, 64);
    const char *setup = "import sys; s = ('x' * 99 + '\\n') * 10000\n";
    write_all(fd, setup, strlen(setup));
    read_prompt(fd, buf, 64);
    double t0 = now_s();
    write_all(fd, stmt, strlen(stmt));
    long got = 0;
    char tail[4] = {0};
    for (;;) {
        ssize_t r = read(fd, buf, sizeof buf);
        if (r <= 0)
            die("bulk read");
        got += r;
        if (r >= 4)
            memcpy(tail, buf + r - 4, 4);
        else {
            memmove(tail, tail + r, (size_t)(4 - r));
            memcpy(tail + 4 - r, buf, (size_t)r);
        }
        if (got >= BULK_BYTES + 4 && memcmp(tail, ">>> ", 4) == 0)
            break;
    }
    double t = now_s() - t0;
    if (got != BULK_BYTES + 4)
        die("bulk: got %ld bytes, expected %ld", got, BULK_BYTES + 4);
    close(fd);
    return (double)BULK_BYTES / 1e6 / t;
}

/* CPU burners for the host-turn measurement. */
static volatile int burn_stop;

static void *burners(void *arg)
{
    const char *path = arg;
    enum { N = 10 };
    int fds[N];
    char buf[512];
    const char *stmt = "while True:\n    x = 1\n\n";
    for (int i = 0; i < N; i++) {
        fds[i] = connect_unix(path);
        read_prompt(fds[i], buf, sizeof buf);
        write_all(fds[i], stmt, strlen(stmt));
    }
    while (!burn_stop) {
        for (int i = 0; i < N; i++) {
            /* after each TimeoutError and prompt, burn again */
            char b[512];
            ssize_t r = recv(fds[i], b, sizeof b, MSG_DONTWAIT);
            if (r > 4 && memcmp(b + r - 4, ">>> ", 4) == 0)
                write_all(fds[i], stmt, strlen(stmt));
        }
        usleep(20000); /* the burners' own pace; not part of any figure */
    }
    for (int i = 0; i < N; i++)
        close(fds[i]);
    return NULL;
}

static long rss_of(proc_t *h)
{
    char line[64];
    host_cmd(h, "rss", line, sizeof line);
    return atol(line + 4);
}

/* The 1-minute load average (Linux; -1 elsewhere): how busy the machine
 * was, for whoever reads the figures. */
static double loadavg(void)
{
    double l = -1;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (fscanf(f, "%lf", &l) != 1)
            l = -1;
        fclose(f);
    }
    return l;
}

/* ---- main ------------------------------------------------------------- */

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick"))
            quick = 1;
        else if (!strcmp(argv[i], "--baseline") && i + 1 < argc) {
            if (!realpath(argv[++i], base_dir))
                die("--baseline %s: %s", argv[i], strerror(errno));
            char exe[PATH_MAX + 32];
            snprintf(exe, sizeof exe, "%s/bench-host", base_dir);
            if (access(exe, X_OK) != 0)
                die("--baseline: no %s", exe);
        } else
            die("usage: bench [--quick] [--baseline DIR]");
    }
    int have_base = base_dir[0] != 0;
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (!realpath(argv[0], bin_dir))
        die("realpath");
    *strrchr(bin_dir, '/') = 0;
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/mhbenchXXXXXX");
    if (!mkdtemp(tmp_dir))
        die("mkdtemp");
    char echo_path[128], path[128], buf[256];
    snprintf(echo_path, sizeof echo_path, "%s/echo", tmp_dir);
    int n_rtt = quick ? 2000 : 20000;
    double tp_secs = quick ? 0.5 : 2.0;
    char v[32], sp[40], ra[40];

    double load0 = loadavg();
    pick_cpus();
    pin_to(cpu_client);
    if (cpu_client >= 0)
        fprintf(stderr, "client on CPU %d, servers on CPU %d\n", cpu_client, cpu_server);
    fprintf(stderr, "measuring (this takes a couple of minutes)...\n");

    /* 1. The floor. */
    pid_t echo = start_echo(echo_path);
    stat_t echo_s = echo_rtt(echo_path, n_rtt);
    double raw_mbs[3];
    for (int i = 0; i < 3; i++)
        raw_mbs[i] = raw_bulk(echo_path);
    qsort(raw_mbs, 3, sizeof raw_mbs[0], cmp_d);
    kill(echo, SIGTERM);
    waitpid(echo, NULL, 0);

    char cmd[PATH_MAX + 64];
    snprintf(cmd, sizeof cmd, "%s/floor %d", bin_dir, n_rtt);
    unpin(); /* the in-process floor at its best: every CPU */
    FILE *f = popen(cmd, "r");
    double fl_med = 0, fl_p99 = 0, print_floor = 0;
    if (!f || fscanf(f, "floor %lf %lf print %lf", &fl_med, &fl_p99, &print_floor) != 3)
        die("floor failed");
    pclose(f);
    double floor_rtt = echo_s.med + fl_med;
    row("floor: echo round trip, UNIX socket", fmt(v, sizeof v, "%.1f us", echo_s.med),
        fmt(sp, sizeof sp, "p99 %.1f us", echo_s.p99), "", "", 1);
    row("floor: compile+run 1+1 in process", fmt(v, sizeof v, "%.1f us", fl_med),
        fmt(sp, sizeof sp, "p99 %.1f us", fl_p99), "", "", 1);
    row("floor: sum (the round-trip floor)", fmt(v, sizeof v, "%.1f us", floor_rtt), "", "", "",
        1);

    /* 2. Round trips, both modes (and the baseline's), measured together:
     * every host on the server CPU, in turns (manhole_rtt_multi). */
    const char *modes[2] = {"nonthreaded", "threaded"};
    {
        pin_to(cpu_client); /* latency: client and server on fixed CPUs */
        int nh = have_base ? 4 : 2;
        char rpaths[MAX_HOSTS][128];
        const char *rp[MAX_HOSTS];
        proc_t hs[MAX_HOSTS];
        stat_t st[MAX_HOSTS];
        for (int j = 0; j < nh; j++) {
            snprintf(rpaths[j], sizeof rpaths[j], "%s/rtt%d", tmp_dir, j);
            rp[j] = rpaths[j];
            hs[j] = start_host_in(j < 2 ? bin_dir : base_dir, rp[j], modes[j % 2], "30", "nice",
                                  1);
        }
        manhole_rtt_multi(rp, nh, n_rtt, st);
        for (int j = 0; j < nh; j++)
            stop_host(&hs[j]);
        for (int j = 0; j < nh; j++) {
            char name[64];
            snprintf(name, sizeof name, "1+1 round trip, %s%s", modes[j % 2],
                     j < 2 ? "" : ", baseline");
            int thr = j % 2;
            row(name, fmt(v, sizeof v, "%.1f us", st[j].med),
                fmt(sp, sizeof sp, "p99 %.1f us", st[j].p99),
                fmt(ra, sizeof ra, "%.2fx floor", st[j].med / floor_rtt),
                j >= 2 ? "" : thr ? "<= 2x floor" : "<= 1.5x floor",
                st[j].med / floor_rtt <= (thr ? 2.0 : 1.5));
            if (thr) {
                double r = st[j].med / st[j - 1].med;
                snprintf(name, sizeof name, "round trip threaded/nonthreaded%s",
                         j < 2 ? "" : ", baseline");
                row(name, fmt(v, sizeof v, "%.2fx", r),
                    fmt(sp, sizeof sp, "p99 %.2fx", st[j].p99 / st[j - 1].p99), "",
                    j < 2 ? "<= 1.15x" : "", r <= 1.15);
            }
        }
    }

    /* 3. Lock-step throughput, both modes: runs alternate with the
     * baseline's, if any. */
    double tp1[2] = {0, 0}, connects = 0;
    for (int m = 0; m < 2; m++) {
        snprintf(path, sizeof path, "%s/%s", tmp_dir, modes[m]);
        char bpath[160];
        snprintf(bpath, sizeof bpath, "%s/%s-baseline", tmp_dir, modes[m]);
        unpin(); /* throughput: every CPU, as a deployment has them */
        proc_t h = start_host_prio(path, modes[m], "30", "nice", 0), bh = {0, -1, NULL};
        if (have_base)
            bh = start_host_in(base_dir, bpath, modes[m], "30", "nice", 0);
        char name[80];
        int counts[4] = {1, 10, 100, 500};
        for (int k = 0; k < 4; k++) {
            double runs[3], bruns[3];
            for (int r = 0; r < 3; r++) { /* every reply checked, each run */
                runs[r] = lockstep(path, counts[k], tp_secs,
                                   k == 3 && m == 1 && r == 0 ? &connects : NULL);
                if (have_base)
                    bruns[r] = lockstep(bpath, counts[k], tp_secs, NULL);
            }
            qsort(runs, 3, sizeof runs[0], cmp_d);
            double rate = runs[1];
            if (k == 0)
                tp1[m] = rate;
            snprintf(name, sizeof name, "statements/s, %d client%s lock-step, %s", counts[k],
                     counts[k] > 1 ? "s" : "", modes[m]);
            const char *target = k == 1 ? ">= 5x 1 client" : k == 3 ? "all correct" : "";
            int ok = k == 1 ? rate >= 5 * tp1[m] : 1;
            if (k == 1)
                snprintf(ra, sizeof ra, "%.1fx 1 client", rate / tp1[m]);
            else
                snprintf(ra, sizeof ra, "%.2fx floor", rate * fl_med / 1e6);
            row(name, fmt(v, sizeof v, "%.0f", rate),
                fmt(sp, sizeof sp, "min %.0f max %.0f", runs[0], runs[2]), ra, target, ok);
            if (have_base) {
                qsort(bruns, 3, sizeof bruns[0], cmp_d);
                snprintf(name, sizeof name, "statements/s, %d client%s lock-step, %s, baseline",
                         counts[k], counts[k] > 1 ? "s" : "", modes[m]);
                row(name, fmt(v, sizeof v, "%.0f", bruns[1]),
                    fmt(sp, sizeof sp, "min %.0f max %.0f", bruns[0], bruns[2]),
                    fmt(ra, sizeof ra, "this build %.2fx", rate / bruns[1]), "", 1);
            }
        }
        if (m == 1) {
            /* 3b. 500 clients at once, each printing, sleeping 50 ms and
             * printing again: the pool grows to max_workers (the sleep
             * blocks a worker), so the floor is 500 x 50 ms / max_workers. */
            host_cmd(&h, "limits", buf, sizeof buf);
            size_t d_line = 0, d_input = 0, d_output = 0;
            int d_workers = 0;
            if (sscanf(buf, "limits %zu %zu %zu %d", &d_line, &d_input, &d_output,
                       &d_workers) != 4 || d_workers <= 0)
                die("bench-host: bad answer to limits: %s", buf);
            (void)d_line;
            (void)d_input;
            (void)d_output;
            int ns = 500;
            double sl[3], bsl[3];
            for (int r = 0; r < (quick ? 1 : 3); r++) {
                sl[r] = sleepers(path, ns);
                if (have_base)
                    bsl[r] = sleepers(bpath, ns);
            }
            int nr = quick ? 1 : 3;
            qsort(sl, (size_t)nr, sizeof sl[0], cmp_d);
            double sl_floor = ns * 0.05 / d_workers;
            row("500 clients print, sleep 50 ms, print", fmt(v, sizeof v, "%.2f s", sl[nr / 2]),
                nr > 1 ? fmt(sp, sizeof sp, "min %.2f max %.2f", sl[0], sl[nr - 1]) : "",
                fmt(ra, sizeof ra, "%.2fx floor", sl[nr / 2] / sl_floor), "all correct", 1);
            if (have_base) {
                qsort(bsl, (size_t)nr, sizeof bsl[0], cmp_d);
                row("500 clients print, sleep 50 ms, print, baseline",
                    fmt(v, sizeof v, "%.2f s", bsl[nr / 2]),
                    nr > 1 ? fmt(sp, sizeof sp, "min %.2f max %.2f", bsl[0], bsl[nr - 1]) : "",
                    fmt(ra, sizeof ra, "this build %.2fx", bsl[nr / 2] / sl[nr / 2]), "", 1);
            }
            row("floor: 500 x 50 ms / max_workers", fmt(v, sizeof v, "%.2f s", sl_floor),
                fmt(sp, sizeof sp, "max_workers %d", d_workers), "", "", 1);
            /* 4. Bulk output through a threaded host. */
            double mb[3], ml[3];
            for (int i = 0; i < 3; i++)
                mb[i] = manhole_bulk(path, "_ = [sys.stdout.write(s) for i in range(50)]\n");
            for (int i = 0; i < (quick ? 1 : 3); i++)
                ml[i] = manhole_bulk(path, "_ = [print('x' * 99) for i in range(500000)]\n");
            qsort(mb, 3, sizeof mb[0], cmp_d);
            qsort(ml, quick ? 1 : 3, sizeof ml[0], cmp_d);
            row("raw socket throughput (floor)", fmt(v, sizeof v, "%.0f MB/s", raw_mbs[1]),
                fmt(sp, sizeof sp, "min %.0f max %.0f", raw_mbs[0], raw_mbs[2]), "", "", 1);
            row("bulk output, 50 MB in 1 MB writes", fmt(v, sizeof v, "%.0f MB/s", mb[1]),
                fmt(sp, sizeof sp, "min %.0f max %.0f", mb[0], mb[2]),
                fmt(ra, sizeof ra, "%.0f%% of raw", 100 * mb[1] / raw_mbs[1]), ">= 50% of raw",
                mb[1] >= 0.5 * raw_mbs[1]);
            row("floor: 500k print() lines into io.StringIO", fmt(v, sizeof v, "%.0f MB/s",
                print_floor), "best of 3", "", "", 1);
            row("bulk output, 50 MB as 500k print() lines",
                fmt(v, sizeof v, "%.0f MB/s", ml[quick ? 0 : 1]),
                quick ? "" : fmt(sp, sizeof sp, "min %.0f max %.0f", ml[0], ml[2]),
                fmt(ra, sizeof ra, "%.0f%% of print()", 100 * ml[quick ? 0 : 1] / print_floor), "",
                1);

            /* 5. Idle costs. */
            host_cmd(&h, "syscall 1000000", buf, sizeof buf);
            double sys_ns = atof(buf + 3);
            double i0[3];
            for (int r = 0; r < 3; r++) {
                host_cmd(&h, quick ? "idle 200000" : "idle 1000000", buf, sizeof buf);
                i0[r] = atof(buf + 3);
            }
            qsort(i0, 3, sizeof i0[0], cmp_d);
            double idle0 = i0[1];
            int idle_fds[100];
            for (int i = 0; i < 100; i++) {
                idle_fds[i] = connect_unix(path);
                read_prompt(idle_fds[i], buf, sizeof buf);
            }
            double i100[3];
            for (int r = 0; r < 3; r++) {
                host_cmd(&h, quick ? "idle 200000" : "idle 1000000", buf, sizeof buf);
                i100[r] = atof(buf + 3);
            }
            qsort(i100, 3, sizeof i100[0], cmp_d);
            double idle100 = i100[1];
            host_cmd(&h, quick ? "wakeups 1" : "wakeups 5", buf, sizeof buf);
            long wakeups = atol(buf + 8);
            row("floor: epoll_wait(0) on an empty set", fmt(v, sizeof v, "%.0f ns", sys_ns), "", "",
                "", 1);
            row("manhole_poll(mh, 0), no clients", fmt(v, sizeof v, "%.0f ns", idle0),
                fmt(sp, sizeof sp, "min %.0f max %.0f", i0[0], i0[2]),
                fmt(ra, sizeof ra, "%.2fx floor", idle0 / sys_ns), "<= 1 us", idle0 <= 1000);
            row("manhole_poll(mh, 0), 100 idle clients", fmt(v, sizeof v, "%.0f ns", idle100),
                fmt(sp, sizeof sp, "min %.0f max %.0f", i100[0], i100[2]),
                fmt(ra, sizeof ra, "%.2fx floor", idle100 / sys_ns), "", 1);
            row(quick ? "select() wake-ups in 1 s, 100 idle clients"
                      : "select() wake-ups in 5 s, 100 idle clients",
                fmt(v, sizeof v, "%ld", wakeups), "", "", "0", wakeups == 0);
            for (int i = 0; i < 100; i++)
                close(idle_fds[i]);
        }
        if (have_base)
            stop_host(&bh);
        stop_host(&h);
    }

    /* 6. The host loop while 10 clients burn CPU (threaded, 1 s timeout),
     * after the same loop with no load, for comparison; with the default
     * worker priority and with MANHOLE_WORKERS_IDLE. */
    for (int pass = 0; pass < 3; pass++) {
        snprintf(path, sizeof path, "%s/burn%d", tmp_dir, pass);
        proc_t h = start_host_prio(path, "threaded", "1", pass == 2 ? "idle" : "nice", 0);
        pthread_t t;
        if (pass > 0) {
            burn_stop = 0;
            pthread_create(&t, NULL, burners, path);
            host_cmd(&h, "rss", buf, sizeof buf); /* let the burners connect */
        }
        host_cmd(&h, quick ? "turns 1" : "turns 5", buf, sizeof buf);
        if (pass > 0) {
            burn_stop = 1;
            pthread_join(t, NULL);
        }
        long turns = 0;
        double p50 = 0, p99 = 0, mx = 0, lp99 = 0, lmax = 0;
        sscanf(buf, "turns %ld p50 %lf p99 %lf max %lf late-p99 %lf late-max %lf", &turns, &p50,
               &p99, &mx, &lp99, &lmax);
        const char *load[3] = {"no load", "10 clients burning CPU",
                               "10 burning, WORKERS_IDLE"};
        char name[80];
        snprintf(name, sizeof name, "host loop turn in manhole, %s", load[pass]);
        row(name, fmt(v, sizeof v, "%.1f us", p50),
            fmt(sp, sizeof sp, "p99 %.1f max %.0f us", p99, mx), "",
            pass == 1 ? "p99 <= 1 ms" : "", p99 <= 1000);
        snprintf(name, sizeof name, "host 1 ms timer lateness, %s", load[pass]);
        row(name, fmt(v, sizeof v, "p99 %.0f us", lp99), fmt(sp, sizeof sp, "max %.0f us", lmax),
            "", "", 1);
        stop_host(&h);
    }

    /* 7. Memory per client, idle and after statements that printed; the
     * worst case at the default limits; connects per second. */
    snprintf(path, sizeof path, "%s/mem", tmp_dir);
    {
        proc_t h = start_host(path, "threaded", "5");
        host_cmd(&h, "limits", buf, sizeof buf);
        size_t d_line = 0, d_input = 0, d_output = 0;
        int d_workers = 0;
        if (sscanf(buf, "limits %zu %zu %zu %d", &d_line, &d_input, &d_output, &d_workers) != 4)
            die("bench-host: bad answer to limits: %s", buf);
        int *fds = calloc(500, sizeof *fds);
        long base = rss_of(&h);
        int at = 0, marks[3] = {1, 100, 500};
        for (int k = 0; k < 3; k++) {
            for (; at < marks[k]; at++) {
                fds[at] = connect_unix(path);
                read_prompt(fds[at], buf, sizeof buf);
            }
            long r = rss_of(&h);
            double per = (double)(r - base) / marks[k];
            char name[64];
            snprintf(name, sizeof name, "RSS per idle client, %d client%s", marks[k],
                     marks[k] > 1 ? "s" : "");
            row(name, fmt(v, sizeof v, "%.1f KiB", per < 0 ? 0 : per), "", "", "<= 64 KiB",
                per <= 64);
        }
        /* Each of the 500 runs a statement that prints (a session, a
         * compiler, buffers used once), then one that prints 64 KiB (big
         * buffers, given back once the client is idle again). */
        static char big[70000];
        const char *stmts[2] = {"print('client %d ' * 20)\n", "print('x' * 65536)\n"};
        const char *what[2] = {"RSS per client after a print(), 500 clients",
                               "RSS per client after printing 64 KiB, 500"};
        for (int s2 = 0; s2 < 2; s2++) {
            for (int i = 0; i < 500; i++) {
                char line[64];
                int k = snprintf(line, sizeof line, stmts[s2], i);
                write_all(fds[i], line, (size_t)k);
                size_t len = read_prompt(fds[i], big, sizeof big);
                size_t want = s2 ? 65536 + 5 : 0;
                if (!s2) {
                    char exp[400];
                    int el = 0;
                    for (int r = 0; r < 20; r++)
                        el += snprintf(exp + el, sizeof exp - (size_t)el, "client %d ", i);
                    el += snprintf(exp + el, sizeof exp - (size_t)el, "\n>>> ");
                    want = (size_t)el;
                    if (len != want || memcmp(big, exp, want) != 0)
                        die("memory: client %d got %.*s", i, (int)len, big);
                } else if (len != want) {
                    die("memory: client %d got %zu bytes, not %zu", i, len, want);
                }
            }
            long r = rss_of(&h);
            double per = (double)(r - base) / 500;
            row(what[s2], fmt(v, sizeof v, "%.1f KiB", per < 0 ? 0 : per), "", "", "<= 64 KiB",
                per <= 64);
        }
        /* The worst case, from the limits: a partial line (max_line), queued
         * input (max_input and one read's worth past it: 16 reads of
         * 16 KiB), an unfinished block (max_input) and unsent output
         * (max_output); buffers grow by doubling, so up to about twice that
         * is allocated. An idle client gives the big buffers back. */
        double worst = ((double)d_line + (double)d_input + 262144 + (double)d_input +
                        (double)d_output) / 1048576.0;
        row("worst case per client at the default limits", fmt(v, sizeof v, "%.1f MiB", worst),
            fmt(sp, sizeof sp, "alloc <= %.0f MiB", 2 * worst), "", "", 1);
        for (int i = 0; i < 500; i++)
            close(fds[i]);
        free(fds);
        stop_host(&h);
        row("connects/s (banner and prompt received)", fmt(v, sizeof v, "%.0f", connects), "",
            "", "", 1);
    }

    row("machine load (1-min average), start and end", fmt(v, sizeof v, "%.2f", load0),
        fmt(sp, sizeof sp, "end %.2f", loadavg()), "", "", 1);

    /* The table. */
    fprintf(stderr, "\n");
    printf("%-52s %12s %22s %16s %16s %s\n", "measure", "value", "spread", "ratio", "target", "");
    for (int i = 0; i < nrows; i++) {
        printf("%-52s %12s %22s %16s %16s %s\n", rows[i].what, rows[i].value, rows[i].spread,
               rows[i].ratio, rows[i].target, rows[i].verdict);
        if (!strcmp(rows[i].verdict, "MISS"))
            failures++;
    }
    printf("%d target(s) missed\n", failures);
    char rm[128];
    snprintf(rm, sizeof rm, "rm -rf %s", tmp_dir);
    if (system(rm) != 0)
        fprintf(stderr, "bench: could not remove %s\n", tmp_dir);
    return 0;
}
