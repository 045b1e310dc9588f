/* producer SIZE SEED PAUSE_MS PATH...
 * For each PATH (number i): open(O_WRONLY|O_CREAT|O_TRUNC), write SIZE bytes of content
 * (SEED, i), close(); print "i t_open t_close" (CLOCK_MONOTONIC ns: before open() was called,
 * after close() returned), then sleep PAUSE_MS. Exits 1 at the first error. */
#include <fcntl.h>
#include <unistd.h>

#include "clients.h"

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: producer SIZE SEED PAUSE_MS PATH...\n");
        return 2;
    }
    size_t size = (size_t)arg_ll(argv[1], "SIZE");
    uint64_t seed = (uint64_t)arg_ll(argv[2], "SEED");
    long long pause = arg_ll(argv[3], "PAUSE_MS");
    unsigned char *buf = malloc(size ? size : 1);
    if (!buf)
        return 3;
    for (int i = 0; i + 4 < argc; i++) {
        const char *path = argv[i + 4];
        fill(buf, size, seed, (uint64_t)i);
        long long t0 = now_ns();
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) {
            fprintf(stderr, "producer: open %s: %s\n", path, strerror(errno));
            return 1;
        }
        size_t done = 0;
        while (done < size) {
            ssize_t w = write(fd, buf + done, size - done);
            if (w < 0) {
                fprintf(stderr, "producer: write %s: %s\n", path, strerror(errno));
                return 1;
            }
            done += (size_t)w;
        }
        if (close(fd) != 0) {
            fprintf(stderr, "producer: close %s: %s\n", path, strerror(errno));
            return 1;
        }
        long long t1 = now_ns();
        printf("%d %lld %lld\n", i, t0, t1);
        fflush(stdout);
        if (pause > 0) {
            struct timespec ts = {pause / 1000, (pause % 1000) * 1000000L};
            while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
            }
        }
    }
    return 0;
}
