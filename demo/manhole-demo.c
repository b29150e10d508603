/*
 * manhole-demo: a small host with its own select() loop and a manhole in
 * it; with no arguments it behaves like aiomanhole's quick example.
 *
 *   ./demo/manhole-demo &
 *   nc -U /var/tmp/testing.manhole
 *
 * Its loop increments `ticks` about ten times a second; the REPL reads it
 * live. The loop sleeps in select() on its own descriptors and the
 * manhole's (manhole_fdset/manhole_timeout/manhole_process): no polling.
 */
#define _POSIX_C_SOURCE 200809L
#include "../manhole.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <time.h>
#include <unistd.h>

static long ticks;               /* bound into the REPL as `ticks` */
static int sig_pipe[2] = {-1, -1};
static volatile sig_atomic_t got_signal;
static int quiet;

static void on_signal(int sig)
{
    int e = errno;
    got_signal = sig;
    ssize_t r = write(sig_pipe[1], "!", 1);
    (void)r;
    errno = e;
}

/* Log lines go to stderr. While the manhole opens they are held back: if
 * the open fails, its one error line is all the user sees. */
static char held[4096] = "";
static size_t held_len;
static int holding = 1;

static void log_line(void *ud, int level, const char *msg)
{
    static const char *names[] = {"error", "warning", "info", "audit", "debug"};
    (void)ud;
    if (quiet && level > MANHOLE_LOG_WARNING)
        return;
    char line[1200];
    int n = snprintf(line, sizeof line, "manhole-demo: %s: %s\n",
                     level >= 0 && level <= 4 ? names[level] : "?", msg);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof line)
        n = (int)sizeof line - 1;
    if (holding) {
        if (held_len + (size_t)n < sizeof held) {
            memcpy(held + held_len, line, (size_t)n);
            held_len += (size_t)n;
        }
        return;
    }
    fputs(line, stderr);
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

/* A C function for the REPL: demo_add(a, b) -> a + b, on the host thread. */
static int demo_add(void *ud, int argc, const manhole_value *argv,
                    manhole_value *ret, char *err, size_t errlen)
{
    (void)ud;
    if (argc != 2 || argv[0].type != MANHOLE_LLONG || argv[1].type != MANHOLE_LLONG) {
        snprintf(err, errlen, "demo_add(a, b) takes two ints");
        return MANHOLE_RAISE_TYPE;
    }
    ret->type = MANHOLE_LLONG;
    ret->i = argv[0].i + argv[1].i;
    return 0;
}

static void usage(FILE *f)
{
    fputs("usage: manhole-demo [options]\n"
          "A C host with a Python manhole; nc -U PATH to get a prompt.\n"
          "\n"
          "  --path PATH        UNIX socket (default /var/tmp/testing.manhole,\n"
          "                     unless --port is given; '' for none)\n"
          "  --port N           listen on TCP port N (0: any free port)\n"
          "  --host ADDR        TCP address (default 127.0.0.1)\n"
          "  --allow-nonlocal   allow a non-loopback --host\n"
          "  --secret-file PATH where the TCP secret is written (default\n"
          "                     $XDG_RUNTIME_DIR/manhole/tcp-ADDR:PORT.secret,\n"
          "                     or /tmp/manhole-UID/tcp-ADDR:PORT.secret)\n"
          "  --tcp-insecure     no TCP secret: any local user gets a prompt\n"
          "  --mode OCTAL       socket file permissions (default 600)\n"
          "  --banner TEXT      banner (default 'Well this is neat')\n"
          "  --no-banner        no banner\n"
          "  --threaded         run statements on worker threads (default)\n"
          "  --no-threaded      run statements in the host loop\n"
          "  --timeout SECONDS  statement time limit (default 5; 0: none)\n"
          "  --shared           one namespace for every client (default)\n"
          "  --no-shared        each client gets its own copy\n"
          "  --max-clients N    refuse clients past N (default: 3/4 of the\n"
          "                     descriptor limit, 768 of 1024)\n"
          "  --max-line BYTES   longest input line (default 1048576)\n"
          "  --max-output BYTES pending output per client (default 1048576)\n"
          "  --idle-timeout S   close clients silent for S seconds (default 0: never)\n"
          "  --audit            log every input line\n"
          "  --quiet            log only warnings and errors\n"
          "  --help             this text\n"
          "\n"
          "SECONDS are decimal numbers from 0 to 1000000; N and BYTES are\n"
          "whole numbers from 1 to 1000000 (N) or 1073741824 (BYTES).\n",
          f);
}

/* A usage error: one line naming the option and what is wrong with it, the
 * usage, exit status 2. */
static int bad_usage(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int bad_usage(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("manhole-demo: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputs("\n", stderr);
    va_end(ap);
    usage(stderr);
    return 2;
}

/* Seconds: a finite decimal number from 0 to MAX_SECONDS (nan, inf,
 * negative and absurd values are refused, as the library refuses them). */
#define MAX_SECONDS 1e6
static int parse_seconds(const char *s, double *out)
{
    char *end;
    errno = 0;
    double d = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(d) || d < 0 || d > MAX_SECONDS)
        return -1;
    *out = d;
    return 0;
}

/* A whole decimal number from lo to hi. */
static int parse_whole(const char *s, unsigned long long lo, unsigned long long hi,
                       unsigned long long *out)
{
    if (!s[0])
        return -1;
    for (const char *p = s; *p; p++)
        if (*p < '0' || *p > '9')
            return -1;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    manhole_config cfg;
    manhole_config_init(&cfg);
    cfg.unix_path = "/var/tmp/testing.manhole";
    cfg.banner = "Well this is neat";
    cfg.threaded = 1;
    cfg.shared_namespace = 1;
    cfg.timeout = 5;
    cfg.log = log_line;

    enum {
        OPT_PATH = 1, OPT_PORT, OPT_HOST, OPT_BANNER, OPT_NOBANNER, OPT_THREADED,
        OPT_NOTHREADED, OPT_TIMEOUT, OPT_SHARED, OPT_NOSHARED, OPT_HELP, OPT_MODE,
        OPT_NONLOCAL, OPT_MAXCLIENTS, OPT_MAXLINE, OPT_MAXOUTPUT, OPT_IDLE, OPT_AUDIT,
        OPT_QUIET, OPT_SECRETFILE, OPT_INSECURE
    };
    static const struct option opts[] = {
        {"path", required_argument, NULL, OPT_PATH},
        {"port", required_argument, NULL, OPT_PORT},
        {"host", required_argument, NULL, OPT_HOST},
        {"secret-file", required_argument, NULL, OPT_SECRETFILE},
        {"tcp-insecure", no_argument, NULL, OPT_INSECURE},
        {"banner", required_argument, NULL, OPT_BANNER},
        {"no-banner", no_argument, NULL, OPT_NOBANNER},
        {"threaded", no_argument, NULL, OPT_THREADED},
        {"no-threaded", no_argument, NULL, OPT_NOTHREADED},
        {"timeout", required_argument, NULL, OPT_TIMEOUT},
        {"shared", no_argument, NULL, OPT_SHARED},
        {"no-shared", no_argument, NULL, OPT_NOSHARED},
        {"mode", required_argument, NULL, OPT_MODE},
        {"allow-nonlocal", no_argument, NULL, OPT_NONLOCAL},
        {"max-clients", required_argument, NULL, OPT_MAXCLIENTS},
        {"max-line", required_argument, NULL, OPT_MAXLINE},
        {"max-output", required_argument, NULL, OPT_MAXOUTPUT},
        {"idle-timeout", required_argument, NULL, OPT_IDLE},
        {"audit", no_argument, NULL, OPT_AUDIT},
        {"quiet", no_argument, NULL, OPT_QUIET},
        {"help", no_argument, NULL, OPT_HELP},
        {NULL, 0, NULL, 0}};
    int o, idx;
    unsigned long long num;
    char *end;
    opterr = 0; /* every message below names the option */
    int path_given = 0;
    /* ":" first: a missing argument is ':', an unknown option '?'. */
    while ((idx = -1, o = getopt_long(argc, argv, ":", opts, &idx)) != -1) {
        const char *name = idx >= 0 ? opts[idx].name : "";
        switch (o) {
        case OPT_PATH:
            cfg.unix_path = optarg[0] ? optarg : NULL;
            path_given = 1;
            break;
        case OPT_PORT:
            if (parse_whole(optarg, 0, 65535, &num) < 0)
                return bad_usage("--%s: '%s' is not a port number (0 to 65535)", name, optarg);
            cfg.tcp_port = (int)num;
            break;
        case OPT_HOST: cfg.tcp_host = optarg; break;
        case OPT_SECRETFILE:
            if (!optarg[0])
                return bad_usage("--%s: the path is empty", name);
            cfg.tcp_secret_file = optarg;
            break;
        case OPT_INSECURE: cfg.tcp_insecure = 1; break;
        case OPT_BANNER: cfg.banner = optarg; break;
        case OPT_NOBANNER: cfg.banner = NULL; break;
        case OPT_THREADED: cfg.threaded = 1; break;
        case OPT_NOTHREADED: cfg.threaded = 0; break;
        case OPT_TIMEOUT:
        case OPT_IDLE:
            if (parse_seconds(optarg, o == OPT_TIMEOUT ? &cfg.timeout : &cfg.idle_timeout) < 0)
                return bad_usage("--%s: '%s' is not a number of seconds from 0 to %.0f", name,
                                 optarg, MAX_SECONDS);
            break;
        case OPT_SHARED: cfg.shared_namespace = 1; break;
        case OPT_NOSHARED: cfg.shared_namespace = 0; break;
        case OPT_MODE:
            errno = 0;
            cfg.unix_mode = (unsigned)strtoul(optarg, &end, 8);
            if (errno || *end || !optarg[0] || optarg[0] < '0' || optarg[0] > '7' ||
                cfg.unix_mode > 0777)
                return bad_usage("--%s: '%s' is not an octal mode from 0 to 777", name, optarg);
            break;
        case OPT_NONLOCAL: cfg.tcp_allow_nonlocal = 1; break;
        case OPT_MAXCLIENTS:
            if (parse_whole(optarg, 1, 1000000, &num) < 0)
                return bad_usage("--%s: '%s' is not a whole number from 1 to 1000000", name,
                                 optarg);
            cfg.max_clients = (int)num;
            break;
        case OPT_MAXLINE:
        case OPT_MAXOUTPUT:
            if (parse_whole(optarg, 1, 1u << 30, &num) < 0)
                return bad_usage("--%s: '%s' is not a number of bytes from 1 to %u", name,
                                 optarg, 1u << 30);
            *(o == OPT_MAXLINE ? &cfg.max_line : &cfg.max_output) = (size_t)num;
            break;
        case OPT_AUDIT: cfg.audit = 1; cfg.log_level = MANHOLE_LOG_AUDIT; break;
        case OPT_QUIET: quiet = 1; break;
        case OPT_HELP: usage(stdout); return 0;
        case ':': /* optopt is the option's val (glibc), else take argv */
            for (int i = 0; opts[i].name; i++)
                if (opts[i].val == optopt)
                    return bad_usage("option '--%s' needs an argument", opts[i].name);
            return bad_usage("option '%s' needs an argument", argv[optind - 1]);
        default: { /* '?': unknown, ambiguous, or an argument where none goes */
            const char *arg = argv[optind - 1];
            if (strncmp(arg, "--", 2))
                return bad_usage("unknown option '-%c'", optopt);
            size_t len = strcspn(arg, "=");
            int matches = 0, exact = -1;
            for (int i = 0; opts[i].name; i++)
                if (len > 2 && !strncmp(opts[i].name, arg + 2, len - 2)) {
                    matches++;
                    if (strlen(opts[i].name) == len - 2)
                        exact = i;
                }
            if (exact < 0 && matches == 1)
                for (int i = 0; opts[i].name; i++)
                    if (!strncmp(opts[i].name, arg + 2, len - 2))
                        exact = i;
            if (exact >= 0 && arg[len] == '=')
                return bad_usage("option '--%s' takes no argument", opts[exact].name);
            if (matches > 1)
                return bad_usage("ambiguous option '%.*s'", (int)len, arg);
            return bad_usage("unknown option '%s'", arg);
        }
        }
    }
    if (optind < argc)
        return bad_usage("unexpected argument '%s'", argv[optind]);
    if (cfg.tcp_port >= 0 && !path_given)
        cfg.unix_path = NULL; /* --port alone: TCP only */
    if (!cfg.unix_path && cfg.tcp_port < 0) {
        return bad_usage("nothing to listen on (give --path or --port)");
    }

    if (pipe(sig_pipe) < 0) {
        perror("manhole-demo: pipe");
        return 1;
    }
    for (int i = 0; i < 2; i++) {
        fcntl(sig_pipe[i], F_SETFL, fcntl(sig_pipe[i], F_GETFL) | O_NONBLOCK);
        fcntl(sig_pipe[i], F_SETFD, FD_CLOEXEC);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    manhole *mh;
    char err[512];
    int rc = manhole_open(&mh, &cfg, err, sizeof err);
    if (rc != MANHOLE_OK) {
        fprintf(stderr, "manhole-demo: %s\n", err);
        return 1;
    }
    holding = 0;
    fputs(held, stderr);
    manhole_bind(mh, "ticks", MANHOLE_LONG, &ticks, 0);
    manhole_def(mh, "demo_add", demo_add, NULL,
                "demo_add(a, b) -> a + b, computed by the C host", 0);
    if (cfg.unix_path)
        printf("listening on unix:%s\n", cfg.unix_path);
    if (cfg.tcp_port >= 0)
        printf("listening on tcp:%s:%d\n", cfg.tcp_host ? cfg.tcp_host : "127.0.0.1",
               manhole_tcp_port(mh));
    fflush(stdout);

    int status = 0;
    double next_tick = now_ms() + 100;
    /* poll() once a descriptor (ours or the manhole's) does not fit in an
     * fd_set: FD_SET on it would write past the set. */
    int use_poll = sig_pipe[0] >= FD_SETSIZE;
    if (use_poll)
        fprintf(stderr, "manhole-demo: descriptor %d does not fit in an fd_set; "
                        "using poll() from now on\n", sig_pipe[0]);
    struct pollfd *pfds = NULL;
    int pcap = 0;
    for (;;) {
        fd_set rd, wr;
        int n, maxfd = sig_pipe[0];
        if (!use_poll) {
            FD_ZERO(&rd);
            FD_ZERO(&wr);
            FD_SET(sig_pipe[0], &rd);
            int frc = manhole_fdset(mh, &rd, &wr, &maxfd);
            if (frc == MANHOLE_EFDSETSIZE) {
                fprintf(stderr, "manhole-demo: %s; using poll() from now on\n",
                        manhole_errmsg(mh));
                use_poll = 1;
            } else if (frc < 0) {
                fprintf(stderr, "manhole-demo: %s\n", manhole_errmsg(mh));
                status = 1;
                break;
            }
        }
        double wait = next_tick - now_ms();
        int t = manhole_timeout(mh);
        if (t >= 0 && t < wait)
            wait = t;
        if (wait < 0)
            wait = 0;
        if (use_poll) {
            /* The same loop with poll(): the signal pipe first, then the
             * manhole's descriptors. */
            int need = 1 + manhole_pollfds(mh, NULL, 0);
            if (need > pcap) {
                pcap = need * 2;
                pfds = realloc(pfds, (size_t)pcap * sizeof *pfds);
                if (!pfds) {
                    status = 1;
                    break;
                }
            }
            pfds[0] = (struct pollfd){sig_pipe[0], POLLIN, 0};
            int k = manhole_pollfds(mh, pfds + 1, pcap - 1);
            n = poll(pfds, (nfds_t)(1 + (k < pcap - 1 ? k : pcap - 1)), (int)wait);
        } else {
            struct timeval tv = {(time_t)(wait / 1000), (suseconds_t)((long)wait % 1000 * 1000)};
            n = select(maxfd + 1, &rd, &wr, NULL, &tv);
        }
        if (n < 0 && errno != EINTR) {
            perror("manhole-demo: wait");
            status = 1;
            break;
        }
        if (got_signal)
            break; /* SIGINT/SIGTERM: exit 0 */
        double now = now_ms();
        while (now >= next_tick) {
            __atomic_store_n(&ticks, ticks + 1, __ATOMIC_RELAXED);
            next_tick += 100;
        }
        if (use_poll)
            rc = manhole_poll(mh, 0);
        else
            rc = n > 0 ? manhole_process(mh, &rd, &wr) : manhole_process(mh, NULL, NULL);
        /* Only a client's sys.exit(n) gets here; exit(), quit() and Ctrl-D
         * end only that client's session. This host stops with status n. */
        if (rc == MANHOLE_EXIT) {
            status = manhole_exit_status(mh);
            break;
        }
        if (rc < 0)
            fprintf(stderr, "manhole-demo: %s\n", manhole_errmsg(mh));
    }
    free(pfds);
    manhole_close(mh);
    return status;
}
