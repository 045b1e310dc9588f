/* The bench's C clients (dyadfs bench --peer): one content pattern and one clock for both.
 * The same programs run on DYAD (under its LD_PRELOAD wrapper) and on dyadfs mounts. */
#ifndef DYADFS_BENCH_CLIENTS_H
#define DYADFS_BENCH_CLIENTS_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* CLOCK_MONOTONIC: producer and consumer run on one host, so their readings compare. */
static inline long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline uint64_t mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* The content of file number INDEX of a run with SEED: a distinct pseudo-random stream per
 * (seed, index), so a swapped, stale, short or empty file never passes for the right one. */
static inline void fill(unsigned char *buf, size_t len, uint64_t seed, uint64_t index) {
    uint64_t key = mix64(seed * 1000003ull + index);
    size_t i = 0;
    for (uint64_t w = 0; i < len; w++) {
        uint64_t word = mix64(key ^ w);
        for (int b = 0; b < 8 && i < len; b++, i++)
            buf[i] = (unsigned char)(word >> (8 * b));
    }
}

static inline long long arg_ll(const char *s, const char *what) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || end == s || v < 0) {
        fprintf(stderr, "bad %s: %s\n", what, s);
        exit(2);
    }
    return v;
}

#endif
