/*
 * wire-test: wire.c's rules, one request a line on stdin, one answer a
 * line on stdout, for tests/test_h3_auth.py to hold against Python's
 * hashlib, hmac and ipaddress.
 *
 *   sha256 HEX                    digest of the bytes (fed whole, and again
 *                                 in pieces of 1, 3, 63, 64, 65 bytes: all
 *                                 must agree, else "split-mismatch")
 *   hmac KEYHEX MSGHEX            HMAC-SHA256
 *   proof server|client SECRETHEX CNONCE SNONCE ENDPOINT
 *   endpoint ADDR PORT            mh_endpoint() of that address
 *   path UID ENDPOINT             mh_secret_path()
 *   random N                      mh_random_hex() of N bytes
 *   equal A B                     mh_equal() of two strings of one length
 *
 * "-" stands for empty hex.
 */
#define _POSIX_C_SOURCE 200809L

#include "../../wire.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static size_t unhex(const char *h, unsigned char *out, size_t cap)
{
    size_t n = 0;
    if (strcmp(h, "-") == 0)
        return 0;
    for (; h[0] && h[1] && n < cap; h += 2) {
        unsigned v;
        if (sscanf(h, "%2x", &v) != 1)
            break;
        out[n++] = (unsigned char)v;
    }
    return n;
}

static void put_hex(const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        printf("%02x", p[i]);
    printf("\n");
}

static void do_sha256(const char *hex)
{
    static unsigned char data[8192];
    unsigned char whole[32], part[32];
    size_t n = unhex(hex, data, sizeof data);
    mh_sha256 s;
    mh_sha256_init(&s);
    mh_sha256_update(&s, data, n);
    mh_sha256_final(&s, whole);
    static const size_t steps[] = {1, 3, 63, 64, 65};
    for (size_t k = 0; k < sizeof steps / sizeof steps[0]; k++) {
        mh_sha256_init(&s);
        for (size_t i = 0; i < n; i += steps[k])
            mh_sha256_update(&s, data + i, n - i < steps[k] ? n - i : steps[k]);
        mh_sha256_final(&s, part);
        if (memcmp(whole, part, 32) != 0) {
            printf("split-mismatch\n");
            return;
        }
    }
    put_hex(whole, 32);
}

static void do_hmac(const char *khex, const char *mhex)
{
    static unsigned char key[4096], msg[8192];
    unsigned char mac[32];
    size_t kn = unhex(khex, key, sizeof key), mn = unhex(mhex, msg, sizeof msg);
    mh_hmac_sha256(key, kn, msg, mn, mac);
    put_hex(mac, 32);
}

static void do_proof(char **a)
{
    unsigned char secret[512];
    size_t n = unhex(a[1], secret, sizeof secret);
    char out[MH_PROOF_HEX + 1];
    mh_auth_proof(out, strcmp(a[0], "server") == 0, (const char *)secret, n, a[2], a[3],
                  a[4]);
    printf("%s\n", out);
}

static void do_endpoint(const char *addr, const char *port)
{
    struct sockaddr_storage ss;
    socklen_t len;
    memset(&ss, 0, sizeof ss);
    struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, addr, &s4->sin_addr) == 1) {
        s4->sin_family = AF_INET;
        s4->sin_port = htons((unsigned short)atoi(port));
        len = sizeof *s4;
    } else if (inet_pton(AF_INET6, addr, &s6->sin6_addr) == 1) {
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((unsigned short)atoi(port));
        len = sizeof *s6;
    } else {
        printf("bad-address\n");
        return;
    }
    char ep[128];
    printf("%s\n", mh_endpoint(ep, sizeof ep, (struct sockaddr *)&ss, len) == 0 ? ep : "-1");
}

static void do_one(char **a, int n)
{
    char buf[4200];
    if (n == 2 && strcmp(a[0], "sha256") == 0)
        do_sha256(a[1]);
    else if (n == 3 && strcmp(a[0], "hmac") == 0)
        do_hmac(a[1], a[2]);
    else if (n == 6 && strcmp(a[0], "proof") == 0)
        do_proof(a + 1);
    else if (n == 3 && strcmp(a[0], "endpoint") == 0)
        do_endpoint(a[1], a[2]);
    else if (n == 3 && strcmp(a[0], "path") == 0)
        printf("%s\n", mh_secret_path(buf, sizeof buf, (uid_t)atol(a[1]), a[2]) == 0 ? buf : "-1");
    else if (n == 2 && strcmp(a[0], "random") == 0)
        printf("%s\n", mh_random_hex(buf, (size_t)atoi(a[1])) == 0 ? buf : "-1");
    else if (n == 3 && strcmp(a[0], "equal") == 0)
        printf("%d\n", strlen(a[1]) == strlen(a[2]) && mh_equal(a[1], a[2], strlen(a[1])));
    else
        printf("bad-request\n");
}

int main(void)
{
    static char line[40000];
    while (fgets(line, sizeof line, stdin)) {
        char *a[8], *save = NULL;
        int n = 0;
        for (char *t = strtok_r(line, " \n", &save); t && n < 8; t = strtok_r(NULL, " \n", &save))
            a[n++] = t;
        if (n > 0)
            do_one(a, n);
        fflush(stdout);
    }
    return 0;
}
