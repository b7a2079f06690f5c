// CNimbusLinux: implementations of the accessors declared in CNimbusLinux.h.
#define _GNU_SOURCE
#include "CNimbusLinux.h"
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <fcntl.h>
#include <malloc.h>
#include <unistd.h>
#include <linux/falloc.h>
#include <errno.h>
#include <net/if.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <linux/if_ether.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <netdb.h>
#include <stdio.h>

/// Closes a descriptor whose setup failed and returns -1 with the failure's errno kept.
static int nimbus_close_failed(int fd) {
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
}

int nimbus_ioctl_ptr(int fd, unsigned long request, void *argument) { return ioctl(fd, request, argument); }
int nimbus_ioctl_val(int fd, unsigned long request, unsigned long argument) { return ioctl(fd, request, argument); }

uint32_t nimbus_run_exit_reason(const struct kvm_run *run) { return run->exit_reason; }
void nimbus_run_set_immediate_exit(struct kvm_run *run, uint8_t value) { run->immediate_exit = value; }
uint8_t nimbus_run_io_direction(const struct kvm_run *run) { return run->io.direction; }
uint8_t nimbus_run_io_size(const struct kvm_run *run) { return run->io.size; }
uint16_t nimbus_run_io_port(const struct kvm_run *run) { return run->io.port; }
uint32_t nimbus_run_io_count(const struct kvm_run *run) { return run->io.count; }
uint64_t nimbus_run_io_data_offset(const struct kvm_run *run) { return run->io.data_offset; }
uint64_t nimbus_run_mmio_phys_addr(const struct kvm_run *run) { return run->mmio.phys_addr; }
uint8_t *nimbus_run_mmio_data(struct kvm_run *run) { return run->mmio.data; }
uint32_t nimbus_run_mmio_len(const struct kvm_run *run) { return run->mmio.len; }
uint8_t nimbus_run_mmio_is_write(const struct kvm_run *run) { return run->mmio.is_write; }
uint32_t nimbus_run_internal_suberror(const struct kvm_run *run) { return run->internal.suberror; }
uint64_t nimbus_run_fail_entry_reason(const struct kvm_run *run) {
    return run->fail_entry.hardware_entry_failure_reason;
}
uint32_t nimbus_run_system_event_type(const struct kvm_run *run) { return run->system_event.type; }

struct kvm_cpuid2 *nimbus_cpuid2_alloc(uint32_t count) {
    struct kvm_cpuid2 *c = calloc(1, sizeof(struct kvm_cpuid2) + (size_t)count * sizeof(struct kvm_cpuid_entry2));
    if (c) c->nent = count;
    return c;
}
struct kvm_cpuid_entry2 *nimbus_cpuid2_entries(struct kvm_cpuid2 *cpuid) { return cpuid->entries; }

struct kvm_msrs *nimbus_msrs_alloc(uint32_t count) {
    struct kvm_msrs *m = calloc(1, sizeof(struct kvm_msrs) + (size_t)count * sizeof(struct kvm_msr_entry));
    if (m) m->nmsrs = count;
    return m;
}
struct kvm_msr_entry *nimbus_msrs_entries(struct kvm_msrs *msrs) { return msrs->entries; }

static void nimbus_kick_handler(int signal) { (void)signal; }

int nimbus_install_kick_handler(int signal) {
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_handler = nimbus_kick_handler;
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0;  // no SA_RESTART: KVM_RUN must return EINTR
    return sigaction(signal, &action, NULL);
}
int nimbus_sigrtmin(void) { return SIGRTMIN; }
int nimbus_unblock_signal(int signal) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, signal);
    return pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}
void nimbus_set_thread_name(const char *name) { prctl(PR_SET_NAME, name, 0, 0, 0); }
int nimbus_punch_hole(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}
void nimbus_keep_allocations_on_heap(int bytes) {
    mallopt(M_MMAP_THRESHOLD, bytes);
    mallopt(M_TRIM_THRESHOLD, bytes * 2);
}
int64_t nimbus_seek_data_or_hole(int fd, int64_t offset, int data) {
    return lseek(fd, offset, data ? SEEK_DATA : SEEK_HOLE);
}

int nimbus_tun_set_iff(int fd, const char *name, short flags) {
    struct ifreq request;
    memset(&request, 0, sizeof request);
    if (strlen(name) >= IFNAMSIZ) { errno = ENAMETOOLONG; return -1; }
    strncpy(request.ifr_name, name, IFNAMSIZ - 1);
    request.ifr_flags = flags;
    return ioctl(fd, TUNSETIFF, &request);
}

int nimbus_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t token) {
    struct epoll_event event;
    memset(&event, 0, sizeof event);
    event.events = events;
    event.data.u64 = token;
    return epoll_ctl(epfd, op, fd, &event);
}

int nimbus_epoll_wait(int epfd, uint64_t *tokens, uint32_t *events, int max, int timeout_ms) {
    struct epoll_event list[64];
    if (max > 64) max = 64;
    int n = epoll_wait(epfd, list, max, timeout_ms);
    for (int i = 0; i < n; i++) {
        tokens[i] = list[i].data.u64;
        events[i] = list[i].events;
    }
    return n;
}

static int unix_address(const char *path, struct sockaddr_un *address) {
    memset(address, 0, sizeof *address);
    address->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof address->sun_path) { errno = ENAMETOOLONG; return -1; }
    strncpy(address->sun_path, path, sizeof address->sun_path - 1);
    return 0;
}

int nimbus_unix_connect(const char *path, int nonblocking) {
    struct sockaddr_un address;
    if (unix_address(path, &address) != 0) return -1;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | (nonblocking ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0) return -1;
    // Unix stream connects complete at once or fail; a non-blocking one fails with EAGAIN when the
    // listener's backlog is full instead of waiting for it to accept.
    int rc;
    do { rc = connect(fd, (struct sockaddr *)&address, sizeof address); } while (rc != 0 && errno == EINTR);
    if (rc != 0) return nimbus_close_failed(fd);
    return fd;
}

int nimbus_unix_listen(const char *path, int backlog) {
    struct sockaddr_un address;
    if (unix_address(path, &address) != 0) return -1;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    if (bind(fd, (struct sockaddr *)&address, sizeof address) != 0 || listen(fd, backlog) != 0) {
        return nimbus_close_failed(fd);
    }
    return fd;
}

int nimbus_unix_dgram_bind(const char *path) {
    struct sockaddr_un address;
    if (unix_address(path, &address) != 0) return -1;
    // A socket left behind by an earlier run is replaced. A socket something still listens on
    // (connecting to it does anything but fail with ECONNREFUSED) and any other file are errors.
    struct stat existing;
    if (lstat(path, &existing) == 0) {
        if (!S_ISSOCK(existing.st_mode)) { errno = EEXIST; return -1; }
        int probe = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (probe < 0) return -1;
        int rc = connect(probe, (struct sockaddr *)&address, sizeof address);
        int stale = rc != 0 && errno == ECONNREFUSED;
        close(probe);
        if (!stale) { errno = EADDRINUSE; return -1; }
        unlink(path);
    }
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    int size = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    if (bind(fd, (struct sockaddr *)&address, sizeof address) != 0) return nimbus_close_failed(fd);
    return fd;
}

int nimbus_unix_dgram_connect(int fd, const char *path) {
    struct sockaddr_un address;
    if (unix_address(path, &address) != 0) return -1;
    int rc;
    do { rc = connect(fd, (struct sockaddr *)&address, sizeof address); } while (rc != 0 && errno == EINTR);
    return rc;
}

int nimbus_accept_nonblocking(int fd) { return accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC); }

int nimbus_tcp_listen(const char *host, int port, int backlog) {
    if (port < 0 || port > 65535) { errno = EINVAL; return -1; }
    char service[8];
    snprintf(service, sizeof service, "%d", port);
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    struct addrinfo *list = NULL;
    if (getaddrinfo(host, service, &hints, &list) != 0 || list == NULL) { errno = EADDRNOTAVAIL; return -1; }
    int fd = -1;
    int saved = EADDRNOTAVAIL;
    for (struct addrinfo *a = list; a != NULL; a = a->ai_next) {
        fd = socket(a->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) { saved = errno; continue; }
        int on = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
        if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, backlog) == 0) break;
        saved = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(list);
    if (fd < 0) errno = saved;
    return fd;
}

int nimbus_accept_blocking(int fd) {
    int conn = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
    if (conn < 0) return -1;
    struct sockaddr_storage address;
    socklen_t length = sizeof address;
    if (getsockname(conn, (struct sockaddr *)&address, &length) == 0 &&
        (address.ss_family == AF_INET || address.ss_family == AF_INET6)) {
        int on = 1;
        setsockopt(conn, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    }
    return conn;
}

int nimbus_local_port(int fd) {
    struct sockaddr_storage address;
    socklen_t length = sizeof address;
    if (getsockname(fd, (struct sockaddr *)&address, &length) != 0) return -1;
    if (address.ss_family == AF_INET) return ntohs(((struct sockaddr_in *)&address)->sin_port);
    if (address.ss_family == AF_INET6) return ntohs(((struct sockaddr_in6 *)&address)->sin6_port);
    errno = EAFNOSUPPORT;
    return -1;
}

// MARK: switch ports

static int nimbus_if_request(const char *name, struct ifreq *request) {
    memset(request, 0, sizeof *request);
    if (strlen(name) >= IFNAMSIZ) { errno = ENAMETOOLONG; return -1; }
    strncpy(request->ifr_name, name, IFNAMSIZ - 1);
    return 0;
}

int nimbus_if_index(const char *name) { return (int)if_nametoindex(name); }

int nimbus_if_set_up(const char *name) {
    struct ifreq request;
    if (nimbus_if_request(name, &request) != 0) return -1;
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int result = ioctl(fd, SIOCGIFFLAGS, &request);
    if (result == 0) {
        request.ifr_flags |= IFF_UP;
        result = ioctl(fd, SIOCSIFFLAGS, &request);
    }
    int saved = errno;
    close(fd);
    errno = saved;
    return result;
}

int nimbus_if_set_mtu(const char *name, int mtu) {
    struct ifreq request;
    if (nimbus_if_request(name, &request) != 0) return -1;
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    request.ifr_mtu = mtu;
    int result = ioctl(fd, SIOCSIFMTU, &request);
    int saved = errno;
    close(fd);
    errno = saved;
    return result;
}

int nimbus_packet_socket(int ifindex, int vnet_header) {
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, htons(ETH_P_ALL));
    if (fd < 0) return -1;
    int one = 1;
    int size = 4 << 20;
    if ((vnet_header && setsockopt(fd, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof one) != 0) ||
        setsockopt(fd, SOL_PACKET, PACKET_AUXDATA, &one, sizeof one) != 0 ||
        setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one) != 0) {
        return nimbus_close_failed(fd);
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    struct sockaddr_ll address;
    memset(&address, 0, sizeof address);
    address.sll_family = AF_PACKET;
    address.sll_protocol = htons(ETH_P_ALL);
    address.sll_ifindex = ifindex;
    if (bind(fd, (struct sockaddr *)&address, sizeof address) != 0) {
        return nimbus_close_failed(fd);
    }
    return fd;
}

#define NIMBUS_BATCH_MAX 64

int nimbus_frames_recv(int fd, struct nimbus_frame *frames, int count, uint32_t capacity) {
    if (count > NIMBUS_BATCH_MAX) count = NIMBUS_BATCH_MAX;
    struct mmsghdr messages[NIMBUS_BATCH_MAX];
    struct iovec vectors[NIMBUS_BATCH_MAX];
    union {
        char buffer[CMSG_SPACE(sizeof(struct tpacket_auxdata))];
        struct cmsghdr align;
    } controls[NIMBUS_BATCH_MAX];
    memset(messages, 0, sizeof(struct mmsghdr) * (size_t)count);
    for (int i = 0; i < count; i++) {
        vectors[i].iov_base = frames[i].data;
        vectors[i].iov_len = capacity;
        messages[i].msg_hdr.msg_iov = &vectors[i];
        messages[i].msg_hdr.msg_iovlen = 1;
        messages[i].msg_hdr.msg_control = controls[i].buffer;
        messages[i].msg_hdr.msg_controllen = sizeof controls[i].buffer;
    }
    int received = recvmmsg(fd, messages, (unsigned)count, MSG_DONTWAIT, NULL);
    if (received < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
    for (int i = 0; i < received; i++) {
        frames[i].length = messages[i].msg_len;
        frames[i].vlan_tci = 0;
        if (messages[i].msg_hdr.msg_flags & MSG_TRUNC) frames[i].length = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&messages[i].msg_hdr); c; c = CMSG_NXTHDR(&messages[i].msg_hdr, c)) {
            if (c->cmsg_level == SOL_PACKET && c->cmsg_type == PACKET_AUXDATA) {
                struct tpacket_auxdata aux;
                memcpy(&aux, CMSG_DATA(c), sizeof aux);
                if (aux.tp_status & TP_STATUS_VLAN_VALID) frames[i].vlan_tci = 0x10000u | aux.tp_vlan_tci;
            }
        }
    }
    return received;
}

static int nimbus_frames_sendto(int fd, const struct nimbus_frame *frames, int count, const uint32_t *destinations, uint16_t port) {
    if (count > NIMBUS_BATCH_MAX) count = NIMBUS_BATCH_MAX;
    struct mmsghdr messages[NIMBUS_BATCH_MAX];
    struct iovec vectors[NIMBUS_BATCH_MAX][2];
    struct sockaddr_in addresses[NIMBUS_BATCH_MAX];
    memset(messages, 0, sizeof(struct mmsghdr) * (size_t)count);
    for (int i = 0; i < count; i++) {
        vectors[i][0].iov_base = frames[i].data;
        vectors[i][0].iov_len = frames[i].length;
        vectors[i][1].iov_base = frames[i].tail;
        vectors[i][1].iov_len = frames[i].tail_length;
        messages[i].msg_hdr.msg_iov = vectors[i];
        messages[i].msg_hdr.msg_iovlen = frames[i].tail_length > 0 ? 2 : 1;
        if (destinations) {
            memset(&addresses[i], 0, sizeof addresses[i]);
            addresses[i].sin_family = AF_INET;
            addresses[i].sin_port = htons(port);
            addresses[i].sin_addr.s_addr = destinations[i];
            messages[i].msg_hdr.msg_name = &addresses[i];
            messages[i].msg_hdr.msg_namelen = sizeof addresses[i];
        }
    }
    int sent = sendmmsg(fd, messages, (unsigned)count, MSG_DONTWAIT);
    if (sent < 0) return (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) ? 0 : -1;
    return sent;
}

int nimbus_frames_send(int fd, const struct nimbus_frame *frames, int count) {
    return nimbus_frames_sendto(fd, frames, count, NULL, 0);
}

int nimbus_udp4_socket(uint16_t port) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    int size = 4 << 20;
    int pmtu = IP_PMTUDISC_DONT;  // a full-size inner frame plus VXLAN may exceed the underlay MTU
    setsockopt(fd, IPPROTO_IP, IP_MTU_DISCOVER, &pmtu, sizeof pmtu);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    struct sockaddr_in address;
    memset(&address, 0, sizeof address);
    address.sin_family = AF_INET;
    address.sin_port = htons(port);
    address.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(fd, (struct sockaddr *)&address, sizeof address) != 0) {
        return nimbus_close_failed(fd);
    }
    return fd;
}

int nimbus_udp4_recv(int fd, struct nimbus_frame *frames, uint32_t *sources, int count, uint32_t capacity) {
    if (count > NIMBUS_BATCH_MAX) count = NIMBUS_BATCH_MAX;
    struct mmsghdr messages[NIMBUS_BATCH_MAX];
    struct iovec vectors[NIMBUS_BATCH_MAX];
    struct sockaddr_in addresses[NIMBUS_BATCH_MAX];
    memset(messages, 0, sizeof(struct mmsghdr) * (size_t)count);
    for (int i = 0; i < count; i++) {
        vectors[i].iov_base = frames[i].data;
        vectors[i].iov_len = capacity;
        messages[i].msg_hdr.msg_iov = &vectors[i];
        messages[i].msg_hdr.msg_iovlen = 1;
        messages[i].msg_hdr.msg_name = &addresses[i];
        messages[i].msg_hdr.msg_namelen = sizeof addresses[i];
    }
    int received = recvmmsg(fd, messages, (unsigned)count, MSG_DONTWAIT, NULL);
    if (received < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
    for (int i = 0; i < received; i++) {
        frames[i].length = (messages[i].msg_hdr.msg_flags & MSG_TRUNC) ? 0 : messages[i].msg_len;
        frames[i].vlan_tci = 0;
        sources[i] = addresses[i].sin_addr.s_addr;
    }
    return received;
}

int nimbus_udp4_send(int fd, const struct nimbus_frame *frames, const uint32_t *destinations, int count, uint16_t port) {
    return nimbus_frames_sendto(fd, frames, count, destinations, port);
}
