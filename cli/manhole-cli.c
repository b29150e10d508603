/*
 * manhole-cli: the client for manhole, a Python REPL inside a running
 * program (see manhole-cli(1) and the README's Protocol section).
 *
 *   manhole-cli /var/tmp/testing.manhole      a REPL on a terminal
 *   manhole-cli 12345                         the same, found by PID (Linux)
 *   manhole-cli 127.0.0.1:7000                TCP, the secret sent first
 *   manhole-cli -c 'print(stats())' 12345     run code, print its output
 *   manhole-cli 12345 < script.py             run a script
 *   manhole-cli --list                        the manholes this user can reach
 *
 * It speaks the manhole's extended channel (telnet subnegotiation, option
 * 77): prompts, statement ends, input requests, completion replies and
 * sys.exit() come as records, so the line being edited can be redrawn
 * below output that arrives while a person types.
 *
 * Line editing is libedit's (BSD licence, like this project; GNU readline
 * would make the client GPL). The client uses libedit's native API in
 * unbuffered mode, fed from its own input buffer (EL_GETCFN), so that one
 * poll() loop serves the terminal, the socket and signals, and so that a
 * paste can be told from typing. Nothing else but libc.
 */
#define _XOPEN_SOURCE 700
#define _DEFAULT_SOURCE 1
#define _DARWIN_C_SOURCE 1

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <langinfo.h>
#include <limits.h>
#include <locale.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <wchar.h>

#include <histedit.h>

#include "../manhole.h" /* MANHOLE_VERSION_STRING only: the client links no library */
#include "wire.h"     /* the secret files and the challenge-response, shared with the library */

/* ---- Exit statuses (manhole-cli(1), EXIT STATUS) ----------------------- */

enum {
    EXIT_RAISED = 1,     /* script mode: a statement raised */
    EXIT_USAGE = 2,      /* bad options; several manholes and no --path */
    EXIT_NOTFOUND = 80,  /* no such socket, process, secret file, or no manhole in it */
    EXIT_REFUSED = 81,   /* connection refused: nothing listens there */
    EXIT_PERM = 82,      /* permission denied (socket, /proc/PID/fd, secret file) */
    EXIT_REJECTED = 83,  /* the manhole refused us: access denied, too many clients */
    EXIT_AUTH = 84,      /* TCP: wrong or missing secret */
    EXIT_CLOSED = 85,    /* the server closed the connection */
    EXIT_NOANSWER = 86,  /* not a socket, not a manhole, or no answer in time */
    EXIT_INTERRUPTED = 130
};

/* ---- Protocol constants ------------------------------------------------- */

#define IAC 255
#define SB 250
#define SE 240
#define OPT_MANHOLE 77

#define HISTORY_MAX 1000
#define MAX_TTY_BUFFER (1 << 20)

/* Private key sequences bound to editor functions, pushed into libedit to
 * make it redraw or finish its line from outside a keystroke. */
#define KEY_REDISPLAY "\033[9990~"
#define KEY_REFRESH "\033[9991~"
#define KEY_NEWLINE "\033[9992~"
#define PASTE_BEGIN "\033[200~"
#define PASTE_END "\033[201~"

/* ---- Small utilities ---------------------------------------------------- */

struct buf {
    char *p;
    size_t len, cap;
};

static void die(int code, const char *fmt, ...);

static void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        die(EXIT_CLOSED, "out of memory");
    return q;
}

static char *xstrndup(const char *s, size_t n)
{
    char *d = xrealloc(NULL, n + 1);
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

static char *xstrdup(const char *s)
{
    return xstrndup(s, strlen(s));
}

static void buf_reserve(struct buf *b, size_t extra)
{
    if (b->len + extra + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + extra + 1)
            cap *= 2;
        b->p = xrealloc(b->p, cap);
        b->cap = cap;
    }
}

static void buf_add(struct buf *b, const void *d, size_t n)
{
    buf_reserve(b, n);
    if (n)
        memcpy(b->p + b->len, d, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void buf_adds(struct buf *b, const char *s)
{
    buf_add(b, s, strlen(s));
}

static void buf_addc(struct buf *b, char c)
{
    buf_add(b, &c, 1);
}

static void buf_clear(struct buf *b)
{
    b->len = 0;
    if (b->p)
        b->p[0] = '\0';
}

static void buf_consume(struct buf *b, size_t n)
{
    if (n >= b->len) {
        buf_clear(b);
        return;
    }
    memmove(b->p, b->p + n, b->len - n);
    b->len -= n;
    b->p[b->len] = '\0';
}

static void buf_free(struct buf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* Always a valid C string, even when empty. */
static const char *buf_str(const struct buf *b)
{
    return b->p ? b->p : "";
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int ms_until(double deadline)
{
    double left = deadline - now();
    if (left <= 0)
        return 0;
    if (left > 1e6)
        return 1000000000;
    return (int)(left * 1000.0) + 1;
}

static int write_all(int fd, const void *d, size_t n)
{
    const char *p = d;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                struct pollfd pf = {fd, POLLOUT, 0};
                poll(&pf, 1, -1);
                continue;
            }
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static const char *find_bytes(const char *hay, size_t n, const char *needle, size_t k)
{
    for (size_t i = 0; i + k <= n; i++)
        if (!memcmp(hay + i, needle, k))
            return hay + i;
    return NULL;
}

static void set_nonblock(int fd, int on)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        fcntl(fd, F_SETFL, on ? fl | O_NONBLOCK : fl & ~O_NONBLOCK);
}

/* One UTF-8 sequence: bytes used (code point in *cp), 0 when more bytes
 * are needed, -1 for an invalid byte. */
static int u8_decode(const unsigned char *s, size_t n, uint32_t *cp)
{
    if (!n)
        return 0;
    unsigned char c = s[0];
    int len;
    uint32_t v;
    if (c < 0x80) {
        *cp = c;
        return 1;
    } else if (c >= 0xc2 && c < 0xe0) {
        len = 2;
        v = c & 0x1f;
    } else if (c >= 0xe0 && c < 0xf0) {
        len = 3;
        v = c & 0x0f;
    } else if (c >= 0xf0 && c < 0xf5) {
        len = 4;
        v = c & 0x07;
    } else {
        return -1;
    }
    for (int i = 1; i < len; i++) {
        if ((size_t)i >= n)
            return 0;
        if ((s[i] & 0xc0) != 0x80)
            return -1;
        v = (v << 6) | (s[i] & 0x3f);
    }
    if ((len == 3 && v < 0x800) || (len == 4 && (v < 0x10000 || v > 0x10ffff)) ||
        (v >= 0xd800 && v <= 0xdfff))
        return -1;
    *cp = v;
    return len;
}

/* The bytes of a character not complete yet at the end of a chunk. */
struct u8carry {
    unsigned char b[4];
    size_t n;
};

/* d[0..n) added to out as valid UTF-8: an invalid byte becomes U+FFFD; a
 * character cut at the end waits in *st for the next chunk (with st NULL,
 * it is invalid too). */
static void u8_clean(struct u8carry *st, const char *d, size_t n, struct buf *out)
{
    struct buf in = {0};
    if (st && st->n)
        buf_add(&in, st->b, st->n);
    buf_add(&in, d, n);
    if (st)
        st->n = 0;
    for (size_t i = 0; i < in.len;) {
        uint32_t cp;
        int k = u8_decode((const unsigned char *)in.p + i, in.len - i, &cp);
        if (k == 0 && st) {
            st->n = in.len - i;
            memcpy(st->b, in.p + i, st->n);
            break;
        }
        if (k <= 0) {
            buf_add(out, "\xef\xbf\xbd", 3);
            i++;
            continue;
        }
        buf_add(out, in.p + i, (size_t)k);
        i += (size_t)k;
    }
    buf_free(&in);
}

/* Where to cut valid UTF-8 to keep at most about `keep` bytes of its end:
 * at the start of a character. */
static size_t u8_cut(const char *s, size_t n, size_t keep)
{
    if (n <= keep)
        return 0;
    size_t i = n - keep;
    while (i < n && ((unsigned char)s[i] & 0xc0) == 0x80)
        i++;
    return i;
}

/* A line a server sent, fit for a message: valid UTF-8 without control
 * characters (shown as '?'), cut on a character boundary to fit. */
static void quote_line(char *dst, size_t size, const char *src, size_t n)
{
    struct buf b = {0};
    u8_clean(NULL, src, n > 4 * size ? 4 * size : n, &b);
    size_t k = 0;
    for (size_t i = 0; i < b.len && k + 4 < size; i++, k++)
        dst[k] = (unsigned char)b.p[i] < 0x20 || b.p[i] == 0x7f ? '?' : b.p[i];
    while (k > 0 && k < b.len && ((unsigned char)b.p[k] & 0xc0) == 0x80)
        k--; /* not inside a character */
    dst[k] = '\0';
    buf_free(&b);
}

/* Code points in a UTF-8 string (invalid bytes count one each). */
static int u8_chars(const char *s, size_t n)
{
    int count = 0;
    size_t i = 0;
    while (i < n) {
        uint32_t cp;
        int k = u8_decode((const unsigned char *)s + i, n - i, &cp);
        i += k > 0 ? (size_t)k : 1;
        count++;
    }
    return count;
}

/* Terminal columns a UTF-8 string takes (no control characters in it). */
static int u8_width(const char *s, size_t n)
{
    int w = 0;
    size_t i = 0;
    while (i < n) {
        uint32_t cp;
        int k = u8_decode((const unsigned char *)s + i, n - i, &cp);
        if (k <= 0) {
            i++;
            w++;
            continue;
        }
        i += (size_t)k;
        int cw = wcwidth((wchar_t)cp);
        w += cw > 0 ? cw : 0;
    }
    return w;
}

/* ---- Options ------------------------------------------------------------ */

static struct {
    const char *command;     /* -c CODE */
    const char *path;        /* --path */
    const char *secret_file; /* --secret-file */
    const char *secret_path; /* --secret-path */
    double timeout;          /* --timeout */
    int list;                /* --list */
    int no_history;          /* --no-history */
    const char *target;
} opt = {NULL, NULL, NULL, NULL, 5.0, 0, 0, NULL};

static const char usage_text[] =
    "usage: manhole-cli [options] TARGET\n"
    "       manhole-cli [options] -c CODE TARGET\n"
    "       manhole-cli [options] TARGET < script.py\n"
    "       manhole-cli --list\n"
    "       manhole-cli --secret-path HOST:PORT\n"
    "A client for manhole, the Python REPL inside a running program.\n"
    "\n"
    "TARGET is one of:\n"
    "  PATH                the manhole's UNIX socket (a name with a '/', or any\n"
    "                      name that is neither a PID nor HOST:PORT)\n"
    "  HOST:PORT           a TCP manhole (HOST may be empty for 127.0.0.1,\n"
    "                      [ADDR]:PORT for IPv6): only addresses with a secret\n"
    "                      file, whose listener is the secret's owner and which\n"
    "                      prove they know the secret; the secret is never sent\n"
    "  PID                 a process: its manhole socket is found in /proc (Linux)\n"
    "\n"
    "On a terminal it is a REPL with line editing, history, Tab completion from\n"
    "the live process, Ctrl-C that interrupts the running statement and Ctrl-D\n"
    "that leaves the host running. Otherwise (or with -c) it runs the script read\n"
    "from standard input (or CODE) as python does and prints only its output.\n"
    "\n"
    "Options:\n"
    "  -c, --command CODE      run CODE (like python -c) and exit\n"
    "      --path PATH         the socket to use (for a PID with several manholes)\n"
    "      --secret-file FILE  the TCP secret (default, per address:\n"
    "                          DIR/tcp-ADDR:PORT.secret, else DIR/tcp-0.0.0.0:PORT.secret\n"
    "                          or DIR/tcp-[::]:PORT.secret; DIR: $XDG_RUNTIME_DIR/manhole,\n"
    "                          or /tmp/manhole-UID)\n"
    "      --secret-path HOST:PORT  print the secret file for each address of\n"
    "                          HOST:PORT (or PORT, on 127.0.0.1), and exit\n"
    "      --list              list the manholes this user can reach: pid, command, path\n"
    "      --timeout SECONDS   wait this long to connect and for the manhole's\n"
    "                          answer (default 5)\n"
    "      --no-history        neither read nor write the history file\n"
    "  -h, --help              this text\n"
    "  -V, --version           the version\n"
    "\n"
    "History: $XDG_STATE_HOME/manhole/history (default ~/.local/state/manhole/history).\n"
    "\n"
    "Exit status: 0 done; 1 the script raised an exception; N the script called\n"
    "sys.exit(N); 2 usage (also: a script too long for one piece, over 1 MiB);\n"
    "80 no such socket, process or secret file, or no manhole there; 81\n"
    "connection refused; 82 permission denied; 83 the manhole refused this client\n"
    "(access denied, too many clients); 84 wrong or missing TCP secret, or the\n"
    "TCP server or its listener is not the secret's owner; 85 the server closed\n"
    "the connection or broke the protocol; 86 no manhole answered (not a socket,\n"
    "not a manhole, or no answer in time); 130 interrupted.\n";

static void usage_exit(int code)
{
    fputs(usage_text, code ? stderr : stdout);
    exit(code);
}

/* ---- Terminal state and fatal errors ------------------------------------ */

static EditLine *el;
static int tty_in = -1;            /* the terminal's descriptor (interactive mode) */
static struct termios tty_orig;    /* as we found it */
static int tty_orig_ok;
static int bracketed_on;

static void term_restore(void)
{
    if (bracketed_on) {
        fputs("\033[?2004l", stdout);
        bracketed_on = 0;
    }
    fflush(stdout);
    if (el) {
        el_end(el);
        el = NULL;
    }
    if (tty_orig_ok)
        tcsetattr(tty_in, TCSADRAIN, &tty_orig);
}

static void die(int code, const char *fmt, ...)
{
    term_restore();
    va_list ap;
    va_start(ap, fmt);
    fputs("manhole-cli: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(code);
}

/* ---- Signals: flags and a self-pipe that wakes poll() ------------------- */

static int sig_pipe[2] = {-1, -1};
static volatile sig_atomic_t sig_int, sig_winch, sig_term, sig_tstp;

static void on_signal(int s)
{
    int e = errno;
    switch (s) {
    case SIGINT: sig_int = 1; break;
    case SIGWINCH: sig_winch = 1; break;
    case SIGTSTP: sig_tstp = 1; break;
    default: sig_term = s; break;
    }
    if (sig_pipe[1] >= 0) {
        ssize_t r = write(sig_pipe[1], "!", 1);
        (void)r;
    }
    errno = e;
}

static void drain_sig_pipe(void)
{
    char tmp[64];
    while (read(sig_pipe[0], tmp, sizeof tmp) > 0) {
    }
}

static void catch_signal(int s)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: a blocked read returns EINTR */
    sigaction(s, &sa, NULL);
}

/* A fatal signal (a crash, an abort): the terminal as it was found, then
 * the signal's previous action (the default, or a sanitizer's report). */
static const int fatal_sigs[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGTRAP, SIGSYS};
static struct sigaction fatal_prev[sizeof fatal_sigs / sizeof fatal_sigs[0]];

static void on_fatal(int s)
{
    static const char off[] = "\033[?2004l";
    if (bracketed_on) {
        ssize_t r = write(1, off, sizeof off - 1);
        (void)r;
    }
    if (tty_orig_ok)
        tcsetattr(tty_in, TCSANOW, &tty_orig);
    for (size_t i = 0; i < sizeof fatal_sigs / sizeof fatal_sigs[0]; i++)
        if (fatal_sigs[i] == s)
            sigaction(s, &fatal_prev[i], NULL);
    raise(s); /* delivered when this handler returns */
}

static void catch_fatal_signals(void)
{
    for (size_t i = 0; i < sizeof fatal_sigs / sizeof fatal_sigs[0]; i++) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_fatal;
        sigemptyset(&sa.sa_mask);
        sigaction(fatal_sigs[i], &sa, &fatal_prev[i]);
    }
}

static void setup_signals(int interactive)
{
    if (pipe(sig_pipe) == 0) {
        for (int i = 0; i < 2; i++) {
            set_nonblock(sig_pipe[i], 1);
            fcntl(sig_pipe[i], F_SETFD, FD_CLOEXEC);
        }
    }
    catch_signal(SIGINT);
    catch_signal(SIGTERM);
    catch_signal(SIGHUP);
    if (interactive) {
        catch_signal(SIGQUIT);
        catch_fatal_signals();
        catch_signal(SIGWINCH);
        catch_signal(SIGTSTP);
        signal(SIGPIPE, SIG_IGN);
    }
}

/* ---- The connection: bytes in, records out ------------------------------ */

enum { EV_OUT, EV_H, EV_P, EV_S, EV_W, EV_C, EV_X, EV_ERR };

/* Bounds on what a server can make the client hold (README, Clients). An
 * E record is passed on as it comes, like output; any other record is
 * kept whole until its end, at most REC_MAX bytes. */
#define REC_MAX (16u << 20)   /* a record (P, C, ...), its type letter included */
#define PRE_MAX (4u << 20)    /* banner and first prompt, before the hello reply */
#define QUEUE_MAX (16u << 20) /* records and output held while waiting for a reply */
#define EV_COST 64            /* what an event costs besides its bytes */

struct ev {
    int type;
    char *data; /* NUL-terminated copy */
    size_t len;
    long a, b;  /* parsed numbers: C <a> <b>, X <a>, S <a>, P <a> */
};

struct conn {
    int fd;
    char name[320];   /* for messages: the path or HOST:PORT */
    int pst;          /* telnet parser state */
    struct buf rec;   /* subnegotiation being read */
    struct buf raw;   /* output bytes being gathered */
    struct ev *q;
    size_t qhead, qlen, qcap;
    size_t qbytes;    /* what the queue holds (bytes and EV_COST per event) */
    struct buf out;   /* bytes waiting to be sent */
    int eof;          /* the server closed (or reset), or broke the protocol */
    char broke[160];  /* how the server broke the protocol ("" if it did not) */
    int shut_req;     /* half-close once out is sent */
    int shut_done;
};

static void conn_init(struct conn *c, int fd, const char *name)
{
    memset(c, 0, sizeof *c);
    c->fd = fd;
    snprintf(c->name, sizeof c->name, "%s", name);
}

static void conn_free(struct conn *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    for (size_t i = c->qhead; i < c->qlen; i++)
        free(c->q[i].data);
    free(c->q);
    c->q = NULL;
    c->qhead = c->qlen = c->qcap = 0;
    buf_free(&c->rec);
    buf_free(&c->raw);
    buf_free(&c->out);
}

/* The server broke the protocol: nothing more is read from it. */
static void conn_broke(struct conn *c, const char *fmt, ...)
{
    if (c->broke[0])
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->broke, sizeof c->broke, fmt, ap);
    va_end(ap);
    c->eof = 1;
}

/* The connection ended: closed, or the server broke the protocol. */
static void die_closed(const struct conn *c)
{
    if (c->broke[0])
        die(EXIT_CLOSED, "%s: the server broke the protocol: %s", c->name, c->broke);
    die(EXIT_CLOSED, "%s: the server closed the connection", c->name);
}

static struct ev *q_push(struct conn *c, int type, const char *d, size_t n)
{
    c->qbytes += n;
    if ((type == EV_OUT || type == EV_ERR) && c->qlen > c->qhead &&
        c->q[c->qlen - 1].type == type) {
        struct ev *e = &c->q[c->qlen - 1];
        e->data = xrealloc(e->data, e->len + n + 1);
        memcpy(e->data + e->len, d, n);
        e->len += n;
        e->data[e->len] = '\0';
        return e;
    }
    if (c->qlen == c->qcap) {
        if (c->qhead > 0) {
            memmove(c->q, c->q + c->qhead, (c->qlen - c->qhead) * sizeof *c->q);
            c->qlen -= c->qhead;
            c->qhead = 0;
        }
        if (c->qlen == c->qcap) {
            c->qcap = c->qcap ? c->qcap * 2 : 16;
            c->q = xrealloc(c->q, c->qcap * sizeof *c->q);
        }
    }
    struct ev *e = &c->q[c->qlen++];
    memset(e, 0, sizeof *e);
    e->type = type;
    e->data = xstrndup(d, n);
    e->len = n;
    c->qbytes += EV_COST;
    return e;
}

static void q_took(struct conn *c, const struct ev *e)
{
    size_t k = e->len + EV_COST;
    c->qbytes = c->qbytes > k ? c->qbytes - k : 0;
}

static int q_pop(struct conn *c, struct ev *out)
{
    if (c->qhead == c->qlen)
        return 0;
    *out = c->q[c->qhead++];
    q_took(c, out);
    if (c->qhead == c->qlen)
        c->qhead = c->qlen = 0;
    return 1;
}

static int q_empty(const struct conn *c)
{
    return c->qhead == c->qlen;
}

static void flush_raw(struct conn *c)
{
    if (c->raw.len) {
        q_push(c, EV_OUT, c->raw.p, c->raw.len);
        buf_clear(&c->raw);
    }
}

/* A decimal number in [lo, hi] making up all of s[0..n): 0, or -1. */
static int parse_num(const char *s, size_t n, long lo, long hi, long *v)
{
    char tmp[24];
    if (n == 0 || n >= sizeof tmp || !(isdigit((unsigned char)s[0]) || s[0] == '-'))
        return -1;
    memcpy(tmp, s, n);
    tmp[n] = '\0';
    char *end;
    errno = 0;
    long x = strtol(tmp, &end, 10);
    if (errno || *end || x < lo || x > hi)
        return -1;
    *v = x;
    return 0;
}

/* C "<id> <n>[\n<candidate>...]": the two numbers. */
static int parse_completion_head(const char *d, size_t n, long *id, long *nrep)
{
    const char *nl = memchr(d, '\n', n);
    size_t head = nl ? (size_t)(nl - d) : n;
    const char *sp = memchr(d, ' ', head);
    if (!sp)
        return -1;
    size_t k = (size_t)(sp - d);
    return parse_num(d, k, 0, INT_MAX, id) < 0 ||
                   parse_num(sp + 1, head - k - 1, 0, INT_MAX, nrep) < 0
               ? -1
               : 0;
}

/* The record's payload checked against the protocol (README, The extended
 * channel); its numbers into a and b. 0, or -1 when it is malformed. */
static int check_record(int type, const char *d, size_t n, long *a, long *b)
{
    switch (type) {
    case EV_H: return n == 1 && d[0] == '1' ? 0 : -1;
    case EV_S: return parse_num(d, n, 0, 1, a);
    case EV_P: return n >= 1 && (d[0] == '1' || d[0] == '2') ? (*a = d[0] - '0', 0) : -1;
    case EV_W: return n == 0 ? 0 : -1;
    case EV_X: return parse_num(d, n, INT_MIN, INT_MAX, a);
    case EV_C: return parse_completion_head(d, n, a, b);
    default: return 0;
    }
}

static int record_type(int letter)
{
    switch (letter) {
    case 'H': return EV_H;
    case 'P': return EV_P;
    case 'S': return EV_S;
    case 'W': return EV_W;
    case 'C': return EV_C;
    case 'X': return EV_X;
    case 'E': return EV_ERR; /* what the session wrote to stderr */
    default: return -1;      /* a record of a later version: ignored */
    }
}

/* An E record's text so far goes out as it comes, after the output
 * before it. */
static void stream_record(struct conn *c)
{
    if (c->rec.len > 1 && c->rec.p[0] == 'E') {
        flush_raw(c);
        q_push(c, EV_ERR, c->rec.p + 1, c->rec.len - 1);
        c->rec.len = 1;
    }
}

static void emit_record(struct conn *c)
{
    if (!c->rec.len)
        return;
    int type = record_type((unsigned char)c->rec.p[0]);
    if (type == EV_ERR) {
        stream_record(c);
        return;
    }
    if (type < 0)
        return;
    const char *d = c->rec.p + 1;
    size_t n = c->rec.len - 1;
    long a = 0, b = 0;
    if (check_record(type, d, n, &a, &b) < 0) {
        char said[48];
        quote_line(said, sizeof said, d, n);
        conn_broke(c, "a malformed %c record (\"%s\"%s)", c->rec.p[0], said,
                   strlen(said) < n ? "..." : "");
        return;
    }
    flush_raw(c);
    struct ev *e = q_push(c, type, d, n);
    e->a = a;
    e->b = b;
}

/* A byte of a record's payload; at most REC_MAX of a record kept whole. */
static void record_byte(struct conn *c, unsigned char b)
{
    if (c->rec.len >= REC_MAX && c->rec.p[0] != 'E') {
        conn_broke(c, "a record longer than %u MiB", REC_MAX >> 20);
        return;
    }
    buf_addc(&c->rec, (char)b);
}

/* Telnet framing: raw bytes are output (IAC IAC is a 0xFF byte), IAC SB 77
 * ... IAC SE is a record, anything else telnet is skipped. */
static void parse_bytes(struct conn *c, const unsigned char *p, size_t n)
{
    size_t run = 0; /* start of the current run of plain output */
    for (size_t i = 0; i < n && !c->broke[0]; i++) {
        unsigned char b = p[i];
        switch (c->pst) {
        case 0:
            if (b == IAC) {
                buf_add(&c->raw, p + run, i - run);
                c->pst = 1;
            }
            continue;
        case 1: /* after IAC */
            if (b == IAC) {
                buf_addc(&c->raw, (char)IAC);
                c->pst = 0;
            } else if (b == SB) {
                c->pst = 2;
            } else if (b >= 251) { /* WILL WONT DO DONT <option> */
                c->pst = 5;
            } else {
                c->pst = 0;
            }
            break;
        case 2: /* IAC SB: the option */
            if (b == OPT_MANHOLE) {
                buf_clear(&c->rec);
                c->pst = 3;
            } else {
                c->pst = 6;
            }
            break;
        case 3: /* record payload */
            if (b == IAC)
                c->pst = 4;
            else
                record_byte(c, b);
            break;
        case 4: /* payload, after IAC */
            if (b == IAC) {
                record_byte(c, b);
                c->pst = 3;
            } else {
                emit_record(c);
                c->pst = 0;
            }
            break;
        case 5: c->pst = 0; break;
        case 6: if (b == IAC) c->pst = 7; break;
        case 7: c->pst = b == SE ? 0 : 6; break;
        }
        run = i + 1;
    }
    if (c->broke[0])
        return;
    if (c->pst == 0 && run < n)
        buf_add(&c->raw, p + run, n - run);
    flush_raw(c);
    if (c->pst == 3 || c->pst == 4)
        stream_record(c);
}

/* Read what is there; 1 if something came (or the end), 0 if nothing. */
static int conn_read(struct conn *c)
{
    unsigned char tmp[65536];
    if (c->eof)
        return 0;
    ssize_t r = recv(c->fd, tmp, sizeof tmp, 0);
    if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return 0;
        c->eof = 1;
        return 1;
    }
    if (r == 0) {
        c->eof = 1;
        return 1;
    }
    parse_bytes(c, tmp, (size_t)r);
    return 1;
}

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif

static void conn_flush(struct conn *c)
{
    while (c->out.len && !c->shut_done) {
        ssize_t w = send(c->fd, c->out.p, c->out.len, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            buf_clear(&c->out); /* the peer is gone; reading will tell */
            break;
        }
        buf_consume(&c->out, (size_t)w);
    }
    if (!c->out.len && c->shut_req && !c->shut_done) {
        shutdown(c->fd, SHUT_WR);
        c->shut_done = 1;
    }
}

static void add_escaped(struct buf *b, const char *d, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        buf_addc(b, d[i]);
        if ((unsigned char)d[i] == IAC)
            buf_addc(b, (char)IAC);
    }
}

static void send_line(struct conn *c, const char *s, size_t n)
{
    add_escaped(&c->out, s, n);
    buf_addc(&c->out, '\n');
    conn_flush(c);
}

static void send_record(struct conn *c, char type, const char *payload, size_t n)
{
    const char head[4] = {(char)IAC, (char)SB, (char)OPT_MANHOLE, type};
    buf_add(&c->out, head, 4);
    add_escaped(&c->out, payload, n);
    const char tail[2] = {(char)IAC, (char)SE};
    buf_add(&c->out, tail, 2);
    conn_flush(c);
}

static void send_interrupt(struct conn *c)
{
    if (!c->shut_req)
        send_record(c, 'I', "", 0);
}

/* ---- Connecting --------------------------------------------------------- */

static char errmsg[1024];

/* Connect to a UNIX socket without blocking; -1 and an exit status in *code
 * and errmsg when it fails. */
static int unix_connect(const char *path, int *code)
{
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof sa.sun_path) {
        snprintf(errmsg, sizeof errmsg, "%s: path too long for a UNIX socket", path);
        *code = EXIT_USAGE;
        return -1;
    }
    memcpy(sa.sun_path, path, strlen(path));
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0) {
        snprintf(errmsg, sizeof errmsg, "socket: %s", strerror(errno));
        *code = EXIT_CLOSED;
        return -1;
    }
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    set_nonblock(fd, 1);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0 || errno == EINPROGRESS)
        return fd;
    int e = errno;
    close(fd);
    struct stat st;
    switch (e) {
    case ENOENT:
    case ENOTDIR:
        snprintf(errmsg, sizeof errmsg, "%s: no such socket", path);
        *code = EXIT_NOTFOUND;
        break;
    case EACCES:
    case EPERM:
        snprintf(errmsg, sizeof errmsg, "%s: permission denied", path);
        *code = EXIT_PERM;
        break;
    case ECONNREFUSED:
        if (stat(path, &st) == 0 && !S_ISSOCK(st.st_mode)) {
            snprintf(errmsg, sizeof errmsg, "%s: not a socket", path);
            *code = EXIT_NOANSWER;
        } else {
            snprintf(errmsg, sizeof errmsg,
                     "%s: connection refused (nothing listens there; has the host exited?)", path);
            *code = EXIT_REFUSED;
        }
        break;
    case EAGAIN:
        snprintf(errmsg, sizeof errmsg,
                 "%s: the listener's queue is full (is the host's loop running?)", path);
        *code = EXIT_NOANSWER;
        break;
    default:
        snprintf(errmsg, sizeof errmsg, "%s: %s", path, strerror(e));
        *code = EXIT_REFUSED;
        break;
    }
    return -1;
}

/* ---- The hello handshake ------------------------------------------------ */

enum { HS_RUN, HS_OK, HS_FAIL };

struct hs {
    struct conn c;
    int greet_first; /* wait for the server's first bytes before the hello */
    int hello_sent;
    int state;
    int code;
    char msg[1024];
    double greet_deadline; /* greet_first: a socket silent until then is no manhole */
    struct buf pre;  /* what came before the hello reply: banner and prompt */
    pid_t pid;       /* probes: whose socket */
    char *path;
};

static void hs_send_hello(struct hs *h)
{
    if (!h->hello_sent) {
        send_record(&h->c, 'H', "1", 1);
        h->hello_sent = 1;
    }
}

static void hs_classify_close(struct hs *h)
{
    const char *pre = buf_str(&h->pre);
    const char *line = strstr(pre, "manhole: ");
    char said[256] = "";
    if (line)
        quote_line(said, sizeof said, line + 9, strcspn(line + 9, "\r\n"));
    h->state = HS_FAIL;
    if (h->c.broke[0]) {
        h->code = EXIT_CLOSED;
        snprintf(h->msg, sizeof h->msg, "%s: the server broke the protocol: %s", h->c.name,
                 h->c.broke);
    } else if (strstr(pre, "manhole: authentication failed")) {
        h->code = EXIT_AUTH;
        snprintf(h->msg, sizeof h->msg, "%s: authentication failed (wrong or missing secret)",
                 h->c.name);
    } else if (strstr(pre, "manhole: access denied") ||
               strstr(pre, "manhole: too many clients")) {
        h->code = EXIT_REJECTED;
        snprintf(h->msg, sizeof h->msg, "%s: the manhole refused this client: %s", h->c.name,
                 said);
    } else {
        h->code = EXIT_CLOSED;
        snprintf(h->msg, sizeof h->msg, "%s: the server closed the connection%s%s", h->c.name,
                 said[0] ? ": " : "", said);
    }
}

/* Move what arrived into h->pre until the hello reply; later records stay
 * queued for the session. */
static void hs_digest(struct hs *h)
{
    if (h->state != HS_RUN)
        return;
    if (h->greet_first && !h->hello_sent && (!q_empty(&h->c) || h->c.eof)) {
        if (!h->c.eof)
            hs_send_hello(h);
    }
    struct ev e;
    while (h->state == HS_RUN && q_pop(&h->c, &e)) {
        if (e.type == EV_OUT || e.type == EV_ERR)
            buf_add(&h->pre, e.data, e.len);
        else if (e.type == EV_H)
            h->state = HS_OK;
        free(e.data);
        if (h->state == HS_RUN && h->pre.len > PRE_MAX)
            conn_broke(&h->c, "more than %u MiB before the hello reply", PRE_MAX >> 20);
    }
    if (h->state == HS_RUN && h->c.eof)
        hs_classify_close(h);
}

static void hs_timeout(struct hs *h)
{
    h->state = HS_FAIL;
    h->code = EXIT_NOANSWER;
    snprintf(h->msg, sizeof h->msg,
             "%s: no answer to the manhole hello within %g s (not a manhole, or its host is "
             "not running its loop)",
             h->c.name, opt.timeout);
}

/* Run handshakes side by side until each has its answer or the deadline. */
static void hs_run(struct hs *hs, size_t n, double deadline)
{
    struct pollfd *pf = xrealloc(NULL, n * sizeof *pf);
    for (;;) {
        size_t live = 0;
        double next = deadline;
        for (size_t i = 0; i < n; i++) {
            pf[i].fd = -1;
            pf[i].events = 0;
            pf[i].revents = 0;
            if (hs[i].state != HS_RUN)
                continue;
            if (hs[i].greet_first && !hs[i].hello_sent) {
                if (!ms_until(hs[i].greet_deadline)) {
                    hs_timeout(&hs[i]);
                    continue;
                }
                if (hs[i].greet_deadline < next)
                    next = hs[i].greet_deadline;
            }
            pf[i].fd = hs[i].c.fd;
            pf[i].events = POLLIN | (hs[i].c.out.len ? POLLOUT : 0);
            live++;
        }
        if (!live)
            break;
        if (ms_until(next) == 0 && next < deadline)
            continue;
        int ms = ms_until(next);
        if (ms == 0) {
            for (size_t i = 0; i < n; i++)
                if (hs[i].state == HS_RUN)
                    hs_timeout(&hs[i]);
            break;
        }
        int r = poll(pf, (nfds_t)n, ms);
        if (r < 0 && errno == EINTR) {
            if (sig_int || sig_term)
                die(EXIT_INTERRUPTED, "interrupted");
            continue;
        }
        for (size_t i = 0; i < n; i++) {
            if (hs[i].state != HS_RUN || !pf[i].revents)
                continue;
            if (pf[i].revents & POLLOUT)
                conn_flush(&hs[i].c);
            if (pf[i].revents & (POLLIN | POLLHUP | POLLERR))
                conn_read(&hs[i].c);
            hs_digest(&hs[i]);
        }
    }
    free(pf);
}

/* ---- Finding manholes: /proc on Linux ----------------------------------- */

struct cand {
    pid_t pid;
    char *path;
    char comm[32];
};

#ifdef __linux__
struct lsock {
    unsigned long inode;
    char *path;
};

/* Listening UNIX stream sockets with a file system path. */
static size_t listening_sockets(struct lsock **out)
{
    FILE *f = fopen("/proc/net/unix", "r");
    *out = NULL;
    if (!f)
        return 0;
    size_t n = 0, cap = 0;
    char line[4096 + 128];
    if (!fgets(line, sizeof line, f)) { /* the header */
        fclose(f);
        return 0;
    }
    while (fgets(line, sizeof line, f)) {
        unsigned long flags, type, st, inode;
        int pos = 0;
        if (sscanf(line, "%*s %*x %*x %lx %lx %lx %lu %n", &flags, &type, &st, &inode, &pos) < 4 ||
            !pos)
            continue;
        if (!(flags & 0x10000) || type != 1) /* __SO_ACCEPTCON, SOCK_STREAM */
            continue;
        char *path = line + pos;
        path[strcspn(path, "\n")] = '\0';
        if (path[0] != '/')
            continue; /* unnamed or abstract */
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            *out = xrealloc(*out, cap * sizeof **out);
        }
        (*out)[n].inode = inode;
        (*out)[n].path = xstrdup(path);
        n++;
    }
    fclose(f);
    return n;
}

/* The socket inodes a process holds: 0, or an errno (ENOENT, EACCES). */
static int pid_socket_inodes(pid_t pid, unsigned long **out, size_t *n)
{
    char dir[64];
    snprintf(dir, sizeof dir, "/proc/%ld/fd", (long)pid);
    *out = NULL;
    *n = 0;
    DIR *d = opendir(dir);
    if (!d)
        return errno;
    size_t cap = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        char link[400], target[128];
        snprintf(link, sizeof link, "%s/%s", dir, de->d_name);
        ssize_t k = readlink(link, target, sizeof target - 1);
        if (k <= 0)
            continue;
        target[k] = '\0';
        unsigned long ino;
        if (sscanf(target, "socket:[%lu]", &ino) != 1)
            continue;
        if (*n == cap) {
            cap = cap ? cap * 2 : 16;
            *out = xrealloc(*out, cap * sizeof **out);
        }
        (*out)[(*n)++] = ino;
    }
    closedir(d);
    return 0;
}

static void proc_comm(pid_t pid, char *buf, size_t len)
{
    char p[64];
    snprintf(p, sizeof p, "/proc/%ld/comm", (long)pid);
    buf[0] = '\0';
    FILE *f = fopen(p, "r");
    if (!f)
        return;
    if (fgets(buf, (int)len, f))
        buf[strcspn(buf, "\n")] = '\0';
    fclose(f);
}

/* (pid, path) for each listening socket of pid (or of every process we may
 * look into, pid 0). */
static size_t find_candidates(pid_t only, struct cand **out, int *err)
{
    struct lsock *ls;
    size_t nls = listening_sockets(&ls);
    size_t n = 0, cap = 0;
    *out = NULL;
    *err = 0;
    pid_t *pids = NULL;
    size_t npids = 0;
    if (only) {
        pids = xrealloc(NULL, sizeof *pids);
        pids[npids++] = only;
    } else {
        DIR *d = opendir("/proc");
        struct dirent *de;
        size_t pcap = 0;
        while (d && (de = readdir(d))) {
            char *end;
            long v = strtol(de->d_name, &end, 10);
            if (*end || v <= 0)
                continue;
            if (npids == pcap) {
                pcap = pcap ? pcap * 2 : 256;
                pids = xrealloc(pids, pcap * sizeof *pids);
            }
            pids[npids++] = (pid_t)v;
        }
        if (d)
            closedir(d);
    }
    for (size_t i = 0; i < npids; i++) {
        unsigned long *inodes;
        size_t ni;
        int e = pid_socket_inodes(pids[i], &inodes, &ni);
        if (e) {
            if (only)
                *err = e;
            continue;
        }
        for (size_t k = 0; k < ni; k++) {
            for (size_t j = 0; j < nls; j++) {
                if (ls[j].inode != inodes[k])
                    continue;
                int dup = 0;
                for (size_t m = 0; m < n; m++)
                    if (!strcmp((*out)[m].path, ls[j].path))
                        dup = 1;
                if (dup)
                    continue;
                if (n == cap) {
                    cap = cap ? cap * 2 : 16;
                    *out = xrealloc(*out, cap * sizeof **out);
                }
                (*out)[n].pid = pids[i];
                (*out)[n].path = xstrdup(ls[j].path);
                proc_comm(pids[i], (*out)[n].comm, sizeof (*out)[n].comm);
                if (!(*out)[n].comm[0])
                    strcpy((*out)[n].comm, "?");
                n++;
            }
        }
        free(inodes);
    }
    for (size_t j = 0; j < nls; j++)
        free(ls[j].path);
    free(ls);
    free(pids);
    return n;
}
#endif

/* Probe candidates side by side: connect, wait for the greeting, hello. */
static struct hs *probe_all(struct cand *cs, size_t n, double deadline)
{
    struct hs *hs = xrealloc(NULL, (n ? n : 1) * sizeof *hs);
    for (size_t i = 0; i < n; i++) {
        memset(&hs[i], 0, sizeof hs[i]);
        int code;
        int fd = unix_connect(cs[i].path, &code);
        conn_init(&hs[i].c, fd, cs[i].path);
        hs[i].pid = cs[i].pid;
        hs[i].path = cs[i].path;
        hs[i].greet_first = 1;
        /* a manhole greets at once; most other sockets wait for a request */
        hs[i].greet_deadline = now() + (deadline - now()) / 5;
        if (fd < 0) {
            hs[i].state = HS_FAIL;
            hs[i].code = code;
            snprintf(hs[i].msg, sizeof hs[i].msg, "%.900s", errmsg);
        }
    }
    hs_run(hs, n, deadline);
    return hs;
}

static int is_manhole(const struct hs *h)
{
    return h->state == HS_OK || h->code == EXIT_REJECTED || h->code == EXIT_AUTH;
}

static int cmp_cand(const void *a, const void *b)
{
    const struct cand *x = a, *y = b;
    if (x->pid != y->pid)
        return x->pid < y->pid ? -1 : 1;
    return strcmp(x->path, y->path);
}

static int do_list(void)
{
#ifdef __linux__
    struct cand *cs;
    int err;
    size_t n = find_candidates(0, &cs, &err);
    if (n > 512)
        n = 512;
    qsort(cs, n, sizeof *cs, cmp_cand);
    struct hs *hs = probe_all(cs, n, now() + opt.timeout);
    int found = 0;
    for (size_t i = 0; i < n; i++) {
        if (hs[i].state != HS_OK)
            continue;
        if (!found)
            printf("%-8s %-16s %s\n", "PID", "COMMAND", "PATH");
        for (char *p = cs[i].comm; *p; p++)
            if (*p == ' ' || (unsigned char)*p < 0x20)
                *p = '_'; /* one word, so that the path is the rest of the line */
        printf("%-8ld %-16s %s\n", (long)hs[i].pid, cs[i].comm, hs[i].path);
        found++;
    }
    for (size_t i = 0; i < n; i++) {
        conn_free(&hs[i].c);
        buf_free(&hs[i].pre);
        free(cs[i].path);
    }
    free(hs);
    free(cs);
    fflush(stdout);
    if (!found)
        die(EXIT_NOTFOUND, "no manhole found that this user can reach");
    return 0;
#else
    die(EXIT_USAGE, "--list needs /proc (Linux); give the manhole's socket path instead");
    return EXIT_USAGE;
#endif
}

/* ---- Resolving the target to a connected, greeted session -------------- */

struct session {
    struct conn c;
    struct buf banner; /* before the hello reply: banner and the raw prompt */
    struct u8carry u8out, u8err; /* a character cut between chunks of each */
};

static void take_hs(struct session *s, struct hs *h)
{
    s->c = h->c;
    s->banner = h->pre;
    memset(&h->c, 0, sizeof h->c);
    h->c.fd = -1;
    memset(&h->pre, 0, sizeof h->pre);
}

static void greet_one(struct session *s, int fd, const char *name, const char *secret_note,
                      double deadline)
{
    struct hs h;
    memset(&h, 0, sizeof h);
    conn_init(&h.c, fd, name);
    hs_send_hello(&h);
    hs_run(&h, 1, deadline);
    if (h.state != HS_OK) {
        if (h.code == EXIT_AUTH && secret_note)
            die(h.code, "%s; %s", h.msg, secret_note);
        die(h.code, "%s", h.msg);
    }
    take_hs(s, &h);
}

static int all_digits(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (!isdigit((unsigned char)*s))
            return 0;
    return 1;
}

/* ---- TCP: the secret of each address, who listens there, the proofs ---- */

struct tcp_addr {
    struct sockaddr_storage sa;
    socklen_t len;
    char ep[INET6_ADDRSTRLEN + 16]; /* as mh_endpoint() writes it */
    char file[PATH_MAX];            /* its secret file ("" when none) */
};

/* HOST:PORT, [ADDR]:PORT or :PORT (127.0.0.1); PORT alone too when
 * bare_port. 0, or -1 when t names no TCP endpoint. */
static int parse_tcp_target(const char *t, int bare_port, char *host, size_t hn,
                            const char **port)
{
    const char *colon = strrchr(t, ':');
    if (bare_port && all_digits(t)) {
        snprintf(host, hn, "127.0.0.1");
        *port = t;
        return 0;
    }
    if (!colon || strchr(t, '/') || !all_digits(colon + 1) || strlen(colon + 1) > 5)
        return -1;
    size_t hl = (size_t)(colon - t);
    if (hl >= hn)
        die(EXIT_USAGE, "%s: host name too long", t);
    memcpy(host, t, hl);
    host[hl] = '\0';
    if (host[0] == '[' && hl >= 2 && host[hl - 1] == ']') {
        memmove(host, host + 1, hl - 2);
        host[hl - 2] = '\0';
    }
    if (!host[0])
        snprintf(host, hn, "127.0.0.1");
    *port = colon + 1;
    return 0;
}

/* The addresses HOST:PORT resolves to, in order, each once. */
static size_t resolve_tcp(const char *host, const char *port, const char *name,
                          struct tcp_addr **out)
{
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    int gr = getaddrinfo(host, port, &hints, &res);
    if (gr != 0)
        die(EXIT_NOTFOUND, "%s: %s", name, gai_strerror(gr));
    size_t n = 0;
    *out = NULL;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        struct tcp_addr a;
        memset(&a, 0, sizeof a);
        if (ai->ai_addrlen > sizeof a.sa ||
            mh_endpoint(a.ep, sizeof a.ep, ai->ai_addr, ai->ai_addrlen) < 0)
            continue;
        int dup = 0;
        for (size_t i = 0; i < n; i++)
            dup |= !strcmp((*out)[i].ep, a.ep);
        if (dup)
            continue;
        memcpy(&a.sa, ai->ai_addr, ai->ai_addrlen);
        a.len = (socklen_t)ai->ai_addrlen;
        *out = xrealloc(*out, (n + 1) * sizeof **out);
        (*out)[n++] = a;
    }
    freeaddrinfo(res);
    if (!n)
        die(EXIT_NOTFOUND, "%s: no IPv4 or IPv6 address", name);
    return n;
}

static int secret_exists(const char *ep, char *file, size_t fn, struct buf *looked)
{
    if (mh_secret_path(file, fn, geteuid(), ep) < 0) {
        file[0] = '\0';
        return 0;
    }
    struct stat st;
    if (stat(file, &st) == 0 || errno != ENOENT)
        return 1; /* (unreadable: said when it is read) */
    buf_adds(looked, looked->len ? ", " : "");
    buf_adds(looked, file);
    file[0] = '\0';
    return 0;
}

/* The secret file of an address (wire.h): the one of that address, else
 * the one of its family's wildcard address; a->file stays "" for none. */
static void find_secret_file(struct tcp_addr *a, const char *port, struct buf *looked)
{
    if (secret_exists(a->ep, a->file, sizeof a->file, looked))
        return;
    char any[32];
    snprintf(any, sizeof any, "%s:%s", a->sa.ss_family == AF_INET6 ? "[::]" : "0.0.0.0", port);
    secret_exists(any, a->file, sizeof a->file, looked);
}

/* Each address's secret file (or --secret-file for all); dies when no
 * address has one. */
static void find_secret_files(struct tcp_addr *as, size_t n, const char *port, const char *name)
{
    struct buf looked = {0};
    size_t found = 0;
    for (size_t i = 0; i < n; i++) {
        if (opt.secret_file)
            snprintf(as[i].file, sizeof as[i].file, "%s", opt.secret_file);
        else
            find_secret_file(&as[i], port, &looked);
        found += as[i].file[0] != '\0';
    }
    if (!found)
        die(EXIT_NOTFOUND,
            "no secret file for %s (looked in %s); is the host listening there? give "
            "--secret-file",
            name, buf_str(&looked));
    buf_free(&looked);
}

/* --secret-path: the file each address would use. */
static int print_secret_paths(const char *t)
{
    char host[256];
    const char *port;
    if (parse_tcp_target(t, 1, host, sizeof host, &port) < 0)
        die(EXIT_USAGE, "--secret-path: not HOST:PORT or PORT: %s", t);
    struct tcp_addr *as;
    size_t n = resolve_tcp(host, port, t, &as);
    find_secret_files(as, n, port, t);
    for (size_t i = 0; i < n; i++) {
        int dup = !as[i].file[0];
        for (size_t k = 0; k < i && !dup; k++)
            dup = !strcmp(as[k].file, as[i].file);
        if (!dup)
            printf("%s\n", as[i].file);
    }
    free(as);
    return fflush(stdout) == 0 ? 0 : EXIT_CLOSED;
}

/* The secret line of a file (without its line end), and its owner. */
static size_t read_secret(const char *file, char *secret, uid_t *owner)
{
    int fd = open(file, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        int e = errno;
        if (e == EACCES || e == EPERM)
            die(EXIT_PERM, "cannot read the secret file %s: permission denied", file);
        die(EXIT_NOTFOUND, "secret file %s: %s", file, strerror(e));
    }
    struct stat st;
    char tmp[MH_SECRET_MAX + 2];
    ssize_t r = fstat(fd, &st) < 0 ? -1 : read(fd, tmp, sizeof tmp);
    int e = errno;
    close(fd);
    if (r < 0)
        die(EXIT_PERM, "cannot read the secret file %s: %s", file, strerror(e));
    size_t n = 0;
    while (n < (size_t)r && tmp[n] != '\n' && tmp[n] != '\r')
        n++;
    if (n > MH_SECRET_MAX || memchr(tmp, '\0', n))
        die(EXIT_AUTH, "the secret file %s does not hold a secret line (at most %d bytes)", file,
            MH_SECRET_MAX);
    memcpy(secret, tmp, n);
    secret[n] = '\0';
    *owner = st.st_uid;
    return n;
}

static int connect_addr(const struct tcp_addr *a, double deadline, int *err)
{
    int fd = socket(a->sa.ss_family, SOCK_STREAM, 0);
    if (fd < 0) {
        *err = errno;
        return -1;
    }
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    set_nonblock(fd, 1);
    int r = connect(fd, (const struct sockaddr *)&a->sa, a->len);
    if (r < 0 && errno == EINPROGRESS) {
        struct pollfd pf = {fd, POLLOUT, 0};
        int pr;
        do
            pr = poll(&pf, 1, ms_until(deadline));
        while (pr < 0 && errno == EINTR && !sig_int && !sig_term);
        socklen_t len = sizeof *err;
        *err = pr == 0 ? ETIMEDOUT : pr < 0 ? errno : 0;
        if (pr > 0 && getsockopt(fd, SOL_SOCKET, SO_ERROR, err, &len) < 0)
            *err = errno;
        r = *err ? -1 : 0;
    } else if (r < 0) {
        *err = errno;
    }
    if (r < 0) {
        close(fd);
        return -1;
    }
#ifdef SO_NOSIGPIPE
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof one);
#endif
    return fd;
}

static void connect_failed(const char *name, int err)
{
    if (err == ETIMEDOUT)
        die(EXIT_NOANSWER, "%s: no answer within %g s", name, opt.timeout);
    if (err == EACCES || err == EPERM)
        die(EXIT_PERM, "%s: permission denied", name);
    if (err == ECONNREFUSED)
        die(EXIT_REFUSED, "%s: connection refused (nothing listens there; has the host exited?)",
            name);
    die(EXIT_REFUSED, "%s: %s", name, strerror(err));
}

/* ---- Who listens: /proc/net/tcp and tcp6 (Linux) ---- */

struct listen_scan {
    const struct tcp_addr *a;
    uid_t ok1, ok2;      /* the uids that may listen there */
    int seen;            /* /proc/net could be read */
    int rank;            /* how well the best listeners so far match */
    size_t count;        /* listeners of that rank */
    int bad;             /* one of them belongs to another uid: */
    unsigned long who;   /* that uid */
};

/* How well a listener on (v6, addr) matches a connection to a, higher
 * first, as Linux picks one: the address itself, then the wildcard of the
 * same family, then (IPv4) the IPv6 wildcard; 0: it does not. */
static int listen_rank(const struct tcp_addr *a, int v6, const unsigned char *addr)
{
    static const unsigned char any[16], mapped[12] = {[10] = 0xff, [11] = 0xff};
    if (a->sa.ss_family == AF_INET6) {
        const unsigned char *ip = ((const struct sockaddr_in6 *)(const void *)&a->sa)->sin6_addr.s6_addr;
        return !v6 ? 0 : !memcmp(addr, ip, 16) ? 4 : !memcmp(addr, any, 16) ? 2 : 0;
    }
    const unsigned char *ip =
        (const unsigned char *)&((const struct sockaddr_in *)(const void *)&a->sa)->sin_addr;
    if (!v6)
        return !memcmp(addr, ip, 4) ? 4 : !memcmp(addr, any, 4) ? 2 : 0;
    if (!memcmp(addr, mapped, 12) && !memcmp(addr + 12, ip, 4))
        return 3;
    return !memcmp(addr, any, 16) ? 1 : 0;
}

static unsigned tcp_port(const struct tcp_addr *a)
{
    return a->sa.ss_family == AF_INET6
               ? ntohs(((const struct sockaddr_in6 *)(const void *)&a->sa)->sin6_port)
               : ntohs(((const struct sockaddr_in *)(const void *)&a->sa)->sin_port);
}

/* One line of /proc/net/tcp{,6}: a listener's address, port and uid. */
static int parse_listener(const char *line, int v6, unsigned char *addr, unsigned *port,
                          unsigned long *uid)
{
    char hex[33];
    unsigned st;
    if (sscanf(line, " %*u: %32[0-9A-Fa-f]:%x %*s %x %*s %*s %*s %lu", hex, port, &st, uid) != 4 ||
        st != 0x0A || strlen(hex) != (v6 ? 32u : 8u))
        return -1;
    for (size_t w = 0; w < strlen(hex) / 8; w++) { /* words in the kernel's byte order */
        char part[9];
        memcpy(part, hex + 8 * w, 8);
        part[8] = '\0';
        uint32_t x = (uint32_t)strtoul(part, NULL, 16);
        memcpy(addr + 4 * w, &x, 4);
    }
    return 0;
}

static void scan_listeners(const char *file, int v6, struct listen_scan *sc)
{
    FILE *f = fopen(file, "r");
    if (!f)
        return;
    sc->seen = 1;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        unsigned char addr[16];
        unsigned port;
        unsigned long uid;
        if (parse_listener(line, v6, addr, &port, &uid) < 0 || port != tcp_port(sc->a))
            continue;
        int r = listen_rank(sc->a, v6, addr);
        if (r > sc->rank) {
            sc->rank = r;
            sc->count = 0;
            sc->bad = 0;
        }
        if (r == 0 || r < sc->rank)
            continue;
        sc->count++;
        if (uid != sc->ok1 && uid != sc->ok2 && !sc->bad) {
            sc->bad = 1;
            sc->who = uid;
        }
    }
    fclose(f);
}

static int is_loopback(const struct tcp_addr *a)
{
    if (a->sa.ss_family == AF_INET6)
        return IN6_IS_ADDR_LOOPBACK(&((const struct sockaddr_in6 *)(const void *)&a->sa)->sin6_addr);
    return (ntohl(((const struct sockaddr_in *)(const void *)&a->sa)->sin_addr.s_addr) >> 24) == 127;
}

/* Before anything is sent: the listener there belongs to the secret's
 * owner (or to us). Where /proc/net cannot be read, not checked. */
static void check_listener(const struct tcp_addr *a, uid_t owner, const char *name)
{
    struct listen_scan sc;
    memset(&sc, 0, sizeof sc);
    sc.a = a;
    sc.ok1 = owner;
    sc.ok2 = geteuid();
    scan_listeners("/proc/net/tcp", 0, &sc);
    scan_listeners("/proc/net/tcp6", 1, &sc);
    if (sc.seen && sc.bad)
        die(EXIT_AUTH,
            "%s: the listener on %s belongs to uid %lu, not to the secret's owner (uid %lu); "
            "nothing was sent",
            name, a->ep, sc.who, (unsigned long)owner);
    if (sc.seen && !sc.count && is_loopback(a))
        die(EXIT_AUTH, "%s: cannot tell who listens on %s (not in /proc/net); nothing was sent",
            name, a->ep);
}

/* ---- The challenge-response (wire.h) ---- */

#define AUTH_REPLY_LEN (6 + MH_NONCE_HEX + 1 + MH_PROOF_HEX + 2)

/* The server's A record so far: 1 complete, 0 good so far, -1 not it. */
static int auth_reply_check(const unsigned char *r, size_t n)
{
    static const unsigned char head[6] = {IAC, SB, OPT_MANHOLE, MH_REC_AUTH, '1', ' '};
    for (size_t i = 0; i < n; i++) {
        int ok = i < 6                          ? r[i] == head[i]
                 : i == 6 + MH_NONCE_HEX        ? r[i] == ' '
                 : i == AUTH_REPLY_LEN - 2      ? r[i] == IAC
                 : i == AUTH_REPLY_LEN - 1      ? r[i] == SE
                                                : mh_is_hex((const char *)r + i, 1);
        if (!ok)
            return -1;
    }
    return n == AUTH_REPLY_LEN;
}

/* Read the answer (never a byte past it): its length; *end set when the
 * server closed or sent something else. */
static size_t auth_read(int fd, unsigned char *r, size_t cap, double deadline, int *end)
{
    size_t got = 0;
    *end = 0;
    while (got < cap) {
        struct pollfd pf = {fd, POLLIN, 0};
        int pr = poll(&pf, 1, ms_until(deadline));
        if (pr < 0 && errno == EINTR && (sig_int || sig_term))
            die(EXIT_INTERRUPTED, "interrupted");
        if (pr == 0)
            break;
        ssize_t k = pr < 0 ? 0 : recv(fd, r + got, cap - got, 0);
        if (k < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (k <= 0) {
            *end = 1;
            break;
        }
        got += (size_t)k;
        if (r[0] == IAC && auth_reply_check(r, got) < 0) {
            *end = 1;
            break;
        }
        if (r[0] != IAC && (memchr(r, '\n', got) || got >= 200)) {
            *end = 1; /* a line of text: enough to say what it was */
            break;
        }
    }
    return got;
}

/* Anything but the A record: the server learns nothing more. */
static void auth_refused(const char *name, const unsigned char *r, size_t n, int end)
{
    char said[200] = "";
    if (n && r[0] != IAC)
        quote_line(said, sizeof said, (const char *)r, strcspn((const char *)r, "\r\n"));
    if (!memcmp(said, "manhole: ", 9) &&
        (strstr(said, "access denied") || strstr(said, "too many")))
        die(EXIT_REJECTED, "%s: the manhole refused this client: %s", name, said + 9);
    if (!end && !n)
        die(EXIT_AUTH,
            "%s: no answer to the authentication within %g s (not a manhole, or one older than "
            "this client); nothing was sent",
            name, opt.timeout);
    if (!n)
        die(EXIT_AUTH, "%s: the server closed the connection before proving it knows the "
            "secret; nothing was sent", name);
    die(EXIT_AUTH, "%s: the server did not prove it knows the secret (it sent %s%s%s); nothing "
        "was sent", name, said[0] ? "\"" : "other bytes", said, said[0] ? "\"" : "");
}

static void send_auth_record(int fd, const char *payload, size_t n)
{
    struct buf b = {0};
    const char head[4] = {(char)IAC, (char)SB, (char)OPT_MANHOLE, MH_REC_AUTH};
    buf_add(&b, head, 4);
    buf_add(&b, payload, n); /* hex digits and a space: nothing to escape */
    buf_add(&b, "\xff\xf0", 2);
    if (write_all(fd, b.p, b.len) < 0 && errno != EPIPE && errno != ECONNRESET)
        die(EXIT_CLOSED, "sending: %s", strerror(errno));
    buf_free(&b);
}

/* Client nonce out, the server's proof checked, ours sent: only then does
 * the session begin. Dies with 84 on anything else. */
static void tcp_auth(int fd, const char *secret, size_t slen, const char *name, const char *note,
                     double deadline)
{
    char cnonce[MH_NONCE_HEX + 3] = MH_AUTH_VERSION " ", ep[INET6_ADDRSTRLEN + 16];
    struct sockaddr_storage peer;
    socklen_t pl = sizeof peer;
    if (!slen)
        die(EXIT_AUTH, "%s: the secret file is empty; %s", name, note);
    if (mh_random_hex(cnonce + 2, MH_NONCE_HEX / 2) < 0)
        die(EXIT_CLOSED, "cannot read random bytes for the authentication");
    if (getpeername(fd, (struct sockaddr *)&peer, &pl) < 0 ||
        mh_endpoint(ep, sizeof ep, (struct sockaddr *)&peer, pl) < 0)
        die(EXIT_CLOSED, "%s: %s", name, strerror(errno));
    send_auth_record(fd, cnonce, strlen(cnonce));
    unsigned char r[AUTH_REPLY_LEN + 1] = {0};
    int end;
    size_t n = auth_read(fd, r, AUTH_REPLY_LEN, deadline, &end);
    if (auth_reply_check(r, n) != 1)
        auth_refused(name, r, n, end);
    char snonce[MH_NONCE_HEX + 1], want[MH_PROOF_HEX + 1];
    memcpy(snonce, r + 6, MH_NONCE_HEX);
    snonce[MH_NONCE_HEX] = '\0';
    mh_auth_proof(want, 1, secret, slen, cnonce + 2, snonce, ep);
    if (!mh_equal(want, r + 7 + MH_NONCE_HEX, MH_PROOF_HEX))
        die(EXIT_AUTH, "%s: authentication failed (wrong or missing secret); %s", name, note);
    mh_auth_proof(want, 0, secret, slen, cnonce + 2, snonce, ep);
    send_auth_record(fd, want, MH_PROOF_HEX);
}

/* HOST:PORT: only to an address with a secret file, only after its
 * listener and then the server itself have shown they are the host's. */
static void open_tcp(struct session *s, const char *t, const char *host, const char *port,
                     double deadline)
{
    struct tcp_addr *as;
    size_t n = resolve_tcp(host, port, t, &as);
    find_secret_files(as, n, port, t);
    int fd = -1, err = ECONNREFUSED;
    size_t i = 0;
    char secret[MH_SECRET_MAX + 1], note[PATH_MAX + 64];
    size_t slen = 0;
    uid_t owner = 0;
    for (; i < n && fd < 0; i++) {
        if (!as[i].file[0])
            continue;
        slen = read_secret(as[i].file, secret, &owner);
        fd = connect_addr(&as[i], deadline, &err);
    }
    if (fd < 0)
        connect_failed(t, err);
    const struct tcp_addr *a = &as[i - 1];
    snprintf(note, sizeof note, "the secret was read from %s", a->file);
    check_listener(a, owner, t);
    tcp_auth(fd, secret, slen, t, note, deadline);
    memset(secret, 0, sizeof secret);
    free(as);
    greet_one(s, fd, t, note, deadline);
}

static void open_session(struct session *s)
{
    double deadline = now() + opt.timeout;
    const char *t = opt.target;
    memset(s, 0, sizeof *s);
    int code;
    if (!t || (opt.path && !all_digits(t))) {
        /* --path alone, or --path with a target that is not a PID */
        const char *p = opt.path ? opt.path : t;
        int fd = unix_connect(p, &code);
        if (fd < 0)
            die(code, "%s", errmsg);
        greet_one(s, fd, p, NULL, deadline);
        return;
    }
    if (all_digits(t)) {
        long v = strtol(t, NULL, 10);
        if (v <= 0 || v > INT_MAX)
            die(EXIT_USAGE, "%s: not a process id", t);
        pid_t pid = (pid_t)v;
        if (opt.path) {
            int fd = unix_connect(opt.path, &code);
            if (fd < 0)
                die(code, "%s", errmsg);
            greet_one(s, fd, opt.path, NULL, deadline);
            return;
        }
#ifdef __linux__
        struct cand *cs;
        int err;
        size_t n = find_candidates(pid, &cs, &err);
        char comm[64];
        proc_comm(pid, comm, sizeof comm);
        if (err == ENOENT)
            die(EXIT_NOTFOUND, "no process with pid %ld", (long)pid);
        if (err == EACCES || err == EPERM)
            die(EXIT_PERM,
                "cannot read /proc/%ld/fd: permission denied (process %ld belongs to another "
                "user: run manhole-cli as that user or root, or give the socket path)",
                (long)pid, (long)pid);
        if (err)
            die(EXIT_NOTFOUND, "cannot read /proc/%ld/fd: %s", (long)pid, strerror(err));
        if (n == 0)
            die(EXIT_NOTFOUND,
                "process %ld (%s) has no manhole: it listens on no UNIX socket (a TCP-only "
                "manhole needs HOST:PORT)",
                (long)pid, comm);
        if (n == 1) {
            int fd = unix_connect(cs[0].path, &code);
            if (fd < 0)
                die(code, "%s", errmsg);
            greet_one(s, fd, cs[0].path, NULL, deadline);
            free(cs[0].path);
            free(cs);
            return;
        }
        qsort(cs, n, sizeof *cs, cmp_cand);
        struct hs *hs = probe_all(cs, n, deadline);
        size_t manholes = 0, pick = 0;
        for (size_t i = 0; i < n; i++)
            if (is_manhole(&hs[i])) {
                manholes++;
                pick = i;
            }
        int rc = 0;
        if (manholes > 1) {
            fprintf(stderr,
                    "manhole-cli: process %ld (%s) has %zu manholes; choose one with --path:\n",
                    (long)pid, comm, manholes);
            for (size_t i = 0; i < n; i++)
                if (is_manhole(&hs[i]))
                    fprintf(stderr, "  manhole-cli --path %s %ld\n", hs[i].path, (long)pid);
            rc = EXIT_USAGE;
        } else if (manholes == 0) {
            snprintf(errmsg, sizeof errmsg,
                     "process %ld (%s) listens on %zu UNIX sockets but none answered as a manhole",
                     (long)pid, comm, n);
            rc = EXIT_NOANSWER;
        } else if (hs[pick].state != HS_OK) {
            snprintf(errmsg, sizeof errmsg, "%s", hs[pick].msg);
            rc = hs[pick].code;
        } else {
            take_hs(s, &hs[pick]);
        }
        for (size_t i = 0; i < n; i++) {
            conn_free(&hs[i].c);
            buf_free(&hs[i].pre);
            free(cs[i].path);
        }
        free(hs);
        free(cs);
        if (rc == EXIT_USAGE)
            exit(rc);
        if (rc)
            die(rc, "%s", errmsg);
        return;
#else
        die(EXIT_USAGE,
            "finding a process's manhole by PID needs /proc (Linux); give the socket path");
#endif
    }
    /* HOST:PORT or [ADDR]:PORT */
    char host[256];
    const char *port;
    if (parse_tcp_target(t, 0, host, sizeof host, &port) == 0) {
        open_tcp(s, t, host, port, deadline);
        return;
    }
    int fd = unix_connect(t, &code);
    if (fd < 0)
        die(code, "%s", errmsg);
    greet_one(s, fd, t, NULL, deadline);
}

/* ---- Script mode: E record, output only --------------------------------- */

/* What one E record may carry: a manhole takes at most max_line bytes of
 * it (1 MiB unless the host set another limit; the hello does not say). */
#define SCRIPT_MAX (1u << 20)

static void check_script_size(const char *filename, size_t srclen)
{
    size_t n = strlen(filename) + 1 + srclen;
    if (n <= SCRIPT_MAX)
        return;
    die(EXIT_USAGE,
        "the script is too long to send in one piece: a manhole takes at most 1 MiB (%u "
        "bytes, its default max_line) of script; split it, or have the host read it from a "
        "file: exec(open('/path/to/script.py').read())",
        SCRIPT_MAX - (unsigned)strlen(filename) - 1);
}

static int run_script(struct session *s, const char *filename, const char *src, size_t srclen,
                      int stdin_free)
{
    struct conn *c = &s->c;
    struct buf rec = {0};
    buf_adds(&rec, filename);
    buf_addc(&rec, '\n');
    buf_add(&rec, src, srclen);
    send_record(c, 'E', rec.p, rec.len);
    buf_free(&rec);

    int got_s = 0, status = 0, got_x = 0, xcode = 0, want_input = 0, stdin_eof = !stdin_free;
    int interrupts = 0;
    struct buf in = {0};
    for (;;) {
        struct ev e;
        while (q_pop(c, &e)) {
            switch (e.type) {
            case EV_OUT:
                if (write_all(1, e.data, e.len) < 0 && errno == EPIPE)
                    exit(EXIT_CLOSED);
                break;
            case EV_ERR: /* tracebacks to stderr, as python -c prints them */
                (void)write_all(2, e.data, e.len);
                break;
            case EV_S:
                got_s = 1;
                status = e.a == 1;
                break;
            case EV_P:
                if (got_s) {
                    free(e.data);
                    buf_free(&in);
                    return status ? EXIT_RAISED : 0;
                }
                break;
            case EV_W:
                want_input = 1;
                break;
            case EV_X:
                got_x = 1;
                xcode = (int)e.a;
                break;
            default:
                break;
            }
            free(e.data);
        }
        if (c->eof) {
            buf_free(&in);
            if (got_x && !c->broke[0])
                return xcode;
            die_closed(c);
        }
        if (want_input) {
            char *nl = in.len ? memchr(in.p, '\n', in.len) : NULL;
            if (nl) {
                size_t n = (size_t)(nl - in.p);
                send_line(c, in.p, n);
                buf_consume(&in, n + 1);
                want_input = 0;
            } else if (stdin_eof) {
                if (in.len) {
                    send_line(c, in.p, in.len);
                    buf_clear(&in);
                    want_input = 0;
                } else if (!c->shut_req) {
                    c->shut_req = 1; /* input() then sees the end of input */
                    conn_flush(c);
                }
            }
        }
        struct pollfd pf[3] = {{c->fd, (short)(POLLIN | (c->out.len ? POLLOUT : 0)), 0},
                               {sig_pipe[0], POLLIN, 0},
                               {want_input && !stdin_eof ? 0 : -1, POLLIN, 0}};
        int r = poll(pf, 3, -1);
        if (r < 0 && errno != EINTR)
            die(EXIT_CLOSED, "poll: %s", strerror(errno));
        if (sig_pipe[0] >= 0)
            drain_sig_pipe();
        if (sig_term)
            exit(128 + sig_term);
        if (sig_int) {
            sig_int = 0;
            if (++interrupts > 1 || c->shut_req)
                exit(EXIT_INTERRUPTED);
            send_interrupt(c); /* the first Ctrl-C interrupts the statement */
        }
        if (r > 0 && (pf[0].revents & POLLOUT))
            conn_flush(c);
        if (r > 0 && (pf[0].revents & (POLLIN | POLLHUP | POLLERR)))
            conn_read(c);
        if (r > 0 && (pf[2].revents & (POLLIN | POLLHUP | POLLERR))) {
            char tmp[4096];
            ssize_t k = read(0, tmp, sizeof tmp);
            if (k > 0)
                buf_add(&in, tmp, (size_t)k);
            else if (k == 0 || errno != EINTR)
                stdin_eof = 1;
        }
    }
}

/* ---- Interactive mode --------------------------------------------------- */

static struct session *S;      /* the session */
static History *hist;
static char hist_path[PATH_MAX];
static struct buf hist_new;    /* entries not yet saved, NUL-separated */
static size_t hist_new_count;
static int hist_broken;        /* the file could not be read: never overwrite it */

static int ed_active;          /* libedit is editing a line */
static int ed_mode;            /* 'P': a statement; 'W': input() */
static int ed_hidden;          /* prompt hidden while output is printed above */
static struct buf prompt_esc;  /* the prompt for libedit (escape sequences marked) */
static struct buf cur_prompt;  /* the prompt text from the server (P) */
static struct buf ed_tail;     /* output tail shown at the start of the prompt */
static struct buf tail;        /* output since the last newline, when not editing */
static struct buf ibuf;        /* terminal bytes not yet given to libedit */
static char *carry;            /* text for the next edited line (rest of a paste) */
static int carry_back;         /* characters of carry after the cursor */
static int banner_done;
static int pkind = 1;          /* the kind of the last P record */
static int running;            /* a line was sent; waiting for P or W */
static int closing;            /* half-closed: waiting for the server to finish */
static int got_x, x_code;
static int auto_close;         /* send an empty line if a recalled block stays open */
static int eof_typed;          /* Ctrl-D on an empty line */
static int tab_ambiguous;      /* the last Tab left several candidates */
static int comp_id;
static char **listing;         /* candidates to list after a double Tab */
static size_t nlisting;
static int dumb;               /* TERM=dumb: no cursor control */
static int line_open;          /* the cursor ends an abandoned edited line */

struct qline {
    char *text;
    int echo;   /* print prompt and line when sent (a paste) */
};
static struct qline *lq;       /* lines waiting for their prompt */
static size_t lq_head, lq_len, lq_cap;

/* What the current block (statement being entered) looks like. */
static struct {
    int depth;   /* open brackets */
    char triple; /* inside a triple-quoted string: its quote */
    int cont;    /* last line ended with a backslash */
    int colon;   /* some line ended with ':' (an indented block is open) */
} blk;
static struct buf stmt;        /* lines of the statement, for the history */

static void term_write(const char *d, size_t n)
{
    fwrite(d, 1, n, stdout);
    fflush(stdout);
}

static void term_puts(const char *s)
{
    term_write(s, strlen(s));
}

static void tail_feed(struct buf *t, const char *d, size_t n)
{
    const char *nl = NULL;
    for (size_t i = n; i > 0; i--)
        if (d[i - 1] == '\n') {
            nl = d + i - 1;
            break;
        }
    if (nl) {
        buf_clear(t);
        buf_add(t, nl + 1, n - (size_t)(nl + 1 - d));
    } else {
        buf_add(t, d, n);
    }
    if (t->len > 4096) /* a long line without an end: keep its end */
        buf_consume(t, u8_cut(t->p, t->len, 2048));
}

/* The end of the escape sequence (CSI or OSC) at s[i], or 0 when there is
 * no well-formed one there. */
static size_t escape_end(const char *s, size_t n, size_t i)
{
    if (i + 1 >= n || (s[i + 1] != '[' && s[i + 1] != ']'))
        return 0;
    size_t j = i + 2;
    if (s[i + 1] == '[') { /* parameters 0x20-0x3f, a final 0x40-0x7e */
        while (j < n && s[j] >= 0x20 && s[j] <= 0x3f)
            j++;
        return j < n && s[j] >= 0x40 && s[j] <= 0x7e ? j + 1 : 0;
    }
    for (; j < n; j++) { /* OSC: text up to BEL or ESC \ */
        if (s[j] == '\a')
            return j + 1;
        if (s[j] == 033)
            return j + 1 < n && s[j + 1] == '\\' ? j + 2 : 0;
        if ((unsigned char)s[j] < 0x20 || s[j] == 0x7f)
            return 0;
    }
    return 0;
}

/* The prompt libedit shows: the output tail, then the server's prompt, as
 * valid UTF-8. Escape sequences (colour in sys.ps1) are wrapped in \1 so
 * that libedit knows they take no room; other control characters are
 * dropped. */
static void build_prompt(void)
{
    struct buf src = {0};
    u8_clean(NULL, buf_str(&ed_tail), ed_tail.len, &src);
    if (ed_mode == 'P')
        u8_clean(NULL, buf_str(&cur_prompt), cur_prompt.len, &src);
    buf_clear(&prompt_esc);
    buf_add(&prompt_esc, "", 0);
    int col = 0;
    for (size_t i = 0; i < src.len; i++) {
        unsigned char ch = (unsigned char)src.p[i];
        size_t j = ch == 033 ? escape_end(src.p, src.len, i) : 0;
        if (j) {
            buf_addc(&prompt_esc, '\1');
            buf_add(&prompt_esc, src.p + i, j - i);
            buf_addc(&prompt_esc, '\1');
            i = j - 1;
        } else if (ch == '\t') {
            do {
                buf_addc(&prompt_esc, ' ');
                col++;
            } while (col % 8);
        } else if (ch >= 0x20 && ch != 0x7f) {
            buf_addc(&prompt_esc, (char)ch);
            if ((ch & 0xc0) != 0x80)
                col++;
        }
    }
    buf_free(&src);
}

static char *prompt_fn(EditLine *e)
{
    static char empty[] = "";
    (void)e;
    return ed_hidden || !prompt_esc.p ? empty : prompt_esc.p;
}

static int term_cols(void)
{
    struct winsize ws;
    if (ioctl(1, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0)
        return ws.ws_col;
    return 80;
}

/* ---- Feeding libedit ---- */

static int tty_read_more(int ms)
{
    struct pollfd pf[2] = {{tty_in, POLLIN, 0}, {sig_pipe[0], POLLIN, 0}};
    for (;;) {
        if (sig_int || sig_term || sig_tstp)
            return -1;
        int r = poll(pf, 2, ms);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return 0;
        if (pf[1].revents)
            drain_sig_pipe();
        if (pf[0].revents) {
            char tmp[4096];
            ssize_t k = read(tty_in, tmp, sizeof tmp);
            if (k > 0) {
                buf_add(&ibuf, tmp, (size_t)k);
                return (int)k;
            }
            if (k == 0 || (errno != EINTR && errno != EAGAIN)) {
                sig_term = SIGHUP; /* the terminal went away */
                return -1;
            }
        }
    }
}

/* libedit's character source: our buffer, then the terminal. */
static int getc_fn(EditLine *e, wchar_t *wc)
{
    (void)e;
    for (;;) {
        if (ibuf.len) {
            uint32_t cp;
            int k = u8_decode((const unsigned char *)ibuf.p, ibuf.len, &cp);
            if (k != 0) {
                if (k < 0) {
                    cp = 0xfffd;
                    k = 1;
                }
                buf_consume(&ibuf, (size_t)k);
                if (cp != '\t')
                    tab_ambiguous = 0;
                *wc = (wchar_t)cp;
                return 1;
            }
        }
        if (tty_read_more(-1) < 0) {
            errno = EINTR;
            return -1;
        }
    }
}

/* Push private keys and let libedit run them (one el_gets per command). */
static void el_run(const char *keys, int ncmds)
{
    el_push(el, keys);
    for (int i = 0; i < ncmds; i++) {
        int n;
        (void)el_gets(el, &n);
    }
}

static unsigned char fn_redisplay(EditLine *e, int ch)
{
    (void)e;
    (void)ch;
    return CC_REDISPLAY;
}

static unsigned char fn_refresh(EditLine *e, int ch)
{
    (void)e;
    (void)ch;
    return CC_REFRESH;
}

static unsigned char fn_eof(EditLine *e, int ch)
{
    (void)ch;
    const LineInfoW *li = el_wline(e);
    if (li->lastchar == li->buffer) {
        if (ed_mode == 'W')
            return CC_ERROR; /* input() cannot be told about an end of input */
        eof_typed = 1;
        return CC_EOF;
    }
    if (li->cursor == li->lastchar)
        return CC_ERROR;
    el_cursor(e, 1);
    el_deletestr(e, 1);
    return CC_REFRESH;
}

/* The edited text, and the cursor's place in it (bytes, and characters
 * after it). */
static char *ed_text(size_t *cursor, int *after)
{
    const LineInfo *li = el_line(el);
    size_t len = (size_t)(li->lastchar - li->buffer);
    if (cursor)
        *cursor = (size_t)(li->cursor - li->buffer);
    if (after)
        *after = u8_chars(li->cursor, (size_t)(li->lastchar - li->cursor));
    return xstrndup(li->buffer, len);
}

static void ed_clear_buffer(void)
{
    const LineInfoW *li = el_wline(el);
    int total = (int)(li->lastchar - li->buffer);
    el_cursor(el, total);
    el_deletestr(el, total);
}

/* Take the edited line off the screen (the cursor ends at its start). */
static char *saved_text;
static int saved_after;

static void ed_hide(void)
{
    saved_text = ed_text(NULL, &saved_after);
    ed_clear_buffer();
    ed_hidden = 1;
    el_run(KEY_REDISPLAY, 1);
}

/* Draw it again where the cursor is (the start of a line). */
static void ed_show(void)
{
    ed_hidden = 0;
    build_prompt();
    if (saved_text && saved_text[0]) {
        el_insertstr(el, saved_text);
        el_cursor(el, -saved_after);
    }
    free(saved_text);
    saved_text = NULL;
    el_set(el, EL_REFRESH);
}

/* Output while a line is being edited: above it, the line redrawn below. */
static void above(const char *d, size_t n)
{
    ed_hide();
    struct buf all = {0};
    buf_add(&all, buf_str(&ed_tail), ed_tail.len);
    buf_add(&all, d, n);
    size_t k = all.len;
    while (k > 0 && all.p[k - 1] != '\n')
        k--;
    term_write(all.p, k);
    buf_clear(&ed_tail);
    buf_add(&ed_tail, all.p + k, all.len - k);
    if (ed_tail.len > 4096)
        buf_consume(&ed_tail, u8_cut(ed_tail.p, ed_tail.len, 2048));
    buf_free(&all);
    ed_show();
}

static void ed_start(int mode)
{
    if (line_open) {
        line_open = 0;
        term_puts("\n");
    }
    ed_mode = mode;
    buf_clear(&ed_tail);
    buf_add(&ed_tail, buf_str(&tail), tail.len);
    buf_clear(&tail);
    if (ed_tail.len) {
        if (dumb) {
            buf_clear(&ed_tail); /* it stays on the screen; the prompt follows it */
        } else if (u8_width(buf_str(&ed_tail), ed_tail.len) >= term_cols() - 8) {
            term_puts("\n"); /* too long to share a row with the line */
            buf_clear(&ed_tail);
        } else {
            term_puts("\r\033[K"); /* drawn again as part of the prompt */
        }
    }
    build_prompt();
    ed_hidden = 0;
    if (!bracketed_on && !dumb) {
        term_puts("\033[?2004h");
        bracketed_on = 1;
    }
    el_set(el, EL_UNBUFFERED, 0);
    el_set(el, EL_UNBUFFERED, 1); /* a fresh line: the prompt is drawn */
    ed_active = 1;
    tab_ambiguous = 0;
    if (carry) {
        el_insertstr(el, carry);
        el_cursor(el, -carry_back);
        free(carry);
        carry = NULL;
        el_run(KEY_REFRESH, 1);
    }
}

/* ---- History: one entry per statement, bounded, 0600 ---- */

static int mkdirs(char *path)
{
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        int r = mkdir(path, 0700);
        *p = '/';
        if (r < 0 && errno != EEXIST)
            return -1;
    }
    return 0;
}

static void hist_setup(void)
{
    HistEvent ev;
    hist = history_init();
    history(hist, &ev, H_SETSIZE, HISTORY_MAX);
    history(hist, &ev, H_SETUNIQUE, 1);
    if (opt.no_history)
        return;
    const char *xdg = getenv("XDG_STATE_HOME");
    const char *home = getenv("HOME");
    if (xdg && xdg[0] == '/')
        snprintf(hist_path, sizeof hist_path, "%s/manhole/history", xdg);
    else if (home && home[0])
        snprintf(hist_path, sizeof hist_path, "%s/.local/state/manhole/history", home);
    else
        return;
    if (access(hist_path, F_OK) == 0 && history(hist, &ev, H_LOAD, hist_path) < 0 &&
        access(hist_path, R_OK) != 0)
        hist_broken = 1;
}

/* Merge the new entries into the file as it is now (another session may
 * have written it) and replace it atomically. */
static void hist_save(void)
{
    if (!hist_path[0] || hist_broken || !hist_new_count)
        return;
    HistEvent ev;
    History *h = history_init();
    history(h, &ev, H_SETSIZE, HISTORY_MAX);
    history(h, &ev, H_SETUNIQUE, 1);
    if (access(hist_path, F_OK) == 0 && history(h, &ev, H_LOAD, hist_path) < 0 &&
        access(hist_path, R_OK) != 0) {
        history_end(h);
        return;
    }
    const char *p = hist_new.p;
    for (size_t i = 0; i < hist_new_count; i++) {
        history(h, &ev, H_ENTER, p);
        p += strlen(p) + 1;
    }
    char tmp[PATH_MAX + 32];
    snprintf(tmp, sizeof tmp, "%s.%ld.tmp", hist_path, (long)getpid());
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", hist_path);
    mkdirs(dir);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd >= 0) {
        fchmod(fd, 0600);
        FILE *f = fdopen(fd, "w");
        if (f) {
            int ok = history(h, &ev, H_SAVE_FP, f) >= 0;
            if (fclose(f) == 0 && ok)
                ok = rename(tmp, hist_path) == 0;
            if (!ok)
                unlink(tmp);
        } else {
            close(fd);
            unlink(tmp);
        }
    }
    history_end(h);
    buf_clear(&hist_new);
    hist_new_count = 0;
}

static int blank(const char *s)
{
    for (; *s; s++)
        if (*s != ' ' && *s != '\t' && *s != '\f')
            return 0;
    return 1;
}

static void stmt_commit(void)
{
    /* without trailing blank lines */
    size_t n = stmt.len;
    while (n > 0) {
        size_t start = n;
        while (start > 0 && stmt.p[start - 1] != '\n')
            start--;
        char *line = xstrndup(stmt.p + start, n - start);
        int b = blank(line);
        free(line);
        if (!b)
            break;
        n = start > 0 ? start - 1 : 0;
    }
    if (n > 0) {
        char *entry = xstrndup(stmt.p, n);
        HistEvent ev;
        history(hist, &ev, H_ENTER, entry);
        buf_add(&hist_new, entry, n + 1);
        hist_new_count++;
        free(entry);
        hist_save();
    }
    buf_clear(&stmt);
}

/* ---- The block being entered: brackets, strings, colons ---- */

static void blk_reset(void)
{
    memset(&blk, 0, sizeof blk);
}

static void blk_feed(const char *s)
{
    size_t i = 0, n = strlen(s);
    char last = 0; /* last significant character outside strings and comments */
    blk.cont = 0;
    while (i < n) {
        char c = s[i];
        if (blk.triple) {
            if (c == '\\') {
                i += 2;
                continue;
            }
            if (c == blk.triple && i + 2 < n + 0 && s[i + 1] == c && s[i + 2] == c) {
                blk.triple = 0;
                i += 3;
                last = c;
                continue;
            }
            i++;
            continue;
        }
        if (c == '#')
            break;
        if (c == '\'' || c == '"') {
            if (i + 2 < n && s[i + 1] == c && s[i + 2] == c) {
                blk.triple = c;
                i += 3;
                continue;
            }
            i++;
            while (i < n && s[i] != c) {
                if (s[i] == '\\')
                    i++;
                i++;
            }
            i++;
            last = c;
            continue;
        }
        if (c == '(' || c == '[' || c == '{')
            blk.depth++;
        else if ((c == ')' || c == ']' || c == '}') && blk.depth > 0)
            blk.depth--;
        if (c != ' ' && c != '\t' && c != '\f')
            last = c;
        i++;
    }
    if (!blk.triple && last == '\\')
        blk.cont = 1;
    if (!blk.triple && !blk.depth && last == ':')
        blk.colon = 1;
}

static int starts_kw(const char *s, const char *kw)
{
    size_t n = strlen(kw);
    return !strncmp(s, kw, n) && !(isalnum((unsigned char)s[n]) || s[n] == '_');
}

/* A pasted line at column 0 that cannot continue the open indented block:
 * the block must be ended (an empty line) before it. */
static int needs_block_end(const char *line)
{
    if (!blk.colon || blk.triple || blk.depth || blk.cont)
        return 0;
    if (!line[0] || line[0] == ' ' || line[0] == '\t' || line[0] == '#' || blank(line))
        return 0;
    return !(starts_kw(line, "else") || starts_kw(line, "elif") || starts_kw(line, "except") ||
             starts_kw(line, "finally"));
}

/* ---- Lines waiting for their prompt (pastes, recalled blocks) ---- */

static void lq_push(const char *text, size_t n, int echo)
{
    if (lq_len == lq_cap) {
        lq_cap = lq_cap ? lq_cap * 2 : 32;
        lq = xrealloc(lq, lq_cap * sizeof *lq);
    }
    lq[lq_len].text = xstrndup(text, n);
    lq[lq_len].echo = echo;
    lq_len++;
}

static void lq_drop_front(void)
{
    free(lq[lq_head].text);
    if (++lq_head == lq_len)
        lq_head = lq_len = 0;
}

static void lq_clear(void)
{
    while (lq_head < lq_len)
        lq_drop_front();
    free(carry);
    carry = NULL;
    auto_close = 0;
}

/* Does the next non-blank line of the paste continue the open block
 * (indented, or else/elif/except/finally)? 1 yes, 0 no, -1 not known yet.
 * Looks at the queue, then at the rest of the paste, then at what the
 * terminal has sent. */
static int continues_block(const char *line)
{
    if (line[0] == ' ' || line[0] == '\t')
        return 1;
    return starts_kw(line, "else") || starts_kw(line, "elif") || starts_kw(line, "except") ||
           starts_kw(line, "finally");
}

static int next_continues(void)
{
    for (size_t i = lq_head + 1; i < lq_len; i++)
        if (!blank(lq[i].text))
            return continues_block(lq[i].text);
    struct buf tmp = {0};
    if (carry) {
        buf_adds(&tmp, carry);
        buf_addc(&tmp, '\n');
    }
    buf_add(&tmp, buf_str(&ibuf), ibuf.len);
    int r = -1;
    const char *p = buf_str(&tmp);
    for (;;) { /* the first line with something on it */
        size_t sp = strspn(p, " \t\f");
        if (p[sp] == '\r' || p[sp] == '\n') {
            p += sp + 1;
            continue;
        }
        if (p[sp])
            r = continues_block(p);
        break;
    }
    buf_free(&tmp);
    return r;
}

static void send_stmt_line(const char *line)
{
    send_line(&S->c, line, strlen(line));
    blk_feed(line);
    buf_add(&stmt, line, strlen(line));
    buf_addc(&stmt, '\n');
    running = 1;
}

static void echo_line(const char *prompt, const char *line)
{
    struct buf b = {0};
    if (tail.len && !dumb) { /* the tail again, from the start of its row */
        term_puts("\r\033[K");
        buf_add(&b, buf_str(&tail), tail.len);
    }
    buf_adds(&b, prompt);
    buf_adds(&b, line);
    buf_addc(&b, '\n');
    term_write(b.p, b.len);
    buf_free(&b);
    buf_clear(&tail);
}

/* At a P record with lines queued: send the next one, ending the block
 * first or dropping a blank line inside it where the paste means that. */
static int lq_send_next(void)
{
    while (lq_head < lq_len) {
        struct qline *q = &lq[lq_head];
        if (pkind == 2 && !blk.triple && blank(q->text)) {
            int more = next_continues();
            if (more < 0 && tty_read_more(50) > 0)
                more = next_continues();
            if (more == 1) { /* a blank line inside a function body */
                lq_drop_front();
                continue;
            }
        }
        if (pkind == 2 && needs_block_end(q->text)) {
            if (q->echo)
                echo_line(buf_str(&cur_prompt), "");
            send_stmt_line("");
            return 1;
        }
        if (q->echo)
            echo_line(buf_str(&cur_prompt), q->text);
        send_stmt_line(q->text);
        lq_drop_front();
        return 1;
    }
    return 0;
}

/* ---- Completion ---- */

static void free_listing(void)
{
    for (size_t i = 0; i < nlisting; i++)
        free(listing[i]);
    free(listing);
    listing = NULL;
    nlisting = 0;
}

/* Wait for the C reply with this id; other records stay queued. */
static struct ev *wait_completion(int id, double deadline)
{
    static struct ev found;
    struct conn *c = &S->c;
    for (;;) {
        for (size_t i = c->qhead; i < c->qlen; i++) {
            if (c->q[i].type == EV_C && c->q[i].a == id) {
                found = c->q[i];
                q_took(c, &found);
                memmove(&c->q[i], &c->q[i + 1], (c->qlen - i - 1) * sizeof *c->q);
                c->qlen--;
                if (c->qhead == c->qlen)
                    c->qhead = c->qlen = 0;
                return &found;
            }
        }
        if (c->eof || sig_int || sig_term || c->qbytes > QUEUE_MAX)
            return NULL; /* (output flooding in: the answer, if any, comes late) */
        int ms = ms_until(deadline);
        if (!ms)
            return NULL;
        struct pollfd pf[2] = {{c->fd, (short)(POLLIN | (c->out.len ? POLLOUT : 0)), 0},
                               {sig_pipe[0], POLLIN, 0}};
        int r = poll(pf, 2, ms);
        if (r <= 0)
            continue;
        if (pf[1].revents)
            drain_sig_pipe();
        if (pf[0].revents & POLLOUT)
            conn_flush(c);
        if (pf[0].revents & (POLLIN | POLLHUP | POLLERR))
            conn_read(c);
    }
}

/* The candidates of a C answer ("<id> <n>\n<cand>\n<cand>..."), each as
 * valid UTF-8; one with a control character in it is no Python and is
 * left out (it could move the cursor or recolour the terminal). */
static char **parse_candidates(const char *d, size_t len, size_t *ncand)
{
    const char *end = d + len, *p = memchr(d, '\n', len);
    size_t cap = 0;
    char **cand = NULL;
    *ncand = 0;
    while (p && p < end) {
        const char *start = p + 1;
        p = memchr(start, '\n', (size_t)(end - start));
        size_t n = (size_t)((p ? p : end) - start);
        int ctrl = 0;
        for (size_t i = 0; i < n; i++)
            ctrl |= (unsigned char)start[i] < 0x20 || start[i] == 0x7f;
        if (!n || ctrl)
            continue;
        if (*ncand == cap) {
            cap = cap ? cap * 2 : 16;
            cand = xrealloc(cand, cap * sizeof *cand);
        }
        struct buf b = {0};
        u8_clean(NULL, start, n, &b);
        cand[(*ncand)++] = b.p;
    }
    return cand;
}

static unsigned char fn_complete(EditLine *e, int ch)
{
    (void)ch;
    const LineInfo *li = el_line(e);
    const char *ls = li->cursor;
    while (ls > li->buffer && ls[-1] != '\n')
        ls--;
    size_t tlen = (size_t)(li->cursor - ls);
    char *text = xstrndup(ls, tlen);
    if (blank(text)) { /* indentation, as python3 -i does */
        free(text);
        el_insertstr(e, "    ");
        return CC_REFRESH;
    }
    if (S->c.shut_req) {
        free(text);
        return CC_ERROR;
    }
    int id = ++comp_id;
    struct buf req = {0};
    char head[32];
    snprintf(head, sizeof head, "%d ", id);
    buf_adds(&req, head);
    buf_add(&req, text, tlen);
    send_record(&S->c, 'C', req.p, req.len);
    buf_free(&req);
    int tchars = u8_chars(text, tlen);
    free(text);
    struct ev *ev = wait_completion(id, now() + opt.timeout * 3);
    if (!ev)
        return CC_REFRESH_BEEP;
    int nrep = (int)ev->b;
    size_t ncand;
    char **cand = parse_candidates(ev->data, ev->len, &ncand);
    free(ev->data);
    unsigned char rc = CC_REFRESH;
    if (ncand == 0) {
        rc = CC_REFRESH_BEEP;
    } else {
        size_t lcp = strlen(cand[0]);
        for (size_t i = 1; i < ncand; i++) {
            size_t k = 0;
            while (k < lcp && cand[i][k] == cand[0][k])
                k++;
            lcp = k;
        }
        while (lcp > 0 && ((unsigned char)cand[0][lcp] & 0xc0) == 0x80)
            lcp--; /* a whole character */
        int lcp_chars = u8_chars(cand[0], lcp);
        if (ncand == 1 || lcp_chars > nrep) {
            const LineInfoW *wl = el_wline(e);
            int avail = (int)(wl->cursor - wl->buffer);
            if (nrep > avail)
                nrep = avail;
            if (nrep > tchars) /* no more than the text it was asked about */
                nrep = tchars;
            if (nrep > 0)
                el_deletestr(e, nrep);
            char *ins = xstrndup(cand[0], ncand == 1 ? strlen(cand[0]) : lcp);
            el_insertstr(e, ins);
            free(ins);
        }
        if (ncand > 1) {
            if (tab_ambiguous) {
                free_listing();
                listing = cand;
                nlisting = ncand;
                cand = NULL;
                ncand = 0;
                tab_ambiguous = 0;
            } else {
                tab_ambiguous = 1;
                rc = lcp_chars > nrep ? CC_REFRESH : CC_REFRESH_BEEP;
            }
        }
    }
    for (size_t i = 0; i < ncand; i++)
        free(cand[i]);
    free(cand);
    return rc;
}

static void show_listing(void)
{
    size_t cursor;
    char *line = ed_text(&cursor, NULL);
    struct buf b = {0};
    if (ed_mode == 'P')
        buf_add(&b, buf_str(&cur_prompt), cur_prompt.len);
    buf_adds(&b, line);
    buf_addc(&b, '\n');
    free(line);
    int width = 0;
    for (size_t i = 0; i < nlisting; i++) {
        int w = u8_width(listing[i], strlen(listing[i]));
        if (w > width)
            width = w;
    }
    width += 2;
    int cols = term_cols();
    size_t per_row = (size_t)(cols / width);
    if (per_row < 1)
        per_row = 1;
    size_t rows = (nlisting + per_row - 1) / per_row;
    for (size_t r = 0; r < rows; r++) {
        for (size_t k = 0; k < per_row; k++) {
            size_t i = k * rows + r;
            if (i >= nlisting)
                break;
            buf_adds(&b, listing[i]);
            size_t next = (k + 1) * rows + r;
            if (next < nlisting)
                for (int pad = u8_width(listing[i], strlen(listing[i])); pad < width; pad++)
                    buf_addc(&b, ' ');
        }
        buf_addc(&b, '\n');
    }
    free_listing();
    /* the prompt's tail was output: it starts the echoed line */
    above(b.p, b.len);
    buf_free(&b);
}

/* ---- Events from the server ---- */

static void finish(int code)
{
    if (ed_active && el) {
        ed_hide();
        ed_active = 0;
    }
    hist_save();
    term_restore();
    exit(code);
}

/* Output or stderr text of the session (the server's bytes, as valid
 * UTF-8 by now). */
static void show_output(const char *d, size_t n)
{
    if (ed_active) {
        above(d, n);
        return;
    }
    if (line_open) {
        line_open = 0;
        if (n && d[0] != '\n')
            term_puts("\n");
    }
    term_write(d, n);
    tail_feed(&tail, d, n);
}

/* Bytes of output or stderr from the server: held as the banner until the
 * first prompt, else shown as valid UTF-8 (a character cut between two
 * chunks is joined again, an invalid byte shown as U+FFFD). */
static void show_server_text(const struct ev *e)
{
    if (!banner_done) {
        buf_add(&S->banner, e->data, e->len);
        if (S->banner.len > PRE_MAX)
            conn_broke(&S->c, "more than %u MiB before the first prompt", PRE_MAX >> 20);
        return;
    }
    struct buf clean = {0};
    u8_clean(e->type == EV_OUT ? &S->u8out : &S->u8err, e->data, e->len, &clean);
    if (clean.len)
        show_output(clean.p, clean.len);
    buf_free(&clean);
}

/* The first prompt: what came before it, less the prompt's text, is the
 * banner. */
static void show_banner(const char *text, size_t tlen)
{
    struct buf *b = &S->banner;
    if (b->len >= tlen && !memcmp(b->p + b->len - tlen, text, tlen))
        b->len -= tlen;
    banner_done = 1;
    struct buf clean = {0};
    u8_clean(&S->u8out, buf_str(b), b->len, &clean);
    term_write(buf_str(&clean), clean.len);
    tail_feed(&tail, buf_str(&clean), clean.len);
    buf_free(&clean);
    buf_free(b);
}

/* A prompt while a line is being edited (an interrupt crossed a line on
 * its way): the line goes off the screen, its text to the next prompt. */
static void ed_abandon(void)
{
    if (!ed_active)
        return;
    ed_hide();
    if (saved_text && saved_text[0]) {
        free(carry);
        carry = saved_text;
        carry_back = saved_after;
    } else {
        free(saved_text);
    }
    saved_text = NULL;
    ed_hidden = 0;
    ed_active = 0;
    buf_clear(&tail);
    buf_add(&tail, buf_str(&ed_tail), ed_tail.len);
    buf_clear(&ed_tail);
    if (tail.len && !dumb) /* the hidden prompt took the tail with it */
        term_write(tail.p, tail.len);
}

static void on_prompt(const char *d, size_t n)
{
    int kind = n > 0 && d[0] == '2' ? 2 : 1;
    const char *text = n > 0 ? d + 1 : "";
    size_t tlen = n > 0 ? n - 1 : 0;
    if (!banner_done)
        show_banner(text, tlen);
    ed_abandon();
    running = 0;
    pkind = kind;
    buf_clear(&cur_prompt);
    u8_clean(NULL, text, tlen, &cur_prompt);
    if (kind == 1) {
        stmt_commit();
        blk_reset();
    }
    if (closing)
        return;
    if (lq_send_next())
        return;
    if (kind == 2 && auto_close) {
        auto_close = 0;
        send_stmt_line("");
        return;
    }
    auto_close = 0;
    ed_start('P');
}

static void on_input_wanted(void)
{
    ed_abandon();
    running = 0;
    if (closing)
        return;
    if (lq_head < lq_len) { /* a pasted line answers input(), as in python3 -i */
        struct qline *q = &lq[lq_head];
        if (q->echo) {
            term_write(q->text, strlen(q->text));
            term_puts("\n");
        }
        buf_clear(&tail);
        send_line(&S->c, q->text, strlen(q->text));
        running = 1;
        lq_drop_front();
        return;
    }
    ed_start('W');
}

static void handle_event(struct ev *e)
{
    switch (e->type) {
    case EV_OUT:
    case EV_ERR: show_server_text(e); break;
    case EV_P: on_prompt(e->data, e->len); break;
    case EV_W: on_input_wanted(); break;
    case EV_X:
        got_x = 1;
        x_code = (int)e->a;
        break;
    default: break; /* S: the status matters in script mode only; C: a late reply */
    }
}

/* ---- Lines from the editor ---- */

static void on_line(const char *s, size_t n)
{
    ed_active = 0;
    buf_clear(&ed_tail);
    char *text = xstrndup(s, n);
    if (ed_mode == 'W') {
        send_line(&S->c, text, n);
        running = 1;
        free(text);
        return;
    }
    char *nl = strchr(text, '\n');
    if (nl) { /* a recalled block: its other lines follow the prompts */
        *nl = '\0';
        char *p = nl + 1;
        for (;;) {
            char *e2 = strchr(p, '\n');
            lq_push(p, e2 ? (size_t)(e2 - p) : strlen(p), 0);
            if (!e2)
                break;
            p = e2 + 1;
        }
        auto_close = 1;
    }
    send_stmt_line(text);
    free(text);
}

static void half_close(void)
{
    ed_active = 0;
    term_puts("\n");
    closing = 1;
    lq_clear();
    S->c.shut_req = 1;
    conn_flush(&S->c);
}

/* Text arriving all at once (a paste, or lines typed ahead): complete lines
 * go to the queue and are sent one per prompt, each shown after its prompt
 * as python3 -i would show them. */
static void handle_paste(const char *body, size_t len)
{
    struct buf norm = {0};
    for (size_t i = 0; i < len; i++) {
        char c = body[i];
        if (c == '\r' || c == '\n') {
            if (i + 1 < len && (body[i + 1] == '\r' || body[i + 1] == '\n') && body[i + 1] != c)
                i++; /* CR LF (or LF CR): one line end */
            buf_addc(&norm, '\n');
        } else if ((unsigned char)c >= 0x20 || c == '\t') {
            buf_addc(&norm, c);
        } else if (c == 033) {
            continue;
        }
    }
    if (!norm.len) {
        buf_free(&norm);
        return;
    }
    if (!memchr(norm.p, '\n', norm.len)) {
        el_insertstr(el, norm.p);
        el_run(KEY_REFRESH, 1);
        buf_free(&norm);
        return;
    }
    size_t cursor;
    int after_chars;
    char *text = ed_text(&cursor, &after_chars);
    struct buf full = {0};
    buf_add(&full, text, cursor);
    buf_add(&full, norm.p, norm.len);
    const char *after = text + cursor;
    buf_free(&norm);
    size_t start = 0;
    for (size_t i = 0; i < full.len; i++) {
        if (full.p[i] == '\n') {
            lq_push(full.p + start, i - start, 1);
            start = i + 1;
        }
    }
    struct buf rest = {0};
    buf_add(&rest, full.p + start, full.len - start);
    buf_adds(&rest, after);
    if (rest.len) {
        free(carry);
        carry = xstrdup(rest.p);
        carry_back = after_chars;
    }
    buf_free(&rest);
    buf_free(&full);
    free(text);
    ed_hide();
    free(saved_text);
    saved_text = NULL;
    ed_hidden = 0;
    ed_active = 0;
    /* the tail was part of the prompt: it is echoed again with the line */
    buf_clear(&tail);
    buf_add(&tail, buf_str(&ed_tail), ed_tail.len);
    buf_clear(&ed_tail);
    if (ed_mode == 'W') {
        on_input_wanted();
        return;
    }
    if (!lq_send_next())
        ed_start('P');
}

/* Several complete lines already typed (or pasted without bracketing). */
static int batch_end(void)
{
    size_t last = 0;
    int lines = 0;
    for (size_t i = 0; i < ibuf.len; i++) {
        unsigned char c = (unsigned char)ibuf.p[i];
        if (c == '\r' || c == '\n') {
            lines++;
            last = i + 1;
            if (i + 1 < ibuf.len && (ibuf.p[i + 1] == '\r' || ibuf.p[i + 1] == '\n') &&
                ibuf.p[i + 1] != (char)c)
                last = ++i + 1;
        } else if ((c < 0x20 && c != '\t') || c == 0x7f) {
            return 0; /* editing keys: let libedit have them */
        }
    }
    if (!lines || last >= ibuf.len)
        return lines >= 2 ? (int)last : 0;
    return (int)last;
}

static void feed_editor(void)
{
    while (ed_active && ibuf.len && !sig_int && !sig_term) {
        if (ibuf.len >= 6 && !memcmp(ibuf.p, PASTE_BEGIN, 6)) {
            double deadline = now() + 2;
            const char *end;
            while (!(end = find_bytes(ibuf.p + 6, ibuf.len - 6, PASTE_END, 6)) &&
                   ms_until(deadline))
                if (tty_read_more(ms_until(deadline)) < 0)
                    break;
            size_t body_end = end ? (size_t)(end - ibuf.p) : ibuf.len;
            char *body = xstrndup(ibuf.p + 6, body_end - 6);
            buf_consume(&ibuf, end ? body_end + 6 : body_end);
            handle_paste(body, body_end - 6);
            free(body);
            continue;
        }
        int k = batch_end();
        if (k > 0) {
            char *body = xstrndup(ibuf.p, (size_t)k);
            buf_consume(&ibuf, (size_t)k);
            handle_paste(body, (size_t)k);
            free(body);
            continue;
        }
        int n;
        eof_typed = 0;
        const char *line = el_gets(el, &n);
        if (eof_typed) {
            half_close();
            break;
        }
        if (line && n > 0 && line[n - 1] == '\n')
            on_line(line, (size_t)n - 1);
    }
}

/* ---- Ctrl-C, suspend, and the end ---- */

static void on_interrupt(void)
{
    buf_clear(&ibuf);
    lq_clear();
    if (closing)
        finish(EXIT_INTERRUPTED);
    if (ed_active) {
        ed_active = 0;
        buf_clear(&ed_tail);
        if (ed_mode == 'P' && pkind == 1) {
            el_run(KEY_NEWLINE, 1); /* leave the line on the screen */
            term_puts("KeyboardInterrupt\n");
            buf_clear(&stmt);
            blk_reset();
            ed_start('P');
            return;
        }
        /* a half-entered block, or input(): the server drops it and says
         * so on a line of its own */
        const LineInfoW *li = el_wline(el);
        el_cursor(el, (int)(li->lastchar - li->cursor));
        el_run(KEY_REFRESH, 1);
        line_open = 1;
        buf_clear(&tail);
        send_interrupt(&S->c);
        running = 1;
        return;
    }
    send_interrupt(&S->c);
}

static void on_suspend(void)
{
    struct termios cur;
    int have = tcgetattr(tty_in, &cur) == 0;
    if (bracketed_on)
        term_puts("\033[?2004l");
    if (tty_orig_ok)
        tcsetattr(tty_in, TCSADRAIN, &tty_orig);
    signal(SIGTSTP, SIG_DFL);
    raise(SIGTSTP);
    /* continued */
    catch_signal(SIGTSTP);
    if (have)
        tcsetattr(tty_in, TCSADRAIN, &cur);
    if (bracketed_on)
        term_puts("\033[?2004h");
    if (ed_active)
        el_set(el, EL_REFRESH);
}

static void on_server_closed(void)
{
    if (ed_active) {
        ed_hide();
        ed_active = 0;
    }
    if (tail.len)
        term_puts("\n");
    if (got_x && !S->c.broke[0])
        finish(x_code);
    if ((closing || running) && !S->c.broke[0])
        finish(0); /* end of input, or exit()/quit() ended the session */
    hist_save();
    die_closed(&S->c);
}

static int interactive(struct session *s)
{
    S = s;
    tty_in = 0;
    if (tcgetattr(tty_in, &tty_orig) == 0)
        tty_orig_ok = 1;
    const char *term = getenv("TERM");
    dumb = !term || !term[0] || !strcmp(term, "dumb");
    hist_setup();
    el = el_init("manhole-cli", stdin, stdout, stderr);
    if (!el)
        die(EXIT_CLOSED, "cannot start the line editor");
    el_set(el, EL_EDITOR, "emacs");
    el_set(el, EL_SIGNAL, 0);
    el_source(el, NULL); /* ~/.editrc, "manhole-cli:" lines */
    el_set(el, EL_PROMPT_ESC, prompt_fn, '\1');
    el_set(el, EL_HIST, history, hist);
    el_set(el, EL_GETCFN, getc_fn);
    /* the wide calls: the narrow EL_ADDFN copies the names and never frees them */
    el_wset(el, EL_ADDFN, L"mh-complete", L"complete from the live process", fn_complete);
    el_wset(el, EL_ADDFN, L"mh-eof", L"delete a character, or leave on an empty line", fn_eof);
    el_wset(el, EL_ADDFN, L"mh-redisplay", L"redraw the line", fn_redisplay);
    el_wset(el, EL_ADDFN, L"mh-refresh", L"refresh the line", fn_refresh);
    el_set(el, EL_BIND, "^I", "mh-complete", NULL);
    el_set(el, EL_BIND, "^D", "mh-eof", NULL);
    el_set(el, EL_BIND, KEY_REDISPLAY, "mh-redisplay", NULL);
    el_set(el, EL_BIND, KEY_REFRESH, "mh-refresh", NULL);
    el_set(el, EL_BIND, KEY_NEWLINE, "ed-newline", NULL);
    el_set(el, EL_BIND, "-a", KEY_REDISPLAY, "mh-redisplay", NULL);
    el_set(el, EL_BIND, "-a", KEY_REFRESH, "mh-refresh", NULL);
    el_set(el, EL_BIND, "-a", KEY_NEWLINE, "ed-newline", NULL);

    struct conn *c = &S->c;
    for (;;) {
        struct ev e;
        while (q_pop(c, &e)) {
            handle_event(&e);
            free(e.data);
        }
        if (c->eof && q_empty(c))
            on_server_closed();
        if (listing && ed_active)
            show_listing();
        if (ed_active && ibuf.len && !sig_int && !sig_term && !sig_tstp) {
            feed_editor();
            continue;
        }
        struct pollfd pf[3] = {
            {c->eof ? -1 : c->fd, (short)(POLLIN | (c->out.len ? POLLOUT : 0)), 0},
            {sig_pipe[0], POLLIN, 0},
            {ibuf.len < MAX_TTY_BUFFER ? tty_in : -1, POLLIN, 0}};
        int r = 0;
        if (!sig_int && !sig_term && !sig_tstp && !sig_winch)
            r = poll(pf, 3, -1);
        if (r < 0 && errno != EINTR)
            die(EXIT_CLOSED, "poll: %s", strerror(errno));
        if (r > 0 && pf[1].revents)
            drain_sig_pipe();
        if (sig_term)
            finish(128 + sig_term);
        if (sig_winch) {
            sig_winch = 0;
            el_resize(el);
            if (ed_active)
                el_run(KEY_REFRESH, 1);
        }
        if (sig_tstp) {
            sig_tstp = 0;
            on_suspend();
        }
        if (sig_int) {
            sig_int = 0;
            on_interrupt();
        }
        if (r <= 0)
            continue;
        if (pf[0].revents & POLLOUT)
            conn_flush(c);
        if (pf[0].revents & (POLLIN | POLLHUP | POLLERR))
            while (conn_read(c) && !c->eof && c->qbytes < (1u << 20)) {
            } /* what is there, up to 1 MiB: then it is shown */
        if (pf[2].revents & (POLLIN | POLLHUP | POLLERR)) {
            char tmp[4096];
            ssize_t k = read(tty_in, tmp, sizeof tmp);
            if (k > 0)
                buf_add(&ibuf, tmp, (size_t)k);
            else if (k == 0 || (errno != EINTR && errno != EAGAIN))
                finish(128 + SIGHUP); /* the terminal went away */
        }
    }
    return 0;
}

/* ---- main --------------------------------------------------------------- */

static void utf8_locale(void)
{
    setlocale(LC_CTYPE, "");
    const char *cs = nl_langinfo(CODESET);
    if (!cs || (strcmp(cs, "UTF-8") && strcmp(cs, "utf8"))) {
        if (!setlocale(LC_CTYPE, "C.UTF-8"))
            setlocale(LC_CTYPE, "en_US.UTF-8");
    }
}

int main(int argc, char **argv)
{
    enum { O_PATH = 256, O_SECRET, O_SECRET_PATH, O_LIST, O_TIMEOUT, O_NOHIST };
    static const struct option longopts[] = {
        {"command", required_argument, NULL, 'c'},
        {"path", required_argument, NULL, O_PATH},
        {"secret-file", required_argument, NULL, O_SECRET},
        {"secret-path", required_argument, NULL, O_SECRET_PATH},
        {"list", no_argument, NULL, O_LIST},
        {"timeout", required_argument, NULL, O_TIMEOUT},
        {"no-history", no_argument, NULL, O_NOHIST},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0}};
    int o;
    opterr = 0;
    while ((o = getopt_long(argc, argv, "+c:hV", longopts, NULL)) != -1) {
        switch (o) {
        case 'c': opt.command = optarg; break;
        case O_PATH: opt.path = optarg; break;
        case O_SECRET: opt.secret_file = optarg; break;
        case O_SECRET_PATH: opt.secret_path = optarg; break;
        case O_LIST: opt.list = 1; break;
        case O_NOHIST: opt.no_history = 1; break;
        case O_TIMEOUT: {
            char *end;
            errno = 0;
            opt.timeout = strtod(optarg, &end);
            if (errno || end == optarg || *end || !(opt.timeout > 0) || opt.timeout > 1e6) {
                fprintf(stderr, "manhole-cli: --timeout: not a positive number of seconds: %s\n",
                        optarg);
                usage_exit(EXIT_USAGE);
            }
            break;
        }
        case 'h': usage_exit(0); break;
        case 'V': printf("manhole-cli %s\n", MANHOLE_VERSION_STRING); return 0;
        default:
            if (optopt == 'c')
                fprintf(stderr, "manhole-cli: -c needs the code to run\n");
            else if (optopt)
                fprintf(stderr, "manhole-cli: unknown option -%c\n", optopt);
            else
                fprintf(stderr, "manhole-cli: unknown or incomplete option %s\n",
                        argv[optind - 1]);
            usage_exit(EXIT_USAGE);
        }
    }
    if (optind < argc)
        opt.target = argv[optind++];
    if (optind < argc) {
        fprintf(stderr, "manhole-cli: one target only (extra argument: %s)\n", argv[optind]);
        usage_exit(EXIT_USAGE);
    }
    utf8_locale();
    if (opt.secret_path) {
        if (opt.target || opt.command || opt.path || opt.list) {
            fprintf(stderr, "manhole-cli: --secret-path takes no target\n");
            usage_exit(EXIT_USAGE);
        }
        return print_secret_paths(opt.secret_path);
    }
    if (opt.list) {
        if (opt.target || opt.command || opt.path) {
            fprintf(stderr, "manhole-cli: --list takes no target\n");
            usage_exit(EXIT_USAGE);
        }
        setup_signals(0);
        return do_list();
    }
    if (!opt.target && !opt.path) {
        fprintf(stderr, "manhole-cli: no target: give a socket PATH, HOST:PORT or a PID\n");
        usage_exit(EXIT_USAGE);
    }
    int interactive_mode = !opt.command && isatty(0) && isatty(1);
    setup_signals(interactive_mode);

    /* Script mode reads the script before connecting: a slow producer
     * holds no session open. */
    struct buf script = {0};
    if (opt.command)
        check_script_size("<string>", strlen(opt.command));
    if (!interactive_mode && !opt.command) {
        char tmp[65536];
        for (;;) {
            ssize_t k = read(0, tmp, sizeof tmp);
            if (k > 0) {
                buf_add(&script, tmp, (size_t)k);
                check_script_size("<stdin>", script.len);
                continue;
            }
            if (k < 0 && errno == EINTR) {
                if (sig_int || sig_term)
                    exit(EXIT_INTERRUPTED);
                continue;
            }
            if (k < 0)
                die(EXIT_USAGE, "reading the script from standard input: %s", strerror(errno));
            break;
        }
    }

    struct session s;
    open_session(&s);
    if (interactive_mode)
        return interactive(&s);
    int rc = opt.command ? run_script(&s, "<string>", opt.command, strlen(opt.command), 1)
                         : run_script(&s, "<stdin>", buf_str(&script), script.len, 0);
    buf_free(&script);
    buf_free(&s.banner);
    conn_free(&s.c);
    return rc;
}
