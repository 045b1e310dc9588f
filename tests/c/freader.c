/* freader PATH...
 * As reader, through stdio: fopen(PATH, "r"), fread() until EOF, fclose(). Prints
 * "PATH BYTES CRC32 ERRNO" per path; exits 1 if any failed. */
#include "common.h"

int main(int argc, char **argv) {
    static unsigned char buf[1 << 16];
    int failed = 0;
    crc_init();
    for (int a = 1; a < argc; a++) {
        FILE *f = fopen(argv[a], "r");
        if (!f) {
            int e = errno;
            printf("%s -1 00000000 %d\n", argv[a], e);
            fprintf(stderr, "freader: fopen %s: %s (errno %d)\n", argv[a], strerror(e), e);
            fflush(stdout);
            failed = 1;
            continue;
        }
        long long total = 0;
        uint32_t crc = 0;
        size_t r;
        while ((r = fread(buf, 1, sizeof buf, f)) > 0) {
            crc = crc_update(crc, buf, r);
            total += (long long)r;
        }
        int err = ferror(f) ? (errno ? errno : 5) : 0;
        if (fclose(f) != 0 && !err)
            err = errno;
        if (err) {
            fprintf(stderr, "freader: %s: %s (errno %d)\n", argv[a], strerror(err), err);
            failed = 1;
        }
        printf("%s %lld %08x %d\n", argv[a], total, crc, err);
        fflush(stdout);
    }
    return failed;
}
