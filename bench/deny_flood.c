// UDP sendto() to distinct destinations, paced: every call is one kernel denial
// when the policy denies 127.1.0.0/16.
//   deny_flood COUNT RATE      RATE calls per second (0: as fast as possible)
// Destination i: 127.1.(i / 256 % 256).(i % 256), port 1000 + i / 65536.
// Prints: calls eperm other_errors seconds start (wall clock, seconds since the epoch)
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s COUNT RATE\n", argv[0]);
        return 2;
    }
    long n = atol(argv[1]);
    double rate = atof(argv[2]);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    long eperm = 0, other = 0;
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall);
    double start = now();
    for (long i = 0; i < n; i++) {
        if (rate > 0 && i % 100 == 0) {  // pace in steps of 100 calls
            double due = start + i / rate;
            double wait = due - now();
            if (wait > 0) {
                struct timespec ts = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
                nanosleep(&ts, NULL);
            }
        }
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(1000 + i / 65536)};
        sa.sin_addr.s_addr = htonl(0x7F010000u | (i % 65536));
        if (sendto(fd, "x", 1, 0, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
            if (errno == EPERM)
                eperm++;
            else
                other++;
        }
    }
    printf("%ld %ld %ld %.3f %.6f\n", n, eperm, other, now() - start, wall.tv_sec + wall.tv_nsec / 1e9);
    return 0;
}
