// udpflood: a small-packet generator and sink for Benchmarks/switch.sh. iperf3 sends one datagram
// per system call, so on two cores it, not the switch, sets the small-packet rate; this sends and
// receives 64 datagrams per call (sendmmsg/recvmmsg) with 18-byte payloads (64-byte frames).
//   udpflood send ADDRESS PORT SECONDS     udpflood recv PORT SECONDS   (prints datagrams/s)
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: udpflood send ADDRESS PORT SECONDS | recv PORT SECONDS\n");
        return 2;
    }
    int sending = strcmp(argv[1], "send") == 0;
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int size = 8 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size);
    struct sockaddr_in address = {.sin_family = AF_INET};
    enum { BATCH = 64 };
    char payload[BATCH][2048];
    struct iovec vectors[BATCH];
    struct mmsghdr messages[BATCH];
    memset(messages, 0, sizeof messages);
    for (int i = 0; i < BATCH; i++) {
        vectors[i].iov_base = payload[i];
        vectors[i].iov_len = sending ? 18 : sizeof payload[i];
        messages[i].msg_hdr.msg_iov = &vectors[i];
        messages[i].msg_hdr.msg_iovlen = 1;
    }
    if (sending) {
        address.sin_port = htons(atoi(argv[3]));
        inet_pton(AF_INET, argv[2], &address.sin_addr);
        if (connect(fd, (struct sockaddr *)&address, sizeof address) != 0) { perror("connect"); return 1; }
        double end = now() + atof(argv[4]);
        long sent = 0;
        while (now() < end) {
            int n = sendmmsg(fd, messages, BATCH, 0);
            if (n > 0) sent += n;
        }
        printf("%ld\n", sent);
    } else {
        address.sin_port = htons(atoi(argv[2]));
        if (bind(fd, (struct sockaddr *)&address, sizeof address) != 0) { perror("bind"); return 1; }
        struct timeval timeout = {.tv_sec = 0, .tv_usec = 200000};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
        double duration = atof(argv[3]), start = 0, last = 0;
        long received = 0;
        for (;;) {
            int n = recvmmsg(fd, messages, BATCH, 0, NULL);
            double t = now();
            if (n > 0) {
                if (start == 0) start = t;
                received += n;
                last = t;
            } else if (start != 0 && t - last > 0.5) {
                break;
            }
            if (start != 0 && t - start > duration + 2) break;
            if (start == 0 && t > 0 && received == 0 && duration < 0) break;
        }
        printf("%.0f\n", last > start ? received / (last - start) : 0.0);
    }
    return 0;
}
