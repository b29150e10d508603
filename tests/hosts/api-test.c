/*
 * api-test: the C API's contracts, checked from C. Prints one line per
 * check ("ok N - what" or "not ok N - what") and exits 1 if any failed.
 *
 *   api-test DIR      (a directory for its sockets)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first: it sets the feature-test macros */

#include "../../manhole.h"

#include <errno.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
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

static int wake_rc = 1;

static void *wake_later(void *arg)
{
    wake_rc = manhole_wakeup(arg);
    return NULL;
}

static int recursive_fn(void *ud, int argc, const manhole_value *argv,
                        manhole_value *ret, char *err, size_t errlen)
{
    (void)ud, (void)argc, (void)argv, (void)ret, (void)err, (void)errlen;
    return 0;
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

/* manhole_open with one field changed from cfg refuses it with EINVAL, a
 * NULL handle and a message naming the field. */
static int refused(const manhole_config *cfg, const char *field)
{
    manhole *mh = (manhole *)cfg;
    char err[256] = "";
    int rc = manhole_open(&mh, cfg, err, sizeof err);
    if (rc == MANHOLE_OK)
        manhole_close(mh);
    return rc == MANHOLE_EINVAL && mh == NULL && strstr(err, field) != NULL;
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
    check(cfg.max_clients == 0 && cfg.max_line == 1u << 20 && cfg.max_output == 1u << 20 &&
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

    /* Numbers the library would have to guess about are refused, naming
     * the field; 0 keeps meaning "the default". */
    manhole_config bad;
    const double bad_seconds[] = {NAN, INFINITY, -INFINITY, -1, 1e6 + 1, 1e300};
    int all_refused = 1;
    for (size_t i = 0; i < sizeof bad_seconds / sizeof bad_seconds[0]; i++) {
        manhole_config_init(&bad);
        bad.unix_path = path;
        bad.timeout = bad_seconds[i];
        all_refused &= refused(&bad, "timeout");
        manhole_config_init(&bad);
        bad.unix_path = path;
        bad.idle_timeout = bad_seconds[i];
        all_refused &= refused(&bad, "idle_timeout");
        manhole_config_init(&bad);
        bad.unix_path = path;
        bad.close_timeout = bad_seconds[i];
        all_refused &= refused(&bad, "close_timeout");
    }
    check(all_refused, "timeout, idle_timeout, close_timeout: nan, inf, negative, > 1e6 refused");
    manhole_config_init(&bad);
    bad.unix_path = path;
    bad.max_clients = -1;
    check(refused(&bad, "max_clients"), "negative max_clients refused, naming it");
    manhole_config_init(&bad);
    bad.unix_path = path;
    bad.max_workers = -3;
    check(refused(&bad, "max_workers"), "negative max_workers refused, naming it");
    manhole_config_init(&bad);
    bad.unix_path = path;
    bad.max_line = (size_t)-1;
    check(refused(&bad, "max_line"), "max_line of (size_t)-1 refused, naming it");
    manhole_config_init(&bad);
    bad.unix_path = path;
    bad.max_output = (size_t)-4096;
    check(refused(&bad, "max_output"), "max_output of (size_t)-4096 refused, naming it");
    manhole_config_init(&bad);
    bad.unix_path = path;
    bad.worker_priority = 7;
    check(refused(&bad, "worker_priority"), "unknown worker_priority refused, naming it");
    manhole_config_init(&bad);
    bad.tcp_port = -2;
    check(refused(&bad, "tcp_port"), "tcp_port below -1 refused, naming it");
    manhole_config_init(&bad);
    bad.unix_path = path;
    bad.unix_mode = 04777;
    check(refused(&bad, "unix_mode"), "unix_mode with setuid bits refused, naming it");
    check(access(path, F_OK) != 0, "a refused config creates no socket file");
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
    check(wake_rc == MANHOLE_OK, "wakeup returns MANHOLE_OK");
    check(manhole_wakeup(mh) == MANHOLE_OK && manhole_wakeup(mh) == MANHOLE_OK &&
              manhole_poll(mh, -1) == MANHOLE_OK && manhole_poll(mh, 0) == MANHOLE_OK,
          "two wakeups before a turn: MANHOLE_OK each, and poll(-1) returns");
    check(manhole_wakeup(NULL) == MANHOLE_EINVAL, "wakeup(NULL): EINVAL");
    fflush(stdout);
    pid_t kid = fork();
    if (kid == 0)
        _exit(manhole_wakeup(mh) == MANHOLE_EFORKED ? 0 : 1);
    int wst = -1;
    waitpid(kid, &wst, 0);
    check(kid > 0 && WIFEXITED(wst) && WEXITSTATUS(wst) == 0,
          "wakeup in a child after fork(): EFORKED");

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

    /* Names a client could never type are refused, with the reason. */
    check(manhole_set_int(mh, "1abc", 1) == MANHOLE_EINVAL &&
              strstr(manhole_errmsg(mh), "'1abc' is not a Python identifier"),
          "set_int: a name starting with a digit refused, named in the message");
    check(manhole_set_string(mh, "a b", "x") == MANHOLE_EINVAL &&
              manhole_set_double(mh, "a-b", 1) == MANHOLE_EINVAL &&
              manhole_set_bytes(mh, "a.b", "", 0) == MANHOLE_EINVAL &&
              manhole_set_object(mh, "x\n", manhole_namespace(mh)) == MANHOLE_EINVAL,
          "set_string/double/bytes/object: names with space, dash, dot, newline refused");
    check(strstr(manhole_errmsg(mh), "'x\\x0a'") != NULL,
          "a control character is shown escaped in the message");
    check(manhole_set_int(mh, "class", 1) == MANHOLE_EINVAL &&
              strstr(manhole_errmsg(mh), "keyword") &&
              manhole_set_int(mh, "None", 1) == MANHOLE_EINVAL &&
              manhole_set_int(mh, "await", 1) == MANHOLE_EINVAL &&
              manhole_set_int(mh, "__debug__", 1) == MANHOLE_EINVAL,
          "keywords (class, None, await) and __debug__ refused");
    check(manhole_bind(mh, "x-y", MANHOLE_INT, &var, 0) == MANHOLE_EINVAL &&
              manhole_bind(mh, "for", MANHOLE_INT, &var, 0) == MANHOLE_EINVAL,
          "bind: non-identifier and keyword names refused");
    check(manhole_def(mh, "f()", recursive_fn, NULL, NULL, 0) == MANHOLE_EINVAL &&
              manhole_def(mh, "lambda", recursive_fn, NULL, NULL, 0) == MANHOLE_EINVAL,
          "def: non-identifier and keyword names refused");
    check(manhole_unset(mh, "a.b") == MANHOLE_EINVAL, "unset: a non-identifier is EINVAL, not ENOTFOUND");
    check(manhole_set_int(mh, "\xff\xfe", 1) == MANHOLE_EINVAL &&
              strstr(manhole_errmsg(mh), "UTF-8"),
          "a name that is not UTF-8 refused");
    check(manhole_set_int(mh, "\xef\xac\x81le", 1) == MANHOLE_EINVAL &&
              strstr(manhole_errmsg(mh), "NFKC"),
          "a name the compiler would normalise (U+FB01 ligature) refused");
    check(manhole_set_int(mh, "\xc3\xa9t\xc3\xa9", 1) == MANHOLE_OK &&
              manhole_set_int(mh, "_", 1) == MANHOLE_OK &&
              manhole_set_int(mh, "match", 1) == MANHOLE_OK &&
              manhole_set_int(mh, "type", 1) == MANHOLE_OK &&
              manhole_bind(mh, "_private9", MANHOLE_INT, &var, 0) == MANHOLE_OK,
          "identifiers accepted: non-ASCII, _, soft keywords (match, type), digits after the first");
    check(manhole_unset(mh, "match") == MANHOLE_OK && manhole_unset(mh, "_private9") == MANHOLE_OK,
          "unset of valid names still works");

    /* `del` of a bound name in a namespace removes the binding there; the
     * host binding the name again restores it. */
    static int live = 7;
    manhole_bind(mh, "live", MANHOLE_INT, &live, 0);
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *ns = manhole_namespace(mh);
    PyObject *v = PyMapping_GetItemString(ns, "live");
    check(v && PyLong_AsLong(v) == 7, "a bound name reads through the namespace");
    Py_XDECREF(v);
    check(PyMapping_DelItemString(ns, "live") == 0, "del of a bound name succeeds");
    v = PyMapping_GetItemString(ns, "live");
    check(!v && PyErr_ExceptionMatches(PyExc_KeyError) && !PyMapping_HasKeyString(ns, "live"),
          "after del the name is gone from that namespace");
    PyErr_Clear();
    PyObject *five = PyLong_FromLong(5);
    check(PyMapping_SetItemString(ns, "live", five) == 0 && live == 7,
          "assigning it then makes an ordinary name; the C variable is untouched");
    Py_DECREF(five);
    live = 8;
    v = PyMapping_GetItemString(ns, "live");
    check(v && PyLong_AsLong(v) == 5, "and it reads the Python value, not the C variable");
    Py_XDECREF(v);
    PyGILState_Release(g);
    check(manhole_bind(mh, "live", MANHOLE_INT, &live, 0) == MANHOLE_OK, "bind the name again");
    g = PyGILState_Ensure();
    v = PyMapping_GetItemString(ns, "live");
    check(v && PyLong_AsLong(v) == 8, "binding again makes it live again");
    Py_XDECREF(v);
    PyErr_Clear();
    PyGILState_Release(g);
    check(manhole_namespace(mh) != NULL, "namespace dict available");

    /* Two manholes in one process. */
    manhole_config cfg2;
    manhole_config_init(&cfg2);
    cfg2.unix_path = path2;
    cfg2.timeout = 1e6;       /* the largest durations are accepted */
    cfg2.idle_timeout = 1e6;
    cfg2.max_clients = 0;     /* 0: the default */
    cfg2.max_workers = 0;
    cfg2.close_timeout = 0;
    manhole *mh2;
    check(manhole_open(&mh2, &cfg2, err, sizeof err) == MANHOLE_OK,
          "a second manhole opens (timeouts of 1e6 s, 0 for the defaults)");
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
