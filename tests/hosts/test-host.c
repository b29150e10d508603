/*
 * test-host: a configurable C host for the test suite. It drives a
 * manhole through one of the integration styles and exposes a few C
 * values and functions:
 *
 *   counter   int, writable binding      ticks   long, 10 Hz, read-only
 *   label     const char * binding        add(a, b), fail(msg), echo(x)
 *   on_host_thread()  1 if the call runs on the host's loop thread
 *   any_thread_echo(x)  like echo, MANHOLE_ANY_THREAD
 *
 * --loop poll     manhole_poll(mh, timeout) waits (default)
 * --loop select   host select() with manhole_fdset/_timeout/_process
 * --loop pollfds  host poll() with manhole_pollfds, then manhole_poll(mh, 0)
 * --loop fd       host poll() on manhole_fd() only
 * --python        the host starts Python itself, keeps the GIL, runs its
 *                 own Python each tick (host_counter in __main__)
 * --open-files N  open N descriptors before the manhole
 * --open-files-after N  ... after it
 * --fork          fork once the manhole is open; the child reports what
 *                 manhole_poll() says there, then exits
 * --close-after-exit  print "exit N" and keep running after MANHOLE_EXIT
 * --no-tick       no timer of its own: the loop sleeps until the manhole
 *                 has work (turns() counts loop turns)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "../../manhole.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int counter;
static long ticks;
static const char *label = "test-host";
static pthread_t loop_thread;
static volatile sig_atomic_t stop;
static volatile sig_atomic_t usr1;
static long turns;

static void on_usr1(int sig)
{
    (void)sig;
    usr1++;
}

static void on_term(int sig)
{
    (void)sig;
    stop = 1;
}

static void log_line(void *ud, int level, const char *msg)
{
    (void)ud;
    fprintf(stderr, "test-host: [%d] %s\n", level, msg);
    fflush(stderr);
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

static int fn_add(void *ud, int argc, const manhole_value *argv,
                  manhole_value *ret, char *err, size_t errlen)
{
    (void)ud;
    if (argc != 2 || argv[0].type != MANHOLE_LLONG || argv[1].type != MANHOLE_LLONG) {
        snprintf(err, errlen, "add() takes two ints");
        return MANHOLE_RAISE_TYPE;
    }
    ret->type = MANHOLE_LLONG;
    ret->i = argv[0].i + argv[1].i;
    return 0;
}

static int fn_fail(void *ud, int argc, const manhole_value *argv,
                   manhole_value *ret, char *err, size_t errlen)
{
    (void)ud;
    (void)ret;
    snprintf(err, errlen, "%s", argc > 0 && argv[0].type == MANHOLE_STRING
                                    ? argv[0].s
                                    : "failed");
    return MANHOLE_RAISE_VALUE;
}

static int fn_echo(void *ud, int argc, const manhole_value *argv,
                   manhole_value *ret, char *err, size_t errlen)
{
    (void)ud;
    (void)err;
    (void)errlen;
    if (argc > 0)
        *ret = argv[0];
    return 0;
}

static int fn_on_host(void *ud, int argc, const manhole_value *argv,
                      manhole_value *ret, char *err, size_t errlen)
{
    (void)ud;
    (void)argc;
    (void)argv;
    (void)err;
    (void)errlen;
    ret->type = MANHOLE_BOOL;
    ret->i = pthread_equal(pthread_self(), loop_thread) != 0;
    return 0;
}

static int fn_turns(void *ud, int argc, const manhole_value *argv,
                    manhole_value *ret, char *err, size_t errlen)
{
    (void)ud;
    (void)argc;
    (void)argv;
    (void)err;
    (void)errlen;
    ret->type = MANHOLE_LLONG;
    ret->i = turns;
    return 0;
}

/* reenter(): a C function that calls back into the library, as a careless
 * "shutdown" command might; returns what manhole_poll() said. */
static manhole *the_mh;
static int fn_reenter(void *ud, int argc, const manhole_value *argv,
                      manhole_value *ret, char *err, size_t errlen)
{
    (void)ud;
    (void)argc;
    (void)argv;
    (void)err;
    (void)errlen;
    ret->type = MANHOLE_LLONG;
    ret->i = manhole_poll(the_mh, 0);
    return 0;
}

static void open_files(int n)
{
    for (int i = 0; i < n; i++)
        if (open("/dev/null", O_RDONLY) < 0) {
            perror("test-host: open");
            exit(1);
        }
}

static void python_tick(void)
{
    /* The host's own Python: the GIL is ours already. */
    PyObject *main = PyImport_AddModule("__main__");
    PyObject *d = PyModule_GetDict(main);
    PyObject *v = PyDict_GetItemString(d, "host_counter");
    long n = v ? PyLong_AsLong(v) : 0;
    PyObject *nv = PyLong_FromLong(n + 1);
    PyDict_SetItemString(d, "host_counter", nv);
    Py_DECREF(nv);
}

int main(int argc, char **argv)
{
    manhole_config cfg;
    manhole_config_init(&cfg);
    cfg.log = log_line;
    cfg.log_level = MANHOLE_LOG_DEBUG;
    const char *loop = "poll";
    int python = 0, files_before = 0, files_after = 0, do_fork = 0, keep_going = 0;
    int tick = 1;
    enum {
        OPT_PATH = 1, OPT_PORT, OPT_NOTHREADED, OPT_TIMEOUT, OPT_SHARED, OPT_LOOP,
        OPT_PYTHON, OPT_FILES, OPT_FILES_AFTER, OPT_FORK, OPT_MAXCLIENTS, OPT_MAXOUTPUT,
        OPT_MAXLINE, OPT_MODE, OPT_AUDIT, OPT_KEEP, OPT_HOST, OPT_NONLOCAL, OPT_BANNER,
        OPT_IDLE, OPT_WORKERS, OPT_NOTICK, OPT_PRIO, OPT_MAXINPUT, OPT_CLOSE, OPT_SECRET,
        OPT_SECRETFILE
    };
    static const struct option opts[] = {
        {"path", required_argument, NULL, OPT_PATH},
        {"port", required_argument, NULL, OPT_PORT},
        {"host", required_argument, NULL, OPT_HOST},
        {"allow-nonlocal", no_argument, NULL, OPT_NONLOCAL},
        {"banner", required_argument, NULL, OPT_BANNER},
        {"no-threaded", no_argument, NULL, OPT_NOTHREADED},
        {"timeout", required_argument, NULL, OPT_TIMEOUT},
        {"shared", no_argument, NULL, OPT_SHARED},
        {"loop", required_argument, NULL, OPT_LOOP},
        {"python", no_argument, NULL, OPT_PYTHON},
        {"open-files", required_argument, NULL, OPT_FILES},
        {"open-files-after", required_argument, NULL, OPT_FILES_AFTER},
        {"fork", no_argument, NULL, OPT_FORK},
        {"max-clients", required_argument, NULL, OPT_MAXCLIENTS},
        {"max-output", required_argument, NULL, OPT_MAXOUTPUT},
        {"max-line", required_argument, NULL, OPT_MAXLINE},
        {"max-input", required_argument, NULL, OPT_MAXINPUT},
        {"close-timeout", required_argument, NULL, OPT_CLOSE},
        {"max-workers", required_argument, NULL, OPT_WORKERS},
        {"mode", required_argument, NULL, OPT_MODE},
        {"idle-timeout", required_argument, NULL, OPT_IDLE},
        {"audit", no_argument, NULL, OPT_AUDIT},
        {"close-after-exit", no_argument, NULL, OPT_KEEP},
        {"no-tick", no_argument, NULL, OPT_NOTICK},
        {"worker-priority", required_argument, NULL, OPT_PRIO},
        {"tcp-secret", required_argument, NULL, OPT_SECRET},
        {"secret-file", required_argument, NULL, OPT_SECRETFILE},
        {NULL, 0, NULL, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case OPT_PATH: cfg.unix_path = optarg; break;
        case OPT_PORT: cfg.tcp_port = atoi(optarg); break;
        case OPT_HOST: cfg.tcp_host = optarg; break;
        case OPT_NONLOCAL: cfg.tcp_allow_nonlocal = 1; break;
        case OPT_BANNER: cfg.banner = optarg; break;
        case OPT_NOTHREADED: cfg.threaded = 0; break;
        case OPT_TIMEOUT: cfg.timeout = atof(optarg); break;
        case OPT_SHARED: cfg.shared_namespace = 1; break;
        case OPT_LOOP: loop = optarg; break;
        case OPT_PYTHON: python = 1; break;
        case OPT_FILES: files_before = atoi(optarg); break;
        case OPT_FILES_AFTER: files_after = atoi(optarg); break;
        case OPT_FORK: do_fork = 1; break;
        case OPT_MAXCLIENTS: cfg.max_clients = atoi(optarg); break;
        case OPT_MAXOUTPUT: cfg.max_output = (size_t)atol(optarg); break;
        case OPT_MAXLINE: cfg.max_line = (size_t)atol(optarg); break;
        case OPT_MAXINPUT: cfg.max_input = (size_t)atol(optarg); break;
        case OPT_CLOSE: cfg.close_timeout = atof(optarg); break;
        case OPT_WORKERS: cfg.max_workers = atoi(optarg); break;
        case OPT_MODE: cfg.unix_mode = (unsigned)strtoul(optarg, NULL, 8); break;
        case OPT_IDLE: cfg.idle_timeout = atof(optarg); break;
        case OPT_AUDIT: cfg.audit = 1; break;
        case OPT_KEEP: keep_going = 1; break;
        case OPT_NOTICK: tick = 0; break;
        case OPT_SECRET: cfg.tcp_secret = optarg; break;
        case OPT_SECRETFILE: cfg.tcp_secret_file = optarg; break;
        case OPT_PRIO:
            cfg.worker_priority = !strcmp(optarg, "idle")     ? MANHOLE_WORKERS_IDLE
                                  : !strcmp(optarg, "normal") ? MANHOLE_WORKERS_NORMAL
                                                              : MANHOLE_WORKERS_NICE;
            break;
        default: fprintf(stderr, "test-host: bad option\n"); return 2;
        }
    }
    loop_thread = pthread_self();
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    /* SIGUSR1 interrupts system calls (no SA_RESTART): EINTR everywhere. */
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);

    if (python) {
        Py_InitializeEx(0);
        PyRun_SimpleString(
            "import threading, time\n"
            "host_data = {'answer': 42}\n"
            "host_counter = 0\n"
            "def _host_loop():\n"
            "    while True:\n"
            "        time.sleep(0.05)\n"
            "threading.Thread(target=_host_loop, name='host-python-thread', daemon=True).start()\n");
    }
    open_files(files_before);
    manhole *mh;
    char err[512];
    int rc = manhole_open(&mh, &cfg, err, sizeof err);
    if (rc != MANHOLE_OK) {
        fprintf(stderr, "test-host: %s\n", err);
        return 1;
    }
    open_files(files_after);
    manhole_bind(mh, "counter", MANHOLE_INT, &counter, MANHOLE_WRITABLE);
    manhole_bind(mh, "ticks", MANHOLE_LONG, &ticks, 0);
    manhole_bind(mh, "label", MANHOLE_STRING, &label, 0);
    manhole_def(mh, "add", fn_add, NULL, "add(a, b): a + b in C", 0);
    manhole_def(mh, "fail", fn_fail, NULL, "fail(msg): raises ValueError", 0);
    manhole_def(mh, "echo", fn_echo, NULL, NULL, 0);
    manhole_def(mh, "on_host_thread", fn_on_host, NULL, NULL, 0);
    manhole_def(mh, "any_thread_echo", fn_echo, NULL, NULL, MANHOLE_ANY_THREAD);
    manhole_def(mh, "turns", fn_turns, NULL, "host loop turns so far", 0);
    the_mh = mh;
    manhole_def(mh, "reenter", fn_reenter, NULL, NULL, 0);
    manhole_set_int(mh, "answer", 42);
    manhole_set_double(mh, "pi", 3.25);
    manhole_set_string(mh, "greeting", "h\xc3\xa9llo");
    manhole_set_bytes(mh, "blob", "\x00\x01\xff", 3);
    if (python) {
        PyObject *d = PyModule_GetDict(PyImport_AddModule("__main__"));
        manhole_set_object(mh, "host_data", PyDict_GetItemString(d, "host_data"));
        manhole_set_object(mh, "host_main", d);
    }
    if (cfg.unix_path)
        printf("listening on unix:%s\n", cfg.unix_path);
    if (cfg.tcp_port >= 0)
        printf("listening on tcp:127.0.0.1:%d\n", manhole_tcp_port(mh));
    fflush(stdout);

    if (do_fork) {
        fflush(stderr);
        pid_t pid = fork();
        if (pid == 0) {
            int prc = manhole_poll(mh, 0);
            int frc = manhole_fd(mh);
            manhole_close(mh);
            printf("child: poll=%d fd=%d\n", prc, frc);
            fflush(stdout);
            _exit(0);
        }
        int st;
        waitpid(pid, &st, 0);
        printf("parent: child exited %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
        fflush(stdout);
    }

    int status = 0;
    double next_tick = now_ms() + 100;
    while (!stop) {
        turns++;
        int wait = (int)(next_tick - now_ms());
        if (wait < 0)
            wait = 0;
        if (!tick)
            wait = -1;
        if (!strcmp(loop, "poll")) {
            rc = manhole_poll(mh, wait);
        } else if (!strcmp(loop, "select")) {
            fd_set rd, wr;
            FD_ZERO(&rd);
            FD_ZERO(&wr);
            int maxfd = -1;
            int frc = manhole_fdset(mh, &rd, &wr, &maxfd);
            if (frc == MANHOLE_EFDSETSIZE) {
                fprintf(stderr, "test-host: %s\n", manhole_errmsg(mh));
                return 3;
            }
            int t = manhole_timeout(mh);
            if (t >= 0 && (wait < 0 || t < wait))
                wait = t;
            struct timeval tv = {wait / 1000, (wait % 1000) * 1000};
            int n = select(maxfd + 1, &rd, &wr, NULL, wait < 0 ? NULL : &tv);
            rc = manhole_process(mh, n > 0 ? &rd : NULL, n > 0 ? &wr : NULL);
        } else if (!strcmp(loop, "pollfds")) {
            struct pollfd fds[256];
            int n = manhole_pollfds(mh, fds, 256);
            if (n > 256)
                n = 256;
            int t = manhole_timeout(mh);
            if (t >= 0 && (wait < 0 || t < wait))
                wait = t;
            poll(fds, (nfds_t)n, wait);
            rc = manhole_poll(mh, 0);
        } else if (!strcmp(loop, "fd")) {
            struct pollfd pf = {manhole_fd(mh), POLLIN, 0};
            int t = manhole_timeout(mh);
            if (t >= 0 && (wait < 0 || t < wait))
                wait = t;
            poll(&pf, 1, wait);
            rc = manhole_poll(mh, 0);
        } else {
            fprintf(stderr, "test-host: unknown loop %s\n", loop);
            return 2;
        }
        if (tick && now_ms() >= next_tick) {
            __atomic_store_n(&ticks, ticks + 1, __ATOMIC_RELAXED);
            next_tick += 100;
            if (python)
                python_tick();
        }
        if (rc == MANHOLE_EXIT) {
            status = manhole_exit_status(mh);
            if (!keep_going)
                break;
            printf("exit %d\n", status);
            fflush(stdout);
        } else if (rc < 0) {
            fprintf(stderr, "test-host: poll: %s\n", manhole_errmsg(mh));
        }
    }
    manhole_close(mh);
    if (python) {
        /* The host's interpreter is still the host's: use it, then end it. */
        PyRun_SimpleString("import sys\n"
                           "print('host python alive after close:', host_counter > 0,"
                           " sys.stdout is sys.__stdout__)\n"
                           "sys.stdout.flush()\n");
        Py_FinalizeEx();
    }
    printf("closed after %ld turns, %ld SIGUSR1\n", turns, (long)usr1);
    fflush(stdout);
    return status;
}
