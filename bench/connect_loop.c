// connect() in a tight loop; prints nanoseconds per call.
//   connect_loop tcp|udp ADDRESS PORT ITERATIONS
// tcp: socket + connect (refused by a closed loopback port) + close per call.
// udp: one socket, connect() again and again (each call runs the cgroup hook).
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s tcp|udp ADDRESS PORT ITERATIONS\n", argv[0]);
        return 2;
    }
    int tcp = strcmp(argv[1], "tcp") == 0;
    long n = atol(argv[4]);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    if (inet_pton(AF_INET, argv[2], &sa.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", argv[2]);
        return 2;
    }
    int eperm = 0;
    int fd = tcp ? -1 : socket(AF_INET, SOCK_DGRAM, 0);
    double start = now();
    for (long i = 0; i < n; i++) {
        if (tcp)
            fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 && errno == EPERM)
            eperm++;
        if (tcp)
            close(fd);
    }
    double elapsed = now() - start;
    printf("%.1f %d\n", elapsed / n, eperm);
    return 0;
}
