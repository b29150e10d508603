/*
 * bench-host: the manhole host the benchmark drives. It serves a manhole
 * on a UNIX socket and obeys one-line commands on stdin (from bench.c):
 *
 *   idle N        time N calls of manhole_poll(mh, 0); print "ns X"
 *   syscall N     the same for epoll_wait(0) on an empty set (the floor)
 *   wakeups S     run the loop S seconds in select() with the fd-set calls
 *                 and no timer of its own but the end of the window;
 *                 print "wakeups K" (select() returns in the window)
 *   turns S       run S seconds with a 1 ms timer of its own, manhole_poll
 *                 (mh, 0) after each poll(); print "turns N p50 P p99 Q max M"
 *                 (microseconds spent in the manhole per turn, and
 *                 "late p99 L max X" for the timer's lateness)
 *   rss           print "rss KiB"
 *   limits        print the library's default limits: "limits max_line
 *                 max_input max_output max_workers" (bytes, threads)
 *   quit
 *
 * Between commands it serves clients, waiting only in manhole_poll().
 *   bench-host PATH threaded|nonthreaded [timeout [nice|idle|normal]]
 */
#define _GNU_SOURCE /* ppoll */
#include "../manhole.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/select.h>
#include <time.h>
#include <unistd.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static long rss_kib(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = -1;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6))
            v = atol(line + 6);
    if (f)
        fclose(f);
    return v;
}

static void cmd_idle(manhole *mh, long n)
{
    for (long i = 0; i < n / 10; i++) /* warm up */
        manhole_poll(mh, 0);
    double t0 = now_s();
    for (long i = 0; i < n; i++)
        manhole_poll(mh, 0);
    double t1 = now_s();
    printf("ns %.1f\n", (t1 - t0) * 1e9 / (double)n);
}

/* The floor for a zero-timeout poll: epoll_wait(0) on an empty set. */
static void cmd_syscall(long n)
{
    int ep = epoll_create1(0);
    struct epoll_event ev;
    double t0 = now_s();
    for (long i = 0; i < n; i++)
        epoll_wait(ep, &ev, 1, 0);
    double t1 = now_s();
    close(ep);
    printf("ns %.1f\n", (t1 - t0) * 1e9 / (double)n);
}

static void cmd_wakeups(manhole *mh, double seconds)
{
    long wakeups = 0;
    manhole_poll(mh, 0); /* settle what the previous command left ready */
    manhole_poll(mh, 0);
    double end = now_s() + seconds;
    for (;;) {
        fd_set rd, wr;
        FD_ZERO(&rd);
        FD_ZERO(&wr);
        int maxfd = -1;
        manhole_fdset(mh, &rd, &wr, &maxfd);
        double left = end - now_s();
        if (left <= 0)
            break;
        int t = manhole_timeout(mh);
        double wait = left;
        if (t >= 0 && t / 1000.0 < wait)
            wait = t / 1000.0;
        struct timeval tv = {(time_t)wait, (suseconds_t)((wait - (long)wait) * 1e6)};
        int n = select(maxfd + 1, &rd, &wr, NULL, &tv);
        if (now_s() >= end)
            break; /* the window's own timer, not a manhole wake-up */
        wakeups++;
        manhole_process(mh, n > 0 ? &rd : NULL, n > 0 ? &wr : NULL);
    }
    printf("wakeups %ld\n", wakeups);
}

static void cmd_turns(manhole *mh, double seconds)
{
    size_t cap = (size_t)(seconds * 2000) + 1000, n = 0;
    double *work = malloc(cap * sizeof *work), *late = malloc(cap * sizeof *late);
    double end = now_s() + seconds, next = now_s() + 0.001;
    while (n < cap) {
        struct pollfd fds[1024];
        int k = manhole_pollfds(mh, fds, 1024);
        double wait = next - now_s();
        if (wait < 0)
            wait = 0;
        struct timespec ts = {(time_t)wait, (long)((wait - (long)wait) * 1e9)};
        ppoll(fds, (nfds_t)(k > 1024 ? 1024 : k), &ts, NULL); /* ns, not ms */
        double t0 = now_s();
        manhole_poll(mh, 0);
        double t1 = now_s();
        work[n] = (t1 - t0) * 1e6;
        late[n] = t0 > next ? (t0 - next) * 1e6 : 0;
        n++;
        if (t1 >= next)
            next += 0.001 * (1 + (long)((t1 - next) / 0.001));
        if (t1 >= end)
            break;
    }
    qsort(work, n, sizeof *work, cmp_double);
    qsort(late, n, sizeof *late, cmp_double);
    printf("turns %zu p50 %.1f p99 %.1f max %.1f late-p99 %.1f late-max %.1f\n", n,
           work[n / 2], work[n * 99 / 100], work[n - 1], late[n * 99 / 100], late[n - 1]);
    free(work);
    free(late);
}

/* stdin is read by a thread of its own, which wakes the loop: the loop
 * itself waits only in manhole_poll(), as a host without other work
 * would, so the round-trip figures carry no extra system call. */
static char pending[128];
static int have_pending, eof;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t taken = PTHREAD_COND_INITIALIZER;

static void *stdin_reader(void *arg)
{
    manhole *mh = arg;
    char line[128];
    for (;;) {
        int ok = fgets(line, sizeof line, stdin) != NULL;
        pthread_mutex_lock(&mu);
        if (!ok)
            eof = 1;
        else
            memcpy(pending, line, sizeof line);
        have_pending = 1;
        manhole_wakeup(mh);
        while (have_pending)
            pthread_cond_wait(&taken, &mu);
        pthread_mutex_unlock(&mu);
        if (!ok)
            return NULL;
    }
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: bench-host PATH threaded|nonthreaded [timeout [idle]]\n");
        return 2;
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    manhole_config cfg;
    manhole_config_init(&cfg);
    cfg.unix_path = argv[1];
    cfg.threaded = strcmp(argv[2], "threaded") == 0;
    cfg.timeout = argc > 3 ? atof(argv[3]) : 5;
    if (argc > 4 && !strcmp(argv[4], "idle"))
        cfg.worker_priority = MANHOLE_WORKERS_IDLE;
    if (argc > 4 && !strcmp(argv[4], "normal"))
        cfg.worker_priority = MANHOLE_WORKERS_NORMAL;
    cfg.max_clients = 4096;
    cfg.max_output = 4u << 20;
    manhole *mh;
    char err[256];
    if (manhole_open(&mh, &cfg, err, sizeof err) != MANHOLE_OK) {
        fprintf(stderr, "bench-host: %s\n", err);
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    pthread_t reader;
    pthread_create(&reader, NULL, stdin_reader, mh);
    char line[128];
    for (;;) {
        pthread_mutex_lock(&mu);
        int got = have_pending;
        pthread_mutex_unlock(&mu);
        if (!got) {
            manhole_poll(mh, -1);
            continue;
        }
        pthread_mutex_lock(&mu);
        memcpy(line, pending, sizeof line);
        int at_eof = eof;
        have_pending = 0;
        pthread_cond_signal(&taken);
        pthread_mutex_unlock(&mu);
        if (at_eof)
            break;
        if (!strncmp(line, "idle ", 5))
            cmd_idle(mh, atol(line + 5));
        else if (!strncmp(line, "syscall ", 8))
            cmd_syscall(atol(line + 8));
        else if (!strncmp(line, "wakeups ", 8))
            cmd_wakeups(mh, atof(line + 8));
        else if (!strncmp(line, "turns ", 6))
            cmd_turns(mh, atof(line + 6));
        else if (!strncmp(line, "rss", 3))
            printf("rss %ld\n", rss_kib());
        else if (!strncmp(line, "limits", 6)) {
            manhole_config d;
            manhole_config_init(&d);
            printf("limits %zu %zu %zu %d\n", d.max_line, d.max_input, d.max_output,
                   d.max_workers);
        }
        else if (!strncmp(line, "quit", 4))
            break;
        fflush(stdout);
    }
    pthread_detach(reader);
    manhole_close(mh);
    return 0;
}
