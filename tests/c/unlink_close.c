/* unlink_close PATH SIZE
 * open(O_WRONLY|O_CREAT|O_TRUNC), write SIZE bytes, unlink(PATH), close(): the pattern of
 * SQLite's -shm files and of scratch files. Exits 1 with the errno at the first failure. */
#include <fcntl.h>
#include <unistd.h>

#include "common.h"

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: unlink_close PATH SIZE\n");
        return 2;
    }
    long size = arg_long(argv[2], "SIZE");
    unsigned char *buf = malloc(size ? (size_t)size : 1);
    if (!buf)
        return 3;
    fill(buf, (size_t)size, 7, 0, 0);
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, buf, (size_t)size) != size || unlink(argv[1]) != 0 ||
        close(fd) != 0) {
        fprintf(stderr, "unlink_close %s: %s (errno %d)\n", argv[1], strerror(errno), errno);
        return 1;
    }
    free(buf);
    return 0;
}
