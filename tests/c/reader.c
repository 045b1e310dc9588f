/* reader [-b BUFSIZE] [-d USEC] [-p] PATH...
 * For each PATH: open(O_RDONLY) (which may block while the file is not published), then read()
 * until it returns 0, with no lseek and no stat first. Prints "PATH BYTES CRC32 ERRNO" per path
 * (ERRNO 0 when fine; BYTES -1 when the open failed). Goes on with the next path after an
 * error and exits 1 if any failed.
 * -d USEC: sleep USEC after each read (a slow reader).
 * -p: right after each open, print "opened PATH" and wait for a line on stdin before reading
 *     (lets a test change the file between the open and the reads). */
#include <fcntl.h>
#include <unistd.h>

#include "common.h"

int main(int argc, char **argv) {
    long bufsize = 65536, delay = 0;
    int pause_after_open = 0, opt, failed = 0;
    while ((opt = getopt(argc, argv, "b:d:p")) != -1) {
        if (opt == 'b')
            bufsize = arg_long(optarg, "-b");
        else if (opt == 'd')
            delay = arg_long(optarg, "-d");
        else if (opt == 'p')
            pause_after_open = 1;
        else
            return 2;
    }
    crc_init();
    unsigned char *buf = malloc((size_t)bufsize);
    if (!buf)
        return 3;
    for (int a = optind; a < argc; a++) {
        int fd = open(argv[a], O_RDONLY);
        if (fd < 0) {
            int e = errno;
            printf("%s -1 00000000 %d\n", argv[a], e);
            fprintf(stderr, "reader: open %s: %s (errno %d)\n", argv[a], strerror(e), e);
            fflush(stdout);
            failed = 1;
            continue;
        }
        if (pause_after_open) {
            char line[64];
            printf("opened %s\n", argv[a]);
            fflush(stdout);
            if (!fgets(line, sizeof line, stdin)) {
                fprintf(stderr, "reader: no go-ahead on stdin\n");
                return 1;
            }
        }
        long long total = 0;
        uint32_t crc = 0;
        int err = 0;
        for (;;) {
            ssize_t r = read(fd, buf, (size_t)bufsize);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                err = errno;
                break;
            }
            if (r == 0)
                break;
            crc = crc_update(crc, buf, (size_t)r);
            total += r;
            if (delay > 0)
                usleep((useconds_t)delay);
        }
        if (close(fd) != 0 && !err)
            err = errno;
        if (err) {
            fprintf(stderr, "reader: read %s: %s (errno %d)\n", argv[a], strerror(err), err);
            failed = 1;
        }
        printf("%s %lld %08x %d\n", argv[a], total, crc, err);
        fflush(stdout);
    }
    free(buf);
    return failed;
}
