/* inplace PATH SEED CHUNK
 * Rewrites an existing file in place, same size, with content (SEED, 0): open(O_RDWR) (no
 * O_TRUNC), then pwrite() CHUNK bytes at a time from offset 0. Before the first chunk it prints
 * "size SIZE crc CRC32" (the content it is writing); after each chunk it prints "wrote OFFSET"
 * and waits for a line on stdin (the test decides when the writer goes on; "end" on stdin ends
 * the pauses). close() at the end, then "closed". Exits 1 with the errno at the first failure. */
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: inplace PATH SEED CHUNK\n");
        return 2;
    }
    crc_init();
    long seed = arg_long(argv[2], "SEED"), chunk = arg_long(argv[3], "CHUNK");
    int fd = open(argv[1], O_RDWR);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        fprintf(stderr, "inplace: open %s: %s (errno %d)\n", argv[1], strerror(errno), errno);
        return 1;
    }
    unsigned char *all = malloc(st.st_size ? (size_t)st.st_size : 1);
    if (!all)
        return 3;
    fill(all, (size_t)st.st_size, (uint64_t)seed, 0, 0);
    printf("size %lld crc %08x\n", (long long)st.st_size, crc_update(0, all, (size_t)st.st_size));
    fflush(stdout);
    int pausing = 1;
    for (off_t off = 0; off < st.st_size; off += chunk) {
        size_t len = (size_t)(st.st_size - off < chunk ? st.st_size - off : chunk);
        if (pwrite(fd, all + off, len, off) != (ssize_t)len) {
            fprintf(stderr, "inplace: pwrite %s: %s (errno %d)\n", argv[1], strerror(errno),
                    errno);
            return 1;
        }
        if (pausing) {
            char line[64];
            printf("wrote %lld\n", (long long)off);
            fflush(stdout);
            if (!fgets(line, sizeof line, stdin) || strncmp(line, "end", 3) == 0)
                pausing = 0;
        }
    }
    if (close(fd) != 0) {
        fprintf(stderr, "inplace: close %s: %s (errno %d)\n", argv[1], strerror(errno), errno);
        return 1;
    }
    printf("closed\n");
    fflush(stdout);
    free(all);
    return 0;
}
