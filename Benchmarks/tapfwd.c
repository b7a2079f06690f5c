// tapfwd: the bare minimum a userspace switch does between two TAP ports, as a reference point for
// Benchmarks/switch.sh. It creates two TAP devices with virtio-net headers and the same offloads
// nimbus-switchd and OVS ask for (checksum, TSO), and copies every frame read from one to the
// other: one read and one write per frame, no parsing, no flow lookup, no batching. No userspace
// switch that reads and writes TAP devices can do less kernel work per frame, so its TCP figures
// are the ceiling for the TAP rows.
//   tapfwd TAP1 TAP2      (runs until killed)
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <unistd.h>

enum { VNET_HEADER = 10, FRAME_MAX = 65536 + 64 };

static int open_tap(const char *name) {
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) { perror("open /dev/net/tun"); exit(1); }
    struct ifreq request;
    memset(&request, 0, sizeof request);
    snprintf(request.ifr_name, IFNAMSIZ, "%s", name);
    request.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if (ioctl(fd, TUNSETIFF, &request) < 0) { perror("TUNSETIFF"); exit(1); }
    int header = VNET_HEADER;
    if (ioctl(fd, TUNSETVNETHDRSZ, &header) < 0) { perror("TUNSETVNETHDRSZ"); exit(1); }
    if (ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN) < 0) {
        perror("TUNSETOFFLOAD");
        exit(1);
    }
    return fd;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: tapfwd TAP1 TAP2\n");
        return 2;
    }
    int taps[2] = {open_tap(argv[1]), open_tap(argv[2])};
    int poller = epoll_create1(EPOLL_CLOEXEC);
    for (int side = 0; side < 2; side++) {
        struct epoll_event event = {.events = EPOLLIN, .data.u32 = (unsigned)side};
        if (epoll_ctl(poller, EPOLL_CTL_ADD, taps[side], &event) < 0) { perror("epoll_ctl"); return 1; }
    }
    static char frame[VNET_HEADER + FRAME_MAX];
    for (;;) {
        struct epoll_event ready[2];
        int count = epoll_wait(poller, ready, 2, -1);
        if (count < 0 && errno != EINTR) { perror("epoll_wait"); return 1; }
        for (int i = 0; i < count; i++) {
            int from = taps[ready[i].data.u32], to = taps[ready[i].data.u32 ^ 1];
            for (;;) {
                ssize_t length = read(from, frame, sizeof frame);
                if (length <= 0) break;
                // A frame the other side cannot take (its device not up yet, its queue full) is
                // dropped, as a NIC would.
                (void)!write(to, frame, (size_t)length);
            }
        }
    }
}
