/* Shared by the test programs: deterministic content and a CRC-32 (zlib's, so that a test can
 * check a result with Python's zlib.crc32). Header-only: each program is one translation unit. */
#ifndef DYADFS_TEST_COMMON_H
#define DYADFS_TEST_COMMON_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint32_t crc_table[256];

static inline void crc_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
}

/* crc = crc_update(0, ...) over the whole stream, as zlib.crc32 */
static inline uint32_t crc_update(uint32_t crc, const unsigned char *buf, size_t len) {
    crc = ~crc;
    for (size_t i = 0; i < len; i++)
        crc = crc_table[(crc ^ buf[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

static inline uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* The bytes [off, off+len) of the content named by (seed, index): the same at any offset, so
 * that a file can be written in chunks. Distinct per seed and per index. */
static inline void fill(unsigned char *buf, size_t len, uint64_t seed, uint64_t index,
                        uint64_t off) {
    uint64_t key = splitmix64(seed * 1000003ull + index);
    for (size_t i = 0; i < len; i++) {
        uint64_t p = off + i;
        uint64_t word = splitmix64(key ^ (p >> 3));
        buf[i] = (unsigned char)(word >> ((p & 7) * 8));
    }
}

static inline void sleep_ms(long ms) {
    if (ms <= 0)
        return;
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static inline long arg_long(const char *s, const char *what) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s) {
        fprintf(stderr, "bad %s: %s\n", what, s);
        exit(2);
    }
    return v;
}

#endif
