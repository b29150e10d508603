/*
 * wire.c - the wire rules shared by the library and its clients: where a
 * TCP secret lives, SHA-256/HMAC, and the proofs of the challenge-response
 * (wire.h says what each is for). libc only, no Python.
 */
#define _POSIX_C_SOURCE 200809L

#include "wire.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- Where the secret lives ------------------------------------------ */

int mh_secret_dir(char *buf, size_t n, uid_t uid)
{
    const char *run = getenv("XDG_RUNTIME_DIR");
    int w = run && run[0] == '/' ? snprintf(buf, n, "%s/manhole", run)
                                 : snprintf(buf, n, "/tmp/manhole-%ld", (long)uid);
    return w < 0 || (size_t)w >= n ? -1 : 0;
}

int mh_endpoint(char *buf, size_t n, const struct sockaddr *sa, socklen_t len)
{
    char a[INET6_ADDRSTRLEN];
    int w = -1;
    if (sa->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)(const void *)sa;
        if (inet_ntop(AF_INET, &s4->sin_addr, a, sizeof a))
            w = snprintf(buf, n, "%s:%u", a, (unsigned)ntohs(s4->sin_port));
    } else if (sa->sa_family == AF_INET6 &&
               len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)(const void *)sa;
        unsigned port = ntohs(s6->sin6_port);
        if (IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr)) {
            if (inet_ntop(AF_INET, s6->sin6_addr.s6_addr + 12, a, sizeof a))
                w = snprintf(buf, n, "%s:%u", a, port);
        } else if (inet_ntop(AF_INET6, &s6->sin6_addr, a, sizeof a)) {
            w = snprintf(buf, n, "[%s]:%u", a, port);
        }
    }
    return w < 0 || (size_t)w >= n ? -1 : 0;
}

int mh_secret_path(char *buf, size_t n, uid_t uid, const char *ep)
{
    char dir[4096];
    if (mh_secret_dir(dir, sizeof dir, uid) < 0)
        return -1;
    int w = snprintf(buf, n, "%s/tcp-%s.secret", dir, ep);
    return w < 0 || (size_t)w >= n ? -1 : 0;
}

/* ---- SHA-256 (FIPS 180-4) -------------------------------------------- */

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

static uint32_t ror(uint32_t x, unsigned r)
{
    return (x >> r) | (x << (32 - r));
}

static void sha256_block(uint32_t h[8], const unsigned char *p)
{
    uint32_t w[64], v[8];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    memcpy(v, h, sizeof v);
    for (int i = 0; i < 64; i++) {
        uint32_t e = v[4], a = v[0];
        uint32_t t1 = v[7] + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) +
                      ((e & v[5]) ^ (~e & v[6])) + K256[i] + w[i];
        uint32_t t2 = (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) +
                      ((a & v[1]) ^ (a & v[2]) ^ (v[1] & v[2]));
        memmove(v + 1, v, 7 * sizeof v[0]);
        v[4] += t1;
        v[0] = t1 + t2;
    }
    for (int i = 0; i < 8; i++)
        h[i] += v[i];
}

void mh_sha256_init(mh_sha256 *s)
{
    static const uint32_t h0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(s->h, h0, sizeof h0);
    s->bytes = 0;
    s->used = 0;
}

void mh_sha256_update(mh_sha256 *s, const void *data, size_t n)
{
    const unsigned char *p = data;
    s->bytes += n;
    while (n > 0) {
        size_t k = 64 - s->used < n ? 64 - s->used : n;
        memcpy(s->block + s->used, p, k);
        s->used += k;
        p += k;
        n -= k;
        if (s->used == 64) {
            sha256_block(s->h, s->block);
            s->used = 0;
        }
    }
}

void mh_sha256_final(mh_sha256 *s, unsigned char out[32])
{
    uint64_t bits = s->bytes * 8;
    unsigned char pad[72] = {0x80};
    size_t padn = (s->used < 56 ? 56 : 120) - s->used;
    for (int i = 0; i < 8; i++)
        pad[padn + i] = (unsigned char)(bits >> (56 - 8 * i));
    mh_sha256_update(s, pad, padn + 8);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (unsigned char)(s->h[i] >> 24);
        out[4 * i + 1] = (unsigned char)(s->h[i] >> 16);
        out[4 * i + 2] = (unsigned char)(s->h[i] >> 8);
        out[4 * i + 3] = (unsigned char)s->h[i];
    }
}

void mh_hmac_sha256(const void *key, size_t klen, const void *msg, size_t mlen,
                    unsigned char out[32])
{
    unsigned char k[64] = {0}, pad[64], inner[32];
    mh_sha256 s;
    if (klen > 64) {
        mh_sha256_init(&s);
        mh_sha256_update(&s, key, klen);
        mh_sha256_final(&s, k);
    } else {
        memcpy(k, key, klen);
    }
    for (int i = 0; i < 64; i++)
        pad[i] = k[i] ^ 0x36;
    mh_sha256_init(&s);
    mh_sha256_update(&s, pad, 64);
    mh_sha256_update(&s, msg, mlen);
    mh_sha256_final(&s, inner);
    for (int i = 0; i < 64; i++)
        pad[i] = k[i] ^ 0x5c;
    mh_sha256_init(&s);
    mh_sha256_update(&s, pad, 64);
    mh_sha256_update(&s, inner, 32);
    mh_sha256_final(&s, out);
}

/* ---- Authentication --------------------------------------------------- */

static void to_hex(char *hex, const unsigned char *p, size_t n)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        hex[2 * i] = digits[p[i] >> 4];
        hex[2 * i + 1] = digits[p[i] & 15];
    }
    hex[2 * n] = '\0';
}

int mh_random_hex(char *hex, size_t n)
{
    unsigned char rnd[64];
    if (n > sizeof rnd)
        return -1;
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, rnd + got, n - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    close(fd);
    if (got != n)
        return -1;
    to_hex(hex, rnd, n);
    return 0;
}

void mh_auth_proof(char out[MH_PROOF_HEX + 1], int server, const char *secret,
                   size_t secret_len, const char *cnonce, const char *snonce,
                   const char *endpoint)
{
    char msg[64 + 2 * MH_NONCE_HEX + 256];
    int w = snprintf(msg, sizeof msg, "manhole-auth-1 %s\n%s\n%s\n%s",
                     server ? "server" : "client", cnonce, snonce, endpoint);
    size_t mlen = w < 0 ? 0 : (size_t)w < sizeof msg ? (size_t)w : sizeof msg - 1;
    unsigned char mac[32];
    mh_hmac_sha256(secret, secret_len, msg, mlen, mac);
    to_hex(out, mac, sizeof mac);
}

int mh_equal(const void *a, const void *b, size_t n)
{
    const volatile unsigned char *x = a, *y = b;
    unsigned char d = 0;
    for (size_t i = 0; i < n; i++)
        d |= (unsigned char)(x[i] ^ y[i]);
    return d == 0;
}

int mh_is_hex(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return 1;
}
