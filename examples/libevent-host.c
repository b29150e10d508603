/*
 * libevent-host: a manhole in a libevent loop.
 *
 *   libevent-host [PATH [TIMEOUT]]
 *
 * One persistent read event on manhole_fd() and one timer kept at
 * manhole_timeout(); either runs manhole_poll(mh, 0). `seconds` counts a
 * libevent timer of the program's own.
 */
#define _POSIX_C_SOURCE 200809L
#include <manhole.h>

#include <event2/event.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

struct app {
    manhole *mh;
    struct event_base *base;
    struct event *timer;
    int status;
};

static long seconds;

static void run_manhole(struct app *app)
{
    /* Only a client's sys.exit(n) gets here; exit(), quit() and Ctrl-D
     * end only that client's session. This host stops with status n. */
    if (manhole_poll(app->mh, 0) == MANHOLE_EXIT) {
        app->status = manhole_exit_status(app->mh);
        event_base_loopbreak(app->base);
        return;
    }
    int t = manhole_timeout(app->mh);
    if (t >= 0) {
        struct timeval tv = {t / 1000, (t % 1000) * 1000};
        evtimer_add(app->timer, &tv);
    } else {
        evtimer_del(app->timer);
    }
}

static void on_manhole(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    run_manhole(arg);
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    __atomic_store_n(&seconds, seconds + 1, __ATOMIC_RELAXED);
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
    (void)sig;
    (void)what;
    event_base_loopbreak(((struct app *)arg)->base);
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
    cfg.banner = "libevent-host";
    struct app app = {0};
    char err[256];
    if (manhole_open(&app.mh, &cfg, err, sizeof err) != MANHOLE_OK) {
        fprintf(stderr, "libevent-host: %s\n", err);
        return 1;
    }
    manhole_bind(app.mh, "seconds", MANHOLE_LONG, &seconds, 0);
    int fd = manhole_fd(app.mh);
    if (fd < 0) {
        fprintf(stderr, "libevent-host: %s\n", manhole_errmsg(app.mh));
        return 1;
    }
    app.base = event_base_new();
    struct event *io = event_new(app.base, fd, EV_READ | EV_PERSIST, on_manhole, &app);
    app.timer = evtimer_new(app.base, on_manhole, &app);
    struct event *tick = event_new(app.base, -1, EV_PERSIST, on_tick, NULL);
    struct event *sint = evsignal_new(app.base, SIGINT, on_signal, &app);
    struct event *sterm = evsignal_new(app.base, SIGTERM, on_signal, &app);
    struct timeval one = {1, 0};
    event_add(io, NULL);
    event_add(tick, &one);
    event_add(sint, NULL);
    event_add(sterm, NULL);
    printf("listening on unix:%s\n", cfg.unix_path);
    fflush(stdout);
    run_manhole(&app);
    event_base_dispatch(app.base);
    event_free(io);
    event_free(app.timer);
    event_free(tick);
    event_free(sint);
    event_free(sterm);
    event_base_free(app.base);
    manhole_close(app.mh);
    return app.status;
}
