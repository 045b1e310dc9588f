/* rewriter PATH NVERS SIZE STEP SEED [SLEEP_MS]
 * For v in 0..NVERS-1: open(PATH, O_WRONLY|O_CREAT|O_TRUNC), write SIZE+v*STEP bytes of content
 * (SEED, v) in 1 MiB write()s, close(); sleep SLEEP_MS. Prints "v size crc32" after each close.
 * SLEEP_MS -1: wait for a line on stdin after each close instead (the test decides when the
 * next rewrite starts). Every write and close is checked: exits 1 with the errno at the first
 * failure. */
#include <fcntl.h>
#include <unistd.h>

#include "common.h"

#define CHUNK (1 << 20)

int main(int argc, char **argv) {
    if (argc != 6 && argc != 7) {
        fprintf(stderr, "usage: rewriter PATH NVERS SIZE STEP SEED [SLEEP_MS]\n");
        return 2;
    }
    crc_init();
    long n = arg_long(argv[2], "NVERS"), size = arg_long(argv[3], "SIZE");
    long step = arg_long(argv[4], "STEP"), seed = arg_long(argv[5], "SEED");
    long pause = argc == 7 ? arg_long(argv[6], "SLEEP_MS") : 0;
    unsigned char *buf = malloc(CHUNK);
    if (!buf)
        return 3;
    for (long v = 0; v < n; v++) {
        long len = size + v * step;
        int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) {
            fprintf(stderr, "rewriter: open %s (version %ld): %s (errno %d)\n", argv[1], v,
                    strerror(errno), errno);
            return 1;
        }
        uint32_t crc = 0;
        for (long off = 0; off < len;) {
            size_t chunk = (size_t)(len - off < CHUNK ? len - off : CHUNK);
            fill(buf, chunk, (uint64_t)seed, (uint64_t)v, (uint64_t)off);
            crc = crc_update(crc, buf, chunk);
            size_t done = 0;
            while (done < chunk) {
                ssize_t w = write(fd, buf + done, chunk - done);
                if (w < 0) {
                    fprintf(stderr, "rewriter: write %s (version %ld, offset %ld): %s "
                            "(errno %d)\n", argv[1], v, off + (long)done, strerror(errno),
                            errno);
                    return 1;
                }
                done += (size_t)w;
            }
            off += (long)chunk;
        }
        if (close(fd) != 0) {
            fprintf(stderr, "rewriter: close %s (version %ld): %s (errno %d)\n", argv[1], v,
                    strerror(errno), errno);
            return 1;
        }
        printf("%ld %ld %08x\n", v, len, crc);
        fflush(stdout);
        if (pause < 0) {
            char line[64];
            if (!fgets(line, sizeof line, stdin))
                break;
        } else {
            sleep_ms(pause);
        }
    }
    free(buf);
    return 0;
}
