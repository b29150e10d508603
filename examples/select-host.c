/*
 * select-host: a manhole in a plain select() loop.
 *
 *   select-host [PATH [TIMEOUT]]     (default /var/tmp/example.manhole, 5 s)
 *
 * The loop adds the manhole's descriptors to its own sets, sleeps at most
 * manhole_timeout() (or until its own 1 s timer), and hands the readiness
 * back with manhole_process(). `seconds` counts the loop's timer.
 */
#define _POSIX_C_SOURCE 200809L
#include <manhole.h>

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/select.h>
#include <time.h>

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }
static long seconds;

int main(int argc, char **argv)
{
    if (argc > 3 || (argc > 1 && argv[1][0] == '-')) {
        fprintf(stderr, "usage: %s [PATH [TIMEOUT]]\n", argv[0]);
        return 2;
    }
    manhole_config cfg;
    manhole_config_init(&cfg);
    cfg.unix_path = argc > 1 ? argv[1] : "/var/tmp/example.manhole";
    cfg.timeout = argc > 2 ? atof(argv[2]) : 5;
    cfg.banner = "select-host";
    manhole *mh;
    char err[256];
    if (manhole_open(&mh, &cfg, err, sizeof err) != MANHOLE_OK) {
        fprintf(stderr, "select-host: %s\n", err);
        return 1;
    }
    manhole_bind(mh, "seconds", MANHOLE_LONG, &seconds, 0);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    printf("listening on unix:%s\n", cfg.unix_path);
    fflush(stdout);

    time_t next = time(NULL) + 1;
    int status = 0, too_many = 0;
    while (!stop) {
        fd_set rd, wr;
        FD_ZERO(&rd);
        FD_ZERO(&wr);
        int maxfd = -1;
        /* ... FD_SET the program's own descriptors here ... */
        long ms = (long)(next - time(NULL)) * 1000;
        int t = manhole_timeout(mh);
        if (t >= 0 && t < ms)
            ms = t;
        if (ms < 0)
            ms = 0;
        if (too_many || manhole_fdset(mh, &rd, &wr, &maxfd) == MANHOLE_EFDSETSIZE) {
            /* A descriptor above FD_SETSIZE: select() cannot watch it. */
            if (!too_many++)
                fprintf(stderr, "select-host: %s; waiting in manhole_poll()\n",
                        manhole_errmsg(mh));
            int rc = manhole_poll(mh, (int)ms);
            if (time(NULL) >= next) {
                __atomic_store_n(&seconds, seconds + 1, __ATOMIC_RELAXED);
                next++;
            }
            /* Only a client's sys.exit(n) gets here; exit(), quit() and Ctrl-D
             * end only that client's session. This host stops with status n. */
            if (rc == MANHOLE_EXIT) {
                status = manhole_exit_status(mh);
                break;
            }
            continue;
        }
        struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
        int n = select(maxfd + 1, &rd, &wr, NULL, &tv);
        if (n < 0 && errno != EINTR)
            break;
        if (time(NULL) >= next) {
            __atomic_store_n(&seconds, seconds + 1, __ATOMIC_RELAXED);
            next++;
        }
        int rc = manhole_process(mh, n > 0 ? &rd : NULL, n > 0 ? &wr : NULL);
        if (rc == MANHOLE_EXIT) { /* a client's sys.exit(n), as above */
            status = manhole_exit_status(mh);
            break;
        }
    }
    manhole_close(mh);
    return status;
}
