/*
 * manhole.h - a Python REPL inside a running C program.
 *
 * A program opens a manhole, keeps calling it from its own event loop, and
 * anyone allowed onto the UNIX socket (the process's own user or root) can
 * `nc -U PATH` and inspect the live process with an embedded CPython.
 *
 * Conventions used by every call below:
 *  - Calls that can fail return an int: 0 (MANHOLE_OK) or more on success,
 *    a negative MANHOLE_E* code on failure. manhole_strerror() names a code;
 *    manhole_errmsg() gives the detail of the last failure on a handle (the
 *    path or address and the system's reason).
 *  - A handle is driven from one thread at a time, the "host thread": the
 *    thread that calls manhole_poll()/manhole_process(). Calls marked "any
 *    thread" may be made from other threads too.
 *  - The library never prints, never raises or catches signals, never calls
 *    exit(), and never blocks the host thread for longer than it is asked to
 *    (except while running a statement in non-threaded mode).
 *
 * The full guide, with a complete host loop, is README.md; manhole(3) is the
 * reference manual.
 */
#ifndef MANHOLE_H
#define MANHOLE_H

#include <poll.h>
#include <stddef.h>
#include <sys/select.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Version -------------------------------------------------------- */

#define MANHOLE_VERSION_MAJOR 0
#define MANHOLE_VERSION_MINOR 6
#define MANHOLE_VERSION_PATCH 0
#define MANHOLE_VERSION_STRING "0.6.0"
/* One comparable number: 0xMMmmpp (0.4.0 is 0x000400). */
#define MANHOLE_VERSION_NUMBER                                                 \
    ((MANHOLE_VERSION_MAJOR << 16) | (MANHOLE_VERSION_MINOR << 8) |            \
     MANHOLE_VERSION_PATCH)

#if defined(__GNUC__) && __GNUC__ >= 4
#define MANHOLE_API __attribute__((visibility("default")))
#else
#define MANHOLE_API
#endif

/* The version of the library actually linked, e.g. "0.4.0". Any thread. */
MANHOLE_API const char *manhole_version(void);
/* MANHOLE_VERSION_NUMBER of the library actually linked. Any thread. */
MANHOLE_API int manhole_version_number(void);

/* ---- Status codes ----------------------------------------------------- */

enum {
    MANHOLE_OK = 0,
    MANHOLE_EXIT = 1,         /* a client called sys.exit(): see
                                 manhole_exit_status() */
    MANHOLE_EINVAL = -1,      /* bad argument or configuration */
    MANHOLE_ESYS = -2,        /* a system call failed (see manhole_errmsg) */
    MANHOLE_ENOMEM = -3,      /* out of memory */
    MANHOLE_EPYTHON = -4,     /* Python failed to start or to set up */
    MANHOLE_EBUSY = -5,       /* a live manhole already listens at the path */
    MANHOLE_EEXIST = -6,      /* the path exists and is not a stale socket */
    MANHOLE_EFDSETSIZE = -7,  /* a descriptor does not fit in an fd_set */
    MANHOLE_ERECURSIVE = -8,  /* called from inside a manhole callback */
    MANHOLE_EFORKED = -9,     /* used in a child process after fork() */
    MANHOLE_ENOTSUP = -10,    /* not available on this platform or build */
    MANHOLE_ENOTFOUND = -11   /* no such name in the namespace */
};

/* A static English text for a status code. Any thread. */
MANHOLE_API const char *manhole_strerror(int status);

/* ---- Configuration ---------------------------------------------------- */

/* Log levels passed to the log callback. */
enum {
    MANHOLE_LOG_ERROR = 0,   /* something the host should know failed */
    MANHOLE_LOG_WARNING = 1, /* refused clients, risky configuration */
    MANHOLE_LOG_INFO = 2,    /* clients accepted and closed, exits */
    MANHOLE_LOG_AUDIT = 3,   /* every input line (only with cfg.audit) */
    MANHOLE_LOG_DEBUG = 4
};

/* Log callback: called on the host thread, from inside manhole_open(),
 * manhole_poll(), manhole_process() and manhole_close(). msg is one line
 * without a trailing newline. Calls back into the library from here fail
 * with MANHOLE_ERECURSIVE. */
typedef void manhole_log_fn(void *ud, int level, const char *msg);

typedef struct manhole_config {
    size_t struct_size;     /* set by manhole_config_init(); leave it */

    /* Where to listen: a UNIX socket, TCP, or both (at least one). */
    const char *unix_path;  /* NULL: no UNIX socket */
    unsigned unix_mode;     /* socket file permissions; default 0600 */
    const char *tcp_host;   /* default "127.0.0.1" */
    int tcp_port;           /* -1 (default): no TCP; 0: ephemeral port */
    int tcp_allow_nonlocal; /* must be 1 to bind a non-loopback address */

    /* Sessions. */
    const char *banner;     /* sent to each client on connect; NULL: none */
    int threaded;           /* 1 (default): statements run on worker threads;
                               0: inside manhole_poll() on the host thread */
    double timeout;         /* seconds a statement may run; default 5;
                               0: no limit (at most 1e6, see below) */
    int shared_namespace;   /* 0 (default): each client starts from a copy
                               of the manhole's namespace; 1: one for all */

    /* Limits (0 keeps the default; a negative value is MANHOLE_EINVAL). */
    int max_clients;        /* connected clients (a TCP client counts
                               once authenticated); default: from the
                               descriptor limit at open (RLIMIT_NOFILE
                               less max(64, a quarter); 768 of 1024) */
    size_t max_line;        /* bytes in one input line; default 1 MiB */
    size_t max_input;       /* bytes of queued input per client; 4 MiB */
    size_t max_output;      /* bytes of unsent output per client before its
                               statement pauses; default 1 MiB */
    int max_workers;        /* threads running statements; default 16 */
    double idle_timeout;    /* seconds before a silent idle client is
                               closed; default 0: never (at most 1e6) */

    /* Logging: silent unless a callback is given. */
    manhole_log_fn *log;
    void *log_ud;
    int log_level;          /* most verbose level delivered; default INFO */
    int audit;              /* 1: log every input line at MANHOLE_LOG_AUDIT */

    /* Added in 0.3.0 (new fields always go last: struct_size tells the
     * library which ones a caller knows). */
    int worker_priority;    /* MANHOLE_WORKERS_NICE (default), _IDLE or
                               _NORMAL: see below */
    /* Added in 0.4.0. */
    double close_timeout;   /* seconds manhole_close() waits for running
                               statements to end once interrupted; then it
                               leaves them behind; default 1 (0 too) */
    /* Added in 0.5.0: TCP clients must send a secret first, or prove
     * they know it (README, Security). */
    const char *tcp_secret;      /* the secret (1 to 128 bytes, no line
                                    breaks); NULL (default): the library
                                    makes a random one and writes it to
                                    tcp_secret_file */
    const char *tcp_secret_file; /* where the secret is written (0600);
                                    NULL: DIR/tcp-ADDR:PORT.secret, named
                                    after the address bound (IPv6:
                                    tcp-[ADDR]:PORT.secret), DIR being
                                    $XDG_RUNTIME_DIR/manhole if that is
                                    absolute, else /tmp/manhole-UID */
    int tcp_insecure;            /* 1: no secret; any local user who can
                                    connect gets a prompt (logged as a
                                    warning) */
} manhole_config;

/* worker_priority: how much CPU statements may take from the host
 * (Linux; elsewhere workers keep the host's priority).
 *  NICE    worker threads run at nice +5 (the default);
 *  IDLE    SCHED_IDLE: statements only use CPU nobody else wants, and the
 *          host's loop always preempts them (a busy machine may starve
 *          them until their timeout);
 *  NORMAL  the host's own priority. */
enum {
    MANHOLE_WORKERS_NICE = 0,
    MANHOLE_WORKERS_IDLE = 1,
    MANHOLE_WORKERS_NORMAL = 2
};

/* Fill *cfg with the defaults. Always call this first, then change fields.
 * manhole_open() refuses with MANHOLE_EINVAL, and a message naming the
 * field, any value it would otherwise have to guess about: a negative count
 * (max_clients, max_workers), a size above PTRDIFF_MAX (max_line,
 * max_input, max_output: a negative number converted), a duration
 * (timeout, idle_timeout, close_timeout) that is NaN, infinite, negative
 * or above 1e6 seconds, a tcp_port below -1 or above 65535, a unix_mode
 * above 0777, an unknown worker_priority. Any thread. */
MANHOLE_API void manhole_config_init(manhole_config *cfg);

/* ---- Lifecycle -------------------------------------------------------- */

typedef struct manhole manhole;

/* Open a manhole: start Python if the process has not (or join the
 * interpreter the host already runs), bind and listen.
 * A stale UNIX socket (nobody listening) is replaced; a live one, or any
 * other kind of file at the path, is left alone and the call fails.
 * On success *out is the new handle. On failure *out is NULL and, when err
 * is not NULL, err holds a one-line reason naming the path or address.
 * Call from the host thread. Returns MANHOLE_OK or a negative code. */
MANHOLE_API int manhole_open(manhole **out, const manhole_config *cfg,
                             char *err, size_t errlen);

/* Close a manhole: disconnect clients (sending what output can be sent
 * without waiting), interrupt running statements, join the worker threads
 * (a thread stuck in an uninterruptible call is given close_timeout, then left
 * to end on its own, keeping the handle's memory and Python objects), and
 * release Python if the library started it.
 * The socket file is left in place; the next manhole_open() replaces it.
 * NULL is accepted. In a child after fork() it only releases descriptors
 * and memory. Call from the host thread. */
MANHOLE_API void manhole_close(manhole *mh);

/* The detail of the last failed call on mh (never NULL). Host thread. */
MANHOLE_API const char *manhole_errmsg(const manhole *mh);

/* ---- Driving the manhole from the host's loop ------------------------- */

/* Do all pending work: accept, read, run statements (non-threaded mode),
 * write. Waits at most timeout_ms for something to do (0: only what is
 * ready now; -1: until something happens); a signal ends the wait early.
 * A caller holding the GIL has it released while waiting. Returns MANHOLE_OK,
 * MANHOLE_EXIT once per client that called sys.exit() (after that client's
 * output was sent and its connection closed), or a negative code.
 * Host thread. */
MANHOLE_API int manhole_poll(manhole *mh, int timeout_ms);

/* For hosts running select(): add the manhole's descriptors to rd and wr
 * (they are never cleared) and raise *maxfd to the highest one added.
 * A descriptor at or above FD_SETSIZE is never added: the call then returns
 * MANHOLE_EFDSETSIZE and the host should use manhole_poll() or
 * manhole_pollfds() instead. While a host uses this call, clients whose
 * descriptor would not fit are refused. Host thread. */
MANHOLE_API int manhole_fdset(manhole *mh, fd_set *rd, fd_set *wr,
                              int *maxfd);

/* Milliseconds the host may sleep before it must call manhole_process()
 * (or manhole_poll()) even if no descriptor is ready: -1 means no limit,
 * 0 means now. Host thread. */
MANHOLE_API int manhole_timeout(manhole *mh);

/* After select() returned: handle the readiness it reported for the
 * manhole's descriptors (other descriptors in the sets are ignored) and
 * any due timer. NULL sets mean "timers only". Never blocks (except to run
 * statements in non-threaded mode). Returns as manhole_poll(). Host thread.
 */
MANHOLE_API int manhole_process(manhole *mh, const fd_set *rd,
                                const fd_set *wr);

/* For hosts running poll(): write up to nfds entries (fd and events) into
 * fds and return how many entries the manhole needs (call with nfds 0 to
 * size the array). After poll() returns, call manhole_poll(mh, 0).
 * Host thread. */
MANHOLE_API int manhole_pollfds(manhole *mh, struct pollfd *fds, int nfds);

/* One descriptor that becomes readable whenever the manhole has work: watch
 * it (and manhole_timeout()) from epoll, libevent, libuv, ..., and call
 * manhole_poll(mh, 0) when it fires. Returns the descriptor, or
 * MANHOLE_ENOTSUP where the build has no epoll. Host thread. */
MANHOLE_API int manhole_fd(manhole *mh);

/* Make a manhole_poll() that is waiting (or the next one) return at once,
 * and a host sleeping on manhole_fd()/the fd-set descriptors wake up. For
 * hosts whose only wait is manhole_poll() and that have another thread
 * with news for the loop. Returns MANHOLE_OK (also when a wake-up was
 * already pending: several calls before the host's next turn make it
 * return once), MANHOLE_EINVAL when mh is NULL, or MANHOLE_EFORKED in a
 * child after fork() (the parent's loop is not woken); sets no
 * manhole_errmsg(). Any thread; not from a signal handler. */
MANHOLE_API int manhole_wakeup(manhole *mh);

/* The status a client passed to sys.exit() (0 for sys.exit() or
 * sys.exit(None), 1 for a non-integer argument), valid after MANHOLE_EXIT.
 * Host thread. */
MANHOLE_API int manhole_exit_status(const manhole *mh);

/* The TCP port actually bound (useful with tcp_port 0), or -1. Any thread.
 */
MANHOLE_API int manhole_tcp_port(const manhole *mh);

/* The file holding the TCP secret (README, Security), or NULL: no TCP,
 * tcp_insecure, or a secret the host gave without a file. Clients such as
 * manhole-cli read it (and prove they know it without sending it); a
 * plain client sends its content as its first line. The library removes
 * the file in manhole_close() if it is still the one it wrote. Any thread. */
MANHOLE_API const char *manhole_tcp_secret_file(const manhole *mh);

/* Number of connected clients (TCP clients once authenticated). Host
 * thread. */
MANHOLE_API int manhole_client_count(const manhole *mh);

/* ---- The namespace ---------------------------------------------------- */
/*
 * Names set here are seen by every client: in the shared namespace
 * directly, or in each client's copy (copied when the client runs its first
 * statement; bindings are live in every copy). These calls take the GIL,
 * so call them from the host thread while setting up, or between loop
 * turns; they are cheap. Each returns MANHOLE_OK, MANHOLE_EINVAL (bad
 * argument, or a name a client could not type: NULL, empty, not a Python
 * identifier, a keyword such as "class" or "None", or non-ASCII not in
 * NFKC form; manhole_errmsg() says which), MANHOLE_EPYTHON (Python
 * refused: see manhole_errmsg), or MANHOLE_EFORKED; manhole_unset() also
 * MANHOLE_ENOTFOUND. Setting a name replaces any value, binding or
 * function of that name.
 */

/* Types of values, for bindings and for C functions. */
enum {
    MANHOLE_NONE = 0,
    MANHOLE_BOOL,      /* bool */
    MANHOLE_INT,       /* int */
    MANHOLE_UINT,      /* unsigned int */
    MANHOLE_LONG,      /* long */
    MANHOLE_ULONG,     /* unsigned long */
    MANHOLE_LLONG,     /* long long */
    MANHOLE_ULLONG,    /* unsigned long long */
    MANHOLE_SIZE,      /* size_t */
    MANHOLE_FLOAT,     /* float */
    MANHOLE_DOUBLE,    /* double */
    MANHOLE_STRING,    /* UTF-8 text */
    MANHOLE_BYTES      /* bytes */
};

MANHOLE_API int manhole_set_int(manhole *mh, const char *name, long long v);
MANHOLE_API int manhole_set_double(manhole *mh, const char *name, double v);
/* utf8 must be valid UTF-8; it is copied. */
MANHOLE_API int manhole_set_string(manhole *mh, const char *name,
                                   const char *utf8);
MANHOLE_API int manhole_set_bytes(manhole *mh, const char *name,
                                  const void *data, size_t len);
/* For hosts that use Python: obj is a PyObject * (borrowed; the namespace
 * takes its own reference). */
MANHOLE_API int manhole_set_object(manhole *mh, const char *name, void *obj);
/* Remove a name (and any binding or function of that name). */
MANHOLE_API int manhole_unset(manhole *mh, const char *name);
/* The namespace dict itself, a PyObject * borrowed from the manhole, for
 * hosts that use Python (touch it only while holding the GIL). */
MANHOLE_API void *manhole_namespace(manhole *mh);

/* Flags for manhole_bind() and manhole_def(). */
enum {
    MANHOLE_WRITABLE = 1,   /* bind: assignments from the REPL write the C
                               variable (on the host thread) */
    MANHOLE_ANY_THREAD = 2  /* def: the function is thread-safe and may run
                               on a worker thread, without waiting for the
                               host thread */
};

/* Bind name to a live C variable: every read in the REPL returns its
 * current value (read with a relaxed atomic load, so word-sized variables
 * never tear). type is MANHOLE_BOOL ... MANHOLE_DOUBLE for a variable of
 * that C type, or MANHOLE_STRING for a `const char *` variable (read-only;
 * the host must keep the string alive). With MANHOLE_WRITABLE, assigning
 * the name writes the variable on the host thread, inside manhole_poll();
 * otherwise assigning it raises AttributeError. addr must outlive mh.
 * `del name` at the prompt removes the binding from the namespace it runs
 * in (the client's own copy; with shared_namespace, the one all clients
 * share): there the name is then undefined, and assigning it makes an
 * ordinary Python variable. The C variable and other namespaces keep the
 * binding; binding the name again from the host restores it in the shared
 * namespace. */
MANHOLE_API int manhole_bind(manhole *mh, const char *name, int type,
                             void *addr, int flags);

/* A value passed to or returned from a C function. */
typedef struct manhole_value {
    int type;          /* MANHOLE_NONE, BOOL, LLONG, DOUBLE, STRING, BYTES */
    long long i;       /* BOOL (0/1) and LLONG */
    double d;          /* DOUBLE */
    const char *s;     /* STRING (UTF-8, NUL-terminated) and BYTES */
    size_t len;        /* length of s in bytes */
} manhole_value;

/* Exceptions a C function can raise (its return value). */
enum {
    MANHOLE_RAISE_RUNTIME = 1, /* RuntimeError(err) */
    MANHOLE_RAISE_VALUE,       /* ValueError(err) */
    MANHOLE_RAISE_TYPE,        /* TypeError(err) */
    MANHOLE_RAISE_KEY          /* KeyError(err) */
};

/* A C function callable from the REPL as name(arg, ...). Positional
 * arguments arrive converted: None, bool, int (as LLONG), float (DOUBLE),
 * str (STRING), bytes (BYTES); anything else raises TypeError before the
 * call. argv strings are valid during the call only. Set *ret (preset to
 * MANHOLE_NONE); STRING/BYTES results are copied after the call returns.
 * Return 0, or a MANHOLE_RAISE_* code with a message written into err
 * (errlen bytes). The GIL is not held during the call. */
typedef int manhole_fn(void *ud, int argc, const manhole_value *argv,
                       manhole_value *ret, char *err, size_t errlen);

/* Publish fn as name. By default it runs on the host thread, inside
 * manhole_poll()/manhole_process(), whichever thread calls it (a worker, a
 * thread started from the REPL), so it may touch host state without locks;
 * calls back into the library from it fail with MANHOLE_ERECURSIVE. With
 * MANHOLE_ANY_THREAD it runs directly on the calling thread. doc becomes
 * its __doc__ (may be NULL). */
MANHOLE_API int manhole_def(manhole *mh, const char *name, manhole_fn *fn,
                            void *ud, const char *doc, int flags);

#ifdef __cplusplus
}
#endif
#endif /* MANHOLE_H */
