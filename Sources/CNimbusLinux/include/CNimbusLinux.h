// CNimbusLinux: layer 0 of Nimbus. The only C in the package.
//
// Why this shim exists: Swift cannot import the _IOW/_IOR ioctl macros, the variadic ioctl(2),
// the anonymous unions inside `struct kvm_run`, or the flexible array members of `kvm_cpuid2`
// and `kvm_msrs`. Everything here is a thin, allocation-free accessor over the kernel's own
// structures; all policy lives in Swift.
#ifndef CNIMBUSLINUX_H
#define CNIMBUSLINUX_H

#include <stdint.h>
#include <stddef.h>
#include <linux/kvm.h>
#include <linux/if_tun.h>
#include <asm/bootparam.h>
#include <sys/eventfd.h>
#include <sys/epoll.h>
#include <sys/random.h>

// MARK: ioctl request codes (Swift cannot expand the macros).
static const unsigned long NIMBUS_KVM_GET_API_VERSION = KVM_GET_API_VERSION;
static const unsigned long NIMBUS_KVM_CREATE_VM = KVM_CREATE_VM;
static const unsigned long NIMBUS_KVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
static const unsigned long NIMBUS_KVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
static const unsigned long NIMBUS_KVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;
static const unsigned long NIMBUS_KVM_CREATE_VCPU = KVM_CREATE_VCPU;
static const unsigned long NIMBUS_KVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
static const unsigned long NIMBUS_KVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;
static const unsigned long NIMBUS_KVM_SET_IDENTITY_MAP_ADDR = KVM_SET_IDENTITY_MAP_ADDR;
static const unsigned long NIMBUS_KVM_CREATE_IRQCHIP = KVM_CREATE_IRQCHIP;
static const unsigned long NIMBUS_KVM_CREATE_PIT2 = KVM_CREATE_PIT2;
static const unsigned long NIMBUS_KVM_IRQ_LINE = KVM_IRQ_LINE;
static const unsigned long NIMBUS_KVM_IRQFD = KVM_IRQFD;
static const unsigned long NIMBUS_KVM_IOEVENTFD = KVM_IOEVENTFD;
static const unsigned long NIMBUS_KVM_RUN = KVM_RUN;
static const unsigned long NIMBUS_KVM_GET_REGS = KVM_GET_REGS;
static const unsigned long NIMBUS_KVM_SET_REGS = KVM_SET_REGS;
static const unsigned long NIMBUS_KVM_GET_SREGS = KVM_GET_SREGS;
static const unsigned long NIMBUS_KVM_SET_SREGS = KVM_SET_SREGS;
static const unsigned long NIMBUS_KVM_SET_FPU = KVM_SET_FPU;
static const unsigned long NIMBUS_KVM_SET_MSRS = KVM_SET_MSRS;
static const unsigned long NIMBUS_KVM_SET_CPUID2 = KVM_SET_CPUID2;
static const unsigned long NIMBUS_KVM_GET_LAPIC = KVM_GET_LAPIC;
static const unsigned long NIMBUS_KVM_SET_LAPIC = KVM_SET_LAPIC;
static const unsigned long NIMBUS_TUNSETIFF = TUNSETIFF;
static const unsigned long NIMBUS_TUNSETOFFLOAD = TUNSETOFFLOAD;
static const unsigned long NIMBUS_TUNSETVNETHDRSZ = TUNSETVNETHDRSZ;

// MARK: capabilities and exit reasons.
static const int NIMBUS_KVM_API_VERSION = KVM_API_VERSION;
static const int NIMBUS_KVM_CAP_IRQCHIP = KVM_CAP_IRQCHIP;
static const int NIMBUS_KVM_CAP_USER_MEMORY = KVM_CAP_USER_MEMORY;
static const int NIMBUS_KVM_CAP_SET_TSS_ADDR = KVM_CAP_SET_TSS_ADDR;
static const int NIMBUS_KVM_CAP_EXT_CPUID = KVM_CAP_EXT_CPUID;
static const int NIMBUS_KVM_CAP_PIT2 = KVM_CAP_PIT2;
static const int NIMBUS_KVM_CAP_IRQFD = KVM_CAP_IRQFD;
static const int NIMBUS_KVM_CAP_IOEVENTFD = KVM_CAP_IOEVENTFD;
static const int NIMBUS_KVM_CAP_IMMEDIATE_EXIT = KVM_CAP_IMMEDIATE_EXIT;
static const int NIMBUS_KVM_CAP_NR_VCPUS = KVM_CAP_NR_VCPUS;
static const int NIMBUS_KVM_CAP_MAX_VCPUS = KVM_CAP_MAX_VCPUS;

static const uint32_t NIMBUS_KVM_EXIT_UNKNOWN = KVM_EXIT_UNKNOWN;
static const uint32_t NIMBUS_KVM_EXIT_IO = KVM_EXIT_IO;
static const uint32_t NIMBUS_KVM_EXIT_HLT = KVM_EXIT_HLT;
static const uint32_t NIMBUS_KVM_EXIT_MMIO = KVM_EXIT_MMIO;
static const uint32_t NIMBUS_KVM_EXIT_SHUTDOWN = KVM_EXIT_SHUTDOWN;
static const uint32_t NIMBUS_KVM_EXIT_FAIL_ENTRY = KVM_EXIT_FAIL_ENTRY;
static const uint32_t NIMBUS_KVM_EXIT_INTR = KVM_EXIT_INTR;
static const uint32_t NIMBUS_KVM_EXIT_INTERNAL_ERROR = KVM_EXIT_INTERNAL_ERROR;
static const uint32_t NIMBUS_KVM_EXIT_SYSTEM_EVENT = KVM_EXIT_SYSTEM_EVENT;
static const uint32_t NIMBUS_KVM_EXIT_IO_OUT = KVM_EXIT_IO_OUT;
static const uint32_t NIMBUS_KVM_SYSTEM_EVENT_SHUTDOWN = KVM_SYSTEM_EVENT_SHUTDOWN;
static const uint32_t NIMBUS_KVM_SYSTEM_EVENT_RESET = KVM_SYSTEM_EVENT_RESET;
static const uint32_t NIMBUS_KVM_PIT_SPEAKER_DUMMY = KVM_PIT_SPEAKER_DUMMY;
static const uint32_t NIMBUS_KVM_IRQFD_FLAG_DEASSIGN = KVM_IRQFD_FLAG_DEASSIGN;
static const uint32_t NIMBUS_KVM_IOEVENTFD_FLAG_DATAMATCH = KVM_IOEVENTFD_FLAG_DATAMATCH;

// MARK: epoll.
static const uint32_t NIMBUS_EPOLLIN = EPOLLIN;
static const uint32_t NIMBUS_EPOLLOUT = EPOLLOUT;
static const uint32_t NIMBUS_EPOLLRDHUP = EPOLLRDHUP;
static const uint32_t NIMBUS_EPOLLHUP = EPOLLHUP;
static const uint32_t NIMBUS_EPOLLERR = EPOLLERR;
static const uint32_t NIMBUS_EPOLLET = EPOLLET;
static const int NIMBUS_EPOLL_CTL_ADD = EPOLL_CTL_ADD;
static const int NIMBUS_EPOLL_CTL_MOD = EPOLL_CTL_MOD;
static const int NIMBUS_EPOLL_CTL_DEL = EPOLL_CTL_DEL;
static const int NIMBUS_EPOLL_CLOEXEC = EPOLL_CLOEXEC;

// MARK: TAP devices.
static const short NIMBUS_IFF_TAP = IFF_TAP;
static const short NIMBUS_IFF_NO_PI = IFF_NO_PI;
static const short NIMBUS_IFF_VNET_HDR = IFF_VNET_HDR;
static const unsigned int NIMBUS_TUN_F_CSUM = TUN_F_CSUM;
static const unsigned int NIMBUS_TUN_F_TSO4 = TUN_F_TSO4;
static const unsigned int NIMBUS_TUN_F_TSO6 = TUN_F_TSO6;
static const unsigned int NIMBUS_TUN_F_TSO_ECN = TUN_F_TSO_ECN;
static const unsigned int NIMBUS_TUN_F_UFO = TUN_F_UFO;

#pragma clang assume_nonnull begin

// MARK: ioctl wrappers (non-variadic so Swift can call them).
int nimbus_ioctl_ptr(int fd, unsigned long request, void *_Nullable argument);
int nimbus_ioctl_val(int fd, unsigned long request, unsigned long argument);

// MARK: struct kvm_run accessors (the struct is a mapping shared with the kernel).
uint32_t nimbus_run_exit_reason(const struct kvm_run *run);
void nimbus_run_set_immediate_exit(struct kvm_run *run, uint8_t value);
uint8_t nimbus_run_io_direction(const struct kvm_run *run);
uint8_t nimbus_run_io_size(const struct kvm_run *run);
uint16_t nimbus_run_io_port(const struct kvm_run *run);
uint32_t nimbus_run_io_count(const struct kvm_run *run);
uint64_t nimbus_run_io_data_offset(const struct kvm_run *run);
uint64_t nimbus_run_mmio_phys_addr(const struct kvm_run *run);
uint8_t *nimbus_run_mmio_data(struct kvm_run *run);
uint32_t nimbus_run_mmio_len(const struct kvm_run *run);
uint8_t nimbus_run_mmio_is_write(const struct kvm_run *run);
uint32_t nimbus_run_internal_suberror(const struct kvm_run *run);
uint64_t nimbus_run_fail_entry_reason(const struct kvm_run *run);
uint32_t nimbus_run_system_event_type(const struct kvm_run *run);

// MARK: flexible-array structures.
/// Allocates a zeroed `kvm_cpuid2` with room for `count` entries; free with `free`.
struct kvm_cpuid2 *_Nullable nimbus_cpuid2_alloc(uint32_t count);
struct kvm_cpuid_entry2 *nimbus_cpuid2_entries(struct kvm_cpuid2 *cpuid);
/// Allocates a zeroed `kvm_msrs` with room for `count` entries; free with `free`.
struct kvm_msrs *_Nullable nimbus_msrs_alloc(uint32_t count);
struct kvm_msr_entry *nimbus_msrs_entries(struct kvm_msrs *msrs);

// MARK: signals used to kick vCPU threads out of KVM_RUN.
/// Installs a handler that does nothing (without SA_RESTART) for `signal`, so that a blocked
/// KVM_RUN returns EINTR when the signal is sent to its thread. Returns 0 or -1 with errno.
int nimbus_install_kick_handler(int signal);
int nimbus_sigrtmin(void);
/// Unblocks `signal` for the calling thread (a parent may have spawned us with it blocked).
int nimbus_unblock_signal(int signal);
/// fallocate(PUNCH_HOLE | KEEP_SIZE): deallocates a file range. Returns 0 or -1 with errno.
int nimbus_punch_hole(int fd, int64_t offset, int64_t length);
/// mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD): keep buffers up to `bytes` on the heap.
void nimbus_keep_allocations_on_heap(int bytes);
/// lseek with SEEK_DATA (data=1) or SEEK_HOLE (data=0).
int64_t nimbus_seek_data_or_hole(int fd, int64_t offset, int data);
/// Names the calling thread (at most 15 bytes are kept).
void nimbus_set_thread_name(const char *name);

/// TUNSETIFF on an open /dev/net/tun descriptor: attaches it to (or creates) interface `name`
/// with `flags`. Returns 0 or -1 with errno (ENAMETOOLONG for names over IFNAMSIZ-1).
int nimbus_tun_set_iff(int fd, const char *name, short flags);

/// epoll_ctl with the 64-bit `token` as the event's data (struct epoll_event is packed, which
/// Swift cannot lay out). Returns 0 or -1 with errno.
int nimbus_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t token);
/// epoll_wait into parallel arrays of tokens and event masks. Returns the count or -1 with errno.
int nimbus_epoll_wait(int epfd, uint64_t *tokens, uint32_t *events, int max, int timeout_ms);

/// Creates a close-on-exec Unix stream socket (non-blocking when `nonblocking`, which makes a
/// full backlog fail with EAGAIN instead of waiting) and connects it to `path`. Returns the fd or
/// -1 with errno.
int nimbus_unix_connect(const char *path, int nonblocking);
/// Creates a non-blocking, close-on-exec Unix stream socket listening on `path`. Returns the fd
/// or -1 with errno.
int nimbus_unix_listen(const char *path, int backlog);
/// A non-blocking AF_UNIX datagram socket bound to `path`, with 4 MiB buffers. A stale socket
/// there (nothing bound to it) is replaced; a live one fails with EADDRINUSE, any other file with
/// EEXIST. -1 and errno on failure.
int nimbus_unix_dgram_bind(const char *path);
/// Connects a datagram socket to `path`: its default destination and its only source. 0 or -1.
int nimbus_unix_dgram_connect(int fd, const char *path);
/// accept4 with SOCK_NONBLOCK | SOCK_CLOEXEC. Returns the fd or -1 with errno.
int nimbus_accept_nonblocking(int fd);
/// Creates a blocking, close-on-exec TCP socket with SO_REUSEADDR bound to `host`:`port`
/// (numeric IPv4 or IPv6 address, or a name resolved with getaddrinfo; port 0 picks a free one)
/// and listening. Returns the fd or -1 with errno (EADDRNOTAVAIL when `host` does not resolve).
int nimbus_tcp_listen(const char *host, int port, int backlog);
/// Blocking accept4 with SOCK_CLOEXEC; TCP connections get TCP_NODELAY. Returns the fd or -1
/// with errno.
int nimbus_accept_blocking(int fd);
/// The local TCP port of socket `fd`, or -1 (with errno) when it has none.
int nimbus_local_port(int fd);

// MARK: switch ports

/// One frame in a batch for `nimbus_frames_recv`/`nimbus_frames_send`: `data` points at the
/// frame's first byte (its virtio-net header when the socket has one), `length` is its size.
/// On receive `vlan_tci` is the tag the kernel took off the frame (bit 16 set when present).
/// On send, a frame may be given as two pieces (`data`/`length` then `tail`/`tail_length`) so a
/// VLAN tag can be inserted or removed without copying.
struct nimbus_frame {
    uint8_t *_Nullable data;
    uint32_t length;
    uint32_t vlan_tci;
    uint8_t *_Nullable tail;
    uint32_t tail_length;
};

/// The index of network interface `name`, or 0 with errno.
int nimbus_if_index(const char *name);
/// Brings interface `name` up (IFF_UP). Returns 0 or -1 with errno.
int nimbus_if_set_up(const char *name);
/// Sets interface `name`'s MTU. Returns 0 or -1 with errno.
int nimbus_if_set_mtu(const char *name, int mtu);
/// A non-blocking AF_PACKET socket bound to interface `ifindex` that sees every frame the
/// interface receives (not the ones sent through it), with a 10-byte virtio-net header on each
/// frame when `vnet_header` (so TSO and checksum offloads pass through) and the kernel's
/// VLAN tags reported beside the frame. Returns the fd or -1 with errno.
int nimbus_packet_socket(int ifindex, int vnet_header);
/// Receives up to `count` frames (recvmmsg): each `frames[i].data` must hold `capacity` bytes.
/// Returns the number received (0 when none is waiting) or -1 with errno.
int nimbus_frames_recv(int fd, struct nimbus_frame *frames, int count, uint32_t capacity);
/// Sends up to `count` frames (sendmmsg); returns the number sent or -1 with errno.
int nimbus_frames_send(int fd, const struct nimbus_frame *frames, int count);
/// A non-blocking UDP socket bound to `port` on all IPv4 addresses (for VXLAN). Returns the fd or -1.
int nimbus_udp4_socket(uint16_t port);
/// Receives up to `count` datagrams; `sources[i]` gets each sender's IPv4 address (network order).
int nimbus_udp4_recv(int fd, struct nimbus_frame *frames, uint32_t *sources, int count, uint32_t capacity);
/// Sends `frames[i]` as one datagram each to `destinations[i]`:`port` (IPv4, network order).
int nimbus_udp4_send(int fd, const struct nimbus_frame *frames, const uint32_t *destinations, int count, uint16_t port);

#pragma clang assume_nonnull end

// MARK: sizes checked at compile time against what the Swift side assumes.
_Static_assert(sizeof(struct kvm_regs) == 144, "kvm_regs layout");
_Static_assert(sizeof(struct kvm_segment) == 24, "kvm_segment layout");
_Static_assert(sizeof(struct kvm_cpuid_entry2) == 40, "kvm_cpuid_entry2 layout");
_Static_assert(sizeof(struct kvm_msr_entry) == 16, "kvm_msr_entry layout");
_Static_assert(sizeof(struct kvm_lapic_state) == 1024, "kvm_lapic_state layout");
_Static_assert(sizeof(struct boot_params) == 4096, "boot_params is one page");

#endif
