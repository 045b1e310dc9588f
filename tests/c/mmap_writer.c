/* mmap_writer PATH SIZE SEED
 * open(O_RDWR|O_CREAT), ftruncate(SIZE), mmap(MAP_SHARED), fill with content (SEED, 0),
 * munmap, close. Prints "size crc32". Exits 1 with the errno at the first failure. */
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common.h"

static int fail(const char *what, const char *path) {
    fprintf(stderr, "mmap_writer: %s %s: %s (errno %d)\n", what, path, strerror(errno), errno);
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: mmap_writer PATH SIZE SEED\n");
        return 2;
    }
    crc_init();
    long size = arg_long(argv[2], "SIZE"), seed = arg_long(argv[3], "SEED");
    int fd = open(argv[1], O_RDWR | O_CREAT, 0644);
    if (fd < 0)
        return fail("open", argv[1]);
    if (ftruncate(fd, size) != 0)
        return fail("ftruncate", argv[1]);
    unsigned char *map = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED)
        return fail("mmap", argv[1]);
    fill(map, (size_t)size, (uint64_t)seed, 0, 0);
    uint32_t crc = crc_update(0, map, (size_t)size);
    if (munmap(map, (size_t)size) != 0)
        return fail("munmap", argv[1]);
    if (close(fd) != 0)
        return fail("close", argv[1]);
    printf("%ld %08x\n", size, crc);
    return 0;
}
