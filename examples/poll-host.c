/*
 * poll-host: a manhole in a poll() loop.
 *
 *   poll-host [PATH [TIMEOUT]]
 *
 * The loop asks manhole_pollfds() for the descriptors to watch (appended
 * after its own), polls, then calls manhole_poll(mh, 0) to do what is
 * ready. `seconds` counts the loop's 1 s timer.
 */
#define _POSIX_C_SOURCE 200809L
#include <manhole.h>

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
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
    cfg.banner = "poll-host";
    manhole *mh;
    char err[256];
    if (manhole_open(&mh, &cfg, err, sizeof err) != MANHOLE_OK) {
        fprintf(stderr, "poll-host: %s\n", err);
        return 1;
    }
    manhole_bind(mh, "seconds", MANHOLE_LONG, &seconds, 0);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    printf("listening on unix:%s\n", cfg.unix_path);
    fflush(stdout);

    struct pollfd *fds = NULL;
    int cap = 0, status = 0;
    time_t next = time(NULL) + 1;
    while (!stop) {
        int own = 0; /* ... the program's own descriptors go first ... */
        int need = manhole_pollfds(mh, NULL, 0);
        if (own + need > cap) {
            cap = (own + need) * 2;
            fds = realloc(fds, (size_t)cap * sizeof *fds);
        }
        int n = manhole_pollfds(mh, fds + own, cap - own);
        long ms = (long)(next - time(NULL)) * 1000;
        int t = manhole_timeout(mh);
        if (t >= 0 && t < ms)
            ms = t;
        if (poll(fds, (nfds_t)(own + n), ms < 0 ? 0 : (int)ms) < 0 && errno != EINTR)
            break;
        if (time(NULL) >= next) {
            __atomic_store_n(&seconds, seconds + 1, __ATOMIC_RELAXED);
            next++;
        }
        int rc = manhole_poll(mh, 0); /* do what poll() found ready */
        /* Only a client's sys.exit(n) gets here; exit(), quit() and Ctrl-D
         * end only that client's session. This host stops with status n. */
        if (rc == MANHOLE_EXIT) {
            status = manhole_exit_status(mh);
            break;
        }
    }
    free(fds);
    manhole_close(mh);
    return status;
}
