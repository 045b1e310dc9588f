/* writer PREFIX N SIZE SEED [MIN_MS MAX_MS]
 * For i in 0..N-1: open(PREFIX<i>, O_WRONLY|O_CREAT|O_TRUNC), write SIZE bytes of content
 * (SEED, i) in one write() loop, close(); then sleep a pseudo-random MIN_MS..MAX_MS.
 * Prints "i size crc32" per frame once close() returned. Exits 1 at the first error. */
#include <fcntl.h>
#include <unistd.h>

#include "common.h"

int main(int argc, char **argv) {
    if (argc != 5 && argc != 7) {
        fprintf(stderr, "usage: writer PREFIX N SIZE SEED [MIN_MS MAX_MS]\n");
        return 2;
    }
    crc_init();
    long n = arg_long(argv[2], "N"), size = arg_long(argv[3], "SIZE");
    long seed = arg_long(argv[4], "SEED");
    long lo = argc == 7 ? arg_long(argv[5], "MIN_MS") : 0;
    long hi = argc == 7 ? arg_long(argv[6], "MAX_MS") : 0;
    unsigned char *buf = malloc(size ? (size_t)size : 1);
    char path[4096];
    if (!buf)
        return 3;
    for (long i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s%ld", argv[1], i);
        fill(buf, (size_t)size, (uint64_t)seed, (uint64_t)i, 0);
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) {
            fprintf(stderr, "writer: open %s: %s (errno %d)\n", path, strerror(errno), errno);
            return 1;
        }
        long done = 0;
        while (done < size) {
            ssize_t w = write(fd, buf + done, (size_t)(size - done));
            if (w < 0) {
                fprintf(stderr, "writer: write %s: %s (errno %d)\n", path, strerror(errno),
                        errno);
                return 1;
            }
            done += w;
        }
        if (close(fd) != 0) {
            fprintf(stderr, "writer: close %s: %s (errno %d)\n", path, strerror(errno), errno);
            return 1;
        }
        printf("%ld %ld %08x\n", i, size, crc_update(0, buf, (size_t)size));
        fflush(stdout);
        if (hi > 0)
            sleep_ms(lo + (long)(splitmix64((uint64_t)seed ^ (uint64_t)i) %
                                 (uint64_t)(hi - lo + 1)));
    }
    free(buf);
    return 0;
}
