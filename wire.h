/*
 * wire.h - private to manhole: what the library and its clients agree on
 * about the wire, with no Python in it (the library, manhole-cli and the
 * fuzz target all build it).
 *
 * For now: where a TCP secret lives, and the challenge-response that
 * proves both sides know it without either sending it.
 *
 * The secret file
 * ---------------
 * A host listening on ADDR:PORT writes its secret to
 *
 *     DIR/tcp-ADDR:PORT.secret         (IPv6: DIR/tcp-[ADDR]:PORT.secret)
 *
 * ADDR being the numeric address it bound (127.0.0.1, ::1, 0.0.0.0) and
 * DIR $XDG_RUNTIME_DIR/manhole when XDG_RUNTIME_DIR is an absolute path,
 * else /tmp/manhole-UID. So two hosts on one port number but different
 * addresses have different files, and a client finds the secret of the
 * address it is about to connect to, never of another.
 *
 * Authentication (TCP)
 * --------------------
 * A plain client sends the secret as its first line, as always. A client
 * that does not want to hand the secret to whoever listens there sends,
 * as its first bytes, telnet subnegotiations of option 77 (README,
 * The extended channel):
 *
 *   client: IAC SB 77 'A' "1 " CNONCE IAC SE
 *   server: IAC SB 77 'A' "1 " SNONCE " " SPROOF IAC SE
 *   client: IAC SB 77 'A' CPROOF IAC SE            (after checking SPROOF)
 *
 * CNONCE and SNONCE are MH_NONCE_HEX lowercase hex digits of fresh random
 * bytes; the proofs are HMAC-SHA256 in lowercase hex (MH_PROOF_HEX) of
 *
 *   "manhole-auth-1 server\n" CNONCE "\n" SNONCE "\n" ENDPOINT   (SPROOF)
 *   "manhole-auth-1 client\n" CNONCE "\n" SNONCE "\n" ENDPOINT   (CPROOF)
 *
 * keyed with the secret line (without its newline). ENDPOINT is the
 * address the connection reached, as mh_endpoint() writes it ("127.0.0.1:
 * 7000", "[::1]:7000"): the server's getsockname(), the client's
 * getpeername(). A listener that is not the host learns a nonce and
 * nothing it can use; a proof relayed from another endpoint does not
 * match. After CPROOF the server goes on as after a right secret line
 * (banner, prompt); a wrong one gets "manhole: authentication failed".
 */
#ifndef MANHOLE_WIRE_H
#define MANHOLE_WIRE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

/* Telnet, and the private option of the extended channel. */
#define MH_IAC 255
#define MH_SB 250
#define MH_SE 240
#define MH_OPT 77

/* Authentication record: type letter, version, sizes (hex digits). */
#define MH_REC_AUTH 'A'
#define MH_AUTH_VERSION "1"
#define MH_NONCE_HEX 32
#define MH_PROOF_HEX 64
#define MH_SECRET_MAX 128 /* bytes of a secret line, newline excluded */

/* ---- Where the secret lives ---- */

/* The directory of the secret files of user `uid` ($XDG_RUNTIME_DIR/manhole
 * if XDG_RUNTIME_DIR is absolute, else /tmp/manhole-UID). 0, or -1 when it
 * does not fit in n bytes. */
int mh_secret_dir(char *buf, size_t n, uid_t uid);

/* "127.0.0.1:7000" or "[::1]:7000" for an AF_INET or AF_INET6 address
 * (an IPv4-mapped IPv6 address is written as IPv4). 0, or -1 for another
 * family or when it does not fit. */
int mh_endpoint(char *buf, size_t n, const struct sockaddr *sa, socklen_t len);

/* DIR/tcp-ENDPOINT.secret for the endpoint text `ep`. 0 or -1. */
int mh_secret_path(char *buf, size_t n, uid_t uid, const char *ep);

/* ---- Hashing ---- */

typedef struct {
    uint32_t h[8];
    uint64_t bytes;
    unsigned char block[64];
    size_t used;
} mh_sha256;

void mh_sha256_init(mh_sha256 *s);
void mh_sha256_update(mh_sha256 *s, const void *data, size_t n);
void mh_sha256_final(mh_sha256 *s, unsigned char out[32]);
void mh_hmac_sha256(const void *key, size_t klen, const void *msg, size_t mlen,
                    unsigned char out[32]);

/* ---- Authentication ---- */

/* n random bytes from the kernel, written as 2n lowercase hex digits and a
 * NUL into hex. 0, or -1 when no randomness could be read. */
int mh_random_hex(char *hex, size_t n);

/* The proof (MH_PROOF_HEX hex digits and a NUL) of one side: server != 0
 * for SPROOF, 0 for CPROOF. */
void mh_auth_proof(char out[MH_PROOF_HEX + 1], int server, const char *secret,
                   size_t secret_len, const char *cnonce, const char *snonce,
                   const char *endpoint);

/* 1 when the n bytes at a and b are equal, in time that depends on n only. */
int mh_equal(const void *a, const void *b, size_t n);

/* 1 when s[0..n) are n lowercase hex digits. */
int mh_is_hex(const char *s, size_t n);

#endif
