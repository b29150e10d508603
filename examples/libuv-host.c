/*
 * libuv-host: a manhole in a libuv loop.
 *
 *   libuv-host [PATH [TIMEOUT]]
 *
 * A uv_poll_t on manhole_fd() and a uv_timer_t kept at manhole_timeout();
 * either runs manhole_poll(mh, 0). `seconds` counts a libuv timer of the
 * program's own.
 */
#define _POSIX_C_SOURCE 200809L
#include <manhole.h>

#include <stdio.h>
#include <stdlib.h>
#include <uv.h>

static manhole *mh;
static uv_poll_t io;
static uv_timer_t timer, tick;
static uv_signal_t sint, sterm;
static int status;
static long seconds;

static void on_timer(uv_timer_t *t);

static void run_manhole(void)
{
    /* Only a client's sys.exit(n) gets here; exit(), quit() and Ctrl-D
     * end only that client's session. This host stops with status n. */
    if (manhole_poll(mh, 0) == MANHOLE_EXIT) {
        status = manhole_exit_status(mh);
        uv_stop(uv_default_loop());
        return;
    }
    int t = manhole_timeout(mh);
    if (t >= 0)
        uv_timer_start(&timer, on_timer, (uint64_t)t, 0);
    else
        uv_timer_stop(&timer);
}

static void on_io(uv_poll_t *h, int st, int events)
{
    (void)h;
    (void)st;
    (void)events;
    run_manhole();
}

static void on_timer(uv_timer_t *t)
{
    (void)t;
    run_manhole();
}

static void on_tick(uv_timer_t *t)
{
    (void)t;
    __atomic_store_n(&seconds, seconds + 1, __ATOMIC_RELAXED);
}

static void on_signal(uv_signal_t *s, int sig)
{
    (void)s;
    (void)sig;
    uv_stop(uv_default_loop());
}

static void close_one(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

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
    cfg.banner = "libuv-host";
    char err[256];
    if (manhole_open(&mh, &cfg, err, sizeof err) != MANHOLE_OK) {
        fprintf(stderr, "libuv-host: %s\n", err);
        return 1;
    }
    manhole_bind(mh, "seconds", MANHOLE_LONG, &seconds, 0);
    int fd = manhole_fd(mh);
    if (fd < 0) {
        fprintf(stderr, "libuv-host: %s\n", manhole_errmsg(mh));
        return 1;
    }
    uv_loop_t *loop = uv_default_loop();
    uv_poll_init(loop, &io, fd);
    uv_poll_start(&io, UV_READABLE, on_io);
    uv_timer_init(loop, &timer);
    uv_timer_init(loop, &tick);
    uv_timer_start(&tick, on_tick, 1000, 1000);
    uv_signal_init(loop, &sint);
    uv_signal_start(&sint, on_signal, SIGINT);
    uv_signal_init(loop, &sterm);
    uv_signal_start(&sterm, on_signal, SIGTERM);
    printf("listening on unix:%s\n", cfg.unix_path);
    fflush(stdout);
    run_manhole();
    uv_run(loop, UV_RUN_DEFAULT);
    uv_walk(loop, close_one, NULL); /* let every handle close */
    uv_run(loop, UV_RUN_DEFAULT);
    uv_loop_close(loop);
    manhole_close(mh);
    return status;
}
