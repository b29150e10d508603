/*
 * floor: the in-process cost of one `1+1` statement through the library's
 * own path (session_line: codeop compile, eval, display hook, prompt, the
 * output buffer), with the GIL taken and released per statement as a
 * worker does. No sockets, no other thread. It includes manhole.c to call
 * its internals.
 *
 *   floor N   prints "floor median_us p99_us"
 */
#include "../manhole.c"

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 20000;
    manhole_config cfg;
    manhole_config_init(&cfg);
    cfg.timeout = 5; /* as the library runs: the watchdog watches */
    manhole *mh = mh_new(&cfg); /* a handle with nothing opened but Python */
    if (py_open(mh) != MANHOLE_OK) {
        fprintf(stderr, "floor: %s\n", mh->errmsg);
        return 1;
    }
    client *c = calloc(1, sizeof *c);
    c->mh = mh;
    c->refs = 1;
    cond_init(&c->cv);
    worker *w = calloc(1, sizeof *w);
    w->mh = mh;
    w->py_tid = PyThread_get_thread_ident();
    tl_worker = w;
    PyThreadState *ts = mh->main_ts;
    double *t = malloc((size_t)n * sizeof *t);
    for (long i = -n / 10; i < n; i++) {
        double t0 = now_mono();
        PyEval_RestoreThread(ts);
        session_line(w, c, "1+1", 3, 1);
        ts = PyEval_SaveThread();
        double t1 = now_mono();
        pthread_mutex_lock(&mh->lock);
        if (i == 0 && strncmp(c->out.p + c->out.head, "2\n>>> ", 6) != 0) {
            fprintf(stderr, "floor: unexpected output\n");
            return 1;
        }
        buf_clear(&c->out);
        pthread_mutex_unlock(&mh->lock);
        if (i >= 0)
            t[i] = (t1 - t0) * 1e6;
    }
    qsort(t, (size_t)n, sizeof *t, cmp_d);
    printf("floor %.2f %.2f\n", t[n / 2], t[n * 99 / 100]);

    /* CPython's own ceiling for printing lines: 500,000 print() calls of
     * 100 bytes into an io.StringIO, no manhole involved. */
    PyEval_RestoreThread(ts);
    PyObject *g = PyDict_New();
    PyDict_SetItemString(g, "__builtins__", PyEval_GetBuiltins());
    PyObject *r = PyRun_String(
        "import io, time\n"
        "best = 0\n"
        "for _ in range(3):\n"
        "    sink = io.StringIO(); t0 = time.perf_counter()\n"
        "    for i in range(500000): print('x' * 99, file=sink)\n"
        "    best = max(best, 50.0 / (time.perf_counter() - t0))\n",
        Py_file_input, g, g);
    PyObject *best = r ? PyDict_GetItemString(g, "best") : NULL;
    printf("print %.1f\n", best ? PyFloat_AsDouble(best) : 0.0);
    Py_XDECREF(r);
    Py_DECREF(g);
    ts = PyEval_SaveThread();
    return 0;
}
