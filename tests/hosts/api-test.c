/*
 * api-test: the C API's contracts, checked from C. Prints one line per
 * check ("ok N - what" or "not ok N - what") and exits 1 if any failed.
 *
 *   api-test DIR      (a directory for its sockets)
 */
#define _POSIX_C_SOURCE 200809L
#include "../../manhole.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int n_checks, n_failed;

static void check(int ok, const char *what)
{
    n_checks++;
    if (!ok)
        n_failed++;
    printf("%sok %d - %s\n", ok ? "" : "not ", n_checks, what);
    fflush(stdout);
}

static manhole *g_mh;
static int recursive_rc = 1;

static void log_cb(void *ud, int level, const char *msg)
{
    (void)ud;
    (void)level;
    if (g_mh && strstr(msg, "accepted client"))
        recursive_rc = manhole_poll(g_mh, 0); /* must be refused */
}

static void *wake_later(void *arg)
{
    manhole_wakeup(arg);
    return NULL;
}

static int connect_to(const char *path)
{
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
        return -1;
    return fd;
}

static int sigpipe_is_default(void)
{
    struct sigaction sa;
    sigaction(SIGPIPE, NULL, &sa);
    return sa.sa_handler == SIG_DFL;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: api-test DIR\n");
        return 2;
    }
    char path[200], path2[200], err[256];
    snprintf(path, sizeof path, "%s/a", argv[1]);
    snprintf(path2, sizeof path2, "%s/b", argv[1]);

    /* Defaults. */
    manhole_config cfg;
    manhole_config_init(&cfg);
    check(cfg.struct_size == sizeof cfg, "config_init sets struct_size");
    check(cfg.unix_path == NULL && cfg.tcp_port == -1 && cfg.unix_mode == 0600,
          "defaults: no listener, TCP off, mode 0600");
    check(cfg.threaded == 1 && cfg.timeout == 5.0 && cfg.shared_namespace == 0,
          "defaults: threaded, 5 s timeout, per-client namespace");
    check(cfg.max_clients == 64 && cfg.max_line == 1u << 20 && cfg.max_output == 1u << 20 &&
              cfg.max_workers == 16 && cfg.worker_priority == MANHOLE_WORKERS_NICE &&
              cfg.close_timeout == 1.0,
          "defaults: limits");

    /* Bad opens. */
    manhole *mh = (manhole *)&cfg;
    check(manhole_open(&mh, &cfg, err, sizeof err) == MANHOLE_EINVAL && mh == NULL &&
              strstr(err, "nothing to listen on"),
          "open with no listener: EINVAL, *out NULL, a message");
    manhole_config raw;
    memset(&raw, 0, sizeof raw);
    check(manhole_open(&mh, &raw, err, sizeof err) == MANHOLE_EINVAL,
          "open with an uninitialised config: EINVAL");
    check(manhole_open(&mh, NULL, NULL, 0) == MANHOLE_EINVAL, "open with NULL config: EINVAL");
    manhole_close(NULL);
    check(1, "close(NULL) is harmless");

    /* Status texts. */
    int codes[] = {MANHOLE_OK, MANHOLE_EXIT, MANHOLE_EINVAL, MANHOLE_ESYS, MANHOLE_ENOMEM,
                   MANHOLE_EPYTHON, MANHOLE_EBUSY, MANHOLE_EEXIST, MANHOLE_EFDSETSIZE,
                   MANHOLE_ERECURSIVE, MANHOLE_EFORKED, MANHOLE_ENOTSUP, MANHOLE_ENOTFOUND};
    int distinct = 1;
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++)
        for (size_t j = 0; j < i; j++)
            if (!manhole_strerror(codes[i]) ||
                !strcmp(manhole_strerror(codes[i]), manhole_strerror(codes[j])))
                distinct = 0;
    check(distinct, "strerror: a distinct text for every status");

    /* Open. */
    check(sigpipe_is_default(), "SIGPIPE disposition is the default before open");
    cfg.unix_path = path;
    cfg.log = log_cb;
    cfg.timeout = 2;
    check(manhole_open(&mh, &cfg, err, sizeof err) == MANHOLE_OK, "open");
    g_mh = mh;
    check(sigpipe_is_default(), "SIGPIPE disposition untouched by open");
    check(manhole_tcp_port(mh) == -1 && manhole_client_count(mh) == 0,
          "tcp_port -1 without TCP; no clients");
    check(!strcmp(manhole_version(), MANHOLE_VERSION_STRING) &&
              manhole_version_number() == MANHOLE_VERSION_NUMBER,
          "runtime version matches the header");
    check(manhole_timeout(mh) == -1, "idle: no timeout wanted");
    check(manhole_poll(mh, 0) == MANHOLE_OK, "poll(0) with nothing to do");

    /* fd sets: adds, never clears, raises maxfd. */
    fd_set rd, wr;
    FD_ZERO(&rd);
    FD_ZERO(&wr);
    FD_SET(0, &rd);
    FD_SET(1, &wr);
    int maxfd = 1;
    check(manhole_fdset(mh, &rd, &wr, &maxfd) == MANHOLE_OK, "fdset");
    int added = 0;
    for (int fd = 2; fd < FD_SETSIZE; fd++)
        if (FD_ISSET(fd, &rd))
            added++;
    check(FD_ISSET(0, &rd) && FD_ISSET(1, &wr), "fdset never clears the host's descriptors");
    check(added >= 2 && maxfd > 1, "fdset adds the listener and wake-up and raises maxfd");
    int before = maxfd;
    manhole_fdset(mh, &rd, &wr, &maxfd);
    check(maxfd == before, "fdset never lowers maxfd");
    check(manhole_process(mh, NULL, NULL) == MANHOLE_OK, "process(NULL, NULL): timers only");

    /* poll descriptors: size query, then fill. */
    int need = manhole_pollfds(mh, NULL, 0);
    struct pollfd fds[16];
    int got = manhole_pollfds(mh, fds, 16);
    check(need >= 2 && got == need, "pollfds: the size query matches the fill");
    int readable = 1;
    for (int i = 0; i < got; i++)
        if (!(fds[i].events & POLLIN))
            readable = 0;
    check(readable, "pollfds: listener and wake-up watched for input");
    int one = manhole_fd(mh);
    check(one >= 0 || one == MANHOLE_ENOTSUP, "manhole_fd: a descriptor, or ENOTSUP");

    /* manhole_wakeup from another thread ends an unbounded wait. */
    pthread_t t;
    pthread_create(&t, NULL, wake_later, mh);
    check(manhole_poll(mh, -1) == MANHOLE_OK, "wakeup from another thread ends poll(-1)");
    pthread_join(t, NULL);

    /* The recursion guard, from inside the log callback. */
    int c1 = connect_to(path);
    for (int i = 0; i < 100 && recursive_rc == 1; i++)
        manhole_poll(mh, 100);
    check(recursive_rc == MANHOLE_ERECURSIVE, "a call from the log callback: ERECURSIVE");
    check(manhole_client_count(mh) == 1, "client_count counts the client");
    close(c1);

    /* Namespace calls. */
    check(manhole_set_int(mh, "i", 42) == MANHOLE_OK && manhole_set_double(mh, "d", 1.5) == 0 &&
              manhole_set_string(mh, "s", "x") == 0 && manhole_set_bytes(mh, "b", "\0", 1) == 0,
          "set_int/double/string/bytes");
    check(manhole_unset(mh, "i") == MANHOLE_OK, "unset a name");
    check(manhole_unset(mh, "i") == MANHOLE_ENOTFOUND && manhole_errmsg(mh)[0],
          "unset a missing name: ENOTFOUND with a message");
    static int var;
    check(manhole_bind(mh, "v", 999, &var, 0) == MANHOLE_EINVAL, "bind: bad type refused");
    static const char *str = "s";
    check(manhole_bind(mh, "v", MANHOLE_STRING, &str, MANHOLE_WRITABLE) == MANHOLE_EINVAL,
          "bind: writable string refused");
    check(manhole_bind(mh, "", MANHOLE_INT, &var, 0) == MANHOLE_EINVAL, "bind: empty name refused");
    check(manhole_def(mh, "f", NULL, NULL, NULL, 0) == MANHOLE_EINVAL, "def: NULL function refused");
    check(manhole_namespace(mh) != NULL, "namespace dict available");

    /* Two manholes in one process. */
    manhole_config cfg2;
    manhole_config_init(&cfg2);
    cfg2.unix_path = path2;
    manhole *mh2;
    check(manhole_open(&mh2, &cfg2, err, sizeof err) == MANHOLE_OK, "a second manhole opens");
    manhole_close(mh);
    g_mh = NULL;
    int c2 = connect_to(path2);
    char buf[64];
    ssize_t r = 0;
    for (int i = 0; i < 100 && r <= 0; i++) {
        manhole_poll(mh2, 50);
        r = recv(c2, buf, sizeof buf, MSG_DONTWAIT);
    }
    check(r == 4 && !memcmp(buf, ">>> ", 4), "the second one serves after the first closed");
    close(c2);
    manhole_close(mh2);
    check(sigpipe_is_default(), "SIGPIPE disposition untouched after close");

    /* Open again after Python was finalized. */
    check(manhole_open(&mh, &cfg2, err, sizeof err) == MANHOLE_OK, "open again after close");
    int c3 = connect_to(path2);
    r = 0;
    for (int i = 0; i < 100 && r <= 0; i++) {
        manhole_poll(mh, 50);
        r = recv(c3, buf, sizeof buf, MSG_DONTWAIT);
    }
    check(r == 4, "and it serves");
    close(c3);
    manhole_close(mh);
    printf("%d checks, %d failed\n", n_checks, n_failed);
    return n_failed ? 1 : 0;
}
