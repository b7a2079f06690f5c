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
#include <sys/un.h>

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
    if (rc != 0) { int saved = errno; close(fd); errno = saved; return -1; }
    return fd;
}

int nimbus_unix_listen(const char *path, int backlog) {
    struct sockaddr_un address;
    if (unix_address(path, &address) != 0) return -1;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    if (bind(fd, (struct sockaddr *)&address, sizeof address) != 0 || listen(fd, backlog) != 0) {
        int saved = errno; close(fd); errno = saved; return -1;
    }
    return fd;
}

int nimbus_accept_nonblocking(int fd) { return accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC); }
