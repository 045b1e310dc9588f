/* consumer SIZE SEED READY_DIR PATH...
 * Makes the directory READY_DIR (the bench's sign that it is about to open: a line on stdout
 * would do on one host, but `flux exec` forwards output only when the program ends), then
 * for each PATH (number i): open(O_RDONLY) (which waits for the
 * publication under DYAD and dyadfs), read to EOF in 4 MiB reads, close(); prints
 * "i t_call t_open t_done bytes ok" (CLOCK_MONOTONIC ns: before open() was called, after it
 * returned, after the read that returned 0), ok = 1 when the bytes are exactly SIZE bytes of
 * content (SEED, i), checked after the timing. Goes on after a bad file; exits 1 if any was. */
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "clients.h"

#define CHUNK (4u << 20)

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: consumer SIZE SEED READY_DIR PATH...\n");
        return 2;
    }
    size_t size = (size_t)arg_ll(argv[1], "SIZE");
    uint64_t seed = (uint64_t)arg_ll(argv[2], "SEED");
    /* room for a file longer than expected, so that it is seen as longer */
    unsigned char *buf = malloc(size + CHUNK), *want = malloc(size ? size : 1);
    if (!buf || !want)
        return 3;
    int bad = 0;
    if (mkdir(argv[3], 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "consumer: mkdir %s: %s\n", argv[3], strerror(errno));
        return 1;
    }
    for (int i = 0; i + 4 < argc; i++) {
        const char *path = argv[i + 4];
        long long t0 = now_ns();
        int fd = open(path, O_RDONLY);
        long long t1 = now_ns();
        if (fd < 0) {
            fprintf(stderr, "consumer: open %s: %s\n", path, strerror(errno));
            printf("%d %lld %lld %lld -1 0\n", i, t0, t1, t1);
            fflush(stdout);
            bad = 1;
            continue;
        }
        size_t got = 0;
        for (;;) {
            size_t room = size + CHUNK - got;
            ssize_t r = read(fd, buf + got, room < CHUNK ? room : CHUNK);
            if (r < 0) {
                fprintf(stderr, "consumer: read %s: %s\n", path, strerror(errno));
                break;
            }
            if (r == 0 || room == 0)
                break;
            got += (size_t)r;
        }
        long long t2 = now_ns();
        close(fd);
        fill(want, size, seed, (uint64_t)i);
        int ok = got == size && memcmp(buf, want, size) == 0;
        bad |= !ok;
        printf("%d %lld %lld %lld %zu %d\n", i, t0, t1, t2, got, ok);
        fflush(stdout);
    }
    return bad;
}
