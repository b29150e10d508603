/*
 * manhole.c - a Python REPL inside a running C program.
 *
 * What it is
 * ----------
 * The host opens a manhole and keeps calling it from its own event loop.
 * Clients connect to a UNIX socket (or loopback TCP, after sending a secret)
 * with manhole-cli, nc or socat and get the prompt of an embedded CPython,
 * with the same prompts, reprs, tracebacks and syntax errors as
 * `python3 -i`.
 *
 * Threads
 * -------
 * Three kinds of thread touch a manhole:
 *
 *  - The host thread: whoever calls manhole_poll()/manhole_process(). It
 *    does the socket I/O (accept, recv, send: all of it but the workers'
 *    one case below), frames input into lines and hands them over. In
 *    threaded mode it never takes the GIL, so a client burning CPU in
 *    Python cannot slow the host's loop down; it only takes mh->lock for
 *    short, bounded critical sections.
 *  - Worker threads (threaded mode): a small pool, shrunk when idle. There
 *    is no thread per client: a client's lines are a job in a FIFO; a
 *    worker takes the GIL, runs the client's next statement and appends
 *    the output to the client's output buffer. The pool starts one worker
 *    and grows (up to max_workers) only when the queue has made no
 *    progress for SPAWN_DELAY, i.e. the workers it has are blocked: more
 *    threads would only bounce the GIL. A worker whose statement waits on
 *    its client (for room in its output, or for a line of input) is
 *    parked: it does not count against max_workers while it waits (64
 *    parked at most), so a client that neither reads nor answers holds
 *    nobody else up; back from the wait, a worker over the pool's size
 *    ends with its job. Workers run below the host's CPU
 *    priority (worker_priority). A statement that outruns its timeout is
 *    abandoned: the worker stays stuck with it (and leaves the pool), the
 *    client moves on with another worker. In non-threaded mode the host
 *    thread itself plays the worker, inside manhole_poll().
 *    A worker whose job ends with the client's output still held back (see
 *    below), none of that client's bytes with the host, no other job
 *    queued and no other worker busy, sends the output itself, with
 *    neither the GIL nor the lock (direct_send(): one non-blocking send;
 *    what the socket does not take goes back to the host), and the host
 *    is not woken: a round trip pays one hand-off between threads, not
 *    two. Meanwhile it counts as idle: a line that arrives is its next
 *    job, taken without a wake-up (and no sign of a starved queue for the
 *    watchdog). If that client had the last few jobs too (a client alone
 *    in lock-step), the worker then spins for WARM_SPIN (25 us, one worker
 *    at most) before it sleeps: the client's next line is queued by then,
 *    and the host's wake-up of a sleeping worker is saved too. Under load
 *    (jobs queued, workers busy) the host sends, many clients per
 *    wake-up, and reads their next lines in batches, while the workers
 *    only run statements.
 *  - The watchdog (created with the first worker, or when a timeout is
 *    set): sleeps until the earliest statement deadline, writes the
 *    TimeoutError report for an expired statement, and interrupts it with
 *    PyThreadState_SetAsyncExc(KeyboardInterrupt). It is also how a client
 *    that hung up, or asked for an interrupt (telnet IP/BRK, or the
 *    extended channel), gets its statement interrupted; an interrupted
 *    statement that has not stopped after INTERRUPT_GRACE is abandoned like
 *    a timed-out one. Time a statement waits in input() does not count
 *    against its deadline, and it raises the client's interrupt itself. The
 *    watchdog takes the GIL only to deliver an interrupt, never while
 *    holding mh->lock. And it hands the host output that a worker has held
 *    back for OUTPUT_HOLD: while statements keep coming it looks every
 *    OUTPUT_HOLD (for HOLD_LINGER after the last), rather than be woken
 *    for each.
 *
 * Completion requests are a second queue (mh->cq) that any worker takes
 * before client jobs: a client's completion is answered while its own
 * statement runs on another worker. With every worker busy, up to two
 * more are started for completions only, so a completion never waits
 * behind statements. A completion has the statement timeout; its output
 * is dropped. A hello at a client with nothing queued or running is
 * answered by the host itself (the prompt it repeats is the one last
 * computed), so it needs no worker either.
 *
 * Signals: workers block every signal (the host's signals stay with the
 * host), but a statement runs with the host thread's mask, so processes
 * and threads it starts get a normal one. So does the user's code the
 * library runs around statements (a completion's __dir__ and properties,
 * sys.excepthook and the exception's str(), str() of sys.ps1/ps2 and of
 * sys.exit's argument): it also gets the statement timeout and Ctrl-C,
 * and outrunning the timeout abandons it as it does a statement. A fork() from a statement (or
 * from a thread one started) gives a child whose handlers are reset to the
 * defaults and which closes every manhole's sockets (a pthread_atfork
 * handler; the registry lists open manholes); when its statement returns
 * into the library it exits.
 *
 * Lock order: the GIL may be held when taking mh->lock, never the other
 * way round; nobody waits on a condition variable while holding the GIL.
 * Workers wake the host through one descriptor (an eventfd, or a pipe),
 * written only when the host is not already due to look. Output is not
 * announced as it is written: a worker holds it back until its job ends
 * (then sends it itself or wakes the host once), until it is about to
 * wait (for room, input, a host call), or for OUTPUT_HOLD (1 ms) at most,
 * which the watchdog enforces. So a short statement on a quiet manhole
 * wakes nobody, and streaming output costs about a wake-up per
 * millisecond (or per max_output bytes), not per print(). (What threads
 * a statement started write is announced at once.)
 *
 * Output
 * ------
 * sys.stdout, sys.stderr, sys.stdin, their sys.__stdout__ & co., and
 * sys.displayhook are replaced once per process by small C proxies that
 * look at thread-local pointers: on a thread that runs a manhole statement,
 * or one such a statement started (its function is wrapped when
 * _thread starts it), or a ThreadPoolExecutor task one submitted (its
 * function is wrapped by submit()), output goes to that client's buffer;
 * on any other thread (the host's own) it goes to the original stream.
 * So many clients
 * run at once and each sees exactly its own output, while the host's output
 * is never captured. On a manhole thread a proxy is a complete stream of
 * its client (buffer, iteration, readlines) and never reaches the
 * process's real one. The sys module gets a ModuleType subclass whose
 * stdout/stderr/stdin/displayhook properties make an assignment on a
 * manhole thread that session's own: the dict, which print() and the
 * interpreter read, keeps the proxies. Only sys has that class:
 * types.ModuleType stays the plain type, and calling type(sys), as
 * importlib does for every new module, makes a plain module. A client that stops reading makes
 * its own statement (or thread) wait once max_output bytes are pending;
 * nobody else notices. A client's bytes leave in order whoever sends
 * them: a worker sends only while the host has none of them, and while it
 * does (c->sending) the host neither sends on that socket nor closes it.
 *
 * Compiling
 * ---------
 * Input is compiled as code.InteractiveConsole compiles it, by codeop, with
 * one shortcut: for complete input codeop returns compile(source, filename,
 * "single", flags, True) with its own flags, so that one call is made from
 * C with the same flags (kept in step with the session's codeop compiler,
 * __future__ features included). Incomplete input and errors go through
 * codeop itself. The compiler is then the bulk of a statement's cost.
 *
 * Namespaces
 * ----------
 * A namespace is a dict subclass whose lookups first consult the table of
 * live bindings, so a name bound to a C variable reads its current value
 * everywhere: at top level, in functions, in comprehensions.
 *
 * Wire protocol
 * -------------
 * Plain UTF-8 text, no negotiation. The server sends the banner (if any)
 * and the prompt (sys.ps1, default ">>> "; sys.ps2, default "... " while a
 * block is open), then output and a new prompt per input line. Lines end in
 * LF, CRLF, or a lone CR. Telnet commands are parsed: IP and BRK interrupt,
 * the rest is dropped, a subnegotiation is bounded. A record of ours
 * (option 77) that is too long or broken is dropped whole, up to its
 * IAC SE, and said once; any other subnegotiation past its bound is a
 * bad line, dropped up to the next line end (it is more likely pasted
 * text than telnet: the server negotiates nothing). A line that is too
 * long, holds a NUL byte or is not UTF-8 is discarded with a one-line
 * "manhole: ..." message. When the client shuts down its sending side,
 * every line already sent is run, a block still open is closed as by an
 * empty line, the output is delivered and the server closes. A TCP client
 * must first show it knows the secret (unless tcp_insecure): by sending it
 * as its first line, or by the challenge-response of wire.h, in which the
 * server proves it knows the secret first and neither side sends it. Until
 * then it gets nothing, is kept for AUTH_TIMEOUT at most, may hold no
 * more than a secret's bytes, and takes one of AUTH_PENDING_MAX places of
 * its own rather than one of max_clients. One whose first bytes look like
 * HTTP is dropped before anything runs. The secret file is named after the
 * address the listener bound (wire.h), so hosts on one port number but
 * different addresses never touch each other's.
 *
 * A client that asks for it (telnet subnegotiation of the private option
 * 77, "hello") gets the extended channel: prompts, statement status and
 * input waits as records, completion, scripts, interrupts; output bytes
 * 0xFF are doubled. Records are framed where the output is produced
 * (workers append to the client's buffer), so the host only moves bytes.
 * No request is dropped unsaid: while a statement waits for input, a
 * hello is answered at once and a script waits its turn behind the
 * statement; a request the server does not know gets a "manhole: ..."
 * line. README, Protocol, is the specification.
 *
 * Sections: platform, utilities, data, sockets, poller, framing, output,
 * Python glue, workers and watchdog, the host side, public API.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first: it sets the feature-test macros */

#include "manhole.h"
#include "wire.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* ==================================================================== */
/* Platform                                                             */
/* ==================================================================== */

/* Linux fast paths. -DMANHOLE_PORTABLE turns all of them off so the
 * portable fallbacks are built and tested on Linux too. */
#if defined(__linux__)
#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#endif

#if defined(__linux__) && !defined(MANHOLE_PORTABLE)
#define MH_HAVE_EPOLL 1
#define MH_HAVE_EVENTFD 1
#define MH_HAVE_ACCEPT4 1
#define MH_HAVE_SO_PEERCRED 1
#include <sys/epoll.h>
#include <sys/eventfd.h>
#endif

#if defined(MSG_NOSIGNAL) && !defined(MANHOLE_PORTABLE)
#define MH_HAVE_MSG_NOSIGNAL 1 /* (glibc's MSG_NOSIGNAL is an enum: #if reads 0) */
#define MH_SEND_FLAGS MSG_NOSIGNAL
#else
#define MH_SEND_FLAGS 0
#endif

#if PY_VERSION_HEX < 0x03080000
#error "manhole needs Python 3.8 or newer"
#endif

/* ==================================================================== */
/* Utilities                                                            */
/* ==================================================================== */

#define MH_UNUSED(x) ((void)(x))
#define MH_MAYBE_UNUSED __attribute__((unused))
/* PyType_Slot wants a void *; ISO C only converts a function pointer
 * through an integer. */
#define MH_FN(f) ((void *)(uintptr_t)(f))
#define MH_MIN(a, b) ((a) < (b) ? (a) : (b))

static double now_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Condition variables wait on the monotonic clock where the platform
 * allows, so a step of the wall clock never delays a timeout. */
#if defined(_POSIX_CLOCK_SELECTION) && _POSIX_CLOCK_SELECTION >= 0 && !defined(__APPLE__)
#define MH_COND_CLOCK CLOCK_MONOTONIC
#else
#define MH_COND_CLOCK CLOCK_REALTIME
#endif

static void cond_init(pthread_cond_t *cv)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
#if defined(_POSIX_CLOCK_SELECTION) && _POSIX_CLOCK_SELECTION >= 0 && !defined(__APPLE__)
    pthread_condattr_setclock(&a, MH_COND_CLOCK);
#endif
    pthread_cond_init(cv, &a);
    pthread_condattr_destroy(&a);
}

/* An absolute time for pthread_cond_timedwait(), from_now seconds ahead. */
static struct timespec cond_deadline(double from_now)
{
    struct timespec ts;
    clock_gettime(MH_COND_CLOCK, &ts);
    if (from_now > 1e6)
        from_now = 1e6;
    if (from_now < 0)
        from_now = 0;
    long sec = (long)from_now;
    ts.tv_sec += sec;
    ts.tv_nsec += (long)((from_now - (double)sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

/* A growable byte buffer. `head` lets it double as a FIFO. */
typedef struct buf {
    char *p;
    size_t len, head, cap;
} buf;

static int buf_reserve(buf *b, size_t extra)
{
    if (b->head > 0 && b->head == b->len)
        b->head = b->len = 0;
    if (b->len + extra <= b->cap)
        return 0;
    if (b->head > 0) { /* compact before growing */
        memmove(b->p, b->p + b->head, b->len - b->head);
        b->len -= b->head;
        b->head = 0;
        if (b->len + extra <= b->cap)
            return 0;
    }
    size_t ncap = b->cap ? b->cap : 256;
    while (ncap < b->len + extra) {
        if (ncap > SIZE_MAX / 2)
            return -1;
        ncap *= 2;
    }
    char *np = realloc(b->p, ncap);
    if (!np)
        return -1;
    b->p = np;
    b->cap = ncap;
    return 0;
}

static int buf_add(buf *b, const void *data, size_t n)
{
    if (n == 0)
        return 0;
    if (buf_reserve(b, n) < 0)
        return -1;
    memcpy(b->p + b->len, data, n);
    b->len += n;
    return 0;
}

static size_t buf_used(const buf *b) { return b->len - b->head; }

static void buf_clear(buf *b) { b->len = b->head = 0; }

static void buf_free(buf *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* Drop a big allocation once a buffer is empty again, so idle clients
 * hold no memory worth speaking of. */
static void buf_shrink_if_empty(buf *b)
{
    if (buf_used(b) == 0 && b->cap > 16384)
        buf_free(b);
    else if (buf_used(b) == 0)
        b->len = b->head = 0;
}

static char *mh_strdup(const char *s)
{
    if (!s)
        return NULL;
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

/* Is p[0..n) valid UTF-8 as Python's strict decoder sees it (no
 * surrogates, no overlong forms, nothing above U+10FFFF)? On failure *bad
 * is the offset of the first bad byte. */
static int utf8_valid(const unsigned char *p, size_t n, size_t *bad)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = p[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t need;
        unsigned lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF)
            need = 1;
        else if (c >= 0xE0 && c <= 0xEF) {
            need = 2;
            if (c == 0xE0)
                lo = 0xA0;
            if (c == 0xED)
                hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            need = 3;
            if (c == 0xF0)
                lo = 0x90;
            if (c == 0xF4)
                hi = 0x8F;
        } else {
            *bad = i;
            return 0;
        }
        if (i + need >= n) { /* truncated sequence */
            *bad = i;
            return 0;
        }
        if (p[i + 1] < lo || p[i + 1] > hi) {
            *bad = i;
            return 0;
        }
        for (size_t k = 2; k <= need; k++) {
            if (p[i + k] < 0x80 || p[i + k] > 0xBF) {
                *bad = i;
                return 0;
            }
        }
        i += need + 1;
    }
    return 1;
}

/* The longest prefix of valid UTF-8 p[0..n) of at most max bytes that
 * ends on a character boundary. */
static size_t utf8_cut(const char *p, size_t n, size_t max)
{
    if (n <= max)
        return n;
    size_t k = max;
    while (k > 0 && ((unsigned char)p[k] & 0xC0) == 0x80)
        k--;
    return k;
}

/* p[0..n) without the incomplete character a truncation (snprintf's) may
 * have left at its end. */
static size_t utf8_complete(const char *p, size_t n)
{
    size_t k = n, cont = 0;
    while (k > 0 && cont < 3 && ((unsigned char)p[k - 1] & 0xC0) == 0x80) {
        k--;
        cont++;
    }
    if (k == 0)
        return n;
    unsigned char lead = (unsigned char)p[k - 1];
    size_t need = lead >= 0xF0 ? 3 : lead >= 0xE0 ? 2 : lead >= 0xC0 ? 1 : 0;
    return cont < need ? k - 1 : n;
}

/* ==================================================================== */
/* Data                                                                 */
/* ==================================================================== */

typedef struct client client;
typedef struct worker worker;
typedef struct hostcall hostcall;

enum { T_UNIX = 1, T_TCP = 2 };

/* Records in a client's input queue: [kind][u32 length][bytes]. HELLO
 * turns on the extended channel; SCRIPT is "filename\nsource" to run as
 * `python -c` would. ERROR is a bad line (said; the block being entered
 * is dropped); NOTE is something the client sent that was not a line and
 * is not acted upon (said; the block stays). */
enum { REC_LINE = 1, REC_ERROR = 2, REC_EOF = 3, REC_HELLO = 4, REC_SCRIPT = 5,
       REC_NOTE = 6 };

/* Telnet bytes, and the private subnegotiation option of the extended
 * channel (README, Protocol). */
enum {
    TN_SE = 240, TN_BRK = 243, TN_IP = 244, TN_SB = 250, TN_WILL = 251, TN_DO = 253,
    TN_IAC = 255, TN_OPT_TM = 6, TN_OPT_MANHOLE = 77
};
#define SB_MAX_OTHER 512 /* bytes of a subnegotiation we do not speak */
#define INTERRUPT_GRACE 1.0 /* seconds an interrupted statement has to stop
                               before it is abandoned like a timed-out one */

/* A TCP client before it is authenticated (README, Security): it has
 * AUTH_TIMEOUT seconds to send the secret line or finish the challenge-
 * response (wire.h), and is closed then; at most AUTH_PENDING_MAX such
 * connections are kept (one more is refused at once), and they do not
 * count against max_clients until they are in. Before that the library
 * keeps at most a secret line's (MH_SECRET_MAX) or an authentication
 * record's (AUTH_SB_MAX) bytes of them: one more is a refusal. */
#define AUTH_TIMEOUT 5.0
#define AUTH_PENDING_MAX 16
#define AUTH_SB_MAX (2 + MH_PROOF_HEX)
enum { AUTH_NONE = 0, AUTH_LINE = 1, AUTH_PROOF = 2 };

/* Tags for poller registrations that are not clients. */
#define TAG_LISTEN_UNIX ((void *)1)
#define TAG_LISTEN_TCP ((void *)2)
#define TAG_WAKE ((void *)3)

/* Poller event bits (our own, mapped to epoll/poll bits). */
enum { EV_IN = 1, EV_OUT = 2, EV_HUP = 4, EV_ERR = 8 };

struct client {
    manhole *mh;
    unsigned id;
    int fd;                 /* -1 once closed */
    int transport;
    char peer[80];          /* for log lines */
    client *next, *prev;    /* host's list of connected clients */

    /* Host thread only. */
    buf line;               /* the line being assembled */
    buf tx;                 /* output being sent (swapped with out) */
    unsigned ev;            /* interest registered with the poller */
    unsigned char discard;  /* dropping the rest of an over-long line */
    unsigned char after_cr; /* swallow an LF/NUL right after a CR */
    unsigned char iac;      /* telnet command parser state */
    unsigned char sb_opt;   /* option of the subnegotiation being read */
    unsigned char iac_cmd;  /* the telnet command being read */
    unsigned char act_intr; /* found by the framer: interrupt (2: after lines) */
    unsigned char act_tm;   /* ... telnet asked for a timing mark */
    unsigned char act_hello;/* ... hello, before any line of this read */
    buf act_comp;           /* ... completion requests: [u32 len][request] */
    unsigned char got_line; /* first line seen (HTTP check) */
    unsigned char http_done;/* TCP: its first bytes are no HTTP request */
    unsigned char head_len;
    char head[24];          /* TCP: the first bytes, until decided */
    unsigned char auth;     /* TCP: AUTH_LINE or AUTH_PROOF until the
                               client has shown it knows the secret */
    unsigned char pending;  /* counted in npending, not nclients (not
                               authenticated yet) */
    unsigned char auth_reply_len; /* the challenge's answer, to be sent */
    double auth_deadline;   /* closed then if still not authenticated */
    char auth_expect[MH_PROOF_HEX + 1]; /* the CPROOF it must send */
    char auth_reply[16 + MH_NONCE_HEX + MH_PROOF_HEX]; /* IAC SB 77 A 1 ... */
    buf sb;                 /* subnegotiation payload being read */
    unsigned char rd_eof;   /* the client shut down its sending side */
    unsigned char rd_paused;/* input queue full: not reading */
    double last_active;

    /* Under mh->lock. */
    buf inq;                /* framed input records */
    buf out;                /* output produced, not yet taken by host */
    int refs;
    client *jnext;          /* job queue */
    client *dnext;          /* dirty list (host has something to do) */
    client *gnext;          /* closed this turn, host reference pending */
    unsigned char dirty, busy, dead, eof_done, exiting;
    unsigned char ext;      /* extended channel on (hello seen) */
    unsigned char intr_pending; /* interrupt for the next statement, or
                               for the prompt if none starts */
    unsigned char out_nl;   /* output so far ends a line (or a prompt) */
    unsigned char out_tail_e; /* out ends with an E record (it may grow) */
    unsigned char leaving;  /* exit()/quit(): close, report nothing */
    unsigned char has_session;
    unsigned char in_paused;/* input queue over max_input */
    unsigned char out_blocked; /* output over max_output: no more input
                               taken until the client reads */
    int out_waiters, in_waiters;
    int ncomp;              /* completion requests queued or running */
    size_t tx_backlog;      /* size of tx when the host last took output */
    int exit_status;        /* sys.exit() status */
    pthread_cond_t cv;      /* output space */
    worker *runner;         /* worker running this client's statement */
    unsigned char sending;  /* a worker is sending output itself (direct_send) */
    unsigned char recheck;  /* ... and the host wants to look once it is done */
    unsigned char close_after; /* ... and must close fd, the host closed c */

    /* Python session: touched only with the GIL, by the one worker that
     * has the client busy (or by teardown). */
    PyObject *ns;
    PyObject *compiler;     /* codeop.CommandCompiler */
    int cc_flags;           /* its compile flags (codeop's + __future__) */
    buf src;                /* lines of the block being entered */
    double src_compile;     /* seconds spent compiling it while incomplete */
    int raised;             /* the last statement raised (S record) */
    PyObject *over[4];      /* the session's own sys.stdout, sys.stderr,
                               sys.stdin, sys.displayhook (SYS_*), if it
                               assigned them */
    PyObject *last_exc[3];  /* its sys.last_type/value/traceback */
};

/* A completion request, answered by any worker (README, Protocol). */
typedef struct cjob {
    struct cjob *next;
    client *c;              /* holds a reference */
    unsigned long id;
    char *text;             /* UTF-8, the line before the cursor */
} cjob;

struct worker {
    manhole *mh;
    worker *next;
    pthread_t thread;
    unsigned long py_tid;   /* Python's id for the thread */
    int index;
    int is_host;            /* the host thread, in non-threaded mode */
    /* Under mh->lock. */
    client *c;              /* client whose statement is running */
    double deadline;        /* 0: none */
    unsigned char running;  /* inside PyEval_EvalCode */
    unsigned char timed_out;/* abandoned at the deadline */
    unsigned char want_int; /* interrupt requested (client gone, close) */
    unsigned char int_sent; /* KeyboardInterrupt was injected */
    unsigned char user_int; /* ... asked for by the client */
    unsigned char waiting;  /* blocked reading the client's input */
    unsigned char completing; /* running a completion, not a statement */
    unsigned char parked;   /* waiting on its client, not counted in nworkers */
    unsigned char exited;
    double int_deadline;    /* a user interrupt not obeyed by then:
                               abandon the statement (0: none) */
    cjob *job;              /* the completion being run */
    buf rec;                /* the record being processed */
    double hold_until;      /* output held back from the host until then (0: none) */
    unsigned char woke_host;/* the host was asked to send during this job */
    unsigned char alone;    /* this job's client had the ones before it too */
    buf dout;               /* output being sent by direct_send() */
};

/* A C function call or binding write that must run on the host thread. */
struct hostcall {
    hostcall *next;
    int kind;               /* HC_CALL or HC_STORE */
    manhole_fn *fn;
    void *ud;
    int argc;
    const manhole_value *argv;
    manhole_value ret;
    char *ret_copy;         /* STRING/BYTES result, copied by the host */
    int rc;
    char err[256];
    int type;               /* HC_STORE: binding type */
    void *addr;             /* HC_STORE: variable */
    union {
        long long i;
        unsigned long long u;
        double d;
    } val;
    int started, done;
};
enum { HC_CALL = 1, HC_STORE = 2 };

#define LOGQ_MAX 256
#define LOG_REPEAT_WINDOW 2.0 /* seconds */

struct manhole {
    manhole_config cfg;     /* strings below are our own copies */
    int nbound;             /* threads bound to a client (TargetObject) */
    char *unix_path;
    char *tcp_host;
    char *banner;
    size_t banner_len;
    int lfd_unix, lfd_tcp;
    int tcp_port;
    int wake_r, wake_w;     /* the same descriptor with eventfd */
    unsigned fork_gen;
    manhole *reg_next;      /* all open manholes (closed in a fork child) */

    /* TCP authentication. */
    char endpoint[64];      /* the TCP listener's address ("127.0.0.1:7000") */
    char secret[MH_SECRET_MAX + 1]; /* "" with tcp_insecure */
    size_t secret_len;
    char *secret_path;      /* the file we wrote, removed at close */
    dev_t secret_dev;       /* ... which is this one: never remove */
    ino_t secret_ino;       /*     another's file of the same name */
    int npending;           /* TCP clients not authenticated yet */

    /* Running out of descriptors: a spare one to accept-and-refuse with,
     * and a pause of the listeners. */
    int reserve_fd;
    int listen_paused;
    double listen_resume_at;
    sigset_t host_sigmask;  /* the host thread's signal mask at open:
                               statements run with it */

    /* Poller. */
#ifdef MH_HAVE_EPOLL
    int epfd;
#endif
    struct pollfd *pfds;    /* poll() fallback, and manhole_pollfds() */
    void **ptags;
    int npfds, cappfds, pfds_dirty;

    /* Clients, host side. */
    client *clients;
    int nclients;
    unsigned next_id;
    int fdset_mode;         /* the host uses manhole_fdset() */
    int in_callback;
    int close_deferred;
    int exit_q[16];         /* statuses of MANHOLE_EXITs not yet returned */
    int exits_ready;
    int exit_status;        /* of the last MANHOLE_EXIT returned */

    /* Shared, under lock. */
    pthread_mutex_t lock;
    pthread_cond_t work_cv; /* workers: a job is queued */
    pthread_cond_t wd_cv;   /* watchdog: deadlines changed */
    pthread_cond_t gone_cv; /* close: a worker exited */
    pthread_cond_t hc_cv;   /* hostcall done */
    client *jq_head, *jq_tail;
    cjob *cq_head, *cq_tail; /* completion requests */
    client *dirty;
    client *graveyard;      /* closed clients, released at the turn's end */
    hostcall *hc_head, *hc_tail;
    int wake_pending;       /* the host should look at the dirty list */
    int wake_fd_set;        /* ... and the wake-up descriptor was written */
    int stopping;
    worker *workers;
    int nworkers;           /* not abandoned, not parked, not exited */
    int nparked;            /* waiting on their clients (park_locked) */
    int nidle;              /* workers waiting for a job (nsoon included) */
    int nspin;              /* workers spinning for one (WARM_SPIN) */
    int nsoon;              /* workers that look at the queue again without
                               a signal: spinning, or sending an answer */
    unsigned last_job_id;   /* the client whose job a worker took last */
    int same_run;           /* ... and how many jobs before that were its */
    unsigned jobs_seq;      /* bumped per job queued while one spins (atomic) */
    int njobs;              /* jobs queued */
    double last_pickup;     /* when a worker last took a job */
    double starve_since;    /* jobs waiting with no idle worker (0: no) */
    int nthreads;           /* all worker threads alive */
    int worker_seq;
    int wd_started, wd_exited, wd_stop;
    double wd_wake_at;      /* when the watchdog will look next (0: never) */
    double hold_last;       /* when a worker last began to hold output */
    int nreap;              /* exited workers to join */
    pthread_t wd_thread;
    worker hostw;           /* non-threaded mode */
    char *prompt[2];        /* sys.ps1, sys.ps2 as last computed, for the host
                               and the watchdog (NULL: the defaults) */
    size_t prompt_len[2];
    char *logq[LOGQ_MAX];
    int logq_head, logq_len, logq_dropped;
    char log_last[160];     /* the last line queued, and how often it came */
    int log_repeats;        /* again since (suppressed) */
    double log_last_at;
    int exits_pending;      /* clients that called sys.exit, not closed */

    /* Python. */
    int owns_python;
    PyThreadState *main_ts;
    PyObject *core;         /* Core object: bindings table, back pointer */
    PyObject *ns;           /* the manhole's namespace */
    PyObject *ns_type;
    PyObject *compiler_cls; /* codeop.CommandCompiler */
    PyObject *filename;     /* "<stdin>" */
    PyObject *single;       /* "single" */
    PyObject *glue;         /* the support module's glue (make_glue) */
    PyObject *complete_fn;  /* (namespace, text) -> (n, candidates) */
    PyObject *noop;         /* lambda: None */
    PyObject *pool_mod;     /* concurrent.futures.thread, once patched */
    unsigned long host_py_tid; /* Python's id for the thread that opened */

    char errmsg[512];
};

static _Thread_local worker *tl_worker;
/* On a thread started by a client's statement: that client (with a
 * reference), so the thread's output reaches it while it is connected. */
static _Thread_local client *tl_bound;
/* The manhole this thread drives as its host thread (set on every entry to
 * manhole_open/poll/process), so host-only work can tell where it is. */
static _Thread_local manhole *tl_host;

/* Every open manhole, so that a child after fork() can let go of their
 * descriptors. */
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static manhole *registry;

static void registry_add(manhole *mh)
{
    pthread_mutex_lock(&registry_lock);
    mh->reg_next = registry;
    registry = mh;
    pthread_mutex_unlock(&registry_lock);
}

static void registry_remove(manhole *mh)
{
    pthread_mutex_lock(&registry_lock);
    for (manhole **pp = &registry; *pp; pp = &(*pp)->reg_next)
        if (*pp == mh) {
            *pp = mh->reg_next;
            break;
        }
    pthread_mutex_unlock(&registry_lock);
}

/* Fork detection: a generation counter bumped in the child. Around a
 * fork every manhole's lock is held, so the child gets consistent
 * copies (and unlocked locks). */
static unsigned fork_generation;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static _Thread_local sigset_t fork_saved_mask;

static int fork_from_statement(void)
{
    return (tl_worker && !tl_worker->is_host) || tl_bound;
}

static void on_fork_prepare(void)
{
    if (fork_from_statement()) {
        /* No signal may reach the child before its handlers are reset
         * (on_fork_child): it would run the host's. */
        sigset_t all;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &fork_saved_mask);
    }
    pthread_mutex_lock(&registry_lock);
    for (manhole *mh = registry; mh; mh = mh->reg_next)
        pthread_mutex_lock(&mh->lock);
}

static void on_fork_parent(void)
{
    for (manhole *mh = registry; mh; mh = mh->reg_next)
        pthread_mutex_unlock(&mh->lock);
    pthread_mutex_unlock(&registry_lock);
    if (fork_from_statement())
        pthread_sigmask(SIG_SETMASK, &fork_saved_mask, NULL);
}

static void close_set(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

/* In the child: the manholes are the parent's. Their listening and
 * client sockets are closed here (the parent's socket must not stay
 * "live" in a child, nor a client miss its end of file), and the handles
 * go inert (MANHOLE_EFORKED). A child forked from a statement (or from a
 * thread one started) is a program of the client's: it gets the signal
 * mask a program would have, and the host's signal handlers (which would
 * act on the parent's behalf: write its pipes, stop its loop) are reset
 * to the defaults, as exec would; ignored signals stay ignored. */
static void on_fork_child(void)
{
    fork_generation++;
    if (fork_from_statement()) {
        for (int sig = 1; sig < NSIG; sig++) {
            struct sigaction sa;
            if (sig == SIGKILL || sig == SIGSTOP || sigaction(sig, NULL, &sa) < 0)
                continue;
            if (!(sa.sa_flags & SA_SIGINFO) &&
                (sa.sa_handler == SIG_DFL || sa.sa_handler == SIG_IGN))
                continue;
            sa.sa_handler = SIG_DFL;
            sa.sa_flags = 0;
            sigemptyset(&sa.sa_mask);
            sigaction(sig, &sa, NULL);
        }
        manhole *own = tl_worker ? tl_worker->mh : tl_bound->mh;
        pthread_sigmask(SIG_SETMASK, &own->host_sigmask, NULL);
    }
    for (manhole *mh = registry; mh; mh = mh->reg_next) {
        close_set(&mh->lfd_unix);
        close_set(&mh->lfd_tcp);
        close_set(&mh->reserve_fd);
        if (mh->wake_w != mh->wake_r)
            close_set(&mh->wake_w);
        close_set(&mh->wake_r);
        mh->wake_w = -1;
#ifdef MH_HAVE_EPOLL
        close_set(&mh->epfd);
#endif
        for (client *c = mh->clients; c; c = c->next)
            close_set(&c->fd);
        pthread_mutex_unlock(&mh->lock);
    }
    pthread_mutex_unlock(&registry_lock);
}

static void fork_init(void)
{
    pthread_atfork(on_fork_prepare, on_fork_parent, on_fork_child);
}

static int mh_forked(const manhole *mh)
{
    return mh->fork_gen != fork_generation;
}

/* ---- Error messages and the log ------------------------------------- */

static int set_err(manhole *mh, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int set_err(manhole *mh, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(mh->errmsg, sizeof mh->errmsg, fmt, ap);
    mh->errmsg[utf8_complete(mh->errmsg, strlen(mh->errmsg))] = 0; /* cut whole */
    va_end(ap);
    return code;
}

static void wake_host_locked(manhole *mh);

/* Queue a log line; it is delivered on the host thread by log_flush().
 * Callable from any thread, with or without mh->lock (locked says
 * which). */
static void logq_push(manhole *mh, int locked, int level, const char *fmt,
                      ...) __attribute__((format(printf, 4, 5)));
static void logq_push(manhole *mh, int locked, int level, const char *fmt, ...)
{
    if (!mh->cfg.log || level > mh->cfg.log_level)
        return;
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    tmp[utf8_complete(tmp, strlen(tmp))] = 0; /* a cut line ends on a character */
    if (!locked)
        pthread_mutex_lock(&mh->lock);
    /* The same line again within LOG_REPEAT_WINDOW is counted, not
     * queued: a storm (a descriptor limit hit on every accept, ...) gives
     * one line and a count, not millions. */
    double now = now_mono();
    if (strncmp(tmp, mh->log_last, sizeof mh->log_last - 1) == 0 &&
        now - mh->log_last_at < LOG_REPEAT_WINDOW) {
        mh->log_repeats++;
        if (!locked)
            pthread_mutex_unlock(&mh->lock);
        return;
    }
    if (mh->log_repeats > 0 && mh->logq_len < LOGQ_MAX) {
        char note[64];
        snprintf(note, sizeof note, "%clast message repeated %d more times",
                 '0' + MANHOLE_LOG_WARNING, mh->log_repeats);
        char *r = mh_strdup(note);
        if (r)
            mh->logq[(mh->logq_head + mh->logq_len++) % LOGQ_MAX] = r;
    }
    mh->log_repeats = 0;
    mh->log_last_at = now;
    size_t ll = MH_MIN(strlen(tmp), sizeof mh->log_last - 1);
    memcpy(mh->log_last, tmp, ll);
    mh->log_last[ll] = 0;
    char *s = malloc(strlen(tmp) + 2);
    if (s) {
        s[0] = (char)('0' + level);
        strcpy(s + 1, tmp);
    }
    if (!s || mh->logq_len == LOGQ_MAX) {
        mh->logq_dropped++;
        free(s);
    } else {
        mh->logq[(mh->logq_head + mh->logq_len) % LOGQ_MAX] = s;
        mh->logq_len++;
    }
    if (tl_host != mh) /* a worker's news: the host delivers it on its next turn */
        wake_host_locked(mh);
    if (!locked)
        pthread_mutex_unlock(&mh->lock);
}

#define LOG(mh, level, ...) logq_push((mh), 0, (level), __VA_ARGS__)
#define LOG_LOCKED(mh, level, ...) logq_push((mh), 1, (level), __VA_ARGS__)

/* Deliver queued log lines. Host thread, lock not held. */
static void log_flush(manhole *mh)
{
    if (!mh->cfg.log)
        return;
    for (;;) {
        char *s = NULL;
        int dropped = 0;
        pthread_mutex_lock(&mh->lock);
        if (mh->logq_len) {
            s = mh->logq[mh->logq_head];
            mh->logq_head = (mh->logq_head + 1) % LOGQ_MAX;
            mh->logq_len--;
        } else if (mh->logq_dropped) {
            dropped = mh->logq_dropped;
            mh->logq_dropped = 0;
        }
        pthread_mutex_unlock(&mh->lock);
        if (!s && !dropped)
            return;
        mh->in_callback++;
        if (s) {
            mh->cfg.log(mh->cfg.log_ud, s[0] - '0', s + 1);
            free(s);
        } else {
            char tmp[64];
            snprintf(tmp, sizeof tmp, "%d log messages dropped", dropped);
            mh->cfg.log(mh->cfg.log_ud, MANHOLE_LOG_WARNING, tmp);
        }
        mh->in_callback--;
    }
}

/* Wake the host: the host loop will look at the dirty list, the log and
 * the host calls. The descriptor is written at most once until the host
 * drains it, and not at all when the host thread itself has the news (it
 * looks before it sleeps), unless `force` (manhole_wakeup). Lock held. */
static void wake_host_force_locked(manhole *mh, int force)
{
    mh->wake_pending = 1;
    if (mh->wake_fd_set || mh->wake_w < 0 || (!force && tl_worker == &mh->hostw))
        return;
    mh->wake_fd_set = 1;
#ifdef MH_HAVE_EVENTFD
    uint64_t one = 1;
    ssize_t r;
    do
        r = write(mh->wake_w, &one, sizeof one);
    while (r < 0 && errno == EINTR);
#else
    char one = 1;
    ssize_t r;
    do
        r = write(mh->wake_w, &one, 1);
    while (r < 0 && errno == EINTR);
#endif
    MH_UNUSED(r);
}

static void wake_host_locked(manhole *mh) { wake_host_force_locked(mh, 0); }

static void drain_wake(manhole *mh)
{
    char tmp[64];
    ssize_t r;
#ifdef MH_HAVE_EVENTFD
    do /* one read resets an eventfd */
        r = read(mh->wake_r, tmp, sizeof tmp);
    while (r < 0 && errno == EINTR);
#else
    do
        r = read(mh->wake_r, tmp, sizeof tmp);
    while (r > 0 || (r < 0 && errno == EINTR));
#endif
}

static void mark_dirty_locked(client *c);

/* A worker took input: if the host stopped reading because the queue was
 * full and it is now half empty, let the host read again. Lock held. */
static void input_drained_locked(client *c)
{
    if (c->in_paused && buf_used(&c->inq) <= c->mh->cfg.max_input / 2) {
        c->in_paused = 0;
        mark_dirty_locked(c);
    }
}

/* Put c on the dirty list so the host looks at it. Lock held. */
static void mark_dirty_locked(client *c)
{
    manhole *mh = c->mh;
    if (!c->dirty) {
        c->dirty = 1;
        c->refs++;
        c->dnext = mh->dirty;
        mh->dirty = c;
    }
    wake_host_locked(mh);
}

/* ==================================================================== */
/* Sockets                                                              */
/* ==================================================================== */

MH_MAYBE_UNUSED static int fd_setup(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -1;
    int fdfl = fcntl(fd, F_GETFD);
    if (fdfl < 0 || fcntl(fd, F_SETFD, fdfl | FD_CLOEXEC) < 0)
        return -1;
#ifdef SO_NOSIGPIPE
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof one);
#endif
    return 0;
}

static int new_socket(int domain)
{
    int fd;
#if defined(SOCK_CLOEXEC) && defined(SOCK_NONBLOCK) && !defined(MANHOLE_PORTABLE)
    fd = socket(domain, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
#else
    fd = socket(domain, SOCK_STREAM, 0);
    if (fd >= 0 && fd_setup(fd) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
#endif
    return fd;
}

MH_MAYBE_UNUSED static void close_keep_errno(int fd)
{
    int e = errno;
    close(fd);
    errno = e;
}

static const char *file_kind(mode_t m)
{
    if (S_ISREG(m))
        return "a regular file";
    if (S_ISDIR(m))
        return "a directory";
    if (S_ISLNK(m))
        return "a symbolic link";
    if (S_ISFIFO(m))
        return "a FIFO";
    if (S_ISCHR(m) || S_ISBLK(m))
        return "a device";
    return "not a socket";
}

/* Is there a live listener at this UNIX socket path? 1 yes, 0 no (stale,
 * ECONNREFUSED), -1 cannot tell (errno). A non-blocking connect never waits
 * for a full backlog. */
static int unix_live(const struct sockaddr_un *sa)
{
    int fd = new_socket(AF_UNIX);
    if (fd < 0)
        return -1;
    int r;
    do
        r = connect(fd, (const struct sockaddr *)sa, sizeof *sa);
    while (r < 0 && errno == EINTR);
    int e = errno;
    close(fd);
    if (r == 0 || e == EAGAIN || e == EINPROGRESS)
        return 1;
    if (e == ECONNREFUSED)
        return 0;
    errno = e;
    return -1;
}

static int unix_listen(manhole *mh)
{
    const char *path = mh->unix_path;
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    size_t n = strlen(path);
    if (n == 0)
        return set_err(mh, MANHOLE_EINVAL, "unix socket path is empty");
    if (n >= sizeof sa.sun_path)
        return set_err(mh, MANHOLE_EINVAL,
                       "%s: path too long for a UNIX socket (%zu bytes, the "
                       "limit is %zu)",
                       path, n, sizeof sa.sun_path - 1);
    memcpy(sa.sun_path, path, n + 1);

    struct stat st;
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode))
            return set_err(mh, MANHOLE_EEXIST,
                           "%s: exists and is %s; refusing to replace it",
                           path, file_kind(st.st_mode));
        int live = unix_live(&sa);
        if (live == 1)
            return set_err(mh, MANHOLE_EBUSY,
                           "%s: address in use: a live server is already listening there",
                           path);
        if (live < 0)
            return set_err(mh, MANHOLE_ESYS, "%s: cannot probe socket: %s",
                           path, strerror(errno));
        if (st.st_uid != geteuid() && geteuid() != 0)
            return set_err(mh, MANHOLE_EEXIST,
                           "%s: stale socket owned by uid %ld; refusing to "
                           "remove it",
                           path, (long)st.st_uid);
        if (unlink(path) < 0 && errno != ENOENT)
            return set_err(mh, MANHOLE_ESYS,
                           "%s: cannot remove stale socket: %s", path,
                           strerror(errno));
        LOG(mh, MANHOLE_LOG_INFO, "replaced stale socket %s", path);
    } else if (errno != ENOENT) {
        return set_err(mh, MANHOLE_ESYS, "%s: %s", path, strerror(errno));
    }

    /* The directory: others who may write there could swap names in
     * it (README, Security). */
    char dir[sizeof sa.sun_path];
    const char *slash = strrchr(path, '/');
    if (!slash)
        snprintf(dir, sizeof dir, ".");
    else if (slash == path)
        snprintf(dir, sizeof dir, "/");
    else
        snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
    struct stat dst;
    if (stat(dir, &dst) == 0 && (dst.st_mode & (S_IWGRP | S_IWOTH)) &&
        !(dst.st_mode & S_ISVTX))
        LOG(mh, MANHOLE_LOG_WARNING,
            "%s: the directory %s is writable by others and not sticky: another "
            "user can replace the socket; use a private directory",
            path, dir);

    int fd = new_socket(AF_UNIX);
    if (fd < 0)
        return set_err(mh, MANHOLE_ESYS, "%s: socket: %s", path,
                       strerror(errno));
    mode_t want = mh->cfg.unix_mode & 0777;
#ifdef __linux__
    /* Linux creates the file with the socket inode's mode (less the
     * umask): a mode up to 0600 needs nothing more. */
    (void)fchmod(fd, want);
    int wider = (want & ~(mode_t)0600) != 0;
#else
    int wider = want != 0600;
#endif
    /* A wider mode is never set on the final path (a name another user
     * could have swapped for a link by then): the socket is bound in a
     * private directory beside it, given its mode there, and renamed into
     * place, which replaces a name and follows no link. */
    struct sockaddr_un tsa = sa;
    char tdir[PATH_MAX] = "", tsock[PATH_MAX + 4] = "";
    int near = 0; /* bind at the path itself, set the mode without links */
    if (wider) {
        int k = snprintf(tdir, sizeof tdir, "%s/.manhole-XXXXXX", dir);
        if (k < 0 || (size_t)k + 3 > sizeof tdir || !mkdtemp(tdir)) {
            int e = k < 0 || (size_t)k + 3 > sizeof tdir ? ENAMETOOLONG : errno;
            close(fd);
            return set_err(mh, MANHOLE_ESYS,
                           "%s: cannot make a private directory beside it to set "
                           "mode %03o safely: %s",
                           path, (unsigned)want, strerror(e));
        }
        snprintf(tsock, sizeof tsock, "%s/s", tdir);
        if (strlen(tsock) < sizeof tsa.sun_path) {
            memcpy(tsa.sun_path, tsock, strlen(tsock) + 1);
        } else {
#ifdef __linux__
            /* Too long for sun_path: reach the directory through its
             * descriptor instead. */
            int dfd = open(tdir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (dfd >= 0)
                snprintf(tsa.sun_path, sizeof tsa.sun_path, "/proc/self/fd/%d/s", dfd);
            mode_t o = umask(0177);
            int br = dfd >= 0 ? bind(fd, (struct sockaddr *)&tsa, sizeof tsa) : -1;
            int be = errno;
            umask(o);
            if (dfd >= 0)
                close(dfd);
            if (br < 0) {
                rmdir(tdir);
                close(fd);
                return set_err(mh, MANHOLE_ESYS, "%s: cannot bind: %s", path, strerror(be));
            }
            tsa.sun_path[0] = 0; /* bound already */
#else
            rmdir(tdir);
            tdir[0] = 0;
            near = 1;
#endif
        }
    }
    int r = 0, e = 0;
    if (!wider || near || tsa.sun_path[0]) {
        mode_t old = umask(0177);
        r = bind(fd, (struct sockaddr *)(wider && !near ? &tsa : &sa), sizeof sa);
        e = errno;
        umask(old);
    }
    if (r == 0 && near) {
        /* (elsewhere, a path too long for a private directory beside it:
         * a mode change that refuses to follow a link) */
        if (fchmodat(AT_FDCWD, path, want, AT_SYMLINK_NOFOLLOW) < 0) {
            r = -1;
            e = errno;
            unlink(path);
        }
    } else if (r == 0 && wider) {
        if (chmod(tsock, want) < 0 || rename(tsock, path) < 0) {
            r = -1;
            e = errno;
            unlink(tsock);
        }
    }
    if (tdir[0])
        rmdir(tdir);
    if (r < 0) {
        close(fd);
        if (e == EADDRINUSE)
            return set_err(mh, MANHOLE_EBUSY,
                           "%s: address already in use", path);
        return set_err(mh, MANHOLE_ESYS, "%s: cannot bind: %s", path,
                       strerror(e));
    }
    if (listen(fd, 128) < 0) {
        e = errno;
        close(fd);
        unlink(path);
        return set_err(mh, MANHOLE_ESYS, "%s: %s", path, strerror(e));
    }
    mh->lfd_unix = fd;
    return MANHOLE_OK;
}

static int is_loopback(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        return (ntohl(in->sin_addr.s_addr) >> 24) == 127;
    }
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        if (IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr))
            return 1;
        if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr))
            return in6->sin6_addr.s6_addr[12] == 127;
    }
    return 0;
}

static void format_addr(const struct sockaddr *sa, char *out, size_t n)
{
    char host[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
        port = ntohs(in->sin_port);
        snprintf(out, n, "%s:%d", host, port);
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        port = ntohs(in6->sin6_port);
        snprintf(out, n, "[%s]:%d", host, port);
    } else {
        snprintf(out, n, "?");
    }
}

static int tcp_listen(manhole *mh)
{
    const char *host = mh->tcp_host;
    char port[16];
    snprintf(port, sizeof port, "%d", mh->cfg.tcp_port);
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int g = getaddrinfo(host, port, &hints, &res);
    if (g != 0)
        return set_err(mh, MANHOLE_EINVAL, "tcp %s:%s: %s", host, port,
                       gai_strerror(g));
    int rc = MANHOLE_OK, fd = -1;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        if (!is_loopback(ai->ai_addr) && !mh->cfg.tcp_allow_nonlocal) {
            rc = set_err(mh, MANHOLE_EINVAL,
                         "tcp %s: not a loopback address; set "
                         "tcp_allow_nonlocal to listen on it",
                         host);
            break;
        }
        fd = new_socket(ai->ai_family);
        if (fd < 0) {
            rc = set_err(mh, MANHOLE_ESYS, "tcp %s:%s: socket: %s", host,
                         port, strerror(errno));
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 ||
            listen(fd, 128) < 0) {
            rc = set_err(mh, MANHOLE_ESYS, "tcp %s:%s: cannot bind: %s",
                         host, port, strerror(errno));
            close(fd);
            fd = -1;
            continue;
        }
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        getsockname(fd, (struct sockaddr *)&ss, &sl);
        mh->tcp_port = ntohs(ss.ss_family == AF_INET6
                                 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                 : ((struct sockaddr_in *)&ss)->sin_port);
        if (mh_endpoint(mh->endpoint, sizeof mh->endpoint, (struct sockaddr *)&ss, sl) < 0)
            snprintf(mh->endpoint, sizeof mh->endpoint, "%s:%d", host, mh->tcp_port);
        if (!is_loopback(ai->ai_addr))
            LOG(mh, MANHOLE_LOG_WARNING,
                "listening on non-loopback address %s port %d: anyone who "
                "can reach it gets a Python prompt in this process",
                host, mh->tcp_port);
        rc = MANHOLE_OK;
        break;
    }
    freeaddrinfo(res);
    if (fd < 0)
        return rc != MANHOLE_OK ? rc
                                : set_err(mh, MANHOLE_ESYS, "tcp %s: no address",
                                          host);
    mh->lfd_tcp = fd;
    return MANHOLE_OK;
}

/* ---- The TCP secret --------------------------------------------------- */

/* A directory only we may use: created 0700 if missing; refused if it is
 * a link, someone else's, or open to others. */
static int private_dir(manhole *mh, const char *dir)
{
    if (mkdir(dir, 0700) < 0 && errno != EEXIST)
        return set_err(mh, MANHOLE_ESYS, "%s: cannot create: %s", dir, strerror(errno));
    struct stat st;
    if (lstat(dir, &st) < 0)
        return set_err(mh, MANHOLE_ESYS, "%s: %s", dir, strerror(errno));
    if (!S_ISDIR(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 077))
        return set_err(mh, MANHOLE_EEXIST,
                       "%s: not a private directory of uid %ld (it is %s, owner "
                       "%ld, mode %03o); refusing to put the TCP secret there",
                       dir, (long)geteuid(), file_kind(st.st_mode), (long)st.st_uid,
                       (unsigned)(st.st_mode & 0777));
    return MANHOLE_OK;
}

/* The secret: the host's (tcp_secret), or 32 random bytes as 64 hex
 * digits. */
static int secret_make(manhole *mh)
{
    const char *given = mh->cfg.tcp_secret;
    if (!given) {
        if (mh_random_hex(mh->secret, 32) < 0)
            return set_err(mh, MANHOLE_ESYS, "cannot read /dev/urandom for the TCP secret");
        mh->secret_len = 64;
        return MANHOLE_OK;
    }
    size_t n = strlen(given);
    if (n == 0 || n > MH_SECRET_MAX || strpbrk(given, "\r\n") ||
        (unsigned char)given[0] == TN_IAC)
        return set_err(mh, MANHOLE_EINVAL, "tcp_secret: 1 to %d bytes, no line breaks",
                       MH_SECRET_MAX);
    memcpy(mh->secret, given, n + 1);
    mh->secret_len = n;
    return MANHOLE_OK;
}

/* Where the secret file goes: tcp_secret_file, or the rule of wire.h
 * (DIR/tcp-ENDPOINT.secret, DIR made private here). */
static int secret_file_path(manhole *mh, char *path, size_t n)
{
    if (mh->cfg.tcp_secret_file) {
        if (snprintf(path, n, "%s", mh->cfg.tcp_secret_file) >= (int)n)
            return set_err(mh, MANHOLE_EINVAL, "tcp_secret_file: path too long");
        return MANHOLE_OK;
    }
    char dir[PATH_MAX];
    if (mh_secret_dir(dir, sizeof dir, geteuid()) < 0)
        return set_err(mh, MANHOLE_EINVAL, "the secret directory's path is too long");
    int rc = private_dir(mh, dir);
    if (rc != MANHOLE_OK)
        return rc;
    if (mh_secret_path(path, n, geteuid(), mh->endpoint) < 0)
        return set_err(mh, MANHOLE_EINVAL, "%s: path too long", dir);
    return MANHOLE_OK;
}

/* Create the file anew (O_EXCL|O_NOFOLLOW, 0600) with the secret line,
 * and note which file it is. A file of ours already there is stale: its
 * endpoint (or tcp_secret_file) is ours now, we just bound it. */
static int secret_write(manhole *mh, const char *path)
{
    struct stat st;
    if (lstat(path, &st) == 0) {
        if (!S_ISREG(st.st_mode) || st.st_uid != geteuid())
            return set_err(mh, MANHOLE_EEXIST,
                           "%s: exists and is %s of uid %ld; refusing to replace it",
                           path, file_kind(st.st_mode), (long)st.st_uid);
        unlink(path);
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return set_err(mh, MANHOLE_ESYS, "%s: cannot create the secret file: %s", path,
                       strerror(errno));
    char line[sizeof mh->secret + 1];
    memcpy(line, mh->secret, mh->secret_len);
    line[mh->secret_len] = '\n';
    ssize_t w = write(fd, line, mh->secret_len + 1);
    int e = errno;
    if (fchmod(fd, 0600) < 0 || w != (ssize_t)mh->secret_len + 1 || fstat(fd, &st) < 0) {
        close(fd);
        unlink(path);
        return set_err(mh, MANHOLE_ESYS, "%s: cannot write the secret: %s", path,
                       strerror(w < 0 ? e : EIO));
    }
    close(fd);
    mh->secret_dev = st.st_dev;
    mh->secret_ino = st.st_ino;
    return MANHOLE_OK;
}

/* Make (or take) the secret and write it where clients of this user find
 * it (wire.h: the file is named after the address bound, not the port). */
static int secret_setup(manhole *mh)
{
    const manhole_config *c = &mh->cfg;
    if (mh->lfd_tcp < 0)
        return MANHOLE_OK;
    if (c->tcp_insecure) {
        LOG(mh, MANHOLE_LOG_WARNING,
            "tcp %s without a secret (tcp_insecure): any local user who "
            "can connect runs Python as uid %ld",
            mh->endpoint, (long)geteuid());
        return MANHOLE_OK;
    }
    int rc = secret_make(mh);
    if (rc != MANHOLE_OK || (c->tcp_secret && !c->tcp_secret_file))
        return rc; /* (the host hands its secret out itself) */
    char path[PATH_MAX];
    if ((rc = secret_file_path(mh, path, sizeof path)) != MANHOLE_OK ||
        (rc = secret_write(mh, path)) != MANHOLE_OK)
        return rc;
    mh->secret_path = mh_strdup(path);
    if (!mh->secret_path) {
        unlink(path);
        return set_err(mh, MANHOLE_ENOMEM, "out of memory");
    }
    LOG(mh, MANHOLE_LOG_INFO, "tcp %s: the secret clients prove (or send first) is in %s",
        mh->endpoint, path);
    return MANHOLE_OK;
}

/* Is the file at the secret's path still the one we wrote: the same
 * device and inode (an inode number may be reused once a file is gone)
 * holding our secret line? */
static int secret_file_ours(const manhole *mh)
{
    int fd = open(mh->secret_path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return 0;
    struct stat st;
    char line[sizeof mh->secret + 2];
    ssize_t n = fstat(fd, &st) == 0 && S_ISREG(st.st_mode) ? read(fd, line, sizeof line) : -1;
    close(fd);
    return n == (ssize_t)mh->secret_len + 1 && st.st_uid == geteuid() &&
           st.st_dev == mh->secret_dev && st.st_ino == mh->secret_ino &&
           mh_equal(line, mh->secret, mh->secret_len) && line[mh->secret_len] == '\n';
}

/* Remove the secret file, if it is still the one we wrote: another
 * host's file of that name is never ours to remove. */
static void secret_remove(manhole *mh)
{
    if (!mh->secret_path)
        return;
    if (secret_file_ours(mh))
        unlink(mh->secret_path);
    free(mh->secret_path);
    mh->secret_path = NULL;
}

static int accept_fd(int lfd)
{
    for (;;) {
#ifdef MH_HAVE_ACCEPT4
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
#else
        int fd = accept(lfd, NULL, NULL);
        if (fd >= 0 && fd_setup(fd) < 0) {
            close_keep_errno(fd);
            fd = -1;
        }
#endif
        if (fd < 0 && errno == EINTR)
            continue;
        return fd;
    }
}

#if !defined(MH_HAVE_SO_PEERCRED) && defined(__linux__)
/* glibc has no getpeereid(); the portable build gets this stand-in so the
 * BSD code path (uid only, no pid) runs on Linux too. */
static int getpeereid(int fd, uid_t *uid, gid_t *gid)
{
    struct ucred uc;
    socklen_t len = sizeof uc;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &uc, &len) < 0)
        return -1;
    *uid = uc.uid;
    *gid = uc.gid;
    return 0;
}
#endif

/* The peer's pid (-1 if unknown) and effective uid. */
static int peer_creds(int fd, long *pid, long *uid)
{
#ifdef MH_HAVE_SO_PEERCRED
    struct ucred uc;
    socklen_t len = sizeof uc;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &uc, &len) < 0)
        return -1;
    *pid = (long)uc.pid;
    *uid = (long)uc.uid;
    return 0;
#else
    uid_t u;
    gid_t g;
    if (getpeereid(fd, &u, &g) < 0)
        return -1;
    *pid = -1;
    *uid = (long)u;
    return 0;
#endif
}

/* send() that can never raise SIGPIPE and never touches the host's
 * SIGPIPE disposition. */
static ssize_t xsend(int fd, const void *p, size_t n)
{
    ssize_t r;
#if defined(MH_HAVE_MSG_NOSIGNAL) || defined(SO_NOSIGPIPE)
    do
        r = send(fd, p, n, MH_SEND_FLAGS);
    while (r < 0 && errno == EINTR);
#else
    /* Block SIGPIPE in this thread for the call and swallow the one the
     * call raised, if any (and only that one). */
    sigset_t pipe_set, old, pending;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
    sigpending(&pending);
    int was_pending = sigismember(&pending, SIGPIPE);
    do
        r = send(fd, p, n, 0);
    while (r < 0 && errno == EINTR);
    if (r < 0 && errno == EPIPE && !was_pending) {
        int e = errno;
        struct timespec zero = {0, 0};
        while (sigtimedwait(&pipe_set, NULL, &zero) < 0 && errno == EINTR)
            ;
        errno = e;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
#endif
    return r;
}

/* Best effort: a one-line message to a client we are about to drop. What
 * it already sent is read and dropped first (a little of it), so it reads
 * the message rather than a connection reset. */
/* Shut our sending side and read what the peer sent that nobody will
 * (a bounded amount): a close() with unread input sends a reset, which
 * may destroy the last line we sent before the peer reads it. */
static void shut_and_drain(int fd)
{
    shutdown(fd, SHUT_WR);
    char sink[4096];
    for (int k = 0; k < 16; k++) {
        ssize_t r = recv(fd, sink, sizeof sink, MSG_DONTWAIT);
        if (r <= 0 && !(r < 0 && errno == EINTR))
            break;
    }
}

static void send_and_close(int fd, const char *msg)
{
    (void)xsend(fd, msg, strlen(msg));
    shut_and_drain(fd);
    close(fd);
}

/* ==================================================================== */
/* Poller: epoll on Linux, poll() elsewhere                             */
/* ==================================================================== */

static void pfds_mark_dirty(manhole *mh) { mh->pfds_dirty = 1; }

static int poller_init(manhole *mh)
{
#ifdef MH_HAVE_EPOLL
    mh->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (mh->epfd < 0)
        return -1;
#endif
    MH_UNUSED(mh);
    return 0;
}

#ifdef MH_HAVE_EPOLL
static uint32_t to_epoll(unsigned ev)
{
    return ((ev & EV_IN) ? EPOLLIN : 0) | ((ev & EV_OUT) ? EPOLLOUT : 0);
}
#endif

static int poller_add(manhole *mh, int fd, void *tag, unsigned ev)
{
    pfds_mark_dirty(mh);
#ifdef MH_HAVE_EPOLL
    struct epoll_event e;
    memset(&e, 0, sizeof e);
    e.events = to_epoll(ev);
    e.data.ptr = tag;
    return epoll_ctl(mh->epfd, EPOLL_CTL_ADD, fd, &e);
#else
    MH_UNUSED(fd);
    MH_UNUSED(tag);
    MH_UNUSED(ev);
    return 0;
#endif
}

static void poller_mod(manhole *mh, int fd, void *tag, unsigned ev)
{
    pfds_mark_dirty(mh);
#ifdef MH_HAVE_EPOLL
    struct epoll_event e;
    memset(&e, 0, sizeof e);
    e.events = to_epoll(ev);
    e.data.ptr = tag;
    epoll_ctl(mh->epfd, EPOLL_CTL_MOD, fd, &e);
#else
    MH_UNUSED(fd);
    MH_UNUSED(tag);
    MH_UNUSED(ev);
#endif
}

static void poller_del(manhole *mh, int fd)
{
    pfds_mark_dirty(mh);
#ifdef MH_HAVE_EPOLL
    struct epoll_event e;
    memset(&e, 0, sizeof e);
    epoll_ctl(mh->epfd, EPOLL_CTL_DEL, fd, &e);
#else
    MH_UNUSED(fd);
#endif
}

static short to_poll(unsigned ev)
{
    return (short)(((ev & EV_IN) ? POLLIN : 0) | ((ev & EV_OUT) ? POLLOUT : 0));
}

MH_MAYBE_UNUSED static unsigned from_poll(short re)
{
    return ((re & POLLIN) ? EV_IN : 0) | ((re & POLLOUT) ? EV_OUT : 0) |
           ((re & POLLHUP) ? EV_HUP : 0) | ((re & (POLLERR | POLLNVAL)) ? EV_ERR : 0);
}

/* Rebuild the pollfd array (listeners, wake-up, clients) if it changed. */
static int pfds_build(manhole *mh)
{
    if (!mh->pfds_dirty && mh->pfds)
        return 0;
    int need = 3 + mh->nclients + mh->npending;
    if (need > mh->cappfds) {
        int ncap = need * 2;
        struct pollfd *np = realloc(mh->pfds, (size_t)ncap * sizeof *np);
        if (!np)
            return -1;
        mh->pfds = np;
        void **nt = realloc(mh->ptags, (size_t)ncap * sizeof *nt);
        if (!nt)
            return -1;
        mh->ptags = nt;
        mh->cappfds = ncap;
    }
    int n = 0;
    short lev = mh->listen_paused ? 0 : POLLIN;
    if (mh->lfd_unix >= 0) {
        mh->pfds[n] = (struct pollfd){mh->lfd_unix, lev, 0};
        mh->ptags[n++] = TAG_LISTEN_UNIX;
    }
    if (mh->lfd_tcp >= 0) {
        mh->pfds[n] = (struct pollfd){mh->lfd_tcp, lev, 0};
        mh->ptags[n++] = TAG_LISTEN_TCP;
    }
    mh->pfds[n] = (struct pollfd){mh->wake_r, POLLIN, 0};
    mh->ptags[n++] = TAG_WAKE;
    for (client *c = mh->clients; c; c = c->next) {
        mh->pfds[n] = (struct pollfd){c->fd, to_poll(c->ev), 0};
        mh->ptags[n++] = c;
    }
    mh->npfds = n;
    mh->pfds_dirty = 0;
    return 0;
}

typedef struct ready {
    void *tag;
    unsigned ev;
} ready;

#define MAX_READY 64

/* Wait up to timeout_ms for readiness; fill out[]. Returns the count, 0 on
 * timeout or EINTR, -1 on error. */
static int poller_wait(manhole *mh, int timeout_ms, ready *out)
{
#ifdef MH_HAVE_EPOLL
    struct epoll_event evs[MAX_READY];
    int n = epoll_wait(mh->epfd, evs, MAX_READY, timeout_ms);
    if (n < 0)
        return errno == EINTR ? 0 : -1;
    for (int i = 0; i < n; i++) {
        uint32_t e = evs[i].events;
        out[i].tag = evs[i].data.ptr;
        out[i].ev = ((e & EPOLLIN) ? EV_IN : 0) | ((e & EPOLLOUT) ? EV_OUT : 0) |
                    ((e & EPOLLHUP) ? EV_HUP : 0) | ((e & EPOLLERR) ? EV_ERR : 0);
    }
    return n;
#else
    if (pfds_build(mh) < 0)
        return -1;
    int n = poll(mh->pfds, (nfds_t)mh->npfds, timeout_ms);
    if (n < 0)
        return errno == EINTR ? 0 : -1;
    int k = 0;
    for (int i = 0; i < mh->npfds && k < MAX_READY; i++) {
        if (mh->pfds[i].revents) {
            out[k].tag = mh->ptags[i];
            out[k].ev = from_poll(mh->pfds[i].revents);
            k++;
        }
    }
    return k;
#endif
}

/* ==================================================================== */
/* Framing: bytes from the socket into line records                     */
/* ==================================================================== */

/* Telnet parser states. SB_SKIP: a subnegotiation too long or broken,
 * dropped up to its IAC SE (nothing in it is ever read as a line). */
enum { IAC_NONE, IAC_CMD, IAC_OPT, IAC_SB, IAC_SB_DATA, IAC_SB_IAC, IAC_SB_SKIP,
       IAC_SB_SKIP_IAC };

/* Frame results. */
enum { FR_OK = 0, FR_HTTP = -1, FR_NOMEM = -2, FR_AUTH = -3 };

static int rec_add(buf *recs, int kind, const char *p, size_t n)
{
    unsigned char hdr[5];
    uint32_t len = (uint32_t)n;
    hdr[0] = (unsigned char)kind;
    memcpy(hdr + 1, &len, 4);
    if (buf_add(recs, hdr, 5) < 0 || buf_add(recs, p, n) < 0)
        return -1;
    return 0;
}

static int rec_vmsg(buf *recs, int kind, const char *fmt, va_list ap)
{
    char msg[256];
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    if (n < 0)
        return -1;
    return rec_add(recs, kind, msg, utf8_complete(msg, MH_MIN((size_t)n, sizeof msg - 1)));
}

/* A bad line: a REC_ERROR record with this message. */
static int rec_error(buf *recs, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static int rec_error(buf *recs, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = rec_vmsg(recs, REC_ERROR, fmt, ap);
    va_end(ap);
    return r;
}

/* Something not acted upon: a REC_NOTE record with this message. */
static int rec_note(buf *recs, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static int rec_note(buf *recs, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = rec_vmsg(recs, REC_NOTE, fmt, ap);
    va_end(ap);
    return r;
}

/* Does a first line look like HTTP (a request line or a Host: header)? */
static int looks_like_http(const char *s, size_t n)
{
    if (n >= 5 && strncasecmp(s, "host:", 5) == 0)
        return 1;
    size_t i = 0;
    while (i < n && s[i] >= 'A' && s[i] <= 'Z')
        i++;
    if (i < 3 || i > 12 || i >= n || s[i] != ' ')
        return 0;
    i++;
    while (i < n && s[i] != ' ')
        i++;
    return n - i >= 6 && memcmp(s + i, " HTTP/", 6) == 0;
}

/* Do the first bytes of a TCP connection start an HTTP request line
 * ("METHOD /...", "METHOD *", "METHOD http://...")? 1 yes, 0 no, -1 not
 * yet known. Decided on the first bytes, however long the line then gets,
 * and however the bytes are cut into reads: a browser's request never
 * runs. */
static int http_decide(const char *s, size_t n)
{
    size_t i = 0;
    while (i < n && s[i] >= 'A' && s[i] <= 'Z')
        i++;
    if (i == n)
        return i > 12 ? 0 : -1;
    if (i < 3 || i > 12 || s[i] != ' ')
        return 0;
    if (i + 1 == n)
        return -1;
    const char *t = s + i + 1;
    size_t m = n - i - 1;
    if (t[0] == '/' || t[0] == '*')
        return 1;
    if (m < 4)
        return strncasecmp(t, "http", m) == 0 ? -1 : 0;
    return strncasecmp(t, "http", 4) == 0;
}

/* Compare a line with the TCP secret in time that depends only on the
 * secret's length. */
static int secret_ok(const manhole *mh, const char *p, size_t n)
{
    unsigned char d = (unsigned char)(n != mh->secret_len);
    for (size_t i = 0; i < mh->secret_len; i++)
        d |= (unsigned char)(mh->secret[i] ^ (i < n ? p[i] : 0));
    return d == 0;
}

/* A line ended: validate it and turn it into a record. Returns FR_HTTP
 * when the client must be dropped (HTTP on TCP), FR_AUTH when it was not
 * the secret, FR_NOMEM when out of memory. */
static int end_line(client *c, buf *recs)
{
    manhole *mh = c->mh;
    const char *p = c->line.p ? c->line.p : "";
    size_t n = c->line.len;
    int first = !c->got_line;
    c->got_line = 1;
    c->http_done = 1; /* a first line ended before it looked like a request */
    int r;
    if (first && c->transport == T_TCP && looks_like_http(p, n))
        return FR_HTTP;
    if (c->auth) { /* (a line in the middle of the challenge-response fails) */
        int ok = c->auth == AUTH_LINE && !c->discard && secret_ok(mh, p, n);
        buf_free(&c->line);
        c->discard = 0;
        if (!ok)
            return FR_AUTH;
        c->auth = AUTH_NONE;
        return FR_OK;
    }
    if (c->discard) {
        c->discard = 0; /* the rest of an over-long line: told already */
        r = 0;
    } else if (memchr(p, 0, n)) {
        r = rec_error(recs, "manhole: line with a NUL byte discarded");
    } else {
        size_t bad;
        if (!utf8_valid((const unsigned char *)p, n, &bad))
            r = rec_error(recs,
                          "manhole: line discarded: not valid UTF-8 (byte "
                          "%zu is 0x%02x)",
                          bad + 1, (unsigned char)p[bad]);
        else {
            r = rec_add(recs, REC_LINE, p, n);
            if (mh->cfg.audit)
                LOG(mh, MANHOLE_LOG_AUDIT, "client #%u input: %.*s", c->id,
                    (int)utf8_cut(p, n, 900), p);
        }
    }
    buf_clear(&c->line);
    return r < 0 ? FR_NOMEM : FR_OK;
}

/* A line just outgrew max_line: tell the client now (not when its end
 * arrives, which may be never) and drop the rest of it. */
static int start_discard(client *c, buf *recs)
{
    if (c->auth)
        return FR_AUTH; /* no secret is that long */
    c->discard = 1;
    c->got_line = 1; /* it was no HTTP request line (checked already) */
    buf_free(&c->line); /* memory stays bounded */
    return rec_error(recs, "manhole: line too long (more than %zu bytes); discarded",
                     c->mh->cfg.max_line) < 0 ? FR_NOMEM : FR_OK;
}

/* What the framer finds that is not a line (an interrupt, a completion
 * request, telnet's timing mark) is noted on the client and acted upon by
 * client_read() once the bytes are framed: the framer itself touches
 * nothing shared. queued: lines of this read came before the interrupt. */
static void act_interrupt(client *c, const buf *recs)
{
    c->act_intr = buf_used(recs) > 0 ? 2 : 1;
}

/* The address a TCP connection reached, as wire.h writes it. */
static int local_endpoint(int fd, char *ep, size_t n)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) < 0)
        return -1;
    return mh_endpoint(ep, n, (struct sockaddr *)&ss, sl);
}

/* "A1 CNONCE" (wire.h): answer with our nonce and proof (sent by
 * client_read()), and note the proof the client must send back. */
static int auth_challenge(client *c, const char *p, size_t n)
{
    manhole *mh = c->mh;
    const size_t vlen = sizeof MH_AUTH_VERSION - 1;
    char cnonce[MH_NONCE_HEX + 1], snonce[MH_NONCE_HEX + 1], sproof[MH_PROOF_HEX + 1];
    char ep[64];
    if (n != vlen + 1 + MH_NONCE_HEX || memcmp(p, MH_AUTH_VERSION, vlen) != 0 ||
        p[vlen] != ' ' || !mh_is_hex(p + vlen + 1, MH_NONCE_HEX))
        return FR_AUTH;
    memcpy(cnonce, p + vlen + 1, MH_NONCE_HEX);
    cnonce[MH_NONCE_HEX] = '\0';
    if (local_endpoint(c->fd, ep, sizeof ep) < 0 || mh_random_hex(snonce, MH_NONCE_HEX / 2) < 0) {
        LOG(mh, MANHOLE_LOG_ERROR, "client #%u: cannot answer its challenge: %s", c->id,
            strerror(errno));
        return FR_AUTH;
    }
    mh_auth_proof(sproof, 1, mh->secret, mh->secret_len, cnonce, snonce, ep);
    mh_auth_proof(c->auth_expect, 0, mh->secret, mh->secret_len, cnonce, snonce, ep);
    int w = snprintf(c->auth_reply, sizeof c->auth_reply, "%c%c%c%c%s %s %s%c%c", TN_IAC,
                     TN_SB, TN_OPT_MANHOLE, MH_REC_AUTH, MH_AUTH_VERSION, snonce, sproof,
                     TN_IAC, TN_SE);
    if (w < 0 || (size_t)w >= sizeof c->auth_reply)
        return FR_AUTH;
    c->auth_reply_len = (unsigned char)w;
    c->auth = AUTH_PROOF;
    return FR_OK;
}

/* "A" CPROOF (wire.h): in if it is the one noted, as after a right
 * secret line. */
static int auth_response(client *c, const char *p, size_t n)
{
    if (c->auth != AUTH_PROOF || n != MH_PROOF_HEX ||
        !mh_equal(p, c->auth_expect, MH_PROOF_HEX))
        return FR_AUTH;
    memset(c->auth_expect, 0, sizeof c->auth_expect);
    c->auth = AUTH_NONE;
    c->got_line = 1;
    c->http_done = 1;
    return FR_OK;
}

/* Our subnegotiation (option 77) before authentication: the challenge-
 * response of wire.h, its first bytes, or a refusal. */
static int auth_record(client *c)
{
    const char *p = c->sb.p ? c->sb.p : "";
    size_t n = c->sb.len;
    if (n == 0 || p[0] != MH_REC_AUTH || c->line.len > 0 || c->discard)
        return FR_AUTH;
    if (c->auth == AUTH_LINE)
        return auth_challenge(c, p + 1, n - 1);
    return auth_response(c, p + 1, n - 1);
}

/* The length of a completion request's id ("<id> <text>": digits, then a
 * space); 0 if it has none. */
static size_t comp_id_len(const char *p, size_t n)
{
    size_t i = 0;
    while (i < n && i < 18 && p[i] >= '0' && p[i] <= '9')
        i++;
    return i > 0 && i < n && p[i] == ' ' ? i : 0;
}

/* A request type for a message: 'X', or 0xNN when it is no letter. */
static const char *type_name(unsigned char t, char out[8])
{
    if (t > 0x20 && t < 0x7f && t != '\'')
        snprintf(out, 8, "'%c'", t);
    else
        snprintf(out, 8, "0x%02x", t);
    return out;
}

/* A subnegotiation ended (IAC SE). Ours (option 77) carries the extended
 * channel's requests (before authentication, only that); any other is
 * dropped. */
static int sb_end(client *c, buf *recs)
{
    const char *p = c->sb.p ? c->sb.p : "";
    size_t n = c->sb.len;
    int r = FR_OK;
    if (c->auth) {
        r = c->sb_opt == TN_OPT_MANHOLE ? auth_record(c) : FR_OK;
        buf_free(&c->sb);
        return r;
    }
    if (c->sb_opt == TN_OPT_MANHOLE && n > 0) {
        switch (p[0]) {
        case 'H': /* hello: before any line of this read, client_read()
                     answers it (client_hello()); else in order with them */
            if (buf_used(recs) == 0 && !c->act_hello)
                c->act_hello = 1;
            else
                r = rec_add(recs, REC_HELLO, p + 1, n - 1) < 0 ? FR_NOMEM : FR_OK;
            break;
        case 'I':
            act_interrupt(c, recs);
            break;
        case 'C': { /* [u32 length][request], for client_read() */
            if (comp_id_len(p + 1, n - 1) == 0) {
                r = rec_note(recs, "manhole: completion request without an id; ignored") < 0
                        ? FR_NOMEM : FR_OK;
                break;
            }
            uint32_t len = (uint32_t)(n - 1);
            r = buf_add(&c->act_comp, &len, 4) < 0 || buf_add(&c->act_comp, p + 1, n - 1) < 0
                    ? FR_NOMEM : FR_OK;
            break;
        }
        case 'E': {
            size_t bad;
            if (memchr(p + 1, 0, n - 1) || !memchr(p + 1, '\n', n - 1) ||
                !utf8_valid((const unsigned char *)p + 1, n - 1, &bad))
                r = rec_error(recs, "manhole: script discarded: a file name "
                                    "line, then UTF-8 text without NUL bytes") < 0
                        ? FR_NOMEM : FR_OK;
            else
                r = rec_add(recs, REC_SCRIPT, p + 1, n - 1) < 0 ? FR_NOMEM : FR_OK;
            break;
        }
        default: { /* a later version's request: not done, and said */
            char t[8];
            r = rec_note(recs, "manhole: unknown request %s; ignored",
                         type_name((unsigned char)p[0], t)) < 0 ? FR_NOMEM : FR_OK;
            break;
        }
        }
    }
    buf_free(&c->sb);
    return r;
}

/* The longest line the framer keeps: before authentication, a secret's. */
static size_t line_cap(const client *c)
{
    return c->auth ? MH_SECRET_MAX : c->mh->cfg.max_line;
}

/* Drop the rest of the subnegotiation being read, up to its IAC SE. */
static void sb_skip(client *c)
{
    buf_free(&c->sb);
    c->iac = IAC_SB_SKIP;
}

/* A completion request too long to read gets an empty answer: its id and
 * a text with a NUL byte, which completion_request() answers empty at
 * once. Without an id there is nobody to answer: said. */
static int comp_refuse(client *c, const char *p, size_t n, buf *recs)
{
    size_t k = comp_id_len(p, n);
    if (k == 0)
        return rec_note(recs, "manhole: completion request without an id; ignored");
    char req[24]; /* k <= 18 */
    memcpy(req, p, k);
    req[k] = ' ';
    req[k + 1] = 0;
    uint32_t len = (uint32_t)(k + 2);
    return buf_add(&c->act_comp, &len, 4) < 0 || buf_add(&c->act_comp, req, len) < 0 ? -1 : 0;
}

/* Is the subnegotiation being read a record of the extended channel, of
 * a type our clients send? Such a record was framed on purpose (its 0xFF
 * bytes doubled): its IAC SE will come. Anything else starting with IAC
 * SB is more likely pasted text (0xFF 0xFA is "\xff\xfa" in Latin-1), as
 * the server negotiates no option. */
static int sb_is_record(const client *c)
{
    return c->sb_opt == TN_OPT_MANHOLE && c->sb.len > 0 && c->sb.p[0] &&
           strchr("HICE", c->sb.p[0]);
}

/* A subnegotiation that is no record outgrew its bound, or broke: a bad
 * line, dropped up to the next line end (it may be text that never ends
 * with IAC SE). */
static int sb_resync(client *c, buf *recs, size_t lim)
{
    buf_free(&c->sb);
    c->iac = IAC_NONE;
    if (lim == 0)
        return FR_OK; /* broken: its bytes go on as text */
    buf_free(&c->line);
    c->discard = 1;
    c->got_line = 1;
    return rec_error(recs, "manhole: telnet subnegotiation longer than %zu bytes; discarded",
                     lim) < 0 ? FR_NOMEM : FR_OK;
}

/* A subnegotiation outgrew its bound (ours may carry a script of max_line
 * bytes, anything else a few hundred). A record is said once, then
 * dropped whole, up to its IAC SE, however its bytes are cut into reads;
 * the line it interrupted goes on after it. */
static int sb_overflow(client *c, buf *recs, size_t lim)
{
    if (c->auth)
        return FR_AUTH; /* no secret is that long */
    if (!sb_is_record(c))
        return sb_resync(c, recs, lim);
    unsigned char type = (unsigned char)c->sb.p[0];
    char t[8];
    int r;
    if (type == 'E') /* as a statement that failed: S 1 and a prompt */
        r = rec_error(recs, "manhole: script longer than %zu bytes; discarded",
                      c->mh->cfg.max_line);
    else if (type == 'C')
        r = comp_refuse(c, c->sb.p + 1, c->sb.len - 1, recs);
    else
        r = rec_note(recs, "manhole: request %s longer than %zu bytes; discarded",
                     type_name(type, t), lim);
    sb_skip(c);
    return r < 0 ? FR_NOMEM : FR_OK;
}

/* One more payload byte of a subnegotiation. */
static int sb_byte(client *c, unsigned char ch, buf *recs)
{
    size_t lim = c->auth                        ? AUTH_SB_MAX
                 : c->sb_opt == TN_OPT_MANHOLE ? c->mh->cfg.max_line + 64
                                               : SB_MAX_OTHER;
    c->iac = IAC_SB_DATA;
    if (c->sb.len >= lim)
        return sb_overflow(c, recs, lim);
    return buf_add(&c->sb, &ch, 1) < 0 ? FR_NOMEM : FR_OK;
}

/* IAC <command> inside a subnegotiation, where only IAC IAC and IAC SE
 * belong: it is broken. A record is said once and dropped up to its IAC
 * SE (its tail is no line either); an interrupt in it still interrupts.
 * Anything else is dropped, and its bytes go on as text. */
static int sb_broken(client *c, unsigned char ch, buf *recs)
{
    if (!sb_is_record(c))
        return sb_resync(c, recs, 0);
    if (c->auth)
        return FR_AUTH; /* no client of ours sends one before the secret */
    if (ch == TN_IP || ch == TN_BRK)
        act_interrupt(c, recs);
    sb_skip(c);
    return rec_note(recs, "manhole: malformed telnet subnegotiation (IAC %u inside it); "
                          "discarded up to its IAC SE", ch) < 0 ? FR_NOMEM : FR_OK;
}

/* One byte after IAC (c->iac is not IAC_NONE). Returns 1 for IAC IAC
 * outside a subnegotiation (a literal 0xFF byte of the line), 0 when the
 * byte was taken, or an FR_* error. */
static int telnet_byte(client *c, unsigned char ch, buf *recs)
{
    switch (c->iac) {
    case IAC_CMD:
        if (ch == TN_IAC) {
            c->iac = IAC_NONE;
            return 1;
        }
        c->iac = (ch >= 251 && ch <= 254) ? IAC_OPT : ch == TN_SB ? IAC_SB : IAC_NONE;
        c->iac_cmd = ch;
        if ((ch == TN_IP || ch == TN_BRK) && !c->auth)
            act_interrupt(c, recs);
        return 0;
    case IAC_OPT:
        /* telnet asks for a timing mark after an interrupt and shows
         * nothing until it comes (RFC 860): client_read() answers it. */
        c->iac = IAC_NONE;
        if (c->iac_cmd == TN_DO && ch == TN_OPT_TM && !c->auth)
            c->act_tm = 1;
        return 0;
    case IAC_SB:
        c->sb_opt = ch;
        buf_free(&c->sb);
        c->iac = IAC_SB_DATA;
        return 0;
    case IAC_SB_DATA:
        if (ch != TN_IAC)
            return sb_byte(c, ch, recs);
        c->iac = IAC_SB_IAC;
        return 0;
    case IAC_SB_IAC:
        if (ch == TN_IAC)
            return sb_byte(c, ch, recs); /* a doubled 0xFF in the payload */
        if (ch != TN_SE)
            return sb_broken(c, ch, recs);
        c->iac = IAC_NONE;
        return sb_end(c, recs);
    case IAC_SB_SKIP:
        if (ch == TN_IAC)
            c->iac = IAC_SB_SKIP_IAC;
        return 0;
    default: /* IAC_SB_SKIP_IAC: SE ends it; IAC IAC is a byte of it */
        c->iac = ch == TN_SE ? IAC_NONE : IAC_SB_SKIP;
        if ((ch == TN_IP || ch == TN_BRK) && !c->auth)
            act_interrupt(c, recs);
        return 0;
    }
}

/* Feed bytes into the framer. Complete lines go to recs. */
static int frame_bytes(client *c, const unsigned char *p, size_t n, buf *recs)
{
    size_t i = 0;
    while (i < n) {
        unsigned char ch = p[i];
        if (c->iac == IAC_CMD && ch < 240) {
            /* Not a telnet command after all: a stray 0xFF byte (which
             * UTF-8 never contains), kept so the line is reported. */
            c->iac = IAC_NONE;
            ch = 0xFF;
            goto literal;
        }
        if (c->iac != IAC_NONE) {
            i++;
            int t = telnet_byte(c, ch, recs);
            if (t < 0)
                return t;
            if (t == 0)
                continue;
            ch = TN_IAC; /* IAC IAC: a literal 0xFF byte */
        literal:
            if (c->discard)
                continue;
            if (c->line.len < line_cap(c)) {
                if (buf_add(&c->line, &ch, 1) < 0)
                    return FR_NOMEM;
            } else {
                int r = start_discard(c, recs);
                if (r < 0)
                    return r;
            }
            continue;
        }
        if (c->after_cr) {
            c->after_cr = 0;
            if (ch == '\n' || ch == '\0') {
                i++;
                continue;
            }
        }
        if (ch == '\n' || ch == '\r') {
            c->after_cr = ch == '\r';
            i++;
            int r = end_line(c, recs);
            if (r < 0)
                return r;
            continue;
        }
        if (ch == TN_IAC) {
            c->iac = IAC_CMD;
            i++;
            continue;
        }
        /* A run of ordinary bytes. */
        size_t j = i + 1;
        while (j < n && p[j] != '\n' && p[j] != '\r' && p[j] != TN_IAC)
            j++;
        size_t run = j - i;
        if (c->transport == T_TCP && !c->http_done) {
            /* The first bytes decide whether this is a browser. */
            size_t take = MH_MIN(run, sizeof c->head - c->head_len);
            memcpy(c->head + c->head_len, p + i, take);
            c->head_len += (unsigned char)take;
            int d = http_decide(c->head, c->head_len);
            if (d == 1)
                return FR_HTTP;
            if (d == 0 || c->head_len == sizeof c->head)
                c->http_done = 1;
        }
        if (!c->discard) {
            size_t cap = line_cap(c);
            size_t room = cap - MH_MIN(cap, c->line.len);
            if (run > room) {
                int r = start_discard(c, recs);
                if (r < 0)
                    return r;
            } else if (buf_add(&c->line, p + i, run) < 0) {
                return FR_NOMEM;
            }
        }
        i = j;
    }
    return FR_OK;
}

/* ==================================================================== */
/* Output: per-client buffers, written by workers, sent by the host     */
/* ==================================================================== */

static void client_free(client *c)
{
    buf_free(&c->line);
    buf_free(&c->tx);
    buf_free(&c->inq);
    buf_free(&c->out);
    buf_free(&c->src);
    buf_free(&c->sb);
    buf_free(&c->act_comp);
    pthread_cond_destroy(&c->cv);
    free(c);
}

/* Drop a reference. Lock held. A client with a Python session is only
 * released by someone holding the GIL (see client_close()). */
static void client_unref_locked(client *c)
{
    if (--c->refs == 0)
        client_free(c);
}

static void output_wait(worker *w, client *c);
static void thread_output_wait(client *c);

/* Append bytes, doubling 0xFF (the extended channel's escape). */
static int buf_add_escaped(buf *b, const char *p, size_t n)
{
    while (n > 0) {
        const char *ff = memchr(p, 0xFF, n);
        size_t k = ff ? (size_t)(ff - p) + 1 : n;
        if (buf_add(b, p, k) < 0 || (ff && buf_add(b, "\xff", 1) < 0))
            return -1;
        p += k;
        n -= k;
    }
    return 0;
}

/* How long a worker may hold output back from the host (seconds). A
 * statement that ends sooner has its output, the next prompt included,
 * sent by its worker (direct_send()), and the host is not woken; the
 * watchdog hands the host whatever is held longer. */
#define OUTPUT_HOLD 0.001
/* While workers keep holding output, the watchdog looks every OUTPUT_HOLD
 * (until HOLD_LINGER after the last hold began) rather than be signalled
 * for each statement. */
#define HOLD_LINGER 0.01

/* New output for c is in c->out (lock held). In threaded mode the worker
 * w holds it back (see OUTPUT_HOLD). Returns 1 when the watchdog must be
 * woken to release it in time (signal wd_cv after unlocking). */
static int output_added_locked(worker *w, client *c)
{
    manhole *mh = c->mh;
    if (!w || w->is_host || !mh->wd_started || mh->wd_stop) {
        mark_dirty_locked(c);
        if (w)
            w->woke_host = 1;
        return 0;
    }
    if (w->hold_until > 0)
        return 0;
    mh->hold_last = now_mono();
    w->hold_until = mh->hold_last + OUTPUT_HOLD;
    if (mh->wd_wake_at == 0 || mh->wd_wake_at > w->hold_until) {
        mh->wd_wake_at = w->hold_until;
        return 1;
    }
    return 0;
}

/* Give the host the output w holds back for c, now: w is about to wait
 * (for room, input, a host call), or the hold ran out. Lock held. */
static void output_release_locked(worker *w, client *c)
{
    if (w && w->hold_until > 0) {
        w->hold_until = 0;
        w->woke_host = 1;
        if (c && !c->dead)
            mark_dirty_locked(c);
    }
}

/* Append output for a client. w is the worker producing it (it may be
 * made to wait for room), or NULL: a thread a statement started (it
 * waits too), or short texts that must never wait (the watchdog's
 * report). raw: bytes of a record, not to be escaped. Lock NOT held on
 * entry. */
static void client_output_ex(worker *w, client *c, const char *p, size_t n, int raw)
{
    manhole *mh = c->mh;
    size_t cap = mh->cfg.max_output;
    int wake_wd = 0;
    int thread = !w && tl_bound == c;
    pthread_mutex_lock(&mh->lock);
    if (n > 0 && !raw)
        c->out_nl = p[n - 1] == '\n';
    while (n > 0) {
        if (c->dead || mh->stopping || (w && w->timed_out))
            break; /* nobody will read it */
        size_t pending = buf_used(&c->out) + c->tx_backlog;
        size_t room = pending < cap ? cap - pending : 0;
        /* Only a running statement (or a thread it started) waits for
         * room (its timeout bounds the wait). What is written around
         * statements (prompts, reports, tracebacks) never waits; it is
         * bounded instead by taking no more input from a client over the
         * cap (process_job). */
        if (!thread && (!w || !w->running))
            room = n;
        if (raw && room > 0)
            room = n; /* a record is never split (nothing may come between) */
        if (room == 0) {
            if (thread)
                thread_output_wait(c);
            else
                output_wait(w, c);
            continue;
        }
        size_t k = MH_MIN(room, n);
        if ((c->ext && !raw ? buf_add_escaped(&c->out, p, k) : buf_add(&c->out, p, k)) < 0)
            break;
        c->out_tail_e = raw && k == n && n > 3 && p[3] == 'E';
        p += k;
        n -= k;
        wake_wd |= output_added_locked(w, c);
    }
    pthread_mutex_unlock(&mh->lock);
    if (wake_wd)
        pthread_cond_signal(&mh->wd_cv);
}

static void client_output(worker *w, client *c, const char *p, size_t n)
{
    client_output_ex(w, c, p, n, 0);
}

/* A record of the extended channel: IAC SB 77 <type> <payload> IAC SE. */
static void record_build(buf *b, char type, const char *payload, size_t n)
{
    const char hdr[4] = {(char)TN_IAC, (char)TN_SB, (char)TN_OPT_MANHOLE, type};
    const char end[2] = {(char)TN_IAC, (char)TN_SE};
    buf_add(b, hdr, 4);
    buf_add_escaped(b, payload, n);
    buf_add(b, end, 2);
}

static void client_record(worker *w, client *c, char type, const char *payload,
                          size_t n)
{
    buf b = {0};
    record_build(&b, type, payload, n);
    client_output_ex(w, c, b.p, b.len, 1);
    buf_free(&b);
}

/* What goes to the client's stderr (tracebacks, reports, "manhole:"
 * lines): for a rich client an E record, so it can tell it from output. */
static void client_error(worker *w, client *c, const char *p, size_t n)
{
    manhole *mh = c->mh;
    if (n == 0)
        return;
    pthread_mutex_lock(&mh->lock);
    int ext = c->ext;
    if (ext) {
        c->out_nl = p[n - 1] == '\n';
        if (c->out_tail_e && buf_used(&c->out) >= 2 && !c->dead &&
            buf_used(&c->out) + c->tx_backlog < mh->cfg.max_output) {
            /* The buffer ends with an E record not yet taken by the host:
             * it grows (a traceback is many small writes, one record). */
            c->out.len -= 2;
            buf_add_escaped(&c->out, p, n);
            const char end[2] = {(char)TN_IAC, (char)TN_SE};
            buf_add(&c->out, end, 2);
            int wake_wd = output_added_locked(w, c);
            pthread_mutex_unlock(&mh->lock);
            if (wake_wd)
                pthread_cond_signal(&mh->wd_cv);
            return;
        }
    }
    pthread_mutex_unlock(&mh->lock);
    if (ext)
        client_record(w, c, 'E', p, n);
    else
        client_output(w, c, p, n);
}

static void client_error_str(worker *w, client *c, const char *s)
{
    client_error(w, c, s, strlen(s));
}

/* A thread a statement started writes faster than its client reads: it
 * waits (GIL released) until there is room, or the client is gone. Lock
 * and GIL held on entry and exit. */
static void thread_output_wait(client *c)
{
    manhole *mh = c->mh;
    c->out_waiters++;
    pthread_mutex_unlock(&mh->lock);
    PyThreadState *ts = PyEval_SaveThread();
    pthread_mutex_lock(&mh->lock);
    while (!c->dead && !mh->stopping && buf_used(&c->out) + c->tx_backlog >= mh->cfg.max_output)
        pthread_cond_wait(&c->cv, &mh->lock);
    c->out_waiters--;
    pthread_mutex_unlock(&mh->lock);
    PyEval_RestoreThread(ts);
    pthread_mutex_lock(&mh->lock);
}

static int client_flush(client *c);
static void client_close(client *c, const char *why);
static int worker_spawn_locked(manhole *mh);

/* Workers parked at once, at most (see park_locked()). */
#define MAX_PARKED 64

/* A worker about to wait on its client (for room in its output, or for a
 * line of input) is parked: it leaves the pool's count while it waits, so
 * that other clients' statements, completions and hellos do not wait for
 * a client that does not read or answer. It uses no CPU meanwhile, and
 * its statement's timeout (for output) still runs. A job already queued
 * gets a worker now. At most MAX_PARKED at once: past that a waiting
 * worker stays counted, as a busy one. Lock held. */
static void park_locked(worker *w)
{
    manhole *mh = w->mh;
    if (w->is_host || w->parked || w->timed_out || mh->nparked >= MAX_PARKED)
        return;
    w->parked = 1;
    mh->nparked++;
    mh->nworkers--;
    if (mh->njobs > mh->nidle || (mh->cq_head && mh->nidle == 0))
        worker_spawn_locked(mh);
}

/* The wait is over: counted again (the pool may be over max_workers
 * until this job ends; worker_main() then lets the extra one go). An
 * abandoned worker was unparked by abandon_locked(). Lock held. */
static void unpark_locked(worker *w)
{
    if (!w->parked)
        return;
    w->parked = 0;
    w->mh->nparked--;
    w->mh->nworkers++;
}

/* Wait until the client's pending output drops below the cap, or the
 * statement is abandoned, the client gone, the manhole closing. Lock and
 * GIL held on entry and on exit; both are released while waiting. */
static void output_wait(worker *w, client *c)
{
    manhole *mh = c->mh;
    size_t cap = mh->cfg.max_output;
    PyThreadState *ts;
    if (!w->is_host) {
        output_release_locked(w, c); /* the host is to make room */
        c->out_waiters++;
        pthread_mutex_unlock(&mh->lock);
        ts = PyEval_SaveThread();
        pthread_mutex_lock(&mh->lock);
        park_locked(w);
        while (!c->dead && !mh->stopping && !w->timed_out &&
               buf_used(&c->out) + c->tx_backlog >= cap)
            pthread_cond_wait(&c->cv, &mh->lock);
        unpark_locked(w);
        c->out_waiters--;
        pthread_mutex_unlock(&mh->lock);
        PyEval_RestoreThread(ts);
        pthread_mutex_lock(&mh->lock);
        return;
    }
    /* Non-threaded mode: we are the host thread, so send it ourselves. */
    pthread_mutex_unlock(&mh->lock);
    ts = PyEval_SaveThread();
    for (;;) {
        if (client_flush(c) < 0) {
            client_close(c, "connection lost");
            break;
        }
        pthread_mutex_lock(&mh->lock);
        int full = buf_used(&c->out) + c->tx_backlog >= cap;
        int stop = c->dead || w->timed_out || mh->stopping;
        pthread_mutex_unlock(&mh->lock);
        if (!full || stop)
            break;
        struct pollfd pf = {c->fd, POLLOUT, 0};
        (void)poll(&pf, 1, 100);
    }
    PyEval_RestoreThread(ts);
    pthread_mutex_lock(&mh->lock);
}

/* ==================================================================== */
/* Python glue                                                          */
/* ==================================================================== */

/* Process-wide state lives in a module "_manhole" in sys.modules, so it
 * goes away with the interpreter: the shared object types, the stream
 * proxies, how many manholes use them, and whether a manhole started
 * Python. */

typedef struct {
    PyObject_HEAD
    manhole *mh;         /* NULL once the manhole is closed */
    PyObject *bindings;  /* dict: name -> Binding */
} CoreObject;

typedef struct {
    PyObject_HEAD
    int type;
    void *addr;
    int flags;
} BindingObject;

typedef struct {
    PyDictObject dict;
    PyObject *core;
    PyObject *detached;  /* set of bound names `del`eted in this namespace,
                            or NULL: they read as ordinary names here */
} NsObject;

typedef struct {
    PyObject_HEAD
    manhole_fn *fn;
    void *ud;
    int flags;
    PyObject *name, *doc, *core;
} CFuncObject;

typedef struct {
    PyObject_HEAD
    PyObject *orig;      /* the stream it stands for (its .buffer, if binary) */
    PyObject *buffer;    /* text proxies: the binary one, made on first use */
    int kind;            /* K_STDOUT, K_STDERR, K_STDIN */
    int binary;
} ProxyObject;

enum { K_STDOUT, K_STDERR, K_STDIN };
/* The sys attributes a session may assign for itself (c->over). */
enum { SYS_STDOUT = K_STDOUT, SYS_STDERR = K_STDERR, SYS_STDIN = K_STDIN, SYS_HOOK, SYS_N };
static const char *const sys_names[SYS_N] = {"stdout", "stderr", "stdin", "displayhook"};

static void simple_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static void core_dealloc(PyObject *self)
{
    Py_CLEAR(((CoreObject *)self)->bindings);
    simple_dealloc(self);
}

static void cfunc_dealloc(PyObject *self)
{
    CFuncObject *f = (CFuncObject *)self;
    Py_CLEAR(f->name);
    Py_CLEAR(f->doc);
    Py_CLEAR(f->core);
    simple_dealloc(self);
}

static void proxy_dealloc(PyObject *self)
{
    Py_CLEAR(((ProxyObject *)self)->orig);
    Py_CLEAR(((ProxyObject *)self)->buffer);
    simple_dealloc(self);
}

static void ns_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Py_CLEAR(((NsObject *)self)->core);
    Py_CLEAR(((NsObject *)self)->detached);
    PyDict_Type.tp_dealloc(self); /* frees through tp_free */
    Py_DECREF(tp);
}

static int ns_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(((NsObject *)self)->core);
    Py_VISIT(((NsObject *)self)->detached);
    return PyDict_Type.tp_traverse(self, visit, arg);
}

static int ns_clear(PyObject *self)
{
    Py_CLEAR(((NsObject *)self)->core);
    Py_CLEAR(((NsObject *)self)->detached);
    return PyDict_Type.tp_clear(self);
}

static PyObject *new_of(PyObject *type)
{
    return ((PyTypeObject *)type)->tp_alloc((PyTypeObject *)type, 0);
}

/* ---- Live bindings ---------------------------------------------------- */

#if defined(__GNUC__) || defined(__clang__)
#define MH_LOAD(T, p) __atomic_load_n((T *)(p), __ATOMIC_RELAXED)
#define MH_STORE(T, p, v) __atomic_store_n((T *)(p), (T)(v), __ATOMIC_RELAXED)
#define MH_LOADF(T, p, out) __atomic_load((T *)(p), (out), __ATOMIC_RELAXED)
#define MH_STOREF(T, p, in) __atomic_store((T *)(p), (in), __ATOMIC_RELAXED)
#else
#define MH_LOAD(T, p) (*(volatile T *)(p))
#define MH_STORE(T, p, v) (*(volatile T *)(p) = (T)(v))
#define MH_LOADF(T, p, out) (*(out) = *(volatile T *)(p))
#define MH_STOREF(T, p, in) (*(volatile T *)(p) = *(in))
#endif

static PyObject *binding_get(BindingObject *b)
{
    void *a = b->addr;
    switch (b->type) {
    case MANHOLE_BOOL:
        return PyBool_FromLong(MH_LOAD(_Bool, a));
    case MANHOLE_INT:
        return PyLong_FromLong(MH_LOAD(int, a));
    case MANHOLE_UINT:
        return PyLong_FromUnsignedLong(MH_LOAD(unsigned, a));
    case MANHOLE_LONG:
        return PyLong_FromLong(MH_LOAD(long, a));
    case MANHOLE_ULONG:
        return PyLong_FromUnsignedLong(MH_LOAD(unsigned long, a));
    case MANHOLE_LLONG:
        return PyLong_FromLongLong(MH_LOAD(long long, a));
    case MANHOLE_ULLONG:
        return PyLong_FromUnsignedLongLong(MH_LOAD(unsigned long long, a));
    case MANHOLE_SIZE:
        return PyLong_FromSize_t(MH_LOAD(size_t, a));
    case MANHOLE_FLOAT: {
        float f;
        MH_LOADF(float, a, &f);
        return PyFloat_FromDouble(f);
    }
    case MANHOLE_DOUBLE: {
        double d;
        MH_LOADF(double, a, &d);
        return PyFloat_FromDouble(d);
    }
    case MANHOLE_STRING: {
        const char *s = MH_LOAD(const char *, a);
        if (!s)
            Py_RETURN_NONE;
        return PyUnicode_DecodeUTF8(s, (Py_ssize_t)strlen(s), "replace");
    }
    }
    Py_RETURN_NONE;
}

static int hostcall_run(manhole *mh, hostcall *hc, int any_thread);

/* Convert v for a binding of type t into hc->val (with range checks). */
static int binding_convert(int t, PyObject *v, hostcall *hc)
{
    if (t == MANHOLE_FLOAT || t == MANHOLE_DOUBLE) {
        double d = PyFloat_AsDouble(v);
        if (d == -1.0 && PyErr_Occurred())
            return -1;
        hc->val.d = d;
        return 0;
    }
    if (t == MANHOLE_BOOL) {
        int b = PyObject_IsTrue(v);
        if (b < 0)
            return -1;
        hc->val.i = b;
        return 0;
    }
    if (!PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "an int is required, not %.100s",
                     Py_TYPE(v)->tp_name);
        return -1;
    }
    int is_unsigned = t == MANHOLE_UINT || t == MANHOLE_ULONG ||
                      t == MANHOLE_ULLONG || t == MANHOLE_SIZE;
    if (is_unsigned) {
        unsigned long long u = PyLong_AsUnsignedLongLong(v);
        if (u == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
        unsigned long long max = t == MANHOLE_UINT    ? UINT_MAX
                                 : t == MANHOLE_ULONG ? ULONG_MAX
                                 : t == MANHOLE_SIZE  ? SIZE_MAX
                                                      : ULLONG_MAX;
        if (u > max) {
            PyErr_SetString(PyExc_OverflowError, "value out of range");
            return -1;
        }
        hc->val.u = u;
        return 0;
    }
    long long i = PyLong_AsLongLong(v);
    if (i == -1 && PyErr_Occurred())
        return -1;
    long long lo = t == MANHOLE_INT ? INT_MIN : t == MANHOLE_LONG ? LONG_MIN : LLONG_MIN;
    long long hi = t == MANHOLE_INT ? INT_MAX : t == MANHOLE_LONG ? LONG_MAX : LLONG_MAX;
    if (i < lo || i > hi) {
        PyErr_SetString(PyExc_OverflowError, "value out of range");
        return -1;
    }
    hc->val.i = i;
    return 0;
}

static void binding_store(hostcall *hc)
{
    void *a = hc->addr;
    switch (hc->type) {
    case MANHOLE_BOOL: MH_STORE(_Bool, a, hc->val.i != 0); break;
    case MANHOLE_INT: MH_STORE(int, a, hc->val.i); break;
    case MANHOLE_UINT: MH_STORE(unsigned, a, hc->val.u); break;
    case MANHOLE_LONG: MH_STORE(long, a, hc->val.i); break;
    case MANHOLE_ULONG: MH_STORE(unsigned long, a, hc->val.u); break;
    case MANHOLE_LLONG: MH_STORE(long long, a, hc->val.i); break;
    case MANHOLE_ULLONG: MH_STORE(unsigned long long, a, hc->val.u); break;
    case MANHOLE_SIZE: MH_STORE(size_t, a, hc->val.u); break;
    case MANHOLE_FLOAT: {
        float f = (float)hc->val.d;
        MH_STOREF(float, a, &f);
        break;
    }
    case MANHOLE_DOUBLE: MH_STOREF(double, a, &hc->val.d); break;
    }
}

static int binding_set(CoreObject *core, BindingObject *b, PyObject *key,
                       PyObject *v)
{
    if (!v || !(b->flags & MANHOLE_WRITABLE)) {
        PyErr_Format(PyExc_AttributeError,
                     "'%U' is bound to a read-only C variable", key);
        return -1;
    }
    hostcall hc;
    memset(&hc, 0, sizeof hc);
    hc.kind = HC_STORE;
    hc.type = b->type;
    hc.addr = b->addr;
    if (binding_convert(b->type, v, &hc) < 0)
        return -1;
    if (!core->mh) {
        PyErr_SetString(PyExc_RuntimeError, "the manhole is closed");
        return -1;
    }
    return hostcall_run(core->mh, &hc, 0);
}

/* The live binding of key in namespace self: a borrowed Binding, or NULL
 * (with an exception set on error) when key is not bound there, or was
 * `del`eted there. */
static PyObject *ns_binding(PyObject *self, PyObject *key)
{
    NsObject *ns = (NsObject *)self;
    CoreObject *core = (CoreObject *)ns->core;
    if (!core || !core->bindings || !PyDict_GET_SIZE(core->bindings) ||
        !PyUnicode_CheckExact(key))
        return NULL;
    PyObject *b = PyDict_GetItemWithError(core->bindings, key);
    if (b && ns->detached) {
        int gone = PySet_Contains(ns->detached, key);
        if (gone)
            return NULL; /* (or -1: the error is set) */
    }
    return b;
}

static PyObject *ns_subscript(PyObject *self, PyObject *key)
{
    PyObject *b = ns_binding(self, key);
    if (b)
        return binding_get((BindingObject *)b);
    if (PyErr_Occurred())
        return NULL;
    return PyDict_Type.tp_as_mapping->mp_subscript(self, key);
}

/* Assigning a bound name writes the C variable (or raises); `del` of a
 * bound name removes it from this namespace only: from then on the name is
 * an ordinary one here (undefined until assigned), while the host's
 * variable, the host's other namespaces and other clients' copies keep the
 * binding. */
static int ns_ass_subscript(PyObject *self, PyObject *key, PyObject *v)
{
    PyObject *b = ns_binding(self, key);
    if (b && v)
        return binding_set((CoreObject *)((NsObject *)self)->core,
                           (BindingObject *)b, key, v);
    if (PyErr_Occurred())
        return -1;
    if (b) {
        NsObject *ns = (NsObject *)self;
        if (!ns->detached && !(ns->detached = PySet_New(NULL)))
            return -1;
        if (PySet_Add(ns->detached, key) < 0)
            return -1;
        /* the value seen by dict methods, if this namespace has one */
        if (PyDict_Type.tp_as_mapping->mp_ass_subscript(self, key, NULL) < 0 &&
            PyErr_ExceptionMatches(PyExc_KeyError))
            PyErr_Clear();
        return PyErr_Occurred() ? -1 : 0;
    }
    return PyDict_Type.tp_as_mapping->mp_ass_subscript(self, key, v);
}

/* ---- C functions ------------------------------------------------------ */

#define MH_MAX_ARGS 32
#define HC_CANCELLED (-1000)

/* Call (or store) on whatever thread we are; results copied. GIL not
 * held. */
static void hostcall_exec(hostcall *hc)
{
    if (hc->kind == HC_STORE) {
        binding_store(hc);
        hc->rc = 0;
        return;
    }
    memset(&hc->ret, 0, sizeof hc->ret);
    hc->ret.type = MANHOLE_NONE;
    hc->err[0] = 0;
    hc->rc = hc->fn(hc->ud, hc->argc, hc->argv, &hc->ret, hc->err,
                    sizeof hc->err);
    if (hc->rc == 0 &&
        (hc->ret.type == MANHOLE_STRING || hc->ret.type == MANHOLE_BYTES)) {
        const char *s = hc->ret.s ? hc->ret.s : "";
        size_t n = hc->ret.type == MANHOLE_STRING && !hc->ret.len && hc->ret.s
                       ? strlen(s)
                       : hc->ret.len;
        hc->ret_copy = malloc(n + 1);
        if (hc->ret_copy) {
            memcpy(hc->ret_copy, s, n);
            hc->ret_copy[n] = 0;
        }
        hc->ret.s = hc->ret_copy;
        hc->ret.len = n;
    }
}

/* Run hc on the host thread: right here if this is the host thread (or
 * if any_thread), otherwise queued for the host's next turn while this
 * thread waits without the GIL. GIL held on entry and exit. Returns 0, or
 * -1 with a Python exception set when cancelled. */
static int hostcall_run(manhole *mh, hostcall *hc, int any_thread)
{
    worker *w = tl_worker;
    if (w && w->mh != mh)
        w = NULL; /* another manhole's worker: only a caller here */
    if (any_thread || tl_host == mh) {
        int on_host = tl_host == mh;
        if (on_host)
            mh->in_callback++; /* the function must not re-enter the library */
        Py_BEGIN_ALLOW_THREADS
        hostcall_exec(hc);
        Py_END_ALLOW_THREADS
        if (on_host)
            mh->in_callback--;
        return 0;
    }
    int cancelled = 0;
    PyThreadState *ts = PyEval_SaveThread();
    pthread_mutex_lock(&mh->lock);
    if (mh->stopping) {
        cancelled = 1;
    } else {
        hc->next = NULL;
        if (mh->hc_tail)
            mh->hc_tail->next = hc;
        else
            mh->hc_head = hc;
        mh->hc_tail = hc;
        wake_host_locked(mh);
        if (w)
            output_release_locked(w, w->c);
        while (!hc->done) {
            if (!hc->started &&
                ((w && (w->timed_out || w->want_int)) || mh->stopping)) {
                /* Give up before the host starts it: unlink. */
                hostcall **pp = &mh->hc_head;
                hostcall *prev = NULL;
                while (*pp && *pp != hc) {
                    prev = *pp;
                    pp = &(*pp)->next;
                }
                if (*pp) {
                    *pp = hc->next;
                    if (mh->hc_tail == hc)
                        mh->hc_tail = prev;
                }
                cancelled = 1;
                break;
            }
            pthread_cond_wait(&mh->hc_cv, &mh->lock);
        }
        if (hc->rc == HC_CANCELLED)
            cancelled = 1;
    }
    pthread_mutex_unlock(&mh->lock);
    PyEval_RestoreThread(ts);
    if (cancelled) {
        if (mh->stopping)
            PyErr_SetString(PyExc_RuntimeError, "the manhole is closing");
        else
            PyErr_SetNone(PyExc_KeyboardInterrupt);
        return -1;
    }
    return 0;
}

static PyObject *cfunc_call(PyObject *self, PyObject *args, PyObject *kw)
{
    CFuncObject *f = (CFuncObject *)self;
    CoreObject *core = (CoreObject *)f->core;
    if (kw && PyDict_GET_SIZE(kw)) {
        PyErr_Format(PyExc_TypeError, "%U() takes no keyword arguments",
                     f->name);
        return NULL;
    }
    if (!core->mh) {
        PyErr_SetString(PyExc_RuntimeError, "the manhole is closed");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if (n > MH_MAX_ARGS) {
        PyErr_Format(PyExc_TypeError, "%U() takes at most %d arguments",
                     f->name, MH_MAX_ARGS);
        return NULL;
    }
    manhole_value argv[MH_MAX_ARGS];
    memset(argv, 0, sizeof argv);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *a = PyTuple_GET_ITEM(args, i);
        manhole_value *v = &argv[i];
        if (a == Py_None) {
            v->type = MANHOLE_NONE;
        } else if (PyBool_Check(a)) {
            v->type = MANHOLE_BOOL;
            v->i = a == Py_True;
        } else if (PyLong_Check(a)) {
            v->type = MANHOLE_LLONG;
            v->i = PyLong_AsLongLong(a);
            if (v->i == -1 && PyErr_Occurred())
                return NULL;
        } else if (PyFloat_Check(a)) {
            v->type = MANHOLE_DOUBLE;
            v->d = PyFloat_AS_DOUBLE(a);
        } else if (PyUnicode_Check(a)) {
            Py_ssize_t len;
            v->type = MANHOLE_STRING;
            v->s = PyUnicode_AsUTF8AndSize(a, &len);
            if (!v->s)
                return NULL;
            v->len = (size_t)len;
        } else if (PyBytes_Check(a)) {
            v->type = MANHOLE_BYTES;
            v->s = PyBytes_AS_STRING(a);
            v->len = (size_t)PyBytes_GET_SIZE(a);
        } else {
            PyErr_Format(PyExc_TypeError,
                         "%U(): argument %zd: cannot pass %.100s to C",
                         f->name, i + 1, Py_TYPE(a)->tp_name);
            return NULL;
        }
    }
    hostcall hc;
    memset(&hc, 0, sizeof hc);
    hc.kind = HC_CALL;
    hc.fn = f->fn;
    hc.ud = f->ud;
    hc.argc = (int)n;
    hc.argv = argv;
    if (hostcall_run(core->mh, &hc, f->flags & MANHOLE_ANY_THREAD) < 0)
        return NULL;
    PyObject *r = NULL;
    if (hc.rc != 0) {
        PyObject *exc = hc.rc == MANHOLE_RAISE_VALUE  ? PyExc_ValueError
                        : hc.rc == MANHOLE_RAISE_TYPE ? PyExc_TypeError
                        : hc.rc == MANHOLE_RAISE_KEY  ? PyExc_KeyError
                                                      : PyExc_RuntimeError;
        hc.err[sizeof hc.err - 1] = 0;
        /* The host's text, maybe cut by its own snprintf: decoded with
         * replacement, so a cut character cannot hide the error. */
        const char *et = hc.err[0] ? hc.err : "error in C function";
        PyObject *m = PyUnicode_DecodeUTF8(et, (Py_ssize_t)strlen(et), "replace");
        if (m) {
            PyErr_SetObject(exc, m);
            Py_DECREF(m);
        }
    } else {
        switch (hc.ret.type) {
        case MANHOLE_BOOL:
            r = PyBool_FromLong(hc.ret.i != 0);
            break;
        case MANHOLE_INT:
        case MANHOLE_LONG:
        case MANHOLE_LLONG:
            r = PyLong_FromLongLong(hc.ret.i);
            break;
        case MANHOLE_UINT:
        case MANHOLE_ULONG:
        case MANHOLE_ULLONG:
        case MANHOLE_SIZE:
            r = PyLong_FromUnsignedLongLong((unsigned long long)hc.ret.i);
            break;
        case MANHOLE_FLOAT:
        case MANHOLE_DOUBLE:
            r = PyFloat_FromDouble(hc.ret.d);
            break;
        case MANHOLE_STRING:
            r = hc.ret_copy ? PyUnicode_DecodeUTF8(hc.ret_copy,
                                                   (Py_ssize_t)hc.ret.len,
                                                   "replace")
                            : PyErr_NoMemory();
            break;
        case MANHOLE_BYTES:
            r = hc.ret_copy ? PyBytes_FromStringAndSize(hc.ret_copy,
                                                        (Py_ssize_t)hc.ret.len)
                            : PyErr_NoMemory();
            break;
        default:
            r = Py_None;
            Py_INCREF(r);
        }
    }
    free(hc.ret_copy);
    return r;
}

static PyObject *cfunc_repr(PyObject *self)
{
    return PyUnicode_FromFormat("<C function %U>", ((CFuncObject *)self)->name);
}

static PyObject *cfunc_get_doc(PyObject *self, void *closure)
{
    MH_UNUSED(closure);
    PyObject *d = ((CFuncObject *)self)->doc;
    Py_INCREF(d);
    return d;
}

static PyObject *cfunc_get_name(PyObject *self, void *closure)
{
    MH_UNUSED(closure);
    PyObject *d = ((CFuncObject *)self)->name;
    Py_INCREF(d);
    return d;
}

static PyGetSetDef cfunc_getset[] = {
    {"__doc__", cfunc_get_doc, NULL, NULL, NULL},
    {"__name__", cfunc_get_name, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL}};

/* ---- Stream proxies and the display hook ----------------------------- */

/* The client whose statement runs on this thread (or that started this
 * thread, while it is connected), or NULL: the host's own threads. */
static client *current_client(void)
{
    worker *w = tl_worker;
    if (w)
        return w->c;
    client *c = tl_bound;
    if (c && !__atomic_load_n(&c->dead, __ATOMIC_RELAXED))
        return c;
    return NULL;
}

/* A completion runs code (attribute lookups) whose output and input are
 * nobody's: dropped, and end of input. */
static int completing(void)
{
    return tl_worker && tl_worker->completing;
}

static PyObject *unsupported(const char *what)
{
    PyObject *io = PyImport_ImportModule("io");
    if (io) {
        PyObject *exc = PyObject_GetAttrString(io, "UnsupportedOperation");
        if (exc) {
            PyErr_SetString(exc, what);
            Py_DECREF(exc);
        }
        Py_DECREF(io);
    }
    return NULL;
}

static PyObject *proxy_forward(PyObject *self, const char *name, PyObject *args,
                               PyObject *kw)
{
    PyObject *m = PyObject_GetAttrString(((ProxyObject *)self)->orig, name);
    if (!m)
        return NULL;
    PyObject *r = PyObject_Call(m, args, kw);
    Py_DECREF(m);
    return r;
}

#define FORWARD(name) proxy_forward(self, name, args, NULL)

static PyObject *proxy_write(PyObject *self, PyObject *arg)
{
    ProxyObject *p = (ProxyObject *)self;
    client *c = current_client();
    if (!c)
        return PyObject_CallMethod(p->orig, "write", "O", arg);
    if (p->kind == K_STDIN)
        return unsupported("not writable");
    const char *s;
    Py_ssize_t n, ret;
    PyObject *tmp = NULL;
    Py_buffer view;
    int have_view = 0;
    if (p->binary) {
        if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
            return NULL;
        have_view = 1;
        s = view.buf;
        n = view.len;
        ret = n;
    } else {
        if (!PyUnicode_Check(arg)) {
            PyErr_Format(PyExc_TypeError, "write() argument must be str, not %.100s",
                         Py_TYPE(arg)->tp_name);
            return NULL;
        }
        ret = PyUnicode_GET_LENGTH(arg);
        /* The session assigned sys.stdout/sys.stderr: its output goes
         * there (and only its own). */
        if (c->over[p->kind])
            return PyObject_CallMethod(c->over[p->kind], "write", "O", arg);
        s = PyUnicode_AsUTF8AndSize(arg, &n);
        if (!s) { /* lone surrogates: show them escaped, never fail */
            PyErr_Clear();
            tmp = PyUnicode_AsEncodedString(arg, "utf-8", "backslashreplace");
            if (!tmp)
                return NULL;
            s = PyBytes_AS_STRING(tmp);
            n = PyBytes_GET_SIZE(tmp);
        }
    }
    if (completing())
        ;
    else if (p->kind == K_STDERR)
        client_error(tl_worker, c, s, (size_t)n);
    else
        client_output(tl_worker, c, s, (size_t)n);
    Py_XDECREF(tmp);
    if (have_view)
        PyBuffer_Release(&view);
    return PyLong_FromSsize_t(ret);
}

static PyObject *proxy_writelines(PyObject *self, PyObject *lines)
{
    PyObject *it = PyObject_GetIter(lines);
    if (!it)
        return NULL;
    PyObject *line;
    while ((line = PyIter_Next(it))) {
        PyObject *r = proxy_write(self, line);
        Py_DECREF(line);
        if (!r) {
            Py_DECREF(it);
            return NULL;
        }
        Py_DECREF(r);
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static void watchdog_kick_locked(manhole *mh, double deadline);
static void say_line(worker *w, client *c, const char *data, size_t len);

/* Take the record at offset off (from the head) out of c's input queue,
 * keeping those before it in place and in order. Lock held. */
static void inq_remove_locked(client *c, size_t off, size_t whole)
{
    char *h = c->inq.p + c->inq.head;
    memmove(h + whole, h, off);
    c->inq.head += whole;
    input_drained_locked(c);
}

/* A statement waits for input: what it does with the client's queued
 * records (lock held; dropped while the client is told something). The
 * first line is its answer. A bad line or a note is said, and waited
 * past, as at the prompt. A hello is answered now (extended mode from
 * here; the W that follows tells the client a line is still awaited). A
 * script stays queued: it runs after the statement. End of input is left
 * for the session. Returns 1 when the wait is over (line holds the
 * answer, or nothing at end of input), 0 to wait on. */
static int input_next_locked(client *c, buf *line, int *told)
{
    size_t off = 0;
    while (buf_used(&c->inq) >= off + 5) {
        const char *h = c->inq.p + c->inq.head + off;
        unsigned char kind = (unsigned char)h[0];
        uint32_t len;
        memcpy(&len, h + 1, 4);
        size_t whole = 5 + (size_t)len;
        if (kind == REC_EOF)
            return 1;
        if (kind == REC_SCRIPT) {
            off += whole;
            continue;
        }
        if (kind == REC_LINE) {
            int ok = buf_add(line, h + 5, len) == 0 && buf_add(line, "\n", 1) == 0;
            inq_remove_locked(c, off, whole);
            if (ok)
                return 1;
            continue;
        }
        buf data = {0};
        buf_add(&data, h + 5, len);
        inq_remove_locked(c, off, whole);
        if (kind == REC_HELLO)
            c->ext = 1;
        pthread_mutex_unlock(&c->mh->lock);
        if (kind == REC_HELLO)
            client_record(NULL, c, 'H', "1", 1);
        else
            say_line(NULL, c, data.p ? data.p : "", data.len);
        buf_free(&data);
        pthread_mutex_lock(&c->mh->lock);
        *told = 0;
    }
    return 0;
}

/* Read one line of the client's input (for input(), pdb, ...), with its
 * "\n"; "" at end of input. Waits for the client in threaded mode (the
 * wait does not count against the statement's timeout); in non-threaded
 * mode only input already received is available. Bad lines get the same
 * message as at the prompt. An interrupt from the client raises
 * KeyboardInterrupt here. NULL with an exception set, or the line. */
static PyObject *stdin_readline(worker *w, client *c, int binary)
{
    manhole *mh = c->mh;
    buf line = {0};
    int interrupted = 0;
    if (!w || w->completing || w->c != c) /* a thread, a completion: no input */
        return binary ? PyBytes_FromStringAndSize("", 0) : PyUnicode_FromString("");
    /* From here the wait is the client's time, not the statement's, and
     * an interrupt is raised here rather than injected by the watchdog. */
    double left = 0;
    pthread_mutex_lock(&mh->lock);
    if (!w->is_host) {
        w->waiting = 1;
        left = w->deadline > 0 ? w->deadline - now_mono() : 0;
        if (w->deadline > 0 && left < 0.001)
            left = 0.001;
        w->deadline = 0;
        w->int_deadline = 0; /* an earlier interrupt was dealt with */
    }
    int injected = w->want_int && w->user_int && w->int_sent;
    pthread_mutex_unlock(&mh->lock);
    if (injected && mh->noop) {
        /* The watchdog may have injected the client's interrupt just
         * before: a call of an empty function raises it if it is still
         * pending, instead of it waiting behind the client's next line. */
        PyObject *r = PyObject_CallObject(mh->noop, NULL);
        if (!r) {
            pthread_mutex_lock(&mh->lock);
            w->waiting = 0;
            if (left > 0) {
                w->deadline = now_mono() + left;
                watchdog_kick_locked(mh, w->deadline);
            }
            pthread_mutex_unlock(&mh->lock);
            return NULL;
        }
        Py_DECREF(r);
    }
    PyThreadState *ts = PyEval_SaveThread();
    pthread_mutex_lock(&mh->lock);
    output_release_locked(w, c); /* an input() prompt, for one */
    int told = 0;
    for (;;) {
        if (c->dead || w->timed_out || mh->stopping || c->exiting)
            break;
        if (w->want_int && w->user_int && !w->int_sent) {
            w->int_sent = 1; /* ours to raise, not the watchdog's */
            w->int_deadline = 0;
            interrupted = 1;
            break;
        }
        if (w->want_int && !w->user_int)
            break; /* closing, or the client is gone */
        if (input_next_locked(c, &line, &told))
            break;
        if (w->is_host)
            break;
        if (!told && c->ext) { /* tell a rich client that we wait for a line */
            pthread_mutex_unlock(&mh->lock);
            client_record(NULL, c, 'W', "", 0);
            pthread_mutex_lock(&mh->lock);
            told = 1;
            continue;
        }
        park_locked(w);
        c->in_waiters++;
        pthread_cond_wait(&c->cv, &mh->lock);
        c->in_waiters--;
    }
    unpark_locked(w);
    if (w->waiting) {
        w->waiting = 0;
        if (left > 0) {
            w->deadline = now_mono() + (left < 0.001 ? 0.001 : left);
            watchdog_kick_locked(mh, w->deadline);
        }
    }
    c->out_nl = 1; /* the client's answer ended the line */
    pthread_mutex_unlock(&mh->lock);
    PyEval_RestoreThread(ts);
    if (interrupted) {
        buf_free(&line);
        PyErr_SetNone(PyExc_KeyboardInterrupt);
        return NULL;
    }
    PyObject *r = binary ? PyBytes_FromStringAndSize(line.p ? line.p : "", (Py_ssize_t)line.len)
                         : PyUnicode_DecodeUTF8(line.p ? line.p : "", (Py_ssize_t)line.len,
                                                "replace");
    buf_free(&line);
    return r;
}

static PyObject *proxy_readline(PyObject *self, PyObject *args)
{
    ProxyObject *p = (ProxyObject *)self;
    client *c = current_client();
    if (!c)
        return FORWARD("readline");
    if (p->kind != K_STDIN)
        return unsupported("not readable");
    if (c->over[SYS_STDIN] && !p->binary) { /* the session's own sys.stdin */
        PyObject *m = PyObject_GetAttrString(c->over[SYS_STDIN], "readline");
        PyObject *r = m ? PyObject_Call(m, args, NULL) : NULL;
        Py_XDECREF(m);
        return r;
    }
    return stdin_readline(tl_worker, c, p->binary);
}

/* Lines until end of input (the client half-closed). */
static PyObject *read_all(PyObject *self)
{
    ProxyObject *p = (ProxyObject *)self;
    client *c = current_client();
    PyObject *list = PyList_New(0);
    if (!list)
        return NULL;
    for (;;) {
        PyObject *line = stdin_readline(tl_worker, c, p->binary);
        if (!line) {
            Py_DECREF(list);
            return NULL;
        }
        if ((p->binary ? PyBytes_GET_SIZE(line) : PyUnicode_GET_LENGTH(line)) == 0) {
            Py_DECREF(line);
            break;
        }
        int r = PyList_Append(list, line);
        Py_DECREF(line);
        if (r < 0) {
            Py_DECREF(list);
            return NULL;
        }
    }
    return list;
}

/* read() gives the client's next line, as before (a person at a prompt
 * has nothing more to give at once, and ending the input would end the
 * session); readlines() and iteration go on to the end of input. */
static PyObject *proxy_read(PyObject *self, PyObject *args)
{
    ProxyObject *p = (ProxyObject *)self;
    client *c = current_client();
    if (!c)
        return FORWARD("read");
    if (p->kind != K_STDIN)
        return unsupported("not readable");
    return stdin_readline(tl_worker, c, p->binary);
}

static PyObject *proxy_readlines(PyObject *self, PyObject *args)
{
    ProxyObject *p = (ProxyObject *)self;
    if (!current_client())
        return FORWARD("readlines");
    if (p->kind != K_STDIN)
        return unsupported("not readable");
    return read_all(self);
}

static PyObject *proxy_iter(PyObject *self)
{
    if (!current_client())
        return PyObject_GetIter(((ProxyObject *)self)->orig);
    Py_INCREF(self);
    return self;
}

static PyObject *proxy_iternext(PyObject *self)
{
    ProxyObject *p = (ProxyObject *)self;
    client *c = current_client();
    if (!c)
        return PyIter_Next(p->orig);
    if (p->kind != K_STDIN)
        return unsupported("not readable");
    PyObject *line = stdin_readline(tl_worker, c, p->binary);
    if (line && (p->binary ? PyBytes_GET_SIZE(line) : PyUnicode_GET_LENGTH(line)) == 0) {
        Py_DECREF(line);
        return NULL; /* StopIteration */
    }
    return line;
}

static PyObject *proxy_flush(PyObject *self, PyObject *args)
{
    if (current_client())
        Py_RETURN_NONE;
    return FORWARD("flush");
}

static PyObject *proxy_close(PyObject *self, PyObject *args)
{
    if (current_client()) /* exit() closes sys.stdin: not ours to close */
        Py_RETURN_NONE;
    return FORWARD("close");
}

static PyObject *proxy_isatty(PyObject *self, PyObject *args)
{
    if (current_client())
        Py_RETURN_FALSE;
    return FORWARD("isatty");
}

static PyObject *proxy_fileno(PyObject *self, PyObject *args)
{
    if (current_client())
        return unsupported("a manhole stream has no file descriptor");
    return FORWARD("fileno");
}

static PyObject *proxy_readable(PyObject *self, PyObject *args)
{
    if (current_client())
        return PyBool_FromLong(((ProxyObject *)self)->kind == K_STDIN);
    return FORWARD("readable");
}

static PyObject *proxy_writable(PyObject *self, PyObject *args)
{
    if (current_client())
        return PyBool_FromLong(((ProxyObject *)self)->kind != K_STDIN);
    return FORWARD("writable");
}

static PyObject *proxy_seekable(PyObject *self, PyObject *args)
{
    if (current_client())
        Py_RETURN_FALSE;
    return FORWARD("seekable");
}

#define PROXY_NOSEEK(fn, name)                                                  \
    static PyObject *fn(PyObject *self, PyObject *args)                        \
    {                                                                          \
        if (current_client())                                                  \
            return unsupported(name);                                          \
        return FORWARD(name);                                                  \
    }
PROXY_NOSEEK(proxy_tell, "tell")
PROXY_NOSEEK(proxy_seek, "seek")
PROXY_NOSEEK(proxy_truncate, "truncate")
PROXY_NOSEEK(proxy_detach, "detach")

/* reconfigure() on a manhole thread changes nothing outside the session
 * (and a client's stream has nothing to change). */
static PyObject *proxy_reconfigure(PyObject *self, PyObject *args, PyObject *kw)
{
    if (current_client())
        Py_RETURN_NONE;
    return proxy_forward(self, "reconfigure", args, kw);
}

static PyObject *proxy_getattr_orig(PyObject *self, const char *name)
{
    return PyObject_GetAttrString(((ProxyObject *)self)->orig, name);
}

static PyObject *proxy_get_encoding(PyObject *self, void *closure)
{
    MH_UNUSED(closure);
    if (current_client())
        return PyUnicode_FromString("utf-8");
    return proxy_getattr_orig(self, "encoding");
}

static PyObject *proxy_get_errors(PyObject *self, void *closure)
{
    MH_UNUSED(closure);
    if (current_client())
        return PyUnicode_FromString("backslashreplace");
    return proxy_getattr_orig(self, "errors");
}

static PyObject *proxy_get_closed(PyObject *self, void *closure)
{
    MH_UNUSED(closure);
    if (current_client())
        Py_RETURN_FALSE;
    return proxy_getattr_orig(self, "closed");
}

static PyObject *proxy_get_name(PyObject *self, void *closure)
{
    MH_UNUSED(closure);
    static const char *const names[] = {"<stdout>", "<stderr>", "<stdin>"};
    if (current_client())
        return PyUnicode_FromString(names[((ProxyObject *)self)->kind]);
    return proxy_getattr_orig(self, "name");
}

static PyObject *proxy_get_mode(PyObject *self, void *closure)
{
    MH_UNUSED(closure);
    ProxyObject *p = (ProxyObject *)self;
    if (current_client())
        return PyUnicode_FromString(p->kind == K_STDIN ? (p->binary ? "rb" : "r")
                                                       : (p->binary ? "wb" : "w"));
    return proxy_getattr_orig(self, "mode");
}

static PyObject *proxy_get_false(PyObject *self, void *closure)
{
    if (current_client())
        Py_RETURN_FALSE;
    return proxy_getattr_orig(self, (const char *)closure);
}

static PyObject *proxy_get_none(PyObject *self, void *closure)
{
    if (current_client())
        Py_RETURN_NONE;
    return proxy_getattr_orig(self, (const char *)closure);
}

static PyObject *make_binary_proxy(ProxyObject *text);

/* The binary side of a text proxy: bytes to and from the same client. */
static PyObject *proxy_get_buffer(PyObject *self, void *closure)
{
    MH_UNUSED(closure);
    ProxyObject *p = (ProxyObject *)self;
    if (p->binary) {
        PyErr_SetString(PyExc_AttributeError, "buffer");
        return NULL;
    }
    if (!p->buffer && !(p->buffer = make_binary_proxy(p)))
        return NULL;
    Py_INCREF(p->buffer);
    return p->buffer;
}

/* Anything else: the original's on the host's threads; on a manhole
 * thread nothing of the process's real stream is reachable. */
static PyObject *proxy_getattro(PyObject *self, PyObject *name)
{
    PyObject *r = PyObject_GenericGetAttr(self, name);
    if (r || !PyErr_ExceptionMatches(PyExc_AttributeError) || current_client())
        return r;
    PyErr_Clear();
    return PyObject_GetAttr(((ProxyObject *)self)->orig, name);
}

static PyMethodDef proxy_methods[] = {
    {"write", proxy_write, METH_O, NULL},
    {"writelines", proxy_writelines, METH_O, NULL},
    {"readline", proxy_readline, METH_VARARGS, NULL},
    {"read", proxy_read, METH_VARARGS, NULL},
    {"readlines", proxy_readlines, METH_VARARGS, NULL},
    {"flush", proxy_flush, METH_VARARGS, NULL},
    {"close", proxy_close, METH_VARARGS, NULL},
    {"isatty", proxy_isatty, METH_VARARGS, NULL},
    {"fileno", proxy_fileno, METH_VARARGS, NULL},
    {"readable", proxy_readable, METH_VARARGS, NULL},
    {"writable", proxy_writable, METH_VARARGS, NULL},
    {"seekable", proxy_seekable, METH_VARARGS, NULL},
    {"tell", proxy_tell, METH_VARARGS, NULL},
    {"seek", proxy_seek, METH_VARARGS, NULL},
    {"truncate", proxy_truncate, METH_VARARGS, NULL},
    {"detach", proxy_detach, METH_VARARGS, NULL},
    {"reconfigure", (PyCFunction)(void (*)(void))proxy_reconfigure,
     METH_VARARGS | METH_KEYWORDS, NULL},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef proxy_getset[] = {
    {"encoding", proxy_get_encoding, NULL, NULL, NULL},
    {"errors", proxy_get_errors, NULL, NULL, NULL},
    {"closed", proxy_get_closed, NULL, NULL, NULL},
    {"name", proxy_get_name, NULL, NULL, NULL},
    {"mode", proxy_get_mode, NULL, NULL, NULL},
    {"buffer", proxy_get_buffer, NULL, NULL, NULL},
    {"line_buffering", proxy_get_false, NULL, NULL, (void *)"line_buffering"},
    {"write_through", proxy_get_false, NULL, NULL, (void *)"write_through"},
    {"newlines", proxy_get_none, NULL, NULL, (void *)"newlines"},
    {NULL, NULL, NULL, NULL, NULL}};

/* sys.displayhook for manhole threads: the interactive interpreter's,
 * except that `_` goes into the statement's namespace, not builtins. A
 * session that assigned sys.displayhook gets its own. */
static PyObject *displayhook(PyObject *orig, PyObject *obj)
{
    client *c = current_client();
    if (!c || completing())
        return PyObject_CallFunctionObjArgs(orig, obj, NULL);
    if (c->over[SYS_HOOK])
        return PyObject_CallFunctionObjArgs(c->over[SYS_HOOK], obj, NULL);
    if (obj == Py_None)
        Py_RETURN_NONE;
    PyObject *globals = PyEval_GetGlobals();
    if (globals && PyDict_SetItemString(globals, "_", Py_None) < 0)
        return NULL;
    PyObject *out = PySys_GetObject("stdout");
    if (!out || out == Py_None) {
        PyErr_SetString(PyExc_RuntimeError, "lost sys.stdout");
        return NULL;
    }
    if (PyFile_WriteObject(obj, out, 0) < 0 || PyFile_WriteString("\n", out) < 0)
        return NULL;
    if (globals && PyDict_SetItemString(globals, "_", obj) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef displayhook_def = {"displayhook", displayhook, METH_O, NULL};

/* ---- sys.stdout & co., per session ------------------------------------ */

/* The sys module gets a class of its own (a ModuleType subclass) whose
 * properties stdout, stderr, stdin and displayhook are read and assigned
 * per session on manhole threads: `sys.stdout = f` (contextlib's
 * redirect_stdout too) sends that session's output to f, and nobody
 * else's, while the module's dict (what print() and the interpreter use)
 * keeps the routing proxies. On the host's threads an assignment sets
 * what the proxy forwards to. */

/* Is v one of the manhole's own objects for sys attribute k, or the
 * original it stands for (an assignment back to it ends a session's
 * own)? */
static int sys_is_ours(PyObject *mod, int k, PyObject *v)
{
    static const char *const dunder[SYS_N] = {"__stdout__", "__stderr__", "__stdin__", NULL};
    PyObject *a = PyObject_GetAttrString(mod, sys_names[k]);
    PyObject *b = dunder[k] ? PyObject_GetAttrString(mod, dunder[k]) : NULL;
    PyErr_Clear();
    int r = v == a || (b && v == b) ||
            (k < SYS_HOOK && a && v == ((ProxyObject *)a)->orig) ||
            (k < SYS_HOOK && b && v == ((ProxyObject *)b)->orig) ||
            (k == SYS_HOOK && a && PyCFunction_Check(a) && v == PyCFunction_GET_SELF(a));
    Py_XDECREF(a);
    Py_XDECREF(b);
    return r;
}

static void sys_assign_for(client *c, int k, PyObject *v)
{
    PyObject *mod = PyDict_GetItemString(PyImport_GetModuleDict(), "_manhole");
    if (!v || v == Py_None || !mod || sys_is_ours(mod, k, v)) {
        Py_CLEAR(c->over[k]);
        return;
    }
    Py_INCREF(v);
    Py_XSETREF(c->over[k], v);
}

static int sys_index(PyObject *name)
{
    const char *n = PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : NULL;
    for (int k = 0; n && k < SYS_N; k++)
        if (strcmp(n, sys_names[k]) == 0)
            return k;
    PyErr_Clear();
    return -1;
}

static PyObject *sys_attr_get(PyObject *self, PyObject *name)
{
    MH_UNUSED(self);
    int k = sys_index(name);
    client *c = current_client();
    if (k >= 0 && c && !completing() && c->over[k]) {
        Py_INCREF(c->over[k]);
        return c->over[k];
    }
    PyObject *v = k >= 0 ? PySys_GetObject(sys_names[k]) : NULL;
    if (!v) {
        PyErr_SetObject(PyExc_AttributeError, name);
        return NULL;
    }
    Py_INCREF(v);
    return v;
}

static PyObject *sys_attr_set(PyObject *self, PyObject *args)
{
    MH_UNUSED(self);
    PyObject *name, *v;
    if (!PyArg_ParseTuple(args, "OO", &name, &v))
        return NULL;
    int k = sys_index(name);
    if (k < 0) {
        PyErr_SetObject(PyExc_AttributeError, name);
        return NULL;
    }
    client *c = current_client();
    if (c && !completing()) {
        sys_assign_for(c, k, v);
        Py_RETURN_NONE;
    }
    PyObject *mod = PyDict_GetItemString(PyImport_GetModuleDict(), "_manhole");
    PyObject *ours = mod ? PyObject_GetAttrString(mod, sys_names[k]) : NULL;
    PyErr_Clear();
    if (k < SYS_HOOK && ours && PySys_GetObject(sys_names[k]) == ours) {
        /* The host's own: the proxy stays, and forwards to v. */
        PyObject *to = v;
        if (PyObject_TypeCheck(v, Py_TYPE(ours)))
            to = ((ProxyObject *)v)->orig; /* sys.__stdout__ & co. */
        Py_INCREF(to);
        Py_XSETREF(((ProxyObject *)ours)->orig, to);
        Py_CLEAR(((ProxyObject *)ours)->buffer);
    } else if (PySys_SetObject(sys_names[k], v) < 0) {
        Py_XDECREF(ours);
        return NULL;
    }
    Py_XDECREF(ours);
    Py_RETURN_NONE;
}

static PyMethodDef sys_get_def = {"sys_get", sys_attr_get, METH_O, NULL};
static PyMethodDef sys_set_def = {"sys_set", sys_attr_set, METH_VARARGS, NULL};

/* Nothing but sys may see the class: type(sys) is what the standard
 * library (types.ModuleType, importlib's new modules, runpy, zipimport)
 * and other code take for "the module type". So types is imported before
 * sys changes class; calling the class (importlib does type(sys)(name))
 * makes a plain module; isinstance() and issubclass() against it answer
 * as for the plain module type; and on any module but sys the properties
 * are the module's own attributes. */
static const char sys_class_src[] =
    "def _make(get, set_):\n"
    "    import sys, types\n"
    "    base = type(sys)\n"
    "    class meta(type):\n"
    "        def __call__(cls, *a, **k):\n"
    "            if cls is own:\n"
    "                return base(*a, **k)\n"
    "            return type.__call__(cls, *a, **k)\n"
    "        def __instancecheck__(cls, x):\n"
    "            return type.__instancecheck__(base if cls is own else cls, x)\n"
    "        def __subclasscheck__(cls, c):\n"
    "            return type.__subclasscheck__(base if cls is own else cls, c)\n"
    "    def prop(n):\n"
    "        def fget(self):\n"
    "            if self is sys:\n"
    "                return get(n)\n"
    "            try:\n"
    "                return self.__dict__[n]\n"
    "            except KeyError:\n"
    "                raise AttributeError(n) from None\n"
    "        def fset(self, v):\n"
    "            if self is sys:\n"
    "                set_(n, v)\n"
    "            else:\n"
    "                self.__dict__[n] = v\n"
    "        return property(fget, fset)\n"
    "    attrs = {n: prop(n) for n in ('stdout', 'stderr', 'stdin', 'displayhook')}\n"
    "    attrs.update(__slots__=(), __module__='builtins', __qualname__='module',\n"
    "                 __doc__=base.__doc__)\n"
    "    own = meta('module', (base,), attrs)\n"
    "    sys.__class__ = own\n"
    "    return base\n";

/* Give sys its class (on = 1; returns the plain module type to restore),
 * or take it back. GIL held. */
static int sys_class(PyObject *mod, int on)
{
    PyObject *sys = PyImport_ImportModule("sys");
    int r = 0;
    if (!sys)
        return -1;
    if (on) {
        PyObject *get = PyCFunction_New(&sys_get_def, NULL);
        PyObject *set = PyCFunction_New(&sys_set_def, NULL);
        PyObject *g = PyDict_New();
        PyObject *base = NULL;
        if (get && set && g) {
            PyDict_SetItemString(g, "__builtins__", PyEval_GetBuiltins());
            PyObject *x = PyRun_String(sys_class_src, Py_file_input, g, g);
            PyObject *make = x ? PyDict_GetItemString(g, "_make") : NULL;
            base = make ? PyObject_CallFunctionObjArgs(make, get, set, NULL) : NULL;
            Py_XDECREF(x);
        }
        if (base)
            PyModule_AddObject(mod, "sys_base", base); /* steals */
        else
            r = -1;
        Py_XDECREF(get);
        Py_XDECREF(set);
        Py_XDECREF(g);
    } else {
        PyObject *base = PyObject_GetAttrString(mod, "sys_base");
        if (base && PyObject_SetAttrString(sys, "__class__", base) == 0)
            PyObject_DelAttrString(mod, "sys_base");
        Py_XDECREF(base);
        PyErr_Clear();
    }
    Py_DECREF(sys);
    return r;
}

/* ---- Threads started from a statement -------------------------------- */

/* _thread.start_new_thread (and 3.13's start_joinable_thread) are wrapped:
 * on a manhole thread the new thread's function is wrapped in turn, so
 * that the thread runs "bound" to the client whose statement started it
 * and its output reaches that client while it is connected. The host's
 * own threads are started unwrapped. */
typedef struct {
    PyObject_HEAD
    PyObject *fn;
    client *c;           /* a reference, until the thread has run */
} TargetObject;

static void bound_release(client *c)
{
    manhole *mh = c->mh;
    pthread_mutex_lock(&mh->lock);
    mh->nbound--;
    client_unref_locked(c);
    pthread_mutex_unlock(&mh->lock);
}

static void target_dealloc(PyObject *self)
{
    TargetObject *t = (TargetObject *)self;
    if (t->c)
        bound_release(t->c);
    t->c = NULL;
    Py_CLEAR(t->fn);
    simple_dealloc(self);
}

static PyObject *target_call(PyObject *self, PyObject *args, PyObject *kw)
{
    TargetObject *t = (TargetObject *)self;
    client *c = t->c, *saved = tl_bound;
    t->c = NULL;
    tl_bound = c;
    PyObject *r = PyObject_Call(t->fn, args, kw);
    tl_bound = saved;
    if (c)
        bound_release(c);
    return r;
}

static PyType_Slot target_slots[] = {{Py_tp_dealloc, MH_FN(target_dealloc)},
                                     {Py_tp_call, MH_FN(target_call)},
                                     {0, NULL}};
static PyType_Spec target_spec = {"_manhole.ThreadTarget", sizeof(TargetObject), 0,
                                  Py_TPFLAGS_DEFAULT, target_slots};

/* fn, to be called once on c's behalf (c NULL: on nobody's). */
static PyObject *target_new(client *c, PyObject *fn)
{
    PyObject *mod = PyDict_GetItemString(PyImport_GetModuleDict(), "_manhole");
    PyObject *type = mod ? PyObject_GetAttrString(mod, "ThreadTarget") : NULL;
    PyObject *t = type ? new_of(type) : NULL;
    Py_XDECREF(type);
    if (!t)
        return NULL;
    TargetObject *to = (TargetObject *)t;
    to->fn = fn;
    Py_INCREF(fn);
    if (c) {
        pthread_mutex_lock(&c->mh->lock);
        c->refs++;
        c->mh->nbound++;
        to->c = c;
        pthread_mutex_unlock(&c->mh->lock);
    }
    return t;
}

static PyObject *start_thread(PyObject *orig, PyObject *args, PyObject *kw)
{
    client *c = current_client();
    if (!c || completing() || PyTuple_GET_SIZE(args) < 1)
        return PyObject_Call(orig, args, kw);
    PyObject *t = target_new(c, PyTuple_GET_ITEM(args, 0));
    PyObject *nargs = t ? PyTuple_GetSlice(args, 0, PyTuple_GET_SIZE(args)) : NULL;
    if (!nargs) {
        Py_XDECREF(t);
        return NULL;
    }
    Py_DECREF(PyTuple_GET_ITEM(nargs, 0));
    PyTuple_SET_ITEM(nargs, 0, t); /* steals t */
    PyObject *r = PyObject_Call(orig, nargs, kw);
    Py_DECREF(nargs);
    return r;
}

static PyMethodDef start_thread_def = {"start_new_thread", (PyCFunction)(void (*)(void))start_thread,
                                       METH_VARARGS | METH_KEYWORDS, NULL};

/* The functions wrapped: in _thread, and the copies threading keeps. */
static const char *const thread_fns[][2] = {
    {"_thread", "start_new_thread"},
    {"_thread", "start_joinable_thread"},
    {"threading", "_start_new_thread"},
    {"threading", "_start_joinable_thread"},
};

static void threads_wrap(PyObject *mod, int on)
{
    PyObject *modules = PyImport_GetModuleDict();
    for (size_t k = 0; k < sizeof thread_fns / sizeof thread_fns[0]; k++) {
        PyObject *m = PyDict_GetItemString(modules, thread_fns[k][0]);
        PyObject *f = m ? PyObject_GetAttrString(m, thread_fns[k][1]) : NULL;
        PyErr_Clear();
        if (!f)
            continue;
        int ours = PyCFunction_Check(f) && PyCFunction_GET_FUNCTION(f) ==
                                               (PyCFunction)(void (*)(void))start_thread;
        if (on && !ours) {
            PyObject *w = PyCFunction_New(&start_thread_def, f);
            if (w)
                PyObject_SetAttrString(m, thread_fns[k][1], w);
            Py_XDECREF(w);
        } else if (!on && ours) {
            PyObject_SetAttrString(m, thread_fns[k][1], PyCFunction_GET_SELF(f));
        }
        Py_DECREF(f);
        PyErr_Clear();
    }
    MH_UNUSED(mod);
}

/* A thread pool's thread runs the tasks of whoever submits them, not only
 * of the client whose statement started it: ThreadPoolExecutor.submit is
 * wrapped (once concurrent.futures.thread is imported) so that each task
 * runs bound to its submitter (bind_task()), and a task the host's own
 * threads submit runs bound to nobody, on a pool thread a client started
 * too. (submit() copies no contextvars before 3.14, so the binding goes
 * with the task itself.) */
static PyObject *bind_task(PyObject *self, PyObject *fn)
{
    MH_UNUSED(self);
    client *c = current_client();
    return target_new(c && !completing() ? c : NULL, fn);
}

static PyMethodDef bind_task_def = {"bind_task", bind_task, METH_O, NULL};

static const char pool_src[] =
    "def _make(bind):\n"
    "    import sys\n"
    "    def patch():\n"
    "        mod = sys.modules.get('concurrent.futures.thread')\n"
    "        cls = getattr(mod, 'ThreadPoolExecutor', None)\n"
    "        orig = getattr(cls, '__dict__', {}).get('submit')\n"
    "        if orig is None or hasattr(orig, '_manhole_orig'):\n"
    "            return\n"
    "        def submit(self, fn, /, *args, **kwargs):\n"
    "            return orig(self, bind(fn), *args, **kwargs)\n"
    "        for a in ('__module__', '__name__', '__qualname__', '__doc__'):\n"
    "            setattr(submit, a, getattr(orig, a))\n"
    "        submit.__wrapped__ = submit._manhole_orig = orig\n"
    "        cls.submit = submit\n"
    "    def unpatch():\n"
    "        mod = sys.modules.get('concurrent.futures.thread')\n"
    "        cls = getattr(mod, 'ThreadPoolExecutor', None)\n"
    "        orig = getattr(getattr(cls, 'submit', None), '_manhole_orig', None)\n"
    "        if orig is not None:\n"
    "            cls.submit = orig\n"
    "    return patch, unpatch\n";

static PyObject *make_from_source(const char *src, PyObject *arg);

/* Make the support module's pool_patch and pool_unpatch (first user). */
static int pools_prepare(PyObject *mod)
{
    PyObject *bind = PyCFunction_New(&bind_task_def, NULL);
    PyObject *fns = bind ? make_from_source(pool_src, bind) : NULL;
    Py_XDECREF(bind);
    int ok = fns && PyTuple_Check(fns) && PyTuple_GET_SIZE(fns) == 2 &&
             PyObject_SetAttrString(mod, "pool_patch", PyTuple_GET_ITEM(fns, 0)) == 0 &&
             PyObject_SetAttrString(mod, "pool_unpatch", PyTuple_GET_ITEM(fns, 1)) == 0;
    Py_XDECREF(fns);
    return ok ? 0 : -1;
}

/* Before a statement: a concurrent.futures.thread imported since the
 * last look gets its submit() wrapped. GIL held. */
static void pools_follow_submitter(manhole *mh)
{
    PyObject *modules = PyImport_GetModuleDict();
    PyObject *m = PyDict_GetItemString(modules, "concurrent.futures.thread");
    if (!m || m == mh->pool_mod)
        return;
    PyObject *mod = PyDict_GetItemString(modules, "_manhole");
    PyObject *r = mod ? PyObject_CallMethod(mod, "pool_patch", NULL) : NULL;
    Py_XDECREF(r);
    PyErr_Clear();
    Py_INCREF(m);
    Py_XSETREF(mh->pool_mod, m);
}

/* The last user: submit() as it was. GIL held. */
static void pools_restore(PyObject *mod)
{
    PyObject *r = PyObject_CallMethod(mod, "pool_unpatch", NULL);
    Py_XDECREF(r);
    PyErr_Clear();
}

/* ---- Completion ------------------------------------------------------- */

/* rlcompleter over the session's namespace, on the word before the
 * cursor as readline delimits it. Imported without readline, so that
 * importing it never touches the host's terminal. */
static const char complete_src[] =
    "def _make():\n"
    "    delims = ' \\t\\n`~!@#$%^&*()-=+[{]}\\\\|;:\\'\",<>/?'\n"
    "    held = []\n"
    "    def complete(ns, text):\n"
    "        if not held:\n"
    "            import sys\n"
    "            had = 'readline' in sys.modules\n"
    "            if not had:\n"
    "                sys.modules['readline'] = None\n"
    "            try:\n"
    "                import rlcompleter\n"
    "            finally:\n"
    "                if not had and sys.modules.get('readline', 0) is None:\n"
    "                    del sys.modules['readline']\n"
    "            held.append(rlcompleter)\n"
    "        i = len(text)\n"
    "        while i > 0 and text[i - 1] not in delims:\n"
    "            i -= 1\n"
    "        word = text[i:]\n"
    "        if not word:\n"
    "            return 0, []\n"
    "        c = held[0].Completer(ns)\n"
    "        out = []\n"
    "        for state in range(5000):\n"
    "            m = c.complete(word, state)\n"
    "            if m is None:\n"
    "                break\n"
    "            if m not in out:\n"
    "                out.append(m)\n"
    "        out.sort()\n"
    "        return len(word), out\n"
    "    return complete\n";

static PyObject *make_from_source(const char *src, PyObject *arg)
{
    PyObject *g = PyDict_New();
    if (!g)
        return NULL;
    PyObject *r = NULL, *made = NULL;
    PyDict_SetItemString(g, "__builtins__", PyEval_GetBuiltins());
    r = PyRun_String(src, Py_file_input, g, g);
    PyObject *make = r ? PyDict_GetItemString(g, "_make") : NULL;
    if (make)
        made = arg ? PyObject_CallFunctionObjArgs(make, arg, NULL)
                   : PyObject_CallFunctionObjArgs(make, NULL);
    Py_XDECREF(r);
    Py_DECREF(g);
    return made;
}

/* ---- The support module ---------------------------------------------- */

static PyType_Slot core_slots[] = {{Py_tp_dealloc, MH_FN(core_dealloc)}, {0, NULL}};
static PyType_Spec core_spec = {"_manhole.Core", sizeof(CoreObject), 0,
                                Py_TPFLAGS_DEFAULT, core_slots};
static PyType_Slot binding_slots[] = {{Py_tp_dealloc, MH_FN(simple_dealloc)}, {0, NULL}};
static PyType_Spec binding_spec = {"_manhole.Binding", sizeof(BindingObject), 0,
                                   Py_TPFLAGS_DEFAULT, binding_slots};
static PyType_Slot ns_slots[] = {
    {Py_tp_dealloc, MH_FN(ns_dealloc)},
    {Py_tp_traverse, MH_FN(ns_traverse)},
    {Py_tp_clear, MH_FN(ns_clear)},
    {Py_mp_subscript, MH_FN(ns_subscript)},
    {Py_mp_ass_subscript, MH_FN(ns_ass_subscript)},
    {Py_tp_doc, (void *)"A manhole namespace: a dict whose names bound to C "
                        "variables read their live value."},
    {0, NULL}};
static PyType_Spec ns_spec = {"_manhole.Namespace", sizeof(NsObject), 0,
                              Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, ns_slots};
static PyType_Slot cfunc_slots[] = {{Py_tp_dealloc, MH_FN(cfunc_dealloc)},
                                    {Py_tp_call, MH_FN(cfunc_call)},
                                    {Py_tp_repr, MH_FN(cfunc_repr)},
                                    {Py_tp_getset, cfunc_getset},
                                    {0, NULL}};
static PyType_Spec cfunc_spec = {"_manhole.CFunction", sizeof(CFuncObject), 0,
                                 Py_TPFLAGS_DEFAULT, cfunc_slots};
static PyType_Slot proxy_slots[] = {{Py_tp_dealloc, MH_FN(proxy_dealloc)},
                                    {Py_tp_methods, proxy_methods},
                                    {Py_tp_iter, MH_FN(proxy_iter)},
                                    {Py_tp_iternext, MH_FN(proxy_iternext)},
                                    {Py_tp_getset, proxy_getset},
                                    {Py_tp_getattro, MH_FN(proxy_getattro)},
                                    {0, NULL}};
static PyType_Spec proxy_spec = {"_manhole.StreamProxy", sizeof(ProxyObject), 0,
                                 Py_TPFLAGS_DEFAULT, proxy_slots};

static int mod_add_type(PyObject *mod, const char *name, PyType_Spec *spec,
                        PyObject *base)
{
    /* The bases as a tuple: 3.8 and 3.9 take nothing else. */
    PyObject *bases = base ? PyTuple_Pack(1, base) : NULL;
    if (base && !bases)
        return -1;
    PyObject *t = bases ? PyType_FromSpecWithBases(spec, bases) : PyType_FromSpec(spec);
    Py_XDECREF(bases);
    if (!t)
        return -1;
    int r = PyModule_AddObject(mod, name, t);
    if (r < 0)
        Py_DECREF(t);
    return r;
}

static PyObject *make_proxy(PyObject *mod, const char *sysname, int kind)
{
    PyObject *type = PyObject_GetAttrString(mod, "StreamProxy");
    if (!type)
        return NULL;
    PyObject *p = new_of(type);
    Py_DECREF(type);
    if (!p)
        return NULL;
    PyObject *orig = PySys_GetObject(sysname);
    ((ProxyObject *)p)->orig = orig ? orig : Py_None;
    Py_INCREF(((ProxyObject *)p)->orig);
    ((ProxyObject *)p)->kind = kind;
    return p;
}

static PyObject *make_binary_proxy(ProxyObject *text)
{
    PyObject *p = new_of((PyObject *)Py_TYPE(text));
    if (!p)
        return NULL;
    ProxyObject *b = (ProxyObject *)p;
    b->orig = PyObject_GetAttrString(text->orig, "buffer");
    if (!b->orig) { /* an original without one (io.StringIO, None) */
        PyErr_Clear();
        b->orig = Py_None;
        Py_INCREF(Py_None);
    }
    b->kind = text->kind;
    b->binary = 1;
    return p;
}

static const char *const proxied[] = {"stdout", "stderr", "stdin"};
/* sys.__stdout__ & co. get proxies of their own, routed the same way: the
 * "restore stdout" idiom (sys.stdout = sys.__stdout__) then keeps every
 * client's output its own, and a session can be told apart from one
 * that never assigned sys.stdout. */
static const char *const proxied_dunder[] = {"__stdout__", "__stderr__", "__stdin__"};

static PyObject *make_glue(void);

/* Find or create the support module; the first user installs the stream
 * proxies and the display hook. GIL held. Returns a borrowed reference. */
static PyObject *support_acquire(int python_started_here, PyThreadState *ts)
{
    PyObject *modules = PyImport_GetModuleDict();
    PyObject *mod = PyDict_GetItemString(modules, "_manhole");
    if (!mod) {
        mod = PyModule_New("_manhole");
        if (!mod)
            return NULL;
        if (PyDict_SetItemString(modules, "_manhole", mod) < 0) {
            Py_DECREF(mod);
            return NULL;
        }
        Py_DECREF(mod); /* sys.modules holds it */
        if (mod_add_type(mod, "Core", &core_spec, NULL) < 0 ||
            mod_add_type(mod, "Binding", &binding_spec, NULL) < 0 ||
            mod_add_type(mod, "Namespace", &ns_spec, (PyObject *)&PyDict_Type) < 0 ||
            mod_add_type(mod, "CFunction", &cfunc_spec, NULL) < 0 ||
            mod_add_type(mod, "StreamProxy", &proxy_spec, NULL) < 0 ||
            PyModule_AddIntConstant(mod, "users", 0) < 0 ||
            PyModule_AddIntConstant(mod, "owned", python_started_here) < 0 ||
            PyModule_AddObject(mod, "glue", make_glue()) < 0 ||
            PyModule_AddObject(mod, "main_ts",
                               PyCapsule_New(ts ? (void *)ts : (void *)mod,
                                             "_manhole.main_ts", NULL)) < 0)
            goto fail;
    }
    if (!PyObject_HasAttrString(mod, "ThreadTarget") &&
        mod_add_type(mod, "ThreadTarget", &target_spec, NULL) < 0)
        goto fail;
    PyObject *u = PyObject_GetAttrString(mod, "users");
    if (!u)
        goto fail;
    long users = PyLong_AsLong(u);
    Py_DECREF(u);
    if (users == 0) {
        for (int k = 0; k < 6; k++) {
            const char *name = k < 3 ? proxied[k] : proxied_dunder[k - 3];
            PyObject *p = make_proxy(mod, name, k % 3);
            if (!p)
                goto fail;
            PyModule_AddObject(mod, name, p); /* steals */
            Py_INCREF(p);
            PySys_SetObject(name, p);
            Py_DECREF(p);
        }
        PyObject *orig = PySys_GetObject("displayhook");
        PyObject *hook = PyCFunction_New(&displayhook_def, orig ? orig : Py_None);
        if (!hook)
            goto fail;
        PySys_SetObject("displayhook", hook);
        PyModule_AddObject(mod, "displayhook", hook);
        if (sys_class(mod, 1) < 0 || pools_prepare(mod) < 0)
            goto fail;
    }
    PyObject *nu = PyLong_FromLong(users + 1);
    if (!nu || PyObject_SetAttrString(mod, "users", nu) < 0) {
        Py_XDECREF(nu);
        goto fail;
    }
    Py_DECREF(nu);
    return mod;
fail:
    return NULL;
}

/* Drop one user; the last one puts the original streams back. Returns
 * 1 if the caller should finalize Python (last user, and a manhole
 * started it), with *ts the thread state to finalize from. GIL held. */
static int support_release(PyThreadState **ts)
{
    PyObject *modules = PyImport_GetModuleDict();
    PyObject *mod = PyDict_GetItemString(modules, "_manhole");
    if (!mod)
        return 0;
    Py_INCREF(mod);
    int finalize = 0;
    PyObject *u = PyObject_GetAttrString(mod, "users");
    long users = u ? PyLong_AsLong(u) : 1;
    Py_XDECREF(u);
    PyErr_Clear();
    users--;
    PyObject *nu = PyLong_FromLong(users);
    if (nu) {
        PyObject_SetAttrString(mod, "users", nu);
        Py_DECREF(nu);
    }
    if (users <= 0) {
        for (int k = 0; k < 6; k++) {
            const char *name = k < 3 ? proxied[k] : proxied_dunder[k - 3];
            PyObject *p = PyObject_GetAttrString(mod, name);
            if (p && PySys_GetObject(name) == p)
                PySys_SetObject(name, ((ProxyObject *)p)->orig);
            Py_XDECREF(p);
        }
        threads_wrap(mod, 0);
        pools_restore(mod);
        sys_class(mod, 0);
        PyObject *hook = PyObject_GetAttrString(mod, "displayhook");
        if (hook && PySys_GetObject("displayhook") == hook)
            PySys_SetObject("displayhook", PyCFunction_GET_SELF(hook));
        Py_XDECREF(hook);
        PyObject *owned = PyObject_GetAttrString(mod, "owned");
        PyObject *cap = PyObject_GetAttrString(mod, "main_ts");
        if (owned && PyObject_IsTrue(owned) == 1 && cap) {
            finalize = 1;
            *ts = PyCapsule_GetPointer(cap, "_manhole.main_ts");
        }
        Py_XDECREF(owned);
        Py_XDECREF(cap);
        PyErr_Clear();
        for (int k = 0; k < 6; k++) {
            const char *name = k < 3 ? proxied[k] : proxied_dunder[k - 3];
            if (PyObject_HasAttrString(mod, name))
                PyObject_DelAttrString(mod, name);
        }
        if (PyObject_HasAttrString(mod, "displayhook"))
            PyObject_DelAttrString(mod, "displayhook");
        PyErr_Clear();
        if (!finalize)
            PyDict_DelItemString(modules, "_manhole");
        PyErr_Clear();
    }
    Py_DECREF(mod);
    return finalize;
}

/* ---- The stacks() helper --------------------------------------------- */

static const char stacks_src[] =
    "def _make(_names):\n"
    "    def stacks(file=None):\n"
    "        \"\"\"Print the current Python stack of every thread, labelled\n"
    "        by thread name. Threads running no Python code are listed too.\"\"\"\n"
    "        import sys, threading, traceback\n"
    "        out = sys.stdout if file is None else file\n"
    "        names = {t.ident: t.name for t in threading.enumerate()}\n"
    "        for ident, label in _names().items():\n"
    "            known = names.get(ident)\n"
    "            same = known is not None and label.startswith(known)\n"
    "            names[ident] = '%s, %s' % (known, label) if known and not same else label\n"
    "        here = threading.get_ident()\n"
    "        frames = sys._current_frames()\n"
    "        frames[here] = sys._getframe(1)  # from the caller, not stacks()\n"
    "        shown = set(frames) | {t.ident for t in threading.enumerate()}\n"
    "        for ident in sorted(shown, key=lambda i: (i != here, i not in frames, i)):\n"
    "            name = names.get(ident, 'thread %d' % ident)\n"
    "            note = ' (running stacks())' if ident == here else ''\n"
    "            print('Thread %r (ident %d)%s:' % (name, ident, note), file=out)\n"
    "            if ident in frames:\n"
    "                print(''.join(traceback.format_stack(frames[ident])), end='', file=out)\n"
    "            else:\n"
    "                print('  (no Python code running)', file=out)\n"
    "        print('%d threads, %d running Python code' % (len(shown), len(frames)), file=out)\n"
    "    return stacks\n";

static PyObject *thread_names(PyObject *self, PyObject *noargs)
{
    MH_UNUSED(noargs);
    manhole *mh = ((CoreObject *)self)->mh;
    PyObject *d = PyDict_New();
    if (!d || !mh)
        return d;
    pthread_mutex_lock(&mh->lock);
    for (worker *w = mh->workers; w; w = w->next) {
        char name[64];
        if (w->exited) /* (not reaped yet) */
            continue;
        if (w->c)
            snprintf(name, sizeof name, "manhole worker %d (client #%u)",
                     w->index, w->c->id);
        else
            snprintf(name, sizeof name, "manhole worker %d", w->index);
        PyObject *k = PyLong_FromUnsignedLong(w->py_tid);
        PyObject *v = PyUnicode_FromString(name);
        if (k && v && w->py_tid)
            PyDict_SetItem(d, k, v);
        Py_XDECREF(k);
        Py_XDECREF(v);
    }
    if (mh->host_py_tid) {
        PyObject *k = PyLong_FromUnsignedLong(mh->host_py_tid);
        PyObject *v = PyUnicode_FromString("manhole host thread");
        if (k && v)
            PyDict_SetItem(d, k, v);
        Py_XDECREF(k);
        Py_XDECREF(v);
    }
    pthread_mutex_unlock(&mh->lock);
    PyErr_Clear();
    return d;
}

static PyMethodDef thread_names_def = {"_thread_names", thread_names,
                                       METH_NOARGS, NULL};

static PyObject *make_stacks(PyObject *core)
{
    PyObject *g = PyDict_New();
    if (!g)
        return NULL;
    PyObject *r = NULL, *names = NULL, *stacks = NULL;
    PyDict_SetItemString(g, "__builtins__", PyEval_GetBuiltins());
    r = PyRun_String(stacks_src, Py_file_input, g, g);
    if (!r)
        goto out;
    names = PyCFunction_New(&thread_names_def, core);
    PyObject *make = PyDict_GetItemString(g, "_make");
    if (names && make)
        stacks = PyObject_CallFunctionObjArgs(make, names, NULL);
out:
    Py_XDECREF(r);
    Py_XDECREF(names);
    Py_DECREF(g);
    return stacks;
}

/* ---- What the interactive loop does that codeop does not ----------- */

/* Python glue, one per interpreter (kept in the support module):
 * syntax_error() reports an error as the interactive loop does;
 * thread_exit() takes an ending worker out of threading's registry; on 3.13+
 * compile_numbered() and forget() give statements the "<stdin>-N" names
 * and linecache entries that 3.13's loop gives them. */
static const char glue_src[] =
    "import sys, warnings\n"
    "def syntax_error(source, filename, flags, at_eof):\n"
    "    # The error compiling source (codeop found one, or end of input\n"
    "    # left a block open), as the interactive loop reports it: its\n"
    "    # tokenizer sees the newline typed after the last line, so an error\n"
    "    # at the end of a line gets its caret there, and it never reports\n"
    "    # 'incomplete input' (codeop's last compile leaks that in 3.10 and\n"
    "    # in Debian's 3.11.2). Warnings were shown by codeop already.\n"
    "    # None: no error (at end of input), or the input is incomplete\n"
    "    # after all: 3.8's and 3.9's codeop probes with warnings made\n"
    "    # errors, and so refuses a block holding '\\d' that the loop\n"
    "    # takes; probed with warnings ignored (its logic otherwise), the\n"
    "    # block goes on.\n"
    "    with warnings.catch_warnings():\n"
    "        warnings.simplefilter('ignore')\n"
    "        try:\n"
    "            compile(source, filename, 'single', flags, True)\n"
    "            return None\n"
    "        except SyntaxError as e:\n"
    "            err = e\n"
    "        if not at_eof and sys.version_info < (3, 10):\n"
    "            try:\n"
    "                compile(source + '\\n', filename, 'single', flags, True)\n"
    "                return None\n"
    "            except SyntaxError as e:\n"
    "                if repr(e) != repr(err):\n"
    "                    return None\n"
    "    if at_eof and sys.version_info < (3, 9) and err.msg == 'unexpected EOF while parsing':\n"
    "        return None  # 3.8's loop ends there without a word\n"
    "    if sys.version_info >= (3, 10) and err.text and err.text.endswith('\\n'):\n"
    "        err.text = err.text[:-1]  # as the 3.10+ tokenizer keeps it\n"
    "    return err\n"
    "def thread_exit():\n"
    "    # A worker is a C thread: once its code asked threading who it is\n"
    "    # (current_thread(): logging does, and so does naming the worker),\n"
    "    # threading registered a _DummyThread for it, which it keeps after\n"
    "    # the thread ends (before 3.13): an exited worker stayed in\n"
    "    # threading.enumerate() and stacks(), and a thread that got its\n"
    "    # ident later took its entry over. It goes with the worker.\n"
    "    threading = sys.modules.get('threading')\n"
    "    if threading is None:\n"
    "        return\n"
    "    ident = threading.get_ident()\n"
    "    with threading._active_limbo_lock:\n"
    "        if isinstance(threading._active.get(ident), threading._DummyThread):\n"
    "            del threading._active[ident]\n"
    "count = 0\n"
    "recent = []\n"
    "def fix_text(err, source):\n"
    "    # 3.13+: a SyntaxError out of a statement that parsed gets the\n"
    "    # statement's line as its text, as the interactive loop does.\n"
    "    lines = source.splitlines(True)\n"
    "    if isinstance(err.lineno, int) and 0 < err.lineno <= len(lines):\n"
    "        err.text = lines[err.lineno - 1]\n"
    "def compile_numbered(tree, filename, flags, source):\n"
    "    global count\n"
    "    name = '%s-%d' % (filename, count)\n"
    "    count += 1\n"
    "    try:\n"
    "        code = compile(tree, name, 'single', flags, True)\n"
    "    except SyntaxError as e:\n"
    "        fix_text(e, source)\n"
    "        raise\n"
    "    import linecache\n"
    "    by_code = hasattr(linecache, '_interactive_cache')\n"
    "    linecache._register_code(code if by_code else name, source, filename)\n"
    "    return code\n"
    "def forget(code):\n"
    "    # A statement that defined no function, class or generator never\n"
    "    # runs again: only the last 100 such keep their lines, so a client\n"
    "    # sending millions of statements does not grow linecache.\n"
    "    import linecache\n"
    "    if hasattr(linecache, '_interactive_cache') or any(\n"
    "            isinstance(k, type(code)) for k in code.co_consts):\n"
    "        return\n"
    "    recent.append(code.co_filename)\n"
    "    if len(recent) > 100:\n"
    "        linecache.cache.pop(recent.pop(0), None)\n";

static PyObject *make_glue(void)
{
    PyObject *g = PyDict_New();
    if (!g || PyDict_SetItemString(g, "__builtins__", PyEval_GetBuiltins()) < 0) {
        Py_XDECREF(g);
        return NULL;
    }
    PyObject *r = PyRun_String(glue_src, Py_file_input, g, g);
    if (!r) {
        Py_DECREF(g);
        return NULL;
    }
    Py_DECREF(r);
    return g;
}

/* Replace the pending SyntaxError with the one the interactive loop
 * reports for text (see syntax_error above). GIL held. */
static void interactive_syntax_error(client *c, PyObject *text, int at_eof)
{
    int flags = c->cc_flags;
#ifdef PyCF_ALLOW_INCOMPLETE_INPUT
    flags &= ~PyCF_ALLOW_INCOMPLETE_INPUT;
#endif
    PyObject *fn = PyDict_GetItemString(c->mh->glue, "syntax_error");
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyObject *e = fn ? PyObject_CallFunction(fn, "OOii", text, c->mh->filename, flags, at_eof)
                     : NULL;
    if (e) { /* None: no error after all */
        if (e != Py_None)
            PyErr_SetObject((PyObject *)Py_TYPE(e), e);
        Py_XDECREF(t);
        Py_XDECREF(v);
        Py_XDECREF(tb);
    } else { /* the glue failed: codeop's error stands */
        PyErr_Clear();
        PyErr_Restore(t, v, tb);
    }
    Py_XDECREF(e);
}

/* ---- Sessions --------------------------------------------------------- */

static PyObject *ns_new(manhole *mh)
{
    PyObject *ns = PyObject_CallObject(mh->ns_type, NULL);
    if (!ns)
        return NULL;
    Py_INCREF(mh->core);
    ((NsObject *)ns)->core = mh->core;
    return ns;
}

/* With one shared namespace in a Python the library started itself, the
 * namespace is __main__'s dict, as python3 -i's is: classes defined at the
 * prompt pickle, `import __main__` sees the session's names. A module's
 * dict is a plain dict, so the module is given the namespace instead,
 * with the entries the interpreter put there (__builtins__, __loader__,
 * __spec__, ...). A __main__ that is not a plain module is left alone. */
static int ns_become_main(PyObject *ns)
{
    PyObject *main = PyImport_AddModule("__main__"); /* borrowed */
    if (!main)
        return -1;
    Py_ssize_t off = Py_TYPE(main)->tp_dictoffset;
    PyObject **slot = off > 0 ? (PyObject **)(void *)((char *)main + off) : NULL;
    PyObject *old = PyModule_CheckExact(main) ? PyModule_GetDict(main) : NULL;
    if (!slot || !old || *slot != old)
        return 0;
    if (PyDict_Update(ns, old) < 0)
        return -1;
    Py_INCREF(ns);
    *slot = ns;
    Py_DECREF(old);
    return 0;
}

/* The flags codeop compiles this session's input with: its own
 * (PyCF_DONT_IMPLY_DEDENT | PyCF_ALLOW_INCOMPLETE_INPUT) plus the
 * __future__ features seen so far. It keeps them in compiler.compiler.flags;
 * we keep a copy for the fast path, and hand back what the fast path
 * learns. */
static int sync_flags_from_codeop(client *c)
{
    PyObject *cc = PyObject_GetAttrString(c->compiler, "compiler");
    PyObject *f = cc ? PyObject_GetAttrString(cc, "flags") : NULL;
    long v = f ? PyLong_AsLong(f) : -1;
    Py_XDECREF(cc);
    Py_XDECREF(f);
    if (v == -1 && PyErr_Occurred())
        return -1;
    c->cc_flags = (int)v;
    return 0;
}

static void sync_flags_to_codeop(client *c)
{
    PyObject *cc = PyObject_GetAttrString(c->compiler, "compiler");
    PyObject *f = PyLong_FromLong(c->cc_flags);
    if (!cc || !f || PyObject_SetAttrString(cc, "flags", f) < 0)
        PyErr_Clear();
    Py_XDECREF(cc);
    Py_XDECREF(f);
}

/* Compile one input as codeop.CommandCompiler does: a code object,
 * Py_None for incomplete input, or NULL with the exception set.
 *
 * For complete input codeop returns compile(source, filename, "single",
 * flags, True) with its flags; the fast path makes exactly that call
 * once, from C, instead of codeop's two compiles under
 * warnings.catch_warnings(). Anything else (incomplete input, errors) goes
 * to codeop itself, so those keep its exact behaviour, and an error is
 * then reported as the interactive loop reports it (syntax_error in the
 * glue). (One difference is left: a statement whose compilation warns and
 * then fails in the code generator shows the warning twice.)
 *
 * 3.13+: the interactive loop parses a statement under "<stdin>", then
 * compiles it under "<stdin>-N" and keeps its lines in linecache, so that
 * tracebacks and warnings show them; so does the fast path here
 * (compile_numbered in the glue). */
static PyObject *compile_input(client *c, PyObject *src, const char *utf8)
{
    manhole *mh = c->mh;
    /* codeop compiles blank or comment-only input as "pass" */
    const char *p = utf8;
    int blank = 1;
    while (*p && blank) {
        while (*p == ' ' || *p == '\t' || *p == '\f' || *p == '\r')
            p++;
        if (*p && *p != '\n' && *p != '#')
            blank = 0;
        while (*p && *p != '\n')
            p++;
        if (*p)
            p++;
    }
#if PY_VERSION_HEX >= 0x030D0000
    PyCompilerFlags cf = {c->cc_flags | PyCF_ONLY_AST, PY_MINOR_VERSION};
    PyObject *code = NULL;
    PyObject *tree = Py_CompileStringObject(blank ? "pass" : utf8, mh->filename,
                                            Py_single_input, &cf, -1);
    if (tree) {
        PyObject *fn = PyDict_GetItemString(mh->glue, "compile_numbered");
        code = fn ? PyObject_CallFunction(fn, "OOiO", tree, mh->filename, c->cc_flags, src)
                  : NULL;
        Py_DECREF(tree);
        if (!code)
            return NULL; /* the compiler's error, named "<stdin>-N" */
        cf.cf_flags = ((PyCodeObject *)code)->co_flags;
    }
#else
    PyCompilerFlags cf = {c->cc_flags, PY_MINOR_VERSION};
    PyObject *code = Py_CompileStringObject(blank ? "pass" : utf8, mh->filename,
                                            Py_single_input, &cf, -1);
#endif
    if (code) {
        int futures = cf.cf_flags & PyCF_MASK;
        if ((c->cc_flags | futures) != c->cc_flags) { /* a new __future__ */
            c->cc_flags |= futures;
            sync_flags_to_codeop(c);
        }
        return code;
    }
    PyErr_Clear();
    code = PyObject_CallFunctionObjArgs(c->compiler, src, mh->filename, mh->single, NULL);
    if (code && code != Py_None && sync_flags_from_codeop(c) < 0)
        PyErr_Clear();
    if (!code && PyErr_ExceptionMatches(PyExc_SyntaxError)) {
        PyObject *typed = PyUnicode_FromFormat("%U\n", src); /* the newline typed */
        if (typed)
            interactive_syntax_error(c, typed, 0);
        Py_XDECREF(typed);
        if (!PyErr_Occurred()) { /* incomplete after all (3.8, 3.9) */
            code = Py_None;
            Py_INCREF(code);
        }
    }
    return code;
}

/* Give a client its namespace and compiler, at its first statement. */
static int session_open(client *c)
{
    manhole *mh = c->mh;
    if (mh->cfg.shared_namespace) {
        c->ns = mh->ns;
        Py_INCREF(c->ns);
    } else {
        c->ns = ns_new(mh);
        if (!c->ns || PyDict_Update(c->ns, mh->ns) < 0)
            goto fail;
    }
    c->compiler = PyObject_CallObject(mh->compiler_cls, NULL);
    if (!c->compiler || sync_flags_from_codeop(c) < 0)
        goto fail;
    pthread_mutex_lock(&mh->lock);
    c->has_session = 1;
    pthread_mutex_unlock(&mh->lock);
    return 0;
fail:
    Py_CLEAR(c->ns);
    Py_CLEAR(c->compiler);
    return -1;
}

static void mask_for_python(worker *w, client *c);
static void mask_for_worker(worker *w);

/* Dropping the session runs its objects' finalizers (__del__, weakref
 * callbacks): on a worker, with the host's signal mask, as a statement.
 * GIL held. */
static void session_close(client *c)
{
    worker *w = tl_worker;
    if (w)
        mask_for_python(w, c);
    Py_CLEAR(c->ns);
    Py_CLEAR(c->compiler);
    for (int k = 0; k < SYS_N; k++)
        Py_CLEAR(c->over[k]);
    for (int k = 0; k < 3; k++)
        Py_CLEAR(c->last_exc[k]);
    if (w)
        mask_for_worker(w);
    buf_free(&c->src);
    pthread_mutex_lock(&c->mh->lock);
    c->has_session = 0;
    pthread_mutex_unlock(&c->mh->lock);
}

/* How a client's statement (or what the library ran for it) ended.
 * RUN_TIMEOUT: code the library ran on the host thread outran the
 * timeout (reported; the session goes on). */
enum { RUN_OK, RUN_ABANDONED, RUN_EXIT, RUN_TIMEOUT };

static int guard_begin(worker *w, client *c);
static int guard_expired(worker *w);
static int guard_end(worker *w, client *c);

/* str() of a prompt object. A str is taken as it is; anything else is
 * the user's code, run guarded. NULL: it failed (the default prompt is
 * shown), or it ran out of time on a worker (*rc is RUN_ABANDONED: the
 * watchdog showed the prompt). GIL held. */
static PyObject *prompt_str(worker *w, client *c, PyObject *p, int *rc)
{
    *rc = RUN_OK;
    if (PyUnicode_CheckExact(p)) {
        Py_INCREF(p);
        return p;
    }
    if (guard_begin(w, c) < 0)
        return NULL;
    PyObject *str = PyObject_Str(p);
    *rc = guard_end(w, c);
    if (*rc != RUN_OK)
        Py_CLEAR(str);
    if (*rc == RUN_TIMEOUT)
        *rc = RUN_OK; /* (the default prompt follows the report) */
    PyErr_Clear();
    return str;
}

/* Prompts are kept whole up to PROMPT_MAX bytes (past that, cut on a
 * character boundary), for those who show one without the GIL: a new
 * client's greeting, a hello's reply, the watchdog's report. */
#define PROMPT_MAX 4096

/* Remember a prompt as computed (UTF-8). Lock held. */
static void prompt_set_locked(manhole *mh, int more, const char *s, size_t n)
{
    n = utf8_cut(s, n, PROMPT_MAX);
    if (mh->prompt[more] && mh->prompt_len[more] == n && memcmp(mh->prompt[more], s, n) == 0)
        return;
    char *t = malloc(n + 1);
    if (!t)
        return; /* the one before stays */
    memcpy(t, s, n);
    t[n] = 0;
    free(mh->prompt[more]);
    mh->prompt[more] = t;
    mh->prompt_len[more] = n;
}

/* The prompt last computed (the default before any). Lock held. */
static const char *prompt_get_locked(manhole *mh, int more, size_t *n)
{
    if (!mh->prompt[more]) {
        *n = 4;
        return more ? "... " : ">>> ";
    }
    *n = mh->prompt_len[more];
    return mh->prompt[more];
}

/* The remembered prompt to c, as its mode wants it: a P record, or the
 * text. Lock held. */
static void prompt_out_locked(client *c, int more)
{
    size_t n;
    const char *s = prompt_get_locked(c->mh, more, &n);
    if (c->ext) {
        buf b = {0};
        buf_add(&b, more ? "2" : "1", 1);
        buf_add(&b, s, n);
        record_build(&c->out, 'P', b.p, b.len);
        c->out_tail_e = 0;
        buf_free(&b);
    } else {
        buf_add(&c->out, s, n);
    }
    c->out_nl = 1;
}

/* The prompt as the interactive interpreter would print it: str(sys.ps1)
 * or str(sys.ps2) when set, else ">>> " / "... ". The text is remembered
 * so the host and the watchdog can show it without the GIL. Returns
 * RUN_ABANDONED if str() outran the timeout, else RUN_OK. */
static int write_prompt(worker *w, client *c, int more)
{
    manhole *mh = c->mh;
    const char *name = more ? "ps2" : "ps1";
    const char *s = more ? "... " : ">>> ";
    Py_ssize_t n = 4;
    PyObject *str = NULL;
    PyObject *p = PySys_GetObject(name);
    if (p) {
        int rc;
        str = prompt_str(w, c, p, &rc);
        if (rc != RUN_OK)
            return rc;
        const char *t = str ? PyUnicode_AsUTF8AndSize(str, &n) : NULL;
        if (t)
            s = t;
        else {
            PyErr_Clear();
            n = 4;
        }
    }
    pthread_mutex_lock(&mh->lock);
    prompt_set_locked(mh, more, s, (size_t)n);
    int ext = c->ext;
    pthread_mutex_unlock(&mh->lock);
    if (ext) {
        /* A rich client learns how the statement ended, and gets the
         * prompt as a record it can redraw. */
        if (c->raised >= 0) {
            client_record(w, c, 'S', c->raised ? "1" : "0", 1);
            c->raised = -1;
        }
        buf b = {0};
        buf_add(&b, more ? "2" : "1", 1);
        buf_add(&b, s, (size_t)n);
        client_record(w, c, 'P', b.p, b.len);
        buf_free(&b);
    } else {
        client_output(w, c, s, (size_t)n);
    }
    pthread_mutex_lock(&mh->lock);
    c->out_nl = 1; /* what the client types next ends the prompt's line */
    pthread_mutex_unlock(&mh->lock);
    Py_XDECREF(str);
    return RUN_OK;
}

/* Hand an exception to sys.excepthook; if the hook fails, show its error
 * and then the exception plainly, as Python does (unless the hook was
 * stopped for outrunning the timeout: the watchdog reported that). */
static void exception_hook(worker *w, PyObject *t, PyObject *v, PyObject *tbo)
{
    PyObject *hook = PySys_GetObject("excepthook");
    PyObject *r = hook ? PyObject_CallFunctionObjArgs(hook, t, v, tbo, NULL) : NULL;
    if (!r && !(w && guard_expired(w))) {
        if (PyErr_Occurred()) {
            PyObject *t2, *v2, *tb2;
            PyErr_Fetch(&t2, &v2, &tb2);
            PyErr_NormalizeException(&t2, &v2, &tb2);
            PyObject *err = PySys_GetObject("stderr");
            if (err)
                PyFile_WriteString("Error in sys.excepthook:\n", err);
            PyErr_Display(t2, v2, tb2);
            if (err)
                PyFile_WriteString("\nOriginal exception was:\n", err);
            Py_XDECREF(t2);
            Py_XDECREF(v2);
            Py_XDECREF(tb2);
        }
        PyErr_Display(t, v, tbo);
    }
    Py_XDECREF(r);
    PyErr_Clear();
}

/* Print the pending exception as the interactive interpreter does, through
 * sys.excepthook, to the client's stderr. A syntax error is shown without
 * the compiler's frames, as Python shows it. The hook (and the str() of
 * the exception) runs as guarded code. Returns RUN_ABANDONED if it outran
 * the timeout, else RUN_OK. GIL held. */
static int show_exception(int syntax)
{
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    if (!t)
        return RUN_OK;
    PyErr_NormalizeException(&t, &v, &tb);
    if (!v) {
        v = Py_None;
        Py_INCREF(v);
    }
    if (syntax) {
        Py_CLEAR(tb);
        if (PyExceptionInstance_Check(v)) {
            PyException_SetTraceback(v, Py_None);
            PyException_SetContext(v, NULL);
            PyException_SetCause(v, NULL);
        }
    } else if (tb && PyExceptionInstance_Check(v)) {
        PyException_SetTraceback(v, tb);
    }
    PyObject *tbo = tb ? tb : Py_None;
    PySys_SetObject("last_type", t);
    PySys_SetObject("last_value", v);
    PySys_SetObject("last_traceback", tbo);
#if PY_VERSION_HEX >= 0x030C0000
    PySys_SetObject("last_exc", v);
#endif
    worker *w = tl_worker;
    client *c = w ? w->c : NULL;
    int rc = RUN_OK;
    if (c) { /* the session's own, for pdb.pm() in its next statement */
        PyObject *keep[3] = {t, v, tbo};
        for (int k = 0; k < 3; k++) {
            Py_INCREF(keep[k]);
            Py_XSETREF(c->last_exc[k], keep[k]);
        }
        c->raised = 1;
        if (guard_begin(w, c) == 0) {
            exception_hook(w, t, v, tbo);
            rc = guard_end(w, c);
            if (rc == RUN_TIMEOUT)
                rc = RUN_OK;
        }
    } else {
        exception_hook(NULL, t, v, tbo);
    }
    Py_XDECREF(t);
    Py_XDECREF(v);
    Py_XDECREF(tb);
    PyErr_Clear();
    return rc;
}

static void timeout_report(worker *w, client *c)
{
    char msg[160];
    pthread_mutex_lock(&c->mh->lock);
    int nl = !c->out_nl; /* after partial output: a line of its own */
    pthread_mutex_unlock(&c->mh->lock);
    snprintf(msg, sizeof msg,
             "%sTimeoutError: statement timed out after %g seconds; "
             "KeyboardInterrupt sent to it\n",
             nl ? "\n" : "", c->mh->cfg.timeout);
    client_error(w, c, msg, strlen(msg));
    c->raised = 1;
}

/* Did this SystemExit come from exit()/quit() (site's Quitter), rather
 * than sys.exit()? Its innermost frame tells. The error stays set. */
static int exit_is_quitter(void)
{
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    int quitter = 0;
    PyObject *cur = tb;
    Py_XINCREF(cur);
    while (cur && cur != Py_None) {
        PyObject *next = PyObject_GetAttrString(cur, "tb_next");
        if (!next || next == Py_None) {
            Py_XDECREF(next);
            break;
        }
        Py_DECREF(cur);
        cur = next;
    }
    if (cur && cur != Py_None) {
        /* (the module may be frozen: its name, not its file, tells) */
        PyObject *f = PyObject_GetAttrString(cur, "tb_frame");
        PyObject *g = f ? PyObject_GetAttrString(f, "f_globals") : NULL;
        PyObject *name = g && PyDict_Check(g) ? PyDict_GetItemString(g, "__name__") : NULL;
        const char *s = name && PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : NULL;
        quitter = s && strcmp(s, "_sitebuiltins") == 0;
        Py_XDECREF(f);
        Py_XDECREF(g);
    }
    Py_XDECREF(cur);
    PyErr_Clear();
    PyErr_Restore(t, v, tb);
    return quitter;
}

/* The exit status a SystemExit asks for: its code, or for any other
 * argument 1, the argument printed first, as Python does. */
static int exit_status(worker *w, client *c, PyObject *v)
{
    int status = 0;
    PyObject *code = v ? PyObject_GetAttrString(v, "code") : NULL;
    PyErr_Clear();
    if (code && code != Py_None) {
        if (PyLong_Check(code)) {
            long l = PyLong_AsLong(code);
            if (l == -1 && PyErr_Occurred()) {
                PyErr_Clear();
                l = -1;
            }
            status = (int)l;
        } else {
            PyObject *s = PyObject_Str(code);
            const char *txt = s ? PyUnicode_AsUTF8(s) : NULL;
            if (txt) {
                buf m = {0};
                buf_add(&m, txt, strlen(txt));
                buf_add(&m, "\n", 1);
                client_error(w, c, m.p, m.len);
                buf_free(&m);
            }
            PyErr_Clear();
            Py_XDECREF(s);
            status = 1;
        }
    }
    Py_XDECREF(code);
    return status;
}

/* SystemExit in a client: note the status, end the session. sys.exit(n)
 * is reported to the host; exit() and quit() (leave) end this client's
 * session only, as at end of input. A rich client learns the status
 * either way (X record). Returns RUN_EXIT; if reading the argument
 * outran the timeout, the session goes on: RUN_ABANDONED (a worker, see
 * guard_end()) or RUN_OK. GIL held. */
static int handle_exit(worker *w, client *c, int leave)
{
    manhole *mh = c->mh;
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    int status = 0, rc = RUN_OK;
    if (guard_begin(w, c) == 0) {
        status = exit_status(w, c, v);
        rc = guard_end(w, c);
    }
    Py_XDECREF(t);
    Py_XDECREF(v);
    Py_XDECREF(tb);
    if (rc == RUN_ABANDONED)
        return rc;
    if (rc == RUN_TIMEOUT) /* reported: the session goes on */
        return RUN_OK;
    if (c->ext) { /* a rich client learns the status before the close */
        char st[24];
        int n = snprintf(st, sizeof st, "%d", status);
        client_record(w, c, 'X', st, (size_t)n);
    }
    pthread_mutex_lock(&mh->lock);
    c->exiting = 1;
    c->leaving = (unsigned char)leave;
    c->exit_status = status;
    buf_clear(&c->inq);
    mark_dirty_locked(c);
    if (!leave)
        LOG_LOCKED(mh, MANHOLE_LOG_INFO, "client #%u called sys.exit(%d)", c->id,
                   status);
    pthread_mutex_unlock(&mh->lock);
    return RUN_EXIT;
}

static void watchdog_ensure_locked(manhole *mh);

/* Mark the start and end of a running statement; the watchdog watches
 * the deadline in between. take_intr: an interrupt the client sent
 * before it began is for this code (a statement), not for the prompt. */
static int stmt_begin(worker *w, client *c, int take_intr)
{
    manhole *mh = c->mh;
    pthread_mutex_lock(&mh->lock);
    if (c->dead || mh->stopping) { /* nobody is waiting for it */
        pthread_mutex_unlock(&mh->lock);
        return -1;
    }
    w->c = c;
    w->running = 1;
    w->timed_out = 0;
    w->want_int = 0;
    w->int_sent = 0;
    w->user_int = 0;
    w->int_deadline = 0;
    w->deadline = mh->cfg.timeout > 0 ? now_mono() + mh->cfg.timeout : 0;
    if (take_intr && c->intr_pending) { /* the client interrupted just before it began */
        c->intr_pending = 0;
        w->user_int = 1;
        w->int_deadline = now_mono() + INTERRUPT_GRACE;
        w->want_int = 1;
        watchdog_ensure_locked(mh);
        pthread_cond_signal(&mh->wd_cv);
    }
    /* Wake the watchdog only if it would otherwise look too late: a new
     * deadline is usually later than the one it already sleeps to. */
    if (w->deadline > 0 && (mh->wd_wake_at == 0 || w->deadline < mh->wd_wake_at)) {
        watchdog_ensure_locked(mh);
        mh->wd_wake_at = w->deadline;
        pthread_cond_signal(&mh->wd_cv);
    }
    pthread_mutex_unlock(&mh->lock);
    return 0;
}

/* The watchdog's KeyboardInterrupt reached a statement that may have
 * ended before it raised it: let it raise now, where it is caught,
 * rather than cancel it. PyThreadState_SetAsyncExc(id, NULL) would
 * cancel it, but it signals the eval breaker again whatever it cancels,
 * and on 3.8 to 3.12 only the thread's next async exception clears that
 * signal: Python then stops at every check for the rest of the process,
 * and 3.11's tracing (settrace, setprofile, pdb, cProfile) loops on it
 * forever. A loop's backward jump checks the eval breaker on every
 * version. GIL held. */
static void interrupt_consume(void)
{
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyObject *g = PyDict_New();
    PyObject *code = Py_CompileString("for _ in range(8): pass\n", "<manhole>",
                                      Py_file_input);
    if (g && code && PyDict_SetItemString(g, "__builtins__", PyEval_GetBuiltins()) == 0) {
        PyObject *r = PyEval_EvalCode(code, g, g);
        Py_XDECREF(r);
    }
    Py_XDECREF(code);
    Py_XDECREF(g);
    PyErr_Clear(); /* the KeyboardInterrupt, if it was still pending */
    PyErr_Restore(t, v, tb);
}

/* Returns 1 if the statement timed out. GIL held. */
static int stmt_end(worker *w)
{
    manhole *mh = w->mh;
    pthread_mutex_lock(&mh->lock);
    w->running = 0;
    w->deadline = 0;
    int sent = w->int_sent;
    int timed_out = w->timed_out;
    if (w->is_host) /* it stays set on abandoned workers only */
        w->timed_out = 0;
    pthread_mutex_unlock(&mh->lock);
    if (sent) /* an interrupt that came too late must not leak out */
        interrupt_consume();
    return timed_out;
}

/* A statement runs with the host's signal mask (workers block every
 * signal: the host's signals are the host's), so that the processes and
 * threads it starts inherit a normal one; so does any Python code the
 * library runs for a client (guard_begin()). */
static void mask_for_python(worker *w, client *c)
{
    if (!w->is_host)
        pthread_sigmask(SIG_SETMASK, &c->mh->host_sigmask, NULL);
}

static void block_signals(void);

static void mask_for_worker(worker *w)
{
    if (!w->is_host)
        block_signals();
}

/* A child forked by Python code the library ran, back in the library: it
 * has no manhole to return to (the parent's session goes on there). */
static void forked_exit(client *c, int ok)
{
    if (mh_forked(c->mh)) {
        PyErr_Clear();
        _exit(ok ? 0 : 1);
    }
}

/* Python code the library runs for a client around its statements (its
 * sys.excepthook, str() of sys.ps1 or of a SystemExit's argument) follows
 * a statement's rules: the host's signal mask, the statement timeout
 * (interrupted, then abandoned as a statement is), output to the client.
 * Returns -1 when nobody waits for it (the client gone, the manhole
 * closing): the caller does without. GIL held. */
static int guard_begin(worker *w, client *c)
{
    if (stmt_begin(w, c, 0) < 0)
        return -1;
    mask_for_python(w, c);
    return 0;
}

/* Has the watchdog found it past its deadline? */
static int guard_expired(worker *w)
{
    pthread_mutex_lock(&w->mh->lock);
    int r = w->timed_out;
    pthread_mutex_unlock(&w->mh->lock);
    return r;
}

/* The end of guarded code. If it outran the timeout: RUN_ABANDONED on a
 * worker (the watchdog answered the client, another worker serves it
 * now), RUN_TIMEOUT on the host thread (reported here). GIL held. */
static int guard_end(worker *w, client *c)
{
    mask_for_worker(w);
    forked_exit(c, !PyErr_Occurred());
    if (!stmt_end(w))
        return RUN_OK;
    PyErr_Clear();
    if (!w->is_host)
        return RUN_ABANDONED;
    timeout_report(w, c);
    return RUN_TIMEOUT;
}

/* Is a statement other than this thread's running? */
static int others_running(manhole *mh)
{
    int n = 0;
    pthread_mutex_lock(&mh->lock);
    for (worker *w = mh->workers; w; w = w->next)
        if (w->running && w != tl_worker)
            n++;
    pthread_mutex_unlock(&mh->lock);
    return n > 0;
}

/* After a statement: what it did to the process-wide hooks is made the
 * session's own. sys.stdout, sys.stderr and sys.displayhook go back to the
 * manhole's (so other clients' output stays theirs); an object the session
 * assigned keeps receiving the session's output; assigning back the
 * original (sys.__stdout__, sys.__displayhook__) ends that. A debugger's
 * trace function ends with the statement: the worker thread serves other
 * clients next. GIL held. */
static int sys_is_ours(PyObject *mod, int k, PyObject *v);
static void sys_assign_for(client *c, int k, PyObject *v);

static void session_hooks_after(client *c)
{
    PyObject *mod = PyDict_GetItemString(PyImport_GetModuleDict(), "_manhole");
    for (int k = 0; mod && k < SYS_N; k++) {
        /* Assignments go through the sys module's class (sys_attr_set);
         * this catches what went around it (sys.__dict__, C code). */
        PyObject *ours = PyObject_GetAttrString(mod, sys_names[k]);
        PyObject *now = PySys_GetObject(sys_names[k]); /* borrowed */
        if (!ours) {
            PyErr_Clear();
            continue;
        }
        if (now != ours) {
            if (!now || sys_is_ours(mod, k, now) || !others_running(c->mh))
                sys_assign_for(c, k, now);
            /* else: another client's statement ran meanwhile, and whose
             * assignment this was cannot be told: nobody's. */
            PySys_SetObject(sys_names[k], ours);
        }
        Py_DECREF(ours);
    }
    PyEval_SetTrace(NULL, NULL);
    PyEval_SetProfile(NULL, NULL);
    PyErr_Clear();
}

/* Before a statement: sys.last_* are the session's own (pdb.pm()); a
 * thread pool's tasks will write to whoever submits them. */
static void session_hooks_before(client *c)
{
    pools_follow_submitter(c->mh);
    if (!c->last_exc[1])
        return;
    PySys_SetObject("last_type", c->last_exc[0]);
    PySys_SetObject("last_value", c->last_exc[1]);
    PySys_SetObject("last_traceback", c->last_exc[2]);
#if PY_VERSION_HEX >= 0x030C0000
    PySys_SetObject("last_exc", c->last_exc[1]);
#endif
}

static int run_code(worker *w, client *c, PyObject *code, PyObject *src)
{
    PyObject *ns = c->ns;
    if (stmt_begin(w, c, 1) < 0)
        return RUN_OK;
    session_hooks_before(c);
    Py_INCREF(ns);
    mask_for_python(w, c);
    PyObject *r = PyEval_EvalCode(code, ns, ns);
    mask_for_worker(w);
    forked_exit(c, r != NULL);
    int timed_out = stmt_end(w);
    Py_DECREF(ns);
    {
        PyObject *t, *v, *tb;
        PyErr_Fetch(&t, &v, &tb);
        session_hooks_after(c);
        PyErr_Restore(t, v, tb);
    }
    if (timed_out && !w->is_host) {
        /* The watchdog already answered the client; whatever this
         * statement did after that is nobody's business. */
        Py_XDECREF(r);
        PyErr_Clear();
        return RUN_ABANDONED;
    }
    if (r) {
        Py_DECREF(r);
        c->raised = 0;
        return RUN_OK;
    }
    pthread_mutex_lock(&c->mh->lock);
    int gone = c->dead;
    pthread_mutex_unlock(&c->mh->lock);
    if (timed_out || gone) {
        PyErr_Clear();
        if (!gone)
            timeout_report(w, c);
        return RUN_OK;
    }
    if (PyErr_ExceptionMatches(PyExc_SystemExit)) {
        return handle_exit(w, c, exit_is_quitter());
    }
#if PY_VERSION_HEX >= 0x030D0000
    if (src && PyErr_ExceptionMatches(PyExc_SyntaxError)) { /* eval('1 +'), for one */
        PyObject *t, *v, *tb;
        PyErr_Fetch(&t, &v, &tb);
        PyErr_NormalizeException(&t, &v, &tb);
        PyObject *fn = PyDict_GetItemString(c->mh->glue, "fix_text");
        PyObject *fixed = fn && v ? PyObject_CallFunctionObjArgs(fn, v, src, NULL) : NULL;
        Py_XDECREF(fixed);
        PyErr_Clear();
        PyErr_Restore(t, v, tb);
    }
#else
    MH_UNUSED(src);
#endif
    return show_exception(0);
}

/* One input line, as code.InteractiveConsole.push() handles it. */
static int session_line(worker *w, client *c, const char *line, size_t len,
                        int prompt)
{
    if (!c->ns && session_open(c) < 0) {
        if (show_exception(0) != RUN_OK)
            return RUN_ABANDONED;
        client_error_str(w, c, "manhole: cannot start a Python session\n");
        return prompt ? write_prompt(w, c, 0) : RUN_OK;
    }
    manhole *mh = c->mh;
    if (buf_used(&c->src) + len + 1 > mh->cfg.max_input) {
        /* A block may not grow without bound either. */
        char msg[96];
        snprintf(msg, sizeof msg, "manhole: block longer than %zu bytes discarded\n",
                 mh->cfg.max_input);
        buf_free(&c->src);
        c->src_compile = 0;
        client_error_str(w, c, msg);
        c->raised = 1;
        return prompt ? write_prompt(w, c, 0) : RUN_OK;
    }
    if (buf_used(&c->src) > 0)
        buf_add(&c->src, "\n", 1);
    buf_add(&c->src, line, len);
    buf_add(&c->src, "", 1); /* NUL-terminate (not counted) */
    c->src.len--;
    PyObject *src = PyUnicode_DecodeUTF8(c->src.p + c->src.head,
                                         (Py_ssize_t)buf_used(&c->src),
                                         "surrogateescape");
    double t0 = now_mono();
    PyObject *code = src ? compile_input(c, src, c->src.p + c->src.head) : NULL;
    int more = 0, rc = RUN_OK;
    if (code == Py_None) {
        /* As codeop does, each line recompiles the whole block: a huge
         * one gets slow. Its compiling gets the statement timeout. */
        c->src_compile += now_mono() - t0;
        if (mh->cfg.timeout > 0 && c->src_compile > mh->cfg.timeout) {
            char msg[128];
            snprintf(msg, sizeof msg,
                     "manhole: block discarded: compiling it took longer than "
                     "the %g s timeout\n",
                     mh->cfg.timeout);
            Py_CLEAR(code);
            Py_XDECREF(src);
            buf_free(&c->src);
            c->src_compile = 0;
            client_error_str(w, c, msg);
            c->raised = 1;
            return prompt ? write_prompt(w, c, 0) : RUN_OK;
        }
    }
    if (!code) {
        buf_clear(&c->src);
        c->src_compile = 0;
        rc = show_exception(1);
    } else if (code == Py_None) {
        more = 1;
    } else {
        c->src_compile = 0;
        buf_clear(&c->src);
        rc = run_code(w, c, code, src);
#if PY_VERSION_HEX >= 0x030D0000
        PyObject *fn = PyDict_GetItemString(mh->glue, "forget");
        PyObject *r = fn ? PyObject_CallFunctionObjArgs(fn, code, NULL) : NULL;
        Py_XDECREF(r);
        PyErr_Clear();
#endif
    }
    Py_XDECREF(code);
    Py_XDECREF(src);
    if (prompt && rc == RUN_OK)
        rc = write_prompt(w, c, more);
    return rc;
}

/* A script from the extended channel ("filename\nsource"): compiled and
 * run as `python -c` runs its argument, in the session's namespace. */
static int session_script(worker *w, client *c, const char *data, size_t len)
{
    buf_clear(&c->src); /* a half-entered block is dropped */
    c->src_compile = 0;
    if (!c->ns && session_open(c) < 0) {
        if (show_exception(0) != RUN_OK)
            return RUN_ABANDONED;
        client_error_str(w, c, "manhole: cannot start a Python session\n");
        return write_prompt(w, c, 0);
    }
    const char *nl = memchr(data, '\n', len);
    size_t fl = nl ? (size_t)(nl - data) : 0;
    size_t sl = nl ? len - fl - 1 : len;
    char *src = malloc(sl + 1);
    PyObject *fname = PyUnicode_DecodeUTF8(data, (Py_ssize_t)fl, "replace");
    int rc = RUN_OK;
    if (!src || !fname) {
        PyErr_Clear();
        client_error_str(w, c, "manhole: out of memory\n");
        c->raised = 1;
    } else {
        memcpy(src, nl ? nl + 1 : data, sl);
        src[sl] = 0;
        PyCompilerFlags cf = {0, PY_MINOR_VERSION};
        PyObject *code = Py_CompileStringObject(src, fname, Py_file_input, &cf, -1);
        if (!code)
            rc = show_exception(1);
        else
            rc = run_code(w, c, code, NULL);
        Py_XDECREF(code);
    }
    free(src);
    Py_XDECREF(fname);
    if (rc == RUN_OK)
        rc = write_prompt(w, c, 0);
    return rc;
}

/* A message of the framer's (a bad line, a note) to the client's stderr,
 * as a line. */
static void say_line(worker *w, client *c, const char *data, size_t len)
{
    buf m = {0};
    buf_add(&m, data, len);
    buf_add(&m, "\n", 1);
    client_error(w, c, m.p, m.len);
    buf_free(&m);
}

/* Handle one input record. Returns RUN_*. GIL held. */
static int session_record(worker *w, client *c, int kind, const char *data,
                          size_t len)
{
    if (kind == REC_ERROR) {
        buf_clear(&c->src); /* a damaged block is not worth finishing */
        c->src_compile = 0;
        say_line(w, c, data, len);
        c->raised = 1;
        return write_prompt(w, c, 0);
    }
    if (kind == REC_NOTE) { /* said, and the same prompt again */
        say_line(w, c, data, len);
        write_prompt(w, c, buf_used(&c->src) > 0);
        return RUN_OK;
    }
    if (kind == REC_HELLO) {
        /* The extended channel from here on; the prompt again, as a
         * record the client can redraw. */
        pthread_mutex_lock(&c->mh->lock);
        c->ext = 1;
        pthread_mutex_unlock(&c->mh->lock);
        client_record(w, c, 'H', "1", 1);
        c->raised = -1;
        return write_prompt(w, c, buf_used(&c->src) > 0);
    }
    if (kind == REC_SCRIPT)
        return session_script(w, c, data, len);
    if (kind == REC_EOF) {
        int rc = RUN_OK;
        if (buf_used(&c->src) > 0) /* as if an empty line had followed */
            rc = session_line(w, c, "", 0, 0);
        if (rc == RUN_OK && buf_used(&c->src) > 0 && c->ns) {
            /* Still open (`x = (1,`): python3 -i reports what end of
             * input leaves unfinished ('(' was never closed). */
            PyObject *src = PyUnicode_DecodeUTF8(c->src.p + c->src.head,
                                                 (Py_ssize_t)buf_used(&c->src),
                                                 "surrogateescape");
            if (src) {
                interactive_syntax_error(c, src, 1);
                Py_DECREF(src);
            }
            buf_clear(&c->src);
            c->src_compile = 0;
            if (PyErr_Occurred())
                rc = show_exception(1);
        }
        if (rc != RUN_EXIT) { /* (an abandoned one was answered already) */
            pthread_mutex_lock(&c->mh->lock);
            c->eof_done = 1;
            mark_dirty_locked(c);
            pthread_mutex_unlock(&c->mh->lock);
        }
        return rc;
    }
    return session_line(w, c, data, len, 1);
}

/* ==================================================================== */
/* Workers and the watchdog                                             */
/* ==================================================================== */

static int worker_spawn_locked(manhole *mh);

/* Queue c for a worker (the job holds a reference). Lock held. */
static void enqueue_locked(client *c)
{
    manhole *mh = c->mh;
    c->busy = 1;
    c->refs++;
    c->jnext = NULL;
    if (mh->jq_tail)
        mh->jq_tail->jnext = c;
    else
        mh->jq_head = c;
    mh->jq_tail = c;
    mh->njobs++;
    if (mh->cfg.threaded) {
        if (mh->nsoon) /* a worker about to look takes it: no futex call */
            __atomic_store_n(&mh->jobs_seq, mh->jobs_seq + 1, __ATOMIC_RELEASE);
        if (mh->njobs > mh->nsoon)
            pthread_cond_signal(&mh->work_cv);
        /* A signalled worker counts as idle until it runs, so compare the
         * queue with the idle workers rather than trust the signal. With
         * no worker at all, start one now. Otherwise more workers would
         * only fight over the GIL while statements are short: the
         * watchdog starts one when the queue has made no progress for
         * SPAWN_DELAY (the busy workers are blocked, or slow). */
        if (mh->njobs > mh->nidle) {
            if (mh->nworkers == 0)
                worker_spawn_locked(mh);
            else if (mh->starve_since == 0) {
                mh->starve_since = now_mono();
                watchdog_ensure_locked(mh);
                pthread_cond_signal(&mh->wd_cv);
            }
        }
    }
}

static client *dequeue_locked(manhole *mh)
{
    client *c = mh->jq_head;
    if (c) {
        mh->jq_head = c->jnext;
        if (!mh->jq_head)
            mh->jq_tail = NULL;
        c->jnext = NULL;
        mh->njobs--;
        mh->last_pickup = now_mono();
    }
    return c;
}

/* Pop the next input record into w->rec. Lock held. */
static int pop_record_locked(worker *w, client *c, int *kind)
{
    if (buf_used(&c->inq) < 5)
        return 0;
    const char *h = c->inq.p + c->inq.head;
    uint32_t len;
    memcpy(&len, h + 1, 4);
    *kind = (unsigned char)h[0];
    buf_clear(&w->rec);
    if (buf_add(&w->rec, h + 5, len) < 0)
        return 0;
    c->inq.head += 5 + (size_t)len;
    input_drained_locked(c);
    return 1;
}

/* A client is alone in lock-step (see WARM_SPIN) once it has had this many
 * jobs in a row after its first. */
#define ALONE_JOBS 3

/* May the worker that just ran c's job send c's output itself, rather
 * than wake the host for it? Only if the host has nothing of c's to send
 * or to do (so no byte can overtake another), and nothing else is going
 * on: no job queued, no other worker busy. Under load the host sends,
 * many clients per wake-up, and reads their next lines in batches, while
 * the workers run statements. Lock held. */
static int direct_ok_locked(worker *w, client *c)
{
    manhole *mh = c->mh;
    return !w->is_host && !w->woke_host && buf_used(&c->out) > 0 && c->tx_backlog == 0 &&
           !c->sending && !c->out_blocked && !c->eof_done && !c->exiting && !c->in_paused &&
           !mh->jq_head && mh->nworkers - mh->nidle <= 1 && !mh->stopping;
}

/* The watchdog gave the client to somebody else while w ran its code
 * (a statement, or what the library ran for it): the job ends here. Lock
 * held on entry, released on return. */
static void job_abandoned_locked(worker *w, client *c)
{
    manhole *mh = c->mh;
    LOG_LOCKED(mh, MANHOLE_LOG_INFO, "client #%u: timed-out statement ended", c->id);
    w->c = NULL;
    if (c->dead && c->has_session && !c->busy) {
        /* Gone while we were stuck, and nobody else has it: the session
         * is ours to release. */
        c->busy = 1;
        pthread_mutex_unlock(&mh->lock);
        session_close(c);
        pthread_mutex_lock(&mh->lock);
        c->busy = 0;
    }
    client_unref_locked(c);
    pthread_mutex_unlock(&mh->lock);
}

/* Run a client's queued input: one statement at a time, handing the
 * client back to the queue when others are waiting. GIL held. The job's
 * reference to c is dropped here, unless c is returned: then its output
 * is for the worker to send, with the GIL dropped (direct_send()), and
 * the reference goes with it. */
static client *process_job(worker *w, client *c)
{
    manhole *mh = c->mh;
    pthread_mutex_lock(&mh->lock);
    c->runner = w;
    w->c = c;
    w->woke_host = 0;
    mh->same_run = mh->last_job_id == c->id ? mh->same_run + 1 : 0;
    mh->last_job_id = c->id;
    w->alone = mh->same_run >= ALONE_JOBS;
    int requeue = 0;
again:
    while (!c->dead && !c->exiting && !mh->stopping) {
        int kind;
        if (buf_used(&c->out) + c->tx_backlog >= mh->cfg.max_output) {
            c->out_blocked = 1; /* the host requeues it once it reads */
            break;
        }
        if (!pop_record_locked(w, c, &kind))
            break;
        pthread_mutex_unlock(&mh->lock);
        int rc = session_record(w, c, kind, w->rec.p ? w->rec.p : "",
                                w->rec.len);
        buf_shrink_if_empty(&w->rec);
        pthread_mutex_lock(&mh->lock);
        if (rc == RUN_ABANDONED) {
            job_abandoned_locked(w, c);
            return NULL;
        }
        if (mh->jq_head && buf_used(&c->inq) >= 5) {
            requeue = 1; /* let the others have a turn */
            break;
        }
    }
    if (c->intr_pending && !requeue && !c->dead && !c->exiting && !mh->stopping &&
        !c->out_blocked && buf_used(&c->inq) < 5) {
        /* Interrupted at the prompt: the half-entered block is dropped,
         * as python3 -i does on Ctrl-C. */
        c->intr_pending = 0;
        pthread_mutex_unlock(&mh->lock);
        buf_clear(&c->src);
        c->src_compile = 0;
        client_error_str(w, c, "\nKeyboardInterrupt\n");
        int rc = write_prompt(w, c, 0);
        pthread_mutex_lock(&mh->lock);
        if (rc == RUN_ABANDONED) {
            job_abandoned_locked(w, c);
            return NULL;
        }
        goto again; /* lines that came meanwhile found the client busy */
    }
    c->runner = NULL;
    w->c = NULL;
    int teardown = c->dead && c->has_session;
    if (c->exiting)
        buf_clear(&c->inq);
    if (requeue && !c->dead && !c->exiting && !mh->stopping) {
        output_release_locked(w, c);
        c->refs--; /* the new queue entry takes its own */
        enqueue_locked(c);
        pthread_mutex_unlock(&mh->lock);
        return NULL;
    }
    c->busy = 0;
    client *send = NULL;
    if (!c->dead) {
        if (direct_ok_locked(w, c)) {
            send = c; /* the host is not woken */
            mh->nidle++; /* it looks at the queue right after (worker_main) */
            mh->nsoon++;
        } else
            mark_dirty_locked(c); /* let the host flush and look at it */
    }
    w->hold_until = 0;
    pthread_mutex_unlock(&mh->lock);
    if (send)
        return send;
    if (teardown)
        session_close(c);
    pthread_mutex_lock(&mh->lock);
    client_unref_locked(c);
    pthread_mutex_unlock(&mh->lock);
    return NULL;
}

/* Send c's output from the worker that produced it, with neither the GIL
 * nor the lock held: after a job that process_job() found fit for it.
 * c->sending keeps the host off c's socket meanwhile (it neither sends
 * nor closes it), and the bytes taken count against max_output as the
 * host's would. Whatever the socket does not take now goes back in front
 * of c->out, for the host to send in order. Drops the job's reference. */
static int direct_send(worker *w, client *c)
{
    manhole *mh = c->mh;
    pthread_mutex_lock(&mh->lock);
    int fd = c->fd;
    if (c->dead || fd < 0 || c->sending || c->tx_backlog > 0 || mh->stopping ||
        buf_used(&c->out) == 0) { /* things moved on since the job ended */
        if (!c->dead && buf_used(&c->out) > 0)
            mark_dirty_locked(c);
        client_unref_locked(c);
        pthread_mutex_unlock(&mh->lock);
        return 0;
    }
    buf t = w->dout;
    w->dout = c->out;
    c->out = t;
    c->out_tail_e = 0;
    c->tx_backlog = buf_used(&w->dout);
    c->sending = 1;
    pthread_mutex_unlock(&mh->lock);
    while (buf_used(&w->dout) > 0) {
        ssize_t r = xsend(fd, w->dout.p + w->dout.head, buf_used(&w->dout));
        if (r <= 0)
            break; /* full: the host sends the rest; failed: the host finds out */
        w->dout.head += (size_t)r;
    }
    int all = buf_used(&w->dout) == 0;
    pthread_mutex_lock(&mh->lock);
    c->sending = 0;
    c->tx_backlog = 0;
    if (c->close_after) { /* the host closed c meanwhile, and left us the fd */
        c->close_after = 0;
        close(fd);
    }
    if (buf_used(&w->dout) > 0 && !c->dead) {
        /* The rest goes first, then what a next statement wrote since. */
        if (buf_used(&c->out) == 0 ||
            buf_add(&w->dout, c->out.p + c->out.head, buf_used(&c->out)) == 0) {
            t = c->out;
            c->out = w->dout;
            w->dout = t;
        }
    }
    buf_clear(&w->dout);
    buf_shrink_if_empty(&w->dout);
    if (!c->dead && (buf_used(&c->out) > 0 || c->recheck))
        mark_dirty_locked(c);
    c->recheck = 0;
    if (c->out_waiters)
        pthread_cond_broadcast(&c->cv);
    client_unref_locked(c);
    pthread_mutex_unlock(&mh->lock);
    return all;
}

static void cjob_free_locked(cjob *j);

/* Answer a completion request: rlcompleter over the client's namespace
 * (or the manhole's, before its first statement), under the statement
 * timeout and with its signal mask, its output dropped. GIL held. */
static void run_completion(worker *w, cjob *j)
{
    client *c = j->c;
    manhole *mh = c->mh;
    pthread_mutex_lock(&mh->lock);
    int skip = c->dead || mh->stopping;
    if (!skip) {
        w->completing = 1;
        w->job = j;
        w->c = c;
        w->running = 1;
        w->timed_out = 0;
        w->want_int = 0;
        w->int_sent = 0;
        w->user_int = 0;
        w->int_deadline = 0;
        w->deadline = mh->cfg.timeout > 0 ? now_mono() + mh->cfg.timeout : 0;
        if (w->deadline > 0)
            watchdog_kick_locked(mh, w->deadline);
    }
    pthread_mutex_unlock(&mh->lock);
    PyObject *r = NULL;
    if (!skip) {
        PyObject *ns = c->ns ? c->ns : mh->ns;
        Py_INCREF(ns);
        mask_for_python(w, c); /* (__dir__ and properties are the user's code) */
        r = PyObject_CallFunction(mh->complete_fn, "Os", ns, j->text);
        mask_for_worker(w);
        forked_exit(c, r != NULL);
        Py_DECREF(ns);
        int timed_out = stmt_end(w);
        pthread_mutex_lock(&mh->lock);
        w->completing = 0;
        w->job = NULL;
        w->c = NULL;
        pthread_mutex_unlock(&mh->lock);
        if (timed_out) {
            Py_CLEAR(r);
            /* A worker was abandoned, and the watchdog answered for it;
             * the host thread (non-threaded mode) answers itself. */
            skip = !w->is_host;
        }
    }
    if (!skip) {
        buf b = {0};
        char head[48];
        long n = 0;
        PyObject *cands = NULL;
        if (r && PyTuple_Check(r) && PyTuple_GET_SIZE(r) == 2) {
            n = PyLong_AsLong(PyTuple_GET_ITEM(r, 0));
            cands = PyTuple_GET_ITEM(r, 1);
        }
        int k = snprintf(head, sizeof head, "%lu %ld", j->id, cands && n > 0 ? n : 0);
        buf_add(&b, head, (size_t)k);
        Py_ssize_t m = cands && PyList_Check(cands) ? PyList_GET_SIZE(cands) : 0;
        for (Py_ssize_t i = 0; i < m && b.len < mh->cfg.max_line; i++) {
            Py_ssize_t len;
            const char *t = PyUnicode_Check(PyList_GET_ITEM(cands, i))
                                ? PyUnicode_AsUTF8AndSize(PyList_GET_ITEM(cands, i), &len)
                                : NULL;
            if (!t || memchr(t, '\n', (size_t)len))
                continue;
            buf_add(&b, "\n", 1);
            buf_add(&b, t, (size_t)len);
        }
        PyErr_Clear();
        client_record(NULL, c, 'C', b.p, b.len);
        buf_free(&b);
    }
    Py_XDECREF(r);
    PyErr_Clear();
    pthread_mutex_lock(&mh->lock);
    cjob_free_locked(j);
    pthread_mutex_unlock(&mh->lock);
}

static cjob *cq_pop_locked(manhole *mh)
{
    cjob *j = mh->cq_head;
    if (j) {
        mh->cq_head = j->next;
        if (!mh->cq_head)
            mh->cq_tail = NULL;
    }
    return j;
}

static void block_signals(void)
{
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
}

#define WORKER_IDLE_SECONDS 30.0

/* How much of the CPU statements may take from the host (this worker
 * thread only; Linux, where nice values and policies are per thread):
 * NICE: nice +5, the default; IDLE: SCHED_IDLE, statements only run on
 * CPU nobody else wants, and the host's loop always preempts them; NORMAL:
 * as the host. Elsewhere threads keep the host's priority. */
static void set_worker_priority(int how)
{
#if defined(__linux__)
    if (how == MANHOLE_WORKERS_IDLE) {
        struct sched_param sp;
        memset(&sp, 0, sizeof sp);
        if (pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp) == 0)
            return;
    }
    if (how != MANHOLE_WORKERS_NORMAL) {
        pid_t tid = (pid_t)syscall(SYS_gettid);
        int now = getpriority(PRIO_PROCESS, (id_t)tid);
        setpriority(PRIO_PROCESS, (id_t)tid, now + 5 > 19 ? 19 : now + 5);
    }
#else
    MH_UNUSED(how);
#endif
}

/* Name a thread for top -H, ps -L and gdb (Linux: 15 characters). */
static void name_thread(const char *name)
{
#if defined(__linux__) && defined(__GLIBC__)
    pthread_setname_np(pthread_self(), name);
#else
    MH_UNUSED(name);
#endif
}

/* ... and for Python: threading.current_thread().name. GIL held. */
static void name_python_thread(const char *name)
{
    PyObject *threading = PyImport_ImportModule("threading");
    PyObject *t = threading ? PyObject_CallMethod(threading, "current_thread", NULL) : NULL;
    PyObject *n = PyUnicode_FromString(name);
    if (t && n)
        PyObject_SetAttrString(t, "name", n);
    Py_XDECREF(n);
    Py_XDECREF(t);
    Py_XDECREF(threading);
    PyErr_Clear();
}

/* How long a worker that just sent a client its answer itself spins for
 * the next job before it sleeps (seconds). A client in lock-step sends its
 * next line within a few microseconds of reading the answer; taking that
 * job without sleeping spares the host's futex wake-up and the worker's
 * return from sleep, the two costs a thread pool adds to a round trip.
 * One worker at most spins, with neither the lock nor the GIL, and only
 * when the client had the ALONE_JOBS jobs before too (a client alone in
 * lock-step). With several clients at work (one of them may have two jobs
 * in a row by chance, hardly four) the CPU it would burn is theirs and
 * the host's, so the worker sleeps as before. */
#ifndef WARM_SPIN
#define WARM_SPIN 25e-6
#endif

static void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Spin until a job is queued after `seq`, WARM_SPIN at most. */
static void spin_for_job(manhole *mh, unsigned seq)
{
    double until = now_mono() + WARM_SPIN;
    while (__atomic_load_n(&mh->jobs_seq, __ATOMIC_ACQUIRE) == seq && now_mono() < until)
        cpu_relax();
}

/* The ending worker leaves threading's registry (glue's thread_exit()).
 * GIL held. */
static void thread_forget(manhole *mh)
{
    PyObject *fn = mh->glue ? PyDict_GetItemString(mh->glue, "thread_exit") : NULL;
    PyObject *r = fn ? PyObject_CallObject(fn, NULL) : NULL;
    Py_XDECREF(r);
    PyErr_Clear();
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    manhole *mh = w->mh;
    block_signals();
    set_worker_priority(mh->cfg.worker_priority);
    char name[32];
    snprintf(name, sizeof name, "manhole-w%d", w->index);
    name_thread(name);
    PyGILState_STATE g = PyGILState_Ensure();
    w->py_tid = PyThread_get_thread_ident();
    snprintf(name, sizeof name, "manhole worker %d", w->index);
    name_python_thread(name);
    PyThreadState *ts = PyEval_SaveThread();
    tl_worker = w;
    int warm = 0; /* its last job's client may come back at once */
    pthread_mutex_lock(&mh->lock);
    for (;;) {
        if (mh->stopping)
            break;
        cjob *j = cq_pop_locked(mh);
        if (j) { /* completions first: a person waits for them */
            pthread_mutex_unlock(&mh->lock);
            PyEval_RestoreThread(ts);
            run_completion(w, j);
            ts = PyEval_SaveThread();
            pthread_mutex_lock(&mh->lock);
            if (w->timed_out) {
                w->timed_out = 0;
                if (mh->nworkers >= mh->cfg.max_workers)
                    goto gone;
                mh->nworkers++;
            }
            continue;
        }
        if (mh->nworkers > mh->cfg.max_workers)
            break; /* back from a wait, or started for a completion: extra */
        client *c = dequeue_locked(mh);
        if (!c && warm && mh->nspin == 0 && WARM_SPIN > 0) {
            warm = 0;
            mh->nidle++;
            mh->nspin++;
            mh->nsoon++;
            unsigned seq = __atomic_load_n(&mh->jobs_seq, __ATOMIC_ACQUIRE);
            pthread_mutex_unlock(&mh->lock);
            spin_for_job(mh, seq);
            pthread_mutex_lock(&mh->lock);
            mh->nsoon--;
            mh->nspin--;
            mh->nidle--;
            continue;
        }
        warm = 0;
        if (!c) {
            mh->nidle++;
            struct timespec until = cond_deadline(WORKER_IDLE_SECONDS);
            int r = pthread_cond_timedwait(&mh->work_cv, &mh->lock, &until);
            mh->nidle--;
            if (r == ETIMEDOUT && !mh->jq_head && mh->nworkers > 1)
                break; /* keep one warm worker, let the rest go */
            continue;
        }
        pthread_mutex_unlock(&mh->lock);
        PyEval_RestoreThread(ts);
        client *send = process_job(w, c);
        ts = PyEval_SaveThread();
        if (send) /* spin only for a client alone in lock-step (see WARM_SPIN) */
            warm = direct_send(w, send) && w->alone;
        pthread_mutex_lock(&mh->lock);
        if (send) { /* (counted idle since its job ended: process_job) */
            mh->nsoon--;
            mh->nidle--;
        }
        if (w->timed_out) {
            /* We were abandoned and are back: rejoin the pool if there is
             * room, else go. */
            w->timed_out = 0;
            if (mh->nworkers >= mh->cfg.max_workers)
                goto gone;
            mh->nworkers++;
        }
    }
    mh->nworkers--;
gone:
    pthread_mutex_unlock(&mh->lock);
    tl_worker = NULL;
    PyEval_RestoreThread(ts);
    thread_forget(mh);
    PyGILState_Release(g);
    pthread_mutex_lock(&mh->lock);
    w->exited = 1;
    mh->nthreads--;
    mh->nreap++;
    wake_host_locked(mh);
    pthread_cond_broadcast(&mh->gone_cv);
    pthread_mutex_unlock(&mh->lock);
    return NULL;
}

#define MAX_THREADS_ABANDONED 64
#define SPAWN_DELAY 0.002 /* seconds without progress before another worker */

/* Completions may have this many workers beyond max_workers: a person
 * waits for them, not behind statements (the extra workers take no
 * statement, and end when no completion is left). */
#define COMPLETION_WORKERS 2

/* Start a worker if the pool may grow past `size` (max_workers, or more
 * for completions). Threads stay bounded: the pool, the parked ones and
 * MAX_THREADS_ABANDONED. Returns 1 if it did. Lock held. */
static int worker_start_locked(manhole *mh, int size)
{
    if (mh->stopping || mh->nworkers >= size ||
        mh->nthreads >= size + mh->nparked + MAX_THREADS_ABANDONED)
        return 0;
    worker *w = calloc(1, sizeof *w);
    if (!w)
        return 0;
    w->mh = mh;
    w->index = ++mh->worker_seq;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old); /* the thread starts blocked */
    int r = pthread_create(&w->thread, NULL, worker_main, w);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (r != 0) {
        LOG_LOCKED(mh, MANHOLE_LOG_ERROR, "cannot start a worker thread: %s",
                   strerror(r));
        free(w);
        return 0;
    }
    w->next = mh->workers;
    mh->workers = w;
    mh->nworkers++;
    mh->nthreads++;
    watchdog_ensure_locked(mh);
    return 1;
}

static int worker_spawn_locked(manhole *mh)
{
    return worker_start_locked(mh, mh->cfg.max_workers);
}

/* Join workers that have exited (cheap; host thread). */
static void workers_reap(manhole *mh)
{
    pthread_mutex_lock(&mh->lock);
    if (!mh->nreap) {
        pthread_mutex_unlock(&mh->lock);
        return;
    }
    mh->nreap = 0;
    worker **pp = &mh->workers;
    while (*pp) {
        worker *w = *pp;
        if (w->exited) {
            *pp = w->next;
            pthread_join(w->thread, NULL);
            buf_free(&w->rec);
            buf_free(&w->dout);
            free(w);
        } else {
            pp = &w->next;
        }
    }
    pthread_mutex_unlock(&mh->lock);
}

/* The watchdog abandons a timed-out statement (threaded mode): the client
 * gets the report and a prompt now, and its next line runs on another
 * worker. Lock held. */
static void abandon_locked(worker *w, int interrupted)
{
    manhole *mh = w->mh;
    client *c = w->c;
    w->timed_out = 1;
    w->hold_until = 0; /* (what it holds is in c->out, sent below) */
    if (w->parked) { /* out of the count already */
        w->parked = 0;
        mh->nparked--;
    } else {
        mh->nworkers--; /* a slot in the pool is free again */
    }
    if (mh->njobs > mh->nidle && mh->starve_since == 0)
        mh->starve_since = now_mono();
    if (w->completing) {
        /* A completion that outran the timeout: an empty answer now; the
         * worker finds its way back (or not) on its own. */
        LOG_LOCKED(mh, MANHOLE_LOG_INFO, "client #%u: completion timed out", c->id);
        if (!c->dead && w->job) {
            char id[32];
            int n = snprintf(id, sizeof id, "%lu 0", w->job->id);
            record_build(&c->out, 'C', id, (size_t)n);
            c->out_tail_e = 0;
            mark_dirty_locked(c);
        }
        pthread_cond_broadcast(&mh->hc_cv);
        return;
    }
    if (interrupted)
        LOG_LOCKED(mh, MANHOLE_LOG_INFO,
                   "client #%u: interrupted statement did not stop; abandoned", c->id);
    else
        LOG_LOCKED(mh, MANHOLE_LOG_INFO,
                   "client #%u: statement timed out after %g s", c->id,
                   mh->cfg.timeout);
    if (!c->dead) {
        char msg[200];
        int n;
        if (interrupted)
            n = snprintf(msg, sizeof msg,
                         "%smanhole: the statement did not stop within %g s; "
                         "it was abandoned and may still be running\n"
                         "KeyboardInterrupt\n",
                         c->out_nl ? "" : "\n", INTERRUPT_GRACE);
        else
            n = snprintf(msg, sizeof msg,
                         "%sTimeoutError: statement timed out after %g seconds; "
                         "KeyboardInterrupt sent to it\n",
                         c->out_nl ? "" : "\n", mh->cfg.timeout);
        if (c->ext)
            record_build(&c->out, 'E', msg, (size_t)MH_MIN(n, (int)sizeof msg - 1));
        else
            buf_add(&c->out, msg, (size_t)MH_MIN(n, (int)sizeof msg - 1));
        if (c->ext)
            record_build(&c->out, 'S', "1", 1);
        prompt_out_locked(c, 0);
        mark_dirty_locked(c);
    }
    c->runner = NULL;
    c->busy = 0;
    if (!c->dead && !c->exiting && buf_used(&c->inq) >= 5)
        enqueue_locked(c);
    pthread_cond_broadcast(&c->cv);
    pthread_cond_broadcast(&mh->hc_cv);
}

/* Workers, then the host thread's pseudo-worker. Lock held. */
static worker *next_worker(manhole *mh, worker *w)
{
    if (!w)
        return mh->workers ? mh->workers : &mh->hostw;
    if (w == &mh->hostw)
        return NULL;
    return w->next ? w->next : &mh->hostw;
}

static void *watchdog_main(void *arg)
{
    manhole *mh = arg;
    block_signals();
    name_thread("manhole-watch");
    pthread_mutex_lock(&mh->lock);
    for (;;) {
        double now = now_mono(), next = 0;
        int pending = 0;
        for (worker *w = next_worker(mh, NULL); w; w = next_worker(mh, w)) {
            if (w->hold_until > 0) { /* output held back too long: to the host */
                if (now >= w->hold_until)
                    output_release_locked(w, w->c);
                else if (next == 0 || w->hold_until < next)
                    next = w->hold_until;
            }
            if (!w->running)
                continue;
            if (w->deadline > 0 && !w->timed_out) {
                if (now >= w->deadline) {
                    if (w->is_host)
                        w->timed_out = 1;
                    else
                        abandon_locked(w, 0);
                    w->want_int = 1;
                } else if (next == 0 || w->deadline < next) {
                    next = w->deadline;
                }
            }
            if (w->user_int && w->int_deadline > 0 && !w->timed_out && !w->is_host &&
                !w->waiting) {
                /* An interrupt the statement did not obey in time (a
                 * call Python cannot interrupt): as a timeout. */
                if (now >= w->int_deadline) {
                    w->int_deadline = 0;
                    abandon_locked(w, 1);
                } else if (next == 0 || w->int_deadline < next) {
                    next = w->int_deadline;
                }
            }
            if (w->want_int && !w->int_sent) {
                if (w->waiting && w->c) /* it raises the interrupt itself */
                    pthread_cond_broadcast(&w->c->cv);
                else
                    pending = 1;
            }
        }
        if (mh->hold_last > 0 && now < mh->hold_last + HOLD_LINGER &&
            (next == 0 || now + OUTPUT_HOLD < next))
            next = now + OUTPUT_HOLD; /* statements keep coming: tick */
        if (mh->starve_since > 0) {
            if (mh->njobs <= mh->nidle || mh->stopping) {
                mh->starve_since = 0;
            } else {
                double since = mh->last_pickup > mh->starve_since ? mh->last_pickup
                                                                  : mh->starve_since;
                if (now >= since + SPAWN_DELAY) {
                    if (worker_spawn_locked(mh)) {
                        mh->starve_since = now; /* look again a delay later */
                        since = now;
                    } else { /* the pool is full: wait for a worker */
                        mh->starve_since = 0;
                    }
                }
                if (mh->starve_since > 0 && (next == 0 || since + SPAWN_DELAY < next))
                    next = since + SPAWN_DELAY;
            }
        }
        if (pending) {
            /* Deliver KeyboardInterrupt. The GIL is taken without the
             * lock held; the state is checked again under both. */
            pthread_mutex_unlock(&mh->lock);
            PyGILState_STATE g = PyGILState_Ensure();
            pthread_mutex_lock(&mh->lock);
            for (worker *w = next_worker(mh, NULL); w; w = next_worker(mh, w)) {
                if (w->running && w->want_int && !w->int_sent && !w->waiting) {
                    PyThreadState_SetAsyncExc(w->py_tid, PyExc_KeyboardInterrupt);
                    w->int_sent = 1;
                }
            }
            pthread_mutex_unlock(&mh->lock);
            PyGILState_Release(g);
            pthread_mutex_lock(&mh->lock);
            continue;
        }
        /* Stop only after a scan found nothing left to deliver: close
         * asks for its interrupts and for the stop together. */
        if (mh->wd_stop)
            break;
        mh->wd_wake_at = next;
        if (next > 0) {
            struct timespec until = cond_deadline(next - now + 0.0005);
            pthread_cond_timedwait(&mh->wd_cv, &mh->lock, &until);
        } else {
            pthread_cond_wait(&mh->wd_cv, &mh->lock);
        }
        mh->wd_wake_at = 0;
    }
    mh->wd_exited = 1;
    pthread_cond_broadcast(&mh->gone_cv);
    pthread_mutex_unlock(&mh->lock);
    return NULL;
}

/* Start the watchdog if it is not running. Lock held. */
static void watchdog_ensure_locked(manhole *mh)
{
    if (mh->wd_started || mh->wd_stop)
        return;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int r = pthread_create(&mh->wd_thread, NULL, watchdog_main, mh);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (r == 0)
        mh->wd_started = 1;
    else
        LOG_LOCKED(mh, MANHOLE_LOG_ERROR, "cannot start the watchdog: %s",
                   strerror(r));
}

/* A deadline was set or moved: make sure the watchdog looks in time.
 * Lock held. */
static void watchdog_kick_locked(manhole *mh, double deadline)
{
    if (mh->wd_wake_at == 0 || deadline < mh->wd_wake_at) {
        watchdog_ensure_locked(mh);
        mh->wd_wake_at = deadline;
        pthread_cond_signal(&mh->wd_cv);
    }
}

/* Ask the watchdog to interrupt the statement a worker runs. Lock held. */
static void request_interrupt_locked(worker *w)
{
    if (w && w->running && !w->want_int) {
        w->want_int = 1;
        watchdog_ensure_locked(w->mh);
        pthread_cond_signal(&w->mh->wd_cv);
        pthread_cond_broadcast(&w->mh->hc_cv);
    }
}

/* ==================================================================== */
/* The host side: accept, read, send                                    */
/* ==================================================================== */

static void client_interest(client *c)
{
    if (c->fd < 0)
        return;
    unsigned ev = 0;
    if (!c->rd_eof && !c->rd_paused)
        ev |= EV_IN;
    if (buf_used(&c->tx) > 0)
        ev |= EV_OUT;
    if (ev != c->ev) {
        c->ev = ev;
        poller_mod(c->mh, c->fd, c, ev);
    }
}

/* Close a client's connection (host thread). A statement still running
 * for it is interrupted; its Python session is released by a worker. */
static void client_close(client *c, const char *why)
{
    manhole *mh = c->mh;
    if (c->fd < 0)
        return;
    poller_del(mh, c->fd);
    int fd = c->fd;
    pthread_mutex_lock(&mh->lock); /* (the list too: a fork child walks it) */
    c->fd = -1;
    if (c->sending) /* a worker is sending on it: it closes it when done */
        c->close_after = 1;
    else
        close(fd);
    if (c->prev)
        c->prev->next = c->next;
    else
        mh->clients = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->next = c->prev = NULL;
    if (c->pending)
        mh->npending--;
    else
        mh->nclients--;
    buf_free(&c->line);
    buf_free(&c->tx);
    buf_free(&c->sb);
    buf_free(&c->act_comp);
    LOG_LOCKED(mh, MANHOLE_LOG_INFO, "client #%u closed (%s)", c->id, why);
    c->dead = 1;
    buf_free(&c->inq);
    buf_free(&c->out);
    pthread_cond_broadcast(&c->cv);
    if (c->runner)
        request_interrupt_locked(c->runner);
    if (c->exiting && !c->leaving) {
        if (mh->exits_ready < (int)(sizeof mh->exit_q / sizeof mh->exit_q[0]))
            mh->exit_q[mh->exits_ready++] = c->exit_status;
        else /* a flood of exits: keep the latest */
            mh->exit_q[mh->exits_ready - 1] = c->exit_status;
    }
    if (c->has_session && !c->busy)
        enqueue_locked(c); /* a worker releases the Python session */
    /* The host's reference goes at the end of the turn: callers up the
     * stack may still look at c (its fd is -1 now). */
    c->gnext = mh->graveyard;
    mh->graveyard = c;
    pthread_mutex_unlock(&mh->lock);
}

static void graveyard_release(manhole *mh)
{
    pthread_mutex_lock(&mh->lock);
    while (mh->graveyard) {
        client *c = mh->graveyard;
        mh->graveyard = c->gnext;
        client_unref_locked(c);
    }
    pthread_mutex_unlock(&mh->lock);
}

/* Send what can be sent now. Returns 0 when all is sent, 1 when the
 * socket is full, -1 when the client is gone. Host thread. */
static int client_flush(client *c)
{
    manhole *mh = c->mh;
    if (c->fd < 0)
        return -1;
    for (;;) {
        if (buf_used(&c->tx) == 0) {
            buf_clear(&c->tx);
            pthread_mutex_lock(&mh->lock);
            if (c->sending) { /* a worker is sending c's output: after it */
                c->recheck = 1;
                pthread_mutex_unlock(&mh->lock);
                return 0;
            }
            buf t = c->tx;
            c->tx = c->out;
            c->out = t;
            c->out_tail_e = 0;
            c->tx_backlog = buf_used(&c->tx);
            if (c->out_waiters)
                pthread_cond_broadcast(&c->cv);
            if (c->out_blocked && c->tx_backlog < mh->cfg.max_output) {
                c->out_blocked = 0; /* it reads again: take its input */
                if (!c->busy && !c->dead && !c->exiting && buf_used(&c->inq) >= 5)
                    enqueue_locked(c);
            }
            pthread_mutex_unlock(&mh->lock);
            if (buf_used(&c->tx) == 0)
                return 0;
        }
        ssize_t r = xsend(c->fd, c->tx.p + c->tx.head, buf_used(&c->tx));
        if (r > 0) {
            c->tx.head += (size_t)r;
            continue;
        }
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 1;
        return -1;
    }
}

/* Close the client once it has nothing left to do: after sys.exit(), or
 * after end of input with every statement run and every byte sent. */
static void client_maybe_finish(client *c)
{
    manhole *mh = c->mh;
    if (c->fd < 0 || buf_used(&c->tx) > 0)
        return;
    pthread_mutex_lock(&mh->lock);
    int idle = !c->busy && !c->sending && buf_used(&c->out) == 0;
    int finish = idle && (c->exiting || (c->eof_done && buf_used(&c->inq) == 0));
    if (c->sending)
        c->recheck = 1; /* look again once the worker is done */
    int exiting = c->exiting && !c->leaving, leaving = c->leaving;
    if (idle && !finish) { /* let go of big buffers while idle */
        buf_shrink_if_empty(&c->out);
        buf_shrink_if_empty(&c->tx);
    }
    pthread_mutex_unlock(&mh->lock);
    if (finish)
        client_close(c, exiting ? "sys.exit()" : leaving ? "exit()" : "end of input");
}

static void client_send_host(client *c)
{
    int r = client_flush(c);
    if (r < 0) {
        client_close(c, "connection lost");
        return;
    }
    client_interest(c);
    client_maybe_finish(c);
}

/* The client asked for an interrupt (telnet IP or BRK, or the extended
 * channel's I). Its running statement gets KeyboardInterrupt; if none
 * runs, the next one to start among those it already sent does; if none
 * starts, the prompt is interrupted (the block being entered is dropped).
 * queued: lines of this same read come before it. Host thread. */
static void client_interrupt(client *c, int queued)
{
    manhole *mh = c->mh;
    pthread_mutex_lock(&mh->lock);
    worker *w = c->runner;
    if (c->dead || c->exiting) {
        pthread_mutex_unlock(&mh->lock);
        return;
    }
    LOG_LOCKED(mh, MANHOLE_LOG_DEBUG, "client #%u: interrupt", c->id);
    if (w && w->running && !w->timed_out && !w->completing) {
        if (!w->want_int || w->int_sent) {
            w->want_int = 1;
            w->int_sent = 0;
            w->user_int = 1;
            w->int_deadline = w->waiting ? 0 : now_mono() + INTERRUPT_GRACE;
            watchdog_ensure_locked(mh);
            pthread_cond_signal(&mh->wd_cv);
            if (w->waiting)
                pthread_cond_broadcast(&c->cv);
        }
    } else {
        c->intr_pending = 1;
        if (!c->busy && !queued && buf_used(&c->inq) < 5)
            enqueue_locked(c); /* a worker answers at the prompt */
    }
    pthread_mutex_unlock(&mh->lock);
}

#define MAX_COMPLETIONS 8 /* a client's requests not yet answered */

static void cjob_free_locked(cjob *j)
{
    j->c->ncomp--;
    client_unref_locked(j->c);
    free(j->text);
    free(j);
}

/* A completion request "<id> <text>": queued for any worker, so it is
 * answered while the client's own statement runs. Host thread. Returns
 * -1 only when out of memory. */
static int completion_request(client *c, const char *p, size_t n)
{
    manhole *mh = c->mh;
    unsigned long id = 0;
    size_t i = 0;
    while (i < n && i < 18 && p[i] >= '0' && p[i] <= '9')
        id = id * 10 + (unsigned long)(p[i++] - '0');
    if (i == 0 || i >= n || p[i] != ' ')
        return 0; /* malformed: ignored */
    i++;
    size_t bad;
    int ok = !memchr(p + i, 0, n - i) && utf8_valid((const unsigned char *)p + i, n - i, &bad);
    cjob *j = calloc(1, sizeof *j);
    char *text = malloc(n - i + 1);
    if (!j || !text) {
        free(j);
        free(text);
        return -1;
    }
    memcpy(text, p + i, n - i);
    text[n - i] = 0;
    j->id = id;
    j->text = text;
    j->c = c;
    pthread_mutex_lock(&mh->lock);
    if (buf_used(&c->out) + c->tx_backlog >= mh->cfg.max_output || c->dead || mh->stopping) {
        /* A client that does not read its answers gets no more of them
         * (its memory stays bounded); it can still interrupt. */
        pthread_mutex_unlock(&mh->lock);
        free(text);
        free(j);
        return 0;
    }
    if (!ok || c->ncomp >= MAX_COMPLETIONS) {
        /* Not answerable: an empty answer at once. */
        char r[32];
        int k = snprintf(r, sizeof r, "%lu 0", id);
        record_build(&c->out, 'C', r, (size_t)k);
        c->out_tail_e = 0;
        mark_dirty_locked(c);
        pthread_mutex_unlock(&mh->lock);
        free(text);
        free(j);
        return 0;
    }
    c->refs++;
    c->ncomp++;
    if (mh->cq_tail)
        mh->cq_tail->next = j;
    else
        mh->cq_head = j;
    mh->cq_tail = j;
    if (mh->cfg.threaded) {
        if (mh->nsoon) /* (a worker about to look takes it) */
            __atomic_store_n(&mh->jobs_seq, mh->jobs_seq + 1, __ATOMIC_RELEASE);
        pthread_cond_signal(&mh->work_cv);
        if (mh->nidle == 0) /* every worker busy (maybe with this client) */
            worker_start_locked(mh, mh->cfg.max_workers + COMPLETION_WORKERS);
    } else {
        wake_host_locked(mh);
    }
    pthread_mutex_unlock(&mh->lock);
    return 0;
}

/* A hello that came before any line of its read. A client with nothing
 * queued or running is answered here and now: the reply and the prompt
 * (the one last computed, as in the greeting) need no Python, so a hello
 * never waits for a worker. Otherwise it goes in line behind what the
 * client sent before it (a statement waiting for input answers it at
 * once: input_next_locked()). Host thread. -1 when out of memory. */
static int client_hello(client *c)
{
    manhole *mh = c->mh;
    int r = 0;
    pthread_mutex_lock(&mh->lock);
    if (c->dead || c->exiting) {
    } else if (c->busy || buf_used(&c->inq) >= 5) {
        r = rec_add(&c->inq, REC_HELLO, "1", 1);
        if (c->in_waiters)
            pthread_cond_broadcast(&c->cv);
        if (!c->busy)
            enqueue_locked(c);
    } else {
        /* Not busy: no worker has the session, so its fields are ours to
         * read (the block being entered) and set (no S before this P). */
        c->ext = 1;
        c->raised = -1;
        record_build(&c->out, 'H', "1", 1);
        prompt_out_locked(c, buf_used(&c->src) > 0);
        mark_dirty_locked(c);
    }
    pthread_mutex_unlock(&mh->lock);
    return r;
}

/* Banner and first prompt: they need no Python, so the host sends them
 * at once. */
static void client_greet(client *c)
{
    manhole *mh = c->mh;
    buf_add(&c->tx, mh->banner ? mh->banner : "", mh->banner_len);
    pthread_mutex_lock(&mh->lock);
    size_t pn;
    const char *ps = prompt_get_locked(mh, 0, &pn);
    buf_add(&c->tx, ps, pn);
    c->out_nl = 1;
    c->tx_backlog = buf_used(&c->tx); /* (no worker sends before it) */
    pthread_mutex_unlock(&mh->lock);
    client_send_host(c);
}

/* A TCP client that has not shown it knows the secret: told so in one
 * line (whatever the reason: a guesser learns nothing more) and closed. */
static void auth_refuse(client *c, const char *why)
{
    LOG(c->mh, MANHOLE_LOG_WARNING, "client #%u (%s) refused: %s", c->id, c->peer, why);
    (void)xsend(c->fd, "manhole: authentication failed\n", 31);
    shut_and_drain(c->fd);
    client_close(c, "authentication failed");
}

/* The answer to a challenge (auth_challenge()): the first bytes the client
 * gets, so nothing else is in the way. -1 if the client is gone. */
static int auth_reply_send(client *c)
{
    manhole *mh = c->mh;
    pthread_mutex_lock(&mh->lock);
    buf_add(&c->tx, c->auth_reply, c->auth_reply_len);
    c->tx_backlog = buf_used(&c->tx); /* (no worker sends before it) */
    pthread_mutex_unlock(&mh->lock);
    c->auth_reply_len = 0;
    client_send_host(c);
    return c->fd < 0 ? -1 : 0;
}

static void refuse_full(manhole *mh, int fd, const char *peer);

/* A TCP client just authenticated: from now on it counts against
 * max_clients (refused if that is full), and gets the banner and the
 * prompt. -1 if it is closed. */
static int client_admit(client *c)
{
    manhole *mh = c->mh;
    c->pending = 0;
    mh->npending--;
    mh->nclients++;
    if (mh->nclients > mh->cfg.max_clients) {
        refuse_full(mh, c->fd, c->peer);
        shut_and_drain(c->fd);
        client_close(c, "too many clients");
        return -1;
    }
    LOG(mh, MANHOLE_LOG_INFO, "client #%u authenticated", c->id);
    client_greet(c);
    return c->fd < 0 ? -1 : 0;
}

/* What the framer found in this read besides lines (see act_interrupt()):
 * a timing mark, completion requests, a hello. Host thread. -1 when out
 * of memory. */
static int client_acts(client *c)
{
    manhole *mh = c->mh;
    int r = 0;
    if (c->act_tm) {
        /* telnet asks for a timing mark after an interrupt and shows
         * nothing until it comes (RFC 860): everything before it has been
         * taken in, so it comes now, after the output already produced. */
        static const char tm[3] = {(char)TN_IAC, (char)TN_WILL, (char)TN_OPT_TM};
        c->act_tm = 0;
        pthread_mutex_lock(&mh->lock);
        buf_add(&c->out, tm, 3);
        c->out_tail_e = 0;
        mark_dirty_locked(c);
        pthread_mutex_unlock(&mh->lock);
    }
    for (size_t i = 0; i + 4 <= buf_used(&c->act_comp);) {
        uint32_t len;
        memcpy(&len, c->act_comp.p + i, 4);
        if (completion_request(c, c->act_comp.p + i + 4, len) < 0)
            r = -1;
        i += 4 + (size_t)len;
    }
    buf_free(&c->act_comp);
    if (c->act_hello) {
        c->act_hello = 0;
        if (client_hello(c) < 0)
            r = -1;
    }
    return r;
}

static void client_read(client *c)
{
    manhole *mh = c->mh;
    unsigned char tmp[16384];
    buf recs = {0};
    int eof = 0, err = 0, drop = 0;
    for (int k = 0; k < 16; k++) {
        ssize_t r = recv(c->fd, tmp, sizeof tmp, 0);
        if (r > 0) {
            c->last_active = now_mono();
            int fr = frame_bytes(c, tmp, (size_t)r, &recs);
            if (fr < 0) {
                drop = fr;
                break;
            }
            if ((size_t)r < sizeof tmp || buf_used(&recs) > mh->cfg.max_input)
                break;
            continue;
        }
        if (r == 0) {
            /* Half-close (shutdown of the client's sending side) or gone
             * for good? A peer that closed entirely leaves the socket
             * hung up (UNIX sockets; TCP cannot tell until we write). */
            struct pollfd pf = {c->fd, 0, 0};
            if (poll(&pf, 1, 0) > 0 && (pf.revents & POLLHUP)) {
                buf_free(&recs);
                client_close(c, "disconnected");
                return;
            }
            eof = 1;
            break;
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            err = errno;
        break;
    }
    if (eof && !drop) {
        if (c->line.len || c->discard)
            drop = end_line(c, &recs);
        if (!drop && c->auth)
            drop = FR_AUTH; /* gone without the secret */
        if (!drop) {
            rec_add(&recs, REC_EOF, "", 0);
            c->rd_eof = 1;
        }
    }
    if (drop == FR_HTTP) {
        LOG(mh, MANHOLE_LOG_WARNING,
            "client #%u (%s) dropped: its first bytes look like HTTP", c->id,
            c->peer);
        buf_free(&recs);
        client_close(c, "HTTP request");
        return;
    }
    if (drop == FR_AUTH) {
        buf_free(&recs);
        auth_refuse(c, "wrong or missing secret");
        return;
    }
    if (c->auth_reply_len > 0 && auth_reply_send(c) < 0) {
        buf_free(&recs);
        return;
    }
    if (c->pending && !c->auth && client_admit(c) < 0) {
        buf_free(&recs);
        return;
    }
    if (client_acts(c) < 0)
        drop = FR_NOMEM;
    int intr = c->act_intr;
    c->act_intr = 0;
    if (intr == 1) /* before any line of this read: at the prompt */
        client_interrupt(c, 0);
    if (buf_used(&recs) > 0) {
        pthread_mutex_lock(&mh->lock);
        if (!c->dead && !c->exiting) {
            if (buf_add(&c->inq, recs.p, recs.len) < 0)
                drop = -2;
            if (c->in_waiters)
                pthread_cond_broadcast(&c->cv);
            if (!c->busy)
                enqueue_locked(c);
            if (buf_used(&c->inq) > mh->cfg.max_input) {
                c->in_paused = 1;
                c->rd_paused = 1;
            }
        }
        pthread_mutex_unlock(&mh->lock);
    }
    buf_free(&recs);
    if (intr == 2) /* after lines of this read: for the statements they start */
        client_interrupt(c, 1);
    if (drop == -2)
        client_close(c, "out of memory");
    else if (err)
        client_close(c, strerror(err));
    else
        client_interest(c);
}

static void describe_peer(client *c, int fd, long pid, long uid)
{
    if (c->transport == T_UNIX) {
        if (pid > 0)
            snprintf(c->peer, sizeof c->peer, "unix, pid %ld, uid %ld", pid, uid);
        else
            snprintf(c->peer, sizeof c->peer, "unix, uid %ld", uid);
    } else {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        char a[72] = "?";
        if (getpeername(fd, (struct sockaddr *)&ss, &sl) == 0)
            format_addr((struct sockaddr *)&ss, a, sizeof a);
        snprintf(c->peer, sizeof c->peer, "tcp %s", a);
    }
}

#define LISTEN_PAUSE 0.25 /* seconds the listeners rest when out of descriptors */

/* Stop (or start again) watching the listeners: with no descriptor left
 * to accept with, a level-triggered listener would fire at once, for
 * ever. */
static void listen_pause(manhole *mh, int pause)
{
    if (mh->listen_paused == pause)
        return;
    mh->listen_paused = pause;
    if (pause)
        mh->listen_resume_at = now_mono() + LISTEN_PAUSE;
    if (mh->lfd_unix >= 0)
        poller_mod(mh, mh->lfd_unix, TAG_LISTEN_UNIX, pause ? 0 : EV_IN);
    if (mh->lfd_tcp >= 0)
        poller_mod(mh, mh->lfd_tcp, TAG_LISTEN_TCP, pause ? 0 : EV_IN);
}

/* Out of descriptors: the spare one is let go for a moment to accept a
 * waiting client and tell it so in one line. Returns 0 if a client was
 * refused that way (try the next), -1 if the listeners must rest. */
static int refuse_no_fds(manhole *mh, int lfd, int e)
{
    LOG(mh, MANHOLE_LOG_WARNING, "cannot accept clients: %s", strerror(e));
    if (mh->reserve_fd < 0)
        return -1;
    close(mh->reserve_fd);
    mh->reserve_fd = -1;
    int fd = accept_fd(lfd);
    if (fd >= 0)
        send_and_close(fd, "manhole: the host has too many open files; try again later\n");
    mh->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    return fd >= 0 && mh->reserve_fd >= 0 ? 0 : -1;
}

/* Full: one line to say so (the descriptor stays open). */
static void refuse_full(manhole *mh, int fd, const char *peer)
{
    LOG(mh, MANHOLE_LOG_WARNING, "refused client (%s): too many clients (limit %d)", peer,
        mh->cfg.max_clients);
    char msg[96];
    snprintf(msg, sizeof msg, "manhole: too many clients (limit %d); try again later\n",
             mh->cfg.max_clients);
    (void)xsend(fd, msg, strlen(msg));
}

/* May this connection in? 0, or -1: refused, told why, closed. A UNIX
 * client must be our uid or root; one that must authenticate first
 * (pending) takes one of AUTH_PENDING_MAX places, any other one of
 * max_clients. */
static int accept_check(manhole *mh, int fd, int transport, long uid, int pending,
                        const char *peer)
{
    const char *msg = NULL;
    if (transport == T_UNIX && uid != 0 && uid != (long)geteuid()) {
        LOG(mh, MANHOLE_LOG_WARNING, "refused client (%s): access denied", peer);
        msg = "manhole: access denied\n";
    } else if (pending && mh->npending >= AUTH_PENDING_MAX) {
        LOG(mh, MANHOLE_LOG_WARNING,
            "refused client (%s): %d connections already waiting to authenticate", peer,
            AUTH_PENDING_MAX);
        msg = "manhole: too many connections waiting to authenticate; try again later\n";
    } else if (!pending && mh->nclients >= mh->cfg.max_clients) {
        refuse_full(mh, fd, peer);
        msg = "";
    } else if (mh->fdset_mode && fd >= FD_SETSIZE) {
        LOG(mh, MANHOLE_LOG_WARNING,
            "refused client (%s): descriptor %d does not fit in the host's fd_set "
            "(FD_SETSIZE %d)", peer, fd, FD_SETSIZE);
        msg = "manhole: the host has too many open files; refused\n";
    }
    if (!msg)
        return 0;
    send_and_close(fd, msg);
    return -1;
}

static void on_accept(manhole *mh, int lfd, int transport)
{
    for (int k = 0; k < 64; k++) {
        int fd = accept_fd(lfd);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            if (errno == ECONNABORTED || errno == EPROTO)
                continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                if (refuse_no_fds(mh, lfd, errno) == 0)
                    continue;
                listen_pause(mh, 1);
                return;
            }
            LOG(mh, MANHOLE_LOG_ERROR, "accept on %s: %s",
                transport == T_UNIX ? mh->unix_path : "tcp", strerror(errno));
            listen_pause(mh, 1);
            return;
        }
        long pid = -1, uid = -1;
        client tmp;
        tmp.transport = transport;
        if (transport == T_UNIX && peer_creds(fd, &pid, &uid) < 0) {
            LOG(mh, MANHOLE_LOG_WARNING,
                "refused unix client: cannot read its credentials: %s",
                strerror(errno));
            send_and_close(fd, "manhole: access denied\n");
            continue;
        }
        describe_peer(&tmp, fd, pid, uid);
        int pending = transport == T_TCP && mh->secret_len > 0;
        if (accept_check(mh, fd, transport, uid, pending, tmp.peer) < 0)
            continue;
        client *c = calloc(1, sizeof *c);
        if (c)
            cond_init(&c->cv);
        if (!c) {
            free(c);
            send_and_close(fd, "manhole: out of memory\n");
            continue;
        }
        c->mh = mh;
        c->fd = fd;
        c->transport = transport;
        memcpy(c->peer, tmp.peer, sizeof c->peer);
        c->refs = 1;
        c->raised = -1;
        c->id = ++mh->next_id;
        c->last_active = now_mono();
        if (transport == T_TCP) {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        }
        c->ev = EV_IN;
        if (poller_add(mh, fd, c, EV_IN) < 0) {
            LOG(mh, MANHOLE_LOG_ERROR, "cannot watch client descriptor: %s",
                strerror(errno));
            send_and_close(fd, "manhole: internal error\n");
            client_free(c);
            continue;
        }
        if (pending) { /* nothing for it until it shows it knows the secret */
            c->auth = AUTH_LINE;
            c->pending = 1;
            c->auth_deadline = c->last_active + AUTH_TIMEOUT;
        }
        pthread_mutex_lock(&mh->lock);
        c->next = mh->clients;
        if (mh->clients)
            mh->clients->prev = c;
        mh->clients = c;
        if (pending)
            mh->npending++;
        else
            mh->nclients++;
        pthread_mutex_unlock(&mh->lock);
        LOG(mh, MANHOLE_LOG_INFO, "accepted client #%u (%s)", c->id, c->peer);
        if (!pending)
            client_greet(c);
    }
}

/* Everything the workers asked the host for: output to send, clients to
 * close or to read from again. Host thread. */
static void process_dirty(manhole *mh)
{
    pthread_mutex_lock(&mh->lock);
    if (!mh->wake_pending) {
        pthread_mutex_unlock(&mh->lock);
        return;
    }
    /* Drain and clear together, under the lock every writer holds: no
     * wake-up can slip in between and be lost or left armed. */
    if (mh->wake_fd_set)
        drain_wake(mh);
    mh->wake_pending = 0;
    mh->wake_fd_set = 0;
    client *list = mh->dirty, *done = NULL;
    mh->dirty = NULL;
    for (;;) {
        /* Pop one at a time: an entry stays marked until it is popped, so
         * a worker marking it again meanwhile finds it still queued here
         * and never relinks it onto the new list while we walk this one. */
        if (done)
            client_unref_locked(done);
        client *c = list;
        if (!c)
            break;
        list = c->dnext;
        c->dirty = 0;
        int resume = c->fd >= 0 && c->rd_paused && !c->in_paused;
        pthread_mutex_unlock(&mh->lock);
        if (c->fd >= 0) {
            if (resume)
                c->rd_paused = 0;
            client_send_host(c);
        }
        done = c;
        pthread_mutex_lock(&mh->lock);
    }
    pthread_mutex_unlock(&mh->lock);
}

/* C functions and binding writes that must run on the host thread. */
static void run_hostcalls(manhole *mh)
{
    pthread_mutex_lock(&mh->lock);
    while (mh->hc_head) {
        hostcall *hc = mh->hc_head;
        mh->hc_head = hc->next;
        if (!mh->hc_head)
            mh->hc_tail = NULL;
        hc->started = 1;
        pthread_mutex_unlock(&mh->lock);
        mh->in_callback++;
        hostcall_exec(hc);
        mh->in_callback--;
        pthread_mutex_lock(&mh->lock);
        hc->done = 1;
        pthread_cond_broadcast(&mh->hc_cv);
    }
    pthread_mutex_unlock(&mh->lock);
}

/* Non-threaded mode: run the queued statements here, on the host thread. */
static void host_run_jobs(manhole *mh)
{
    pthread_mutex_lock(&mh->lock);
    int n = 0;
    for (client *c = mh->jq_head; c; c = c->jnext)
        n++;
    int nc = mh->cq_head != NULL;
    pthread_mutex_unlock(&mh->lock);
    if (n == 0 && !nc)
        return;
    worker *w = &mh->hostw;
    PyGILState_STATE g = PyGILState_Ensure();
    w->py_tid = PyThread_get_thread_ident();
    worker *saved = tl_worker;
    tl_worker = w;
    for (;;) {
        pthread_mutex_lock(&mh->lock);
        cjob *j = cq_pop_locked(mh);
        pthread_mutex_unlock(&mh->lock);
        if (!j)
            break;
        run_completion(w, j);
    }
    for (int k = 0; k < n; k++) {
        pthread_mutex_lock(&mh->lock);
        client *c = dequeue_locked(mh);
        pthread_mutex_unlock(&mh->lock);
        if (!c)
            break;
        (void)process_job(w, c); /* (never a direct send: this is the host) */
    }
    tl_worker = saved;
    PyGILState_Release(g);
}

static int idle_check(manhole *mh)
{
    int closed = 0;
    if (mh->cfg.idle_timeout <= 0 || !mh->clients)
        return 0;
    double now = now_mono();
    client *next;
    for (client *c = mh->clients; c; c = next) {
        next = c->next;
        if (now - c->last_active < mh->cfg.idle_timeout)
            continue;
        pthread_mutex_lock(&mh->lock);
        int idle = !c->busy && !c->sending && buf_used(&c->inq) == 0;
        pthread_mutex_unlock(&mh->lock);
        if (!idle) {
            c->last_active = now;
            continue;
        }
        char msg[96];
        snprintf(msg, sizeof msg, "\nmanhole: idle for %g seconds; closing\n",
                 mh->cfg.idle_timeout);
        (void)xsend(c->fd, msg, strlen(msg));
        client_close(c, "idle timeout");
        closed = 1;
    }
    return closed;
}

/* TCP clients still not authenticated at their deadline are closed.
 * Returns 1 if one was. */
static int auth_check(manhole *mh)
{
    int closed = 0;
    if (mh->npending == 0)
        return 0;
    double now = now_mono();
    client *next;
    for (client *c = mh->clients; c; c = next) {
        next = c->next;
        if (c->pending && c->auth && now >= c->auth_deadline) {
            auth_refuse(c, "not authenticated in time");
            closed = 1;
        }
    }
    return closed;
}

static void client_event(client *c, unsigned ev)
{
    if (ev & EV_ERR) {
        client_close(c, "connection error");
        return;
    }
    if (ev & (EV_IN | EV_HUP)) {
        if (!c->rd_eof && !c->rd_paused)
            client_read(c);
        if (c->fd < 0)
            return;
        if (ev & EV_HUP) { /* both directions shut: the client is gone */
            client_close(c, "disconnected");
            return;
        }
    }
    if (ev & EV_OUT)
        client_send_host(c);
}

static void dispatch(manhole *mh, void *tag, unsigned ev)
{
    if (tag == TAG_LISTEN_UNIX)
        on_accept(mh, mh->lfd_unix, T_UNIX);
    else if (tag == TAG_LISTEN_TCP)
        on_accept(mh, mh->lfd_tcp, T_TCP);
    else if (tag != TAG_WAKE)
        client_event((client *)tag, ev);
}

enum { FREE_ALL, FREE_LEAVE, FREE_FORKED };
static void manhole_free(manhole *mh, int how);

/* The second half of every turn. Returns the poll status. */
static int turn_finish(manhole *mh)
{
    pthread_mutex_lock(&mh->lock);
    int work = mh->wake_pending || mh->hc_head || mh->logq_len ||
               mh->logq_dropped || mh->nreap || mh->graveyard ||
               (!mh->cfg.threaded && (mh->jq_head || mh->cq_head));
    pthread_mutex_unlock(&mh->lock);
    if (work) {
        process_dirty(mh);
        run_hostcalls(mh);
        if (!mh->cfg.threaded) {
            host_run_jobs(mh);
            process_dirty(mh);
        }
        workers_reap(mh);
    }
    if (idle_check(mh) | auth_check(mh))
        work = 1;
    if (mh->listen_paused && now_mono() >= mh->listen_resume_at)
        listen_pause(mh, 0); /* try again: a descriptor may be free by now */
    if (mh->graveyard)
        graveyard_release(mh);
    if (work) /* anything logged this turn was counted above or just now */
        log_flush(mh);
    if (mh->exits_ready > 0) {
        mh->exit_status = mh->exit_q[0];
        memmove(mh->exit_q, mh->exit_q + 1, (size_t)--mh->exits_ready * sizeof mh->exit_q[0]);
        return MANHOLE_EXIT;
    }
    return MANHOLE_OK;
}

/* ==================================================================== */
/* Public API                                                           */
/* ==================================================================== */

const char *manhole_version(void) { return MANHOLE_VERSION_STRING; }

int manhole_version_number(void) { return MANHOLE_VERSION_NUMBER; }

const char *manhole_strerror(int status)
{
    switch (status) {
    case MANHOLE_OK: return "success";
    case MANHOLE_EXIT: return "a client called sys.exit()";
    case MANHOLE_EINVAL: return "invalid argument";
    case MANHOLE_ESYS: return "system call failed";
    case MANHOLE_ENOMEM: return "out of memory";
    case MANHOLE_EPYTHON: return "Python error";
    case MANHOLE_EBUSY: return "a live server already listens at the path";
    case MANHOLE_EEXIST: return "the path exists and is not a stale socket";
    case MANHOLE_EFDSETSIZE: return "descriptor does not fit in an fd_set";
    case MANHOLE_ERECURSIVE: return "called from inside a manhole callback";
    case MANHOLE_EFORKED: return "manhole used in a child process after fork()";
    case MANHOLE_ENOTSUP: return "not supported by this build";
    case MANHOLE_ENOTFOUND: return "no such name";
    }
    return "unknown status";
}

void manhole_config_init(manhole_config *cfg)
{
    if (!cfg)
        return;
    memset(cfg, 0, sizeof *cfg);
    cfg->struct_size = sizeof *cfg;
    cfg->unix_mode = 0600;
    cfg->tcp_port = -1;
    cfg->threaded = 1;
    cfg->timeout = 5.0;
    cfg->max_clients = 0; /* at open: from the descriptor limit */
    cfg->max_line = 1u << 20;
    cfg->max_input = 4u << 20;
    cfg->max_output = 1u << 20;
    cfg->max_workers = 16;
    cfg->log_level = MANHOLE_LOG_INFO;
    cfg->close_timeout = 1.0;
}

/* Start Python or join the interpreter the host runs, and set up this
 * manhole's namespace. */
static int py_open(manhole *mh)
{
    int started = 0;
    PyGILState_STATE g = PyGILState_UNLOCKED;
    if (!Py_IsInitialized()) {
        PyPreConfig pre;
        PyPreConfig_InitPythonConfig(&pre);
        pre.configure_locale = 0; /* the host's locale is the host's */
        pre.utf8_mode = 1;
        pre.parse_argv = 0;
        PyStatus st = Py_PreInitialize(&pre);
        if (PyStatus_Exception(st))
            return set_err(mh, MANHOLE_EPYTHON, "cannot start Python: %s",
                           st.err_msg ? st.err_msg : "?");
        PyConfig pc;
        PyConfig_InitPythonConfig(&pc);
        pc.install_signal_handlers = 0; /* signals belong to the host */
        pc.parse_argv = 0;
        pc.configure_c_stdio = 0;
        st = Py_InitializeFromConfig(&pc);
        PyConfig_Clear(&pc);
        if (PyStatus_Exception(st))
            return set_err(mh, MANHOLE_EPYTHON, "cannot start Python: %s",
                           st.err_msg ? st.err_msg : "?");
        started = 1;
    } else {
        g = PyGILState_Ensure();
    }
    PyObject *mod = support_acquire(started, started ? PyThreadState_Get() : NULL);
    if (!mod)
        goto fail;
    mh->ns_type = PyObject_GetAttrString(mod, "Namespace");
    PyObject *core_type = PyObject_GetAttrString(mod, "Core");
    if (!mh->ns_type || !core_type) {
        Py_XDECREF(core_type);
        goto fail_support;
    }
    mh->core = new_of(core_type);
    Py_DECREF(core_type);
    if (!mh->core)
        goto fail_support;
    ((CoreObject *)mh->core)->mh = mh;
    ((CoreObject *)mh->core)->bindings = PyDict_New();
    mh->ns = ns_new(mh);
    if (mh->ns && started && mh->cfg.shared_namespace && ns_become_main(mh->ns) < 0)
        Py_CLEAR(mh->ns);
    /* threading takes whichever thread first imports it for the main
     * thread: make that this one, not a worker. */
    PyObject *threading = PyImport_ImportModule("threading");
    Py_XDECREF(threading);
    PyErr_Clear();
    threads_wrap(mod, 1);
    mh->complete_fn = make_from_source(complete_src, NULL);
    mh->noop = make_from_source("def _make():\n    return lambda: None\n", NULL);
    if (!mh->complete_fn || !mh->noop)
        goto fail_support;
    PyObject *builtins = PyImport_ImportModule("builtins");
    PyObject *codeop = PyImport_ImportModule("codeop");
    PyObject *stacks = make_stacks(mh->core);
    if (!((CoreObject *)mh->core)->bindings || !mh->ns || !builtins ||
        !codeop || !stacks) {
        Py_XDECREF(builtins);
        Py_XDECREF(codeop);
        Py_XDECREF(stacks);
        goto fail_support;
    }
    mh->host_py_tid = PyThread_get_thread_ident();
    mh->compiler_cls = PyObject_GetAttrString(codeop, "CommandCompiler");
    mh->filename = PyUnicode_InternFromString("<stdin>");
    mh->single = PyUnicode_InternFromString("single");
    mh->glue = PyObject_GetAttrString(mod, "glue");
    PyObject *name = PyUnicode_FromString("__main__");
    int bad = !mh->compiler_cls || !name || !mh->filename || !mh->single || !mh->glue ||
              PyDict_SetItemString(mh->ns, "__name__", name) < 0 ||
              PyDict_SetItemString(mh->ns, "__doc__", Py_None) < 0 ||
              PyDict_SetItemString(mh->ns, "__builtins__", builtins) < 0 ||
              PyDict_SetItemString(mh->ns, "stacks", stacks) < 0;
    Py_XDECREF(name);
    Py_DECREF(builtins);
    Py_DECREF(codeop);
    Py_DECREF(stacks);
    if (bad)
        goto fail_support;
    for (int more = 0; more < 2; more++) {
        /* As the interactive interpreter (and code.interact) do: give
         * sys.ps1/sys.ps2 their defaults when they are not set. */
        if (!PySys_GetObject(more ? "ps2" : "ps1")) {
            PyObject *d = PyUnicode_FromString(more ? "... " : ">>> ");
            if (d)
                PySys_SetObject(more ? "ps2" : "ps1", d);
            Py_XDECREF(d);
        }
        PyObject *p = PySys_GetObject(more ? "ps2" : "ps1");
        PyObject *s = p ? PyObject_Str(p) : NULL;
        const char *t = s ? PyUnicode_AsUTF8(s) : NULL;
        if (t) /* (no other thread yet: the lock is not needed) */
            prompt_set_locked(mh, more, t, strlen(t));
        Py_XDECREF(s);
        PyErr_Clear();
    }
    if (started) {
        mh->owns_python = 1;
        mh->main_ts = PyEval_SaveThread(); /* the host runs without it */
    } else {
        PyGILState_Release(g);
    }
    return MANHOLE_OK;

fail_support: {
    PyThreadState *ts = NULL;
    Py_CLEAR(mh->ns);
    if (mh->core)
        ((CoreObject *)mh->core)->mh = NULL;
    Py_CLEAR(mh->core);
    Py_CLEAR(mh->ns_type);
    Py_CLEAR(mh->compiler_cls);
    Py_CLEAR(mh->filename);
    Py_CLEAR(mh->single);
    Py_CLEAR(mh->glue);
    Py_CLEAR(mh->complete_fn);
    Py_CLEAR(mh->noop);
    support_release(&ts);
}
fail: {
    char what[256] = "?";
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyObject *s = v ? PyObject_Str(v) : NULL;
    const char *txt = s ? PyUnicode_AsUTF8(s) : NULL;
    snprintf(what, sizeof what, "%s", txt ? txt : "?");
    what[utf8_complete(what, strlen(what))] = 0;
    Py_XDECREF(s);
    Py_XDECREF(t);
    Py_XDECREF(v);
    Py_XDECREF(tb);
    PyErr_Clear();
    if (started)
        Py_FinalizeEx();
    else
        PyGILState_Release(g);
    return set_err(mh, MANHOLE_EPYTHON, "cannot set up Python: %s", what);
}
}

/* The default max_clients: the descriptors the process may open
 * (RLIMIT_NOFILE, its soft limit, read at open) less a reserve for the
 * host, a quarter of them and at least 64; half of them under 128. A
 * client holds one descriptor (the manhole itself five at most), so the
 * host keeps its reserve whatever the clients do. With the common soft
 * limit of 1024 that is 768. Raising the soft limit is the host's call
 * (setrlimit before manhole_open); fd-set hosts are still refused
 * descriptors past FD_SETSIZE (on_accept). */
static int default_max_clients(void)
{
    long lim = 1024;
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0)
        lim = rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur > (1 << 20) ? 1 << 20 : (long)rl.rlim_cur;
    long n = lim - (lim / 4 > 64 ? lim / 4 : 64);
    if (n < lim / 2)
        n = lim / 2;
    return n < 1 ? 1 : (int)n;
}

/* A handle with its configuration (defaults filled in), locks and
 * descriptors set to none: nothing opened yet. */
static manhole *mh_new(const manhole_config *cfg_in)
{
    manhole *mh = calloc(1, sizeof *mh);
    if (!mh)
        return NULL;
    manhole_config *c = &mh->cfg, def;
    manhole_config_init(c);
    memcpy(c, cfg_in, MH_MIN(cfg_in->struct_size, sizeof *c));
    c->struct_size = sizeof *c;
    manhole_config_init(&def);
    if (c->max_clients == 0) c->max_clients = default_max_clients();
    if (c->max_line == 0) c->max_line = def.max_line;
    if (c->max_input == 0) c->max_input = def.max_input;
    if (c->max_input < c->max_line) c->max_input = c->max_line;
    if (c->max_output == 0) c->max_output = def.max_output;
    if (c->max_workers == 0) c->max_workers = def.max_workers;
    if (c->unix_mode == 0) c->unix_mode = def.unix_mode;
    if (c->close_timeout == 0) /* (an older caller's struct: the default) */
        c->close_timeout = def.close_timeout;
    mh->lfd_unix = mh->lfd_tcp = mh->wake_r = mh->wake_w = mh->reserve_fd = -1;
    mh->tcp_port = -1;
#ifdef MH_HAVE_EPOLL
    mh->epfd = -1;
#endif
    pthread_mutex_init(&mh->lock, NULL);
    cond_init(&mh->work_cv);
    cond_init(&mh->wd_cv);
    cond_init(&mh->gone_cv);
    cond_init(&mh->hc_cv);
    mh->hostw.mh = mh;
    mh->hostw.is_host = 1;
    pthread_once(&fork_once, fork_init);
    mh->fork_gen = fork_generation;
    return mh;
}

/* Seconds in a config field: finite, not negative, at most this. */
#define MH_MAX_SECONDS 1e6

static int config_seconds(manhole *mh, const char *field, double v)
{
    if (isfinite(v) && v >= 0 && v <= MH_MAX_SECONDS)
        return MANHOLE_OK;
    return set_err(mh, MANHOLE_EINVAL,
                   "%s: %g is not a number of seconds from 0 to %.0f", field,
                   v, MH_MAX_SECONDS);
}

static int config_count(manhole *mh, const char *field, long long v)
{
    if (v >= 0)
        return MANHOLE_OK;
    return set_err(mh, MANHOLE_EINVAL,
                   "%s: %lld is negative (0 means the default)", field, v);
}

/* Refuse configuration the library would otherwise misread (negative
 * counts, non-finite or absurd durations), naming the field. Only 0 means
 * "the default". */
static int config_check(manhole *mh)
{
    const manhole_config *c = &mh->cfg;
    int rc;
    if (!c->unix_path && c->tcp_port < 0)
        return set_err(mh, MANHOLE_EINVAL,
                       "nothing to listen on: set unix_path or tcp_port");
    if (c->tcp_port < -1 || c->tcp_port > 65535)
        return set_err(mh, MANHOLE_EINVAL,
                       "tcp_port: %d out of range (-1: none, 0: any free port, "
                       "up to 65535)", c->tcp_port);
    if (c->unix_mode > 0777)
        return set_err(mh, MANHOLE_EINVAL,
                       "unix_mode: %#o has bits other than permissions (0 to 0777)",
                       c->unix_mode);
    if ((rc = config_seconds(mh, "timeout", c->timeout)) != MANHOLE_OK ||
        (rc = config_seconds(mh, "idle_timeout", c->idle_timeout)) != MANHOLE_OK ||
        (rc = config_seconds(mh, "close_timeout", c->close_timeout)) != MANHOLE_OK ||
        (rc = config_count(mh, "max_clients", c->max_clients)) != MANHOLE_OK ||
        (rc = config_count(mh, "max_workers", c->max_workers)) != MANHOLE_OK)
        return rc;
    const size_t sizes[] = {c->max_line, c->max_input, c->max_output};
    const char *names[] = {"max_line", "max_input", "max_output"};
    for (int i = 0; i < 3; i++)
        if (sizes[i] > (size_t)PTRDIFF_MAX)
            return set_err(mh, MANHOLE_EINVAL,
                           "%s: %zu bytes is absurd (a negative number?)",
                           names[i], sizes[i]);
    if (c->worker_priority != MANHOLE_WORKERS_NICE &&
        c->worker_priority != MANHOLE_WORKERS_IDLE &&
        c->worker_priority != MANHOLE_WORKERS_NORMAL)
        return set_err(mh, MANHOLE_EINVAL,
                       "worker_priority: %d is not MANHOLE_WORKERS_NICE, _IDLE "
                       "or _NORMAL", c->worker_priority);
    return MANHOLE_OK;
}

int manhole_open(manhole **out, const manhole_config *cfg_in, char *err,
                 size_t errlen)
{
    if (out)
        *out = NULL;
    if (err && errlen)
        err[0] = 0;
    if (!out || !cfg_in || cfg_in->struct_size == 0) {
        if (err && errlen)
            snprintf(err, errlen, "manhole_open: missing argument, or config "
                                  "not set up with manhole_config_init()");
        return MANHOLE_EINVAL;
    }
    manhole *mh = mh_new(cfg_in);
    if (!mh) {
        if (err && errlen)
            snprintf(err, errlen, "out of memory");
        return MANHOLE_ENOMEM;
    }
    manhole_config *c = &mh->cfg;

    int rc = config_check(mh);
    if (rc != MANHOLE_OK)
        goto fail;

    mh->unix_path = mh_strdup(c->unix_path);
    mh->tcp_host = mh_strdup(c->tcp_host ? c->tcp_host : "127.0.0.1");
    if (c->banner && c->banner[0]) {
        size_t n = strlen(c->banner);
        int nl = c->banner[n - 1] != '\n';
        mh->banner = malloc(n + 2);
        if (mh->banner) {
            memcpy(mh->banner, c->banner, n);
            if (nl)
                mh->banner[n++] = '\n';
            mh->banner[n] = 0;
            mh->banner_len = n;
        }
    }
    c->unix_path = mh->unix_path;
    c->tcp_host = mh->tcp_host;
    c->banner = mh->banner;
    if ((c->unix_path && !mh->unix_path) || !mh->tcp_host ||
        (c->banner && !mh->banner)) {
        rc = set_err(mh, MANHOLE_ENOMEM, "out of memory");
        goto fail;
    }

#ifdef MH_HAVE_EVENTFD
    mh->wake_r = mh->wake_w = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (mh->wake_r < 0) {
        rc = set_err(mh, MANHOLE_ESYS, "eventfd: %s", strerror(errno));
        goto fail;
    }
#else
    {
        int p[2];
        if (pipe(p) < 0 || fd_setup(p[0]) < 0 || fd_setup(p[1]) < 0) {
            rc = set_err(mh, MANHOLE_ESYS, "pipe: %s", strerror(errno));
            goto fail;
        }
        mh->wake_r = p[0];
        mh->wake_w = p[1];
    }
#endif
    if (poller_init(mh) < 0 || poller_add(mh, mh->wake_r, TAG_WAKE, EV_IN) < 0) {
        rc = set_err(mh, MANHOLE_ESYS, "cannot set up the poller: %s",
                     strerror(errno));
        goto fail;
    }
    if (c->unix_path && (rc = unix_listen(mh)) != MANHOLE_OK)
        goto fail;
    if (c->tcp_port >= 0 && (rc = tcp_listen(mh)) != MANHOLE_OK)
        goto fail;
    if ((rc = secret_setup(mh)) != MANHOLE_OK)
        goto fail;
    /* A spare descriptor: with none left, a waiting client is still told
     * why it is refused (on_accept). */
    mh->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if ((mh->lfd_unix >= 0 &&
         poller_add(mh, mh->lfd_unix, TAG_LISTEN_UNIX, EV_IN) < 0) ||
        (mh->lfd_tcp >= 0 && poller_add(mh, mh->lfd_tcp, TAG_LISTEN_TCP, EV_IN) < 0)) {
        rc = set_err(mh, MANHOLE_ESYS, "cannot watch the listener: %s",
                     strerror(errno));
        goto fail;
    }
    if ((rc = py_open(mh)) != MANHOLE_OK)
        goto fail;
    pthread_sigmask(SIG_SETMASK, NULL, &mh->host_sigmask);
    registry_add(mh);
    char where[PATH_MAX + 128];
    snprintf(where, sizeof where, "%s%s%s%s%s", mh->unix_path ? "unix:" : "",
             mh->unix_path ? mh->unix_path : "", mh->unix_path && mh->lfd_tcp >= 0 ? " " : "",
             mh->lfd_tcp >= 0 ? "tcp:" : "", mh->lfd_tcp >= 0 ? mh->tcp_host : "");
    LOG(mh, MANHOLE_LOG_INFO,
        "manhole %s open (%s, %s, timeout %g s, %s namespace, at most %d clients)",
        MANHOLE_VERSION_STRING, where, c->threaded ? "threaded" : "non-threaded", c->timeout,
        c->shared_namespace ? "shared" : "per-client", c->max_clients);
    log_flush(mh);
    tl_host = mh;
    *out = mh;
    return MANHOLE_OK;

fail:
    log_flush(mh);
    if (err && errlen)
        snprintf(err, errlen, "%s", mh->errmsg);
    if (mh->lfd_unix >= 0 && mh->unix_path)
        unlink(mh->unix_path); /* ours, and nobody will ever answer it */
    secret_remove(mh);
    manhole_free(mh, FREE_ALL);
    return rc;
}

/* Release descriptors and memory (no Python). FREE_LEAVE: threads left
 * behind may still use the handle, so only the descriptors go (and the
 * wake-up descriptor is disarmed first, so they never write to a number
 * the host may reuse). FREE_FORKED: a child after fork(), where no other
 * thread exists and a lock may have been copied held: descriptors only. */
static void manhole_free(manhole *mh, int how)
{
    if (how == FREE_LEAVE) {
        pthread_mutex_lock(&mh->lock);
        int w = mh->wake_w, r = mh->wake_r;
        mh->wake_w = mh->wake_r = -1;
        pthread_mutex_unlock(&mh->lock);
        if (r >= 0)
            close(r);
        if (w >= 0 && w != r)
            close(w);
    }
    while (mh->clients) {
        client *c = mh->clients;
        mh->clients = c->next;
        if (c->fd >= 0)
            close(c->fd);
        if (how == FREE_ALL)
            client_free(c);
    }
    if (mh->lfd_unix >= 0)
        close(mh->lfd_unix);
    if (mh->lfd_tcp >= 0)
        close(mh->lfd_tcp);
    if (mh->reserve_fd >= 0)
        close(mh->reserve_fd);
    if (how != FREE_LEAVE) {
        if (mh->wake_r >= 0)
            close(mh->wake_r);
        if (mh->wake_w >= 0 && mh->wake_w != mh->wake_r)
            close(mh->wake_w);
    }
#ifdef MH_HAVE_EPOLL
    if (mh->epfd >= 0)
        close(mh->epfd);
#endif
    if (how != FREE_ALL)
        return; /* the rest stays for whoever may still look at it */
    for (int i = 0; i < mh->logq_len; i++)
        free(mh->logq[(mh->logq_head + i) % LOGQ_MAX]);
    free(mh->pfds);
    free(mh->ptags);
    free(mh->unix_path);
    free(mh->tcp_host);
    free(mh->banner);
    free(mh->secret_path);
    free(mh->prompt[0]);
    free(mh->prompt[1]);
    buf_free(&mh->hostw.rec);
    pthread_mutex_destroy(&mh->lock);
    pthread_cond_destroy(&mh->work_cv);
    pthread_cond_destroy(&mh->wd_cv);
    pthread_cond_destroy(&mh->gone_cv);
    pthread_cond_destroy(&mh->hc_cv);
    free(mh);
}


void manhole_close(manhole *mh)
{
    if (!mh)
        return;
    if (mh->in_callback) { /* finish the turn first */
        mh->close_deferred = 1;
        return;
    }
    if (mh_forked(mh)) {
        /* A child after fork(): the parent's threads and Python state are
         * not ours. Release our copies of the descriptors, nothing else
         * (the socket file stays the parent's). */
        registry_remove(mh);
        manhole_free(mh, FREE_FORKED);
        return;
    }
    mh->in_callback++;

    /* 1. Stop: no new statements, interrupt running ones. */
    pthread_mutex_lock(&mh->lock);
    mh->stopping = 1;
    for (worker *w = mh->workers; w; w = w->next)
        request_interrupt_locked(w);
    pthread_cond_broadcast(&mh->work_cv);
    pthread_cond_broadcast(&mh->hc_cv);
    for (hostcall *hc = mh->hc_head; hc; hc = hc->next) {
        hc->rc = HC_CANCELLED;
        hc->done = 1;
    }
    mh->hc_head = mh->hc_tail = NULL;
    for (client *c = mh->clients; c; c = c->next)
        pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&mh->lock);

    /* 2. Listeners away; clients get what can be sent without waiting. */
    if (mh->lfd_unix >= 0) {
        poller_del(mh, mh->lfd_unix);
        close(mh->lfd_unix);
        mh->lfd_unix = -1;
    }
    if (mh->lfd_tcp >= 0) {
        poller_del(mh, mh->lfd_tcp);
        close(mh->lfd_tcp);
        mh->lfd_tcp = -1;
    }
    secret_remove(mh);
    while (mh->clients) {
        client *c = mh->clients;
        (void)client_flush(c);
        client_close(c, "manhole closed");
    }
    graveyard_release(mh);

    /* 3. Let the threads go; wait a while for them. A host that holds
     * the GIL here would keep them from ever finishing: lend it. */
    PyThreadState *lent = NULL;
    if (PyGILState_Check())
        lent = PyEval_SaveThread();
    double until = now_mono() + mh->cfg.close_timeout;
    pthread_mutex_lock(&mh->lock);
    mh->wd_stop = 1;
    pthread_cond_broadcast(&mh->wd_cv);
    while ((mh->nthreads > 0 || (mh->wd_started && !mh->wd_exited)) &&
           now_mono() < until) {
        struct timespec ts = cond_deadline(0.05);
        pthread_cond_timedwait(&mh->gone_cv, &mh->lock, &ts);
    }
    int stuck = mh->nthreads + (mh->wd_started && !mh->wd_exited);
    pthread_mutex_unlock(&mh->lock);
    log_flush(mh);
    if (stuck) {
        /* Something did not end in time: a statement in a call Python
         * cannot interrupt, maybe holding the GIL. Leave it, and all it
         * may touch (this handle, the workers, the Python objects), behind
         * rather than wait for it or free memory under it. */
        for (worker *w = mh->workers; w; w = w->next)
            if (!w->exited)
                pthread_detach(w->thread);
        if (mh->wd_started && !mh->wd_exited)
            pthread_detach(mh->wd_thread);
        LOG(mh, MANHOLE_LOG_WARNING,
            "%d thread(s) stuck in uninterruptible calls left behind", stuck);
        log_flush(mh);
        if (lent)
            PyEval_RestoreThread(lent);
        mh->in_callback--;
        if (tl_host == mh)
            tl_host = NULL;
        registry_remove(mh);
        manhole_free(mh, FREE_LEAVE);
        return;
    }
    for (worker *w = mh->workers, *next; w; w = next) {
        next = w->next;
        pthread_join(w->thread, NULL);
        buf_free(&w->rec);
        buf_free(&w->dout);
        free(w);
    }
    mh->workers = NULL;
    if (mh->wd_started)
        pthread_join(mh->wd_thread, NULL);
    if (lent)
        PyEval_RestoreThread(lent);

    /* 4. Python: sessions, namespace, streams; finalize if we started it
     * and nothing is left running in it. */
    PyGILState_STATE g = PyGILState_Ensure();
    pthread_mutex_lock(&mh->lock);
    client *jobs = mh->jq_head;
    mh->jq_head = mh->jq_tail = NULL;
    mh->njobs = 0;
    while (mh->cq_head) {
        cjob *j = mh->cq_head;
        mh->cq_head = j->next;
        cjob_free_locked(j);
    }
    mh->cq_tail = NULL;
    while (mh->dirty) { /* dirty entries hold references */
        client *c = mh->dirty;
        mh->dirty = c->dnext;
        c->dirty = 0;
        client_unref_locked(c);
    }
    pthread_mutex_unlock(&mh->lock);
    while (jobs) {
        client *c = jobs;
        jobs = c->jnext;
        if (c->has_session)
            session_close(c);
        pthread_mutex_lock(&mh->lock);
        client_unref_locked(c);
        pthread_mutex_unlock(&mh->lock);
    }
    ((CoreObject *)mh->core)->mh = NULL;
    PyDict_Clear(((CoreObject *)mh->core)->bindings);
    Py_CLEAR(mh->ns);
    Py_CLEAR(mh->core);
    Py_CLEAR(mh->ns_type);
    Py_CLEAR(mh->compiler_cls);
    Py_CLEAR(mh->filename);
    Py_CLEAR(mh->single);
    Py_CLEAR(mh->glue);
    Py_CLEAR(mh->complete_fn);
    Py_CLEAR(mh->noop);
    Py_CLEAR(mh->pool_mod);
    PyThreadState *main_ts = NULL;
    if (support_release(&main_ts)) {
        if (PyThreadState_Get() != main_ts) {
            PyGILState_Release(g);
            PyEval_RestoreThread(main_ts);
        }
        Py_FinalizeEx();
    } else {
        PyGILState_Release(g);
    }
    mh->in_callback--;
    if (tl_host == mh)
        tl_host = NULL;
    pthread_mutex_lock(&mh->lock);
    int bound = mh->nbound; /* threads of statements still running: they
                               release their clients (and so touch this
                               handle) when they end */
    pthread_mutex_unlock(&mh->lock);
    registry_remove(mh);
    manhole_free(mh, bound ? FREE_LEAVE : FREE_ALL);
}

const char *manhole_errmsg(const manhole *mh)
{
    return mh ? mh->errmsg : "no manhole";
}

#define API_GUARD(mh)                                                          \
    do {                                                                       \
        if (!(mh))                                                             \
            return MANHOLE_EINVAL;                                             \
        if ((mh)->in_callback)                                                 \
            return set_err((mh), MANHOLE_ERECURSIVE,                           \
                           "called from inside a manhole callback");          \
        if (mh_forked(mh))                                                     \
            return set_err((mh), MANHOLE_EFORKED,                              \
                           "this manhole belongs to the parent process");     \
    } while (0)

static int finish_and_maybe_close(manhole *mh)
{
    int rc = turn_finish(mh);
    if (mh->close_deferred) {
        mh->close_deferred = 0;
        manhole_close(mh);
        return MANHOLE_OK;
    }
    return rc;
}

/* The earliest time a client must be looked at: its idle timeout, or
 * its authentication deadline. */
static double next_client_deadline(const manhole *mh)
{
    double soonest = -1;
    for (client *c = mh->clients; c; c = c->next) {
        double at = mh->cfg.idle_timeout > 0 ? c->last_active + mh->cfg.idle_timeout : -1;
        if (c->pending && c->auth && (at < 0 || c->auth_deadline < at))
            at = c->auth_deadline;
        if (at >= 0 && (soonest < 0 || at < soonest))
            soonest = at;
    }
    return soonest;
}

static int internal_timeout(manhole *mh)
{
    int t = -1;
    if (mh->exits_ready > 0) /* one MANHOLE_EXIT per call: come back */
        return 0;
    if (!mh->cfg.threaded) {
        pthread_mutex_lock(&mh->lock);
        int jobs = mh->jq_head != NULL || mh->cq_head != NULL;
        pthread_mutex_unlock(&mh->lock);
        if (jobs)
            return 0;
    }
    if (mh->listen_paused) {
        double left = mh->listen_resume_at - now_mono();
        t = left <= 0 ? 0 : (int)(left * 1000.0) + 1;
    }
    if ((mh->cfg.idle_timeout > 0 && mh->clients) || mh->npending > 0) {
        double soonest = next_client_deadline(mh) - now_mono();
        int it = soonest <= 0 ? 0 : (int)(soonest * 1000.0) + 1;
        if (t < 0 || it < t)
            t = it;
    }
    return t;
}

int manhole_poll(manhole *mh, int timeout_ms)
{
    API_GUARD(mh);
    tl_host = mh;
    int wait = timeout_ms;
    int t = internal_timeout(mh);
    if (t >= 0 && (wait < 0 || t < wait))
        wait = t;
    ready evs[MAX_READY];
    int n;
    if (wait != 0 && PyGILState_Check()) {
        /* A host that holds the GIL while it waits would starve the
         * workers: lend it for the wait. */
        PyThreadState *ts = PyEval_SaveThread();
        n = poller_wait(mh, wait, evs);
        PyEval_RestoreThread(ts);
    } else {
        n = poller_wait(mh, wait, evs);
    }
    if (n < 0)
        return set_err(mh, MANHOLE_ESYS, "poll: %s", strerror(errno));
    for (int i = 0; i < n; i++)
        dispatch(mh, evs[i].tag, evs[i].ev);
    return finish_and_maybe_close(mh);
}

int manhole_fdset(manhole *mh, fd_set *rd, fd_set *wr, int *maxfd)
{
    API_GUARD(mh);
    if (!rd || !wr || !maxfd)
        return set_err(mh, MANHOLE_EINVAL, "manhole_fdset: NULL argument");
    mh->fdset_mode = 1;
    int rc = MANHOLE_OK;
#define ADD_FD(fd, set)                                                        \
    do {                                                                       \
        if ((fd) >= FD_SETSIZE)                                                \
            rc = set_err(mh, MANHOLE_EFDSETSIZE,                               \
                         "descriptor %d does not fit in an fd_set "           \
                         "(FD_SETSIZE %d)",                                    \
                         (fd), FD_SETSIZE);                                    \
        else {                                                                 \
            FD_SET((fd), (set));                                               \
            if ((fd) > *maxfd)                                                 \
                *maxfd = (fd);                                                 \
        }                                                                      \
    } while (0)
    if (mh->lfd_unix >= 0 && !mh->listen_paused)
        ADD_FD(mh->lfd_unix, rd);
    if (mh->lfd_tcp >= 0 && !mh->listen_paused)
        ADD_FD(mh->lfd_tcp, rd);
    ADD_FD(mh->wake_r, rd);
    for (client *c = mh->clients; c; c = c->next) {
        if (c->ev & EV_IN)
            ADD_FD(c->fd, rd);
        if (c->ev & EV_OUT)
            ADD_FD(c->fd, wr);
    }
#undef ADD_FD
    return rc;
}

int manhole_timeout(manhole *mh)
{
    if (!mh || mh_forked(mh))
        return -1;
    return internal_timeout(mh);
}

static int in_set(int fd, const fd_set *s)
{
    return s && fd >= 0 && fd < FD_SETSIZE && FD_ISSET(fd, s);
}

int manhole_process(manhole *mh, const fd_set *rd, const fd_set *wr)
{
    API_GUARD(mh);
    tl_host = mh;
    client *next;
    for (client *c = mh->clients; c; c = next) {
        next = c->next;
        unsigned ev = (in_set(c->fd, rd) ? EV_IN : 0) |
                      (in_set(c->fd, wr) ? EV_OUT : 0);
        if (ev)
            client_event(c, ev);
    }
    if (in_set(mh->lfd_unix, rd))
        on_accept(mh, mh->lfd_unix, T_UNIX);
    if (in_set(mh->lfd_tcp, rd))
        on_accept(mh, mh->lfd_tcp, T_TCP);
    return finish_and_maybe_close(mh);
}

int manhole_pollfds(manhole *mh, struct pollfd *fds, int nfds)
{
    API_GUARD(mh);
    if (pfds_build(mh) < 0)
        return set_err(mh, MANHOLE_ENOMEM, "out of memory");
    for (int i = 0; i < mh->npfds && i < nfds && fds; i++) {
        fds[i].fd = mh->pfds[i].fd;
        fds[i].events = mh->pfds[i].events;
        fds[i].revents = 0;
    }
    return mh->npfds;
}

int manhole_fd(manhole *mh)
{
    API_GUARD(mh);
#ifdef MH_HAVE_EPOLL
    return mh->epfd;
#else
    return set_err(mh, MANHOLE_ENOTSUP, "this build has no epoll");
#endif
}

int manhole_wakeup(manhole *mh)
{
    if (!mh)
        return MANHOLE_EINVAL;
    if (mh_forked(mh)) /* (no message: errmsg is the host thread's) */
        return MANHOLE_EFORKED;
    pthread_mutex_lock(&mh->lock);
    wake_host_force_locked(mh, 1);
    pthread_mutex_unlock(&mh->lock);
    return MANHOLE_OK;
}

int manhole_exit_status(const manhole *mh) { return mh ? mh->exit_status : 0; }

int manhole_tcp_port(const manhole *mh) { return mh ? mh->tcp_port : -1; }

const char *manhole_tcp_secret_file(const manhole *mh)
{
    return mh ? mh->secret_path : NULL;
}

int manhole_client_count(const manhole *mh) { return mh ? mh->nclients : 0; }

/* ---- Namespace API ---------------------------------------------------- */

/* Python's hard keywords (the same from 3.8 on), and __debug__, which the
 * compiler turns into a constant: names the prompt can never reach. */
static const char *const py_keywords[] = {
    "False", "None", "True", "and", "as", "assert", "async", "await", "break",
    "class", "continue", "def", "del", "elif", "else", "except", "finally",
    "for", "from", "global", "if", "import", "in", "is", "lambda", "nonlocal",
    "not", "or", "pass", "raise", "return", "try", "while", "with", "yield",
    "__debug__"};

/* MANHOLE_OK if name is a name a client can type at the prompt: a Python
 * identifier, not a keyword, and (non-ASCII) already in the NFKC form the
 * compiler turns identifiers into. Otherwise MANHOLE_EINVAL with a message
 * showing the name (escaped). */
static int name_check(manhole *mh, const char *name)
{
    int ascii = 1, ok = 1;
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
        if (*p >= 0x80)
            ascii = 0;
        else if (!(*p == '_' || (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
                   (p != (const unsigned char *)name && *p >= '0' && *p <= '9')))
            ok = 0;
    }
    const char *why = "is not a Python identifier";
    if (ok && !ascii) {
        PyGILState_STATE g = PyGILState_Ensure();
        PyObject *u = PyUnicode_DecodeUTF8(name, (Py_ssize_t)strlen(name), "strict");
        if (!u) {
            ok = 0;
            why = "is not valid UTF-8";
        } else if (PyUnicode_IsIdentifier(u) != 1) {
            ok = 0;
        } else {
            PyObject *ud = PyImport_ImportModule("unicodedata");
            PyObject *nf = ud ? PyObject_CallMethod(ud, "normalize", "sO", "NFKC", u) : NULL;
            if (nf && PyUnicode_Compare(nf, u) != 0) {
                ok = 0;
                why = "is not in NFKC form (the prompt could never name it)";
            }
            Py_XDECREF(nf);
            Py_XDECREF(ud);
        }
        Py_XDECREF(u);
        PyErr_Clear();
        PyGILState_Release(g);
    }
    for (size_t i = 0; ok && i < sizeof py_keywords / sizeof py_keywords[0]; i++)
        if (!strcmp(name, py_keywords[i])) {
            ok = 0;
            why = "is a Python keyword";
        }
    if (ok)
        return MANHOLE_OK;
    char shown[100];
    size_t n = 0;
    const unsigned char *p = (const unsigned char *)name;
    for (; *p && n + 8 < sizeof shown; p++) {
        if (*p >= 0x20 && *p < 0x7f && *p != '\\' && *p != '\'')
            shown[n++] = (char)*p;
        else
            n += (size_t)snprintf(shown + n, sizeof shown - n, "\\x%02x", *p);
    }
    shown[n] = 0;
    return set_err(mh, MANHOLE_EINVAL, "'%s'%s %s", shown, *p ? "..." : "", why);
}

#define NS_GUARD(mh, name)                                                     \
    do {                                                                       \
        if (!(mh) || !(name) || !(name)[0])                                    \
            return (mh) ? set_err((mh), MANHOLE_EINVAL, "empty name")          \
                        : MANHOLE_EINVAL;                                      \
        if (mh_forked(mh))                                                     \
            return set_err((mh), MANHOLE_EFORKED,                              \
                           "this manhole belongs to the parent process");     \
        if (name_check((mh), (name)) != MANHOLE_OK)                            \
            return MANHOLE_EINVAL;                                             \
    } while (0)

static int py_fail(manhole *mh)
{
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyObject *s = v ? PyObject_Str(v) : NULL;
    const char *txt = s ? PyUnicode_AsUTF8(s) : NULL;
    set_err(mh, MANHOLE_EPYTHON, "%s", txt ? txt : "Python error");
    Py_XDECREF(s);
    Py_XDECREF(t);
    Py_XDECREF(v);
    Py_XDECREF(tb);
    PyErr_Clear();
    return MANHOLE_EPYTHON;
}

/* Put v (a new reference, may be NULL on error) under name. GIL held. */
static int ns_put(manhole *mh, const char *name, PyObject *v)
{
    if (!v)
        return py_fail(mh);
    PyObject *bindings = ((CoreObject *)mh->core)->bindings;
    if (PyDict_GetItemString(bindings, name))
        PyDict_DelItemString(bindings, name);
    int r = PyDict_SetItemString(mh->ns, name, v);
    Py_DECREF(v);
    return r < 0 ? py_fail(mh) : MANHOLE_OK;
}

int manhole_set_int(manhole *mh, const char *name, long long v)
{
    NS_GUARD(mh, name);
    PyGILState_STATE g = PyGILState_Ensure();
    int r = ns_put(mh, name, PyLong_FromLongLong(v));
    PyGILState_Release(g);
    return r;
}

int manhole_set_double(manhole *mh, const char *name, double v)
{
    NS_GUARD(mh, name);
    PyGILState_STATE g = PyGILState_Ensure();
    int r = ns_put(mh, name, PyFloat_FromDouble(v));
    PyGILState_Release(g);
    return r;
}

int manhole_set_string(manhole *mh, const char *name, const char *utf8)
{
    NS_GUARD(mh, name);
    if (!utf8)
        return set_err(mh, MANHOLE_EINVAL, "NULL string");
    PyGILState_STATE g = PyGILState_Ensure();
    int r = ns_put(mh, name, PyUnicode_DecodeUTF8(utf8, (Py_ssize_t)strlen(utf8), "strict"));
    PyGILState_Release(g);
    return r;
}

int manhole_set_bytes(manhole *mh, const char *name, const void *data, size_t len)
{
    NS_GUARD(mh, name);
    if (!data && len)
        return set_err(mh, MANHOLE_EINVAL, "NULL data");
    PyGILState_STATE g = PyGILState_Ensure();
    int r = ns_put(mh, name, PyBytes_FromStringAndSize(data ? data : "", (Py_ssize_t)len));
    PyGILState_Release(g);
    return r;
}

int manhole_set_object(manhole *mh, const char *name, void *obj)
{
    NS_GUARD(mh, name);
    if (!obj)
        return set_err(mh, MANHOLE_EINVAL, "NULL object");
    PyGILState_STATE g = PyGILState_Ensure();
    Py_INCREF((PyObject *)obj);
    int r = ns_put(mh, name, (PyObject *)obj);
    PyGILState_Release(g);
    return r;
}

int manhole_unset(manhole *mh, const char *name)
{
    NS_GUARD(mh, name);
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *bindings = ((CoreObject *)mh->core)->bindings;
    int found = 0;
    if (PyDict_GetItemString(bindings, name)) {
        PyDict_DelItemString(bindings, name);
        found = 1;
    }
    if (PyDict_GetItemString(mh->ns, name)) {
        PyDict_DelItemString(mh->ns, name);
        found = 1;
    }
    PyErr_Clear();
    PyGILState_Release(g);
    return found ? MANHOLE_OK
                 : set_err(mh, MANHOLE_ENOTFOUND, "%s: no such name", name);
}

void *manhole_namespace(manhole *mh)
{
    return mh ? mh->ns : NULL;
}

int manhole_bind(manhole *mh, const char *name, int type, void *addr, int flags)
{
    NS_GUARD(mh, name);
    if (!addr || type < MANHOLE_BOOL || type > MANHOLE_STRING)
        return set_err(mh, MANHOLE_EINVAL, "%s: bad binding type or address", name);
    if (type == MANHOLE_STRING && (flags & MANHOLE_WRITABLE))
        return set_err(mh, MANHOLE_EINVAL, "%s: string bindings are read-only", name);
    PyGILState_STATE g = PyGILState_Ensure();
    int r = MANHOLE_OK;
    PyObject *mod = PyDict_GetItemString(PyImport_GetModuleDict(), "_manhole");
    PyObject *type_obj = mod ? PyObject_GetAttrString(mod, "Binding") : NULL;
    PyObject *b = type_obj ? new_of(type_obj) : NULL;
    Py_XDECREF(type_obj);
    if (!b) {
        r = py_fail(mh);
    } else {
        BindingObject *bo = (BindingObject *)b;
        bo->type = type;
        bo->addr = addr;
        bo->flags = flags;
        PyObject *now = binding_get(bo);
        PyObject *detached = ((NsObject *)mh->ns)->detached;
        PyObject *key = PyUnicode_FromString(name);
        if (!now || !key || PyDict_SetItem(mh->ns, key, now) < 0 ||
            PyDict_SetItem(((CoreObject *)mh->core)->bindings, key, b) < 0 ||
            (detached && PySet_Discard(detached, key) < 0)) /* bound anew */
            r = py_fail(mh);
        Py_XDECREF(key);
        Py_XDECREF(now);
        Py_DECREF(b);
    }
    PyGILState_Release(g);
    return r;
}

int manhole_def(manhole *mh, const char *name, manhole_fn *fn, void *ud,
                const char *doc, int flags)
{
    NS_GUARD(mh, name);
    if (!fn)
        return set_err(mh, MANHOLE_EINVAL, "%s: NULL function", name);
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *mod = PyDict_GetItemString(PyImport_GetModuleDict(), "_manhole");
    PyObject *type_obj = mod ? PyObject_GetAttrString(mod, "CFunction") : NULL;
    PyObject *f = type_obj ? new_of(type_obj) : NULL;
    Py_XDECREF(type_obj);
    int r;
    if (!f) {
        r = py_fail(mh);
    } else {
        CFuncObject *fo = (CFuncObject *)f;
        fo->fn = fn;
        fo->ud = ud;
        fo->flags = flags;
        fo->name = PyUnicode_FromString(name);
        fo->doc = doc ? PyUnicode_FromString(doc) : (Py_INCREF(Py_None), Py_None);
        fo->core = mh->core;
        Py_INCREF(mh->core);
        if (!fo->name || !fo->doc) {
            Py_DECREF(f);
            r = py_fail(mh);
        } else {
            r = ns_put(mh, name, f);
        }
    }
    PyGILState_Release(g);
    return r;
}
