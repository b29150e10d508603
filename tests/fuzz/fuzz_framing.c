/*
 * libFuzzer target for everything between the socket's bytes and the
 * compiler: line framing (LF, CRLF, lone CR, telnet IAC), the line cap,
 * NUL and UTF-8 checks, the HTTP first-line check.
 *
 * It includes manhole.c to reach its static functions, and checks:
 *  - utf8_valid() agrees exactly with CPython's strict UTF-8 decoder
 *    (what later decodes the line);
 *  - framing the input in one piece or in arbitrary chunks gives the
 *    same records (the framer keeps no state it should not);
 *  - every record is well formed; a line record is at most max_line
 *    bytes, holds no NUL, CR or LF, and decodes as UTF-8;
 *  - the partial line never exceeds max_line (memory stays bounded);
 *  - the framer's messages (bad lines, notes) are valid UTF-8.
 *
 *   make fuzz FUZZ_TIME=30
 */
#include "../../manhole.c"

static manhole fz;

static int frame_all(const uint8_t *p, size_t n, int transport, size_t chunk_seed,
                     buf *recs)
{
    client c;
    memset(&c, 0, sizeof c);
    c.mh = &fz;
    c.transport = transport;
    size_t i = 0, k = 0;
    int r = 0;
    while (i < n && r == 0) {
        size_t len = chunk_seed ? 1 + (k++ * 7 + chunk_seed) % 13 : n;
        if (len > n - i)
            len = n - i;
        r = frame_bytes(&c, p + i, len, recs);
        if (c.line.len > fz.cfg.max_line)
            abort(); /* the cap must hold at every step */
        i += len;
    }
    if (r == 0 && (c.line.len || c.discard))
        r = end_line(&c, recs);
    if (r == 0)
        rec_add(recs, REC_EOF, "", 0);
    buf_free(&c.line);
    buf_free(&c.sb);
    buf_free(&c.act_comp); /* (acted upon by client_read(), not here) */
    return r;
}

static void check_records(const buf *recs)
{
    size_t i = 0;
    while (i < recs->len) {
        if (recs->len - i < 5)
            abort();
        int kind = (unsigned char)recs->p[i];
        uint32_t len;
        memcpy(&len, recs->p + i + 1, 4);
        if (i + 5 + len > recs->len)
            abort();
        const char *d = recs->p + i + 5;
        if (kind == REC_LINE) {
            if (len > fz.cfg.max_line || memchr(d, 0, len) || memchr(d, '\n', len) ||
                memchr(d, '\r', len))
                abort();
            PyObject *u = PyUnicode_DecodeUTF8(d, (Py_ssize_t)len, "strict");
            if (!u)
                abort();
            Py_DECREF(u);
        } else if (kind == REC_HELLO || kind == REC_SCRIPT) {
            if (len > fz.cfg.max_line + 64)
                abort(); /* bounded like a subnegotiation */
        } else if (kind == REC_ERROR || kind == REC_NOTE) {
            /* the framer's messages are whole UTF-8, however cut */
            PyObject *m = PyUnicode_DecodeUTF8(d, (Py_ssize_t)len, "strict");
            if (!m)
                abort();
            Py_DECREF(m);
        } else if (kind != REC_EOF) {
            abort();
        }
        i += 5 + len;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!Py_IsInitialized())
        Py_InitializeEx(0);
    if (size < 2)
        return 0;
    const uint8_t *p = data + 2;
    size_t n = size - 2;

    /* The decoder: ours and CPython's must agree byte for byte. */
    size_t bad;
    int ours = utf8_valid(p, n, &bad);
    PyObject *u = PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)n, "strict");
    if (!u)
        PyErr_Clear();
    if (ours != (u != NULL))
        abort();
    Py_XDECREF(u);

    /* The framer: one piece or many, same records. */
    fz.cfg.max_line = 1 + data[0] % 64;
    buf whole = {0}, pieces = {0};
    int transport = (data[1] & 1) ? T_TCP : T_UNIX;
    int r1 = frame_all(p, n, transport, 0, &whole);
    int r2 = frame_all(p, n, transport, 1 + (data[1] >> 1), &pieces);
    if (r1 != r2 || (r1 == 0 && (whole.len != pieces.len ||
                                 memcmp(whole.p, pieces.p, whole.len) != 0)))
        abort();
    if (r1 == 0)
        check_records(&whole);
    if (r2 == 0)
        check_records(&pieces);
    buf_free(&whole);
    buf_free(&pieces);
    return 0;
}
