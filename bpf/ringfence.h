// SPDX-License-Identifier: GPL-2.0
// What restricted.bpf.c and recording.bpf.c share: the session flags, the
// pinned `sessions` map, pinned ring buffers, and the records user space
// decodes (services/enforcer/records.py and recording_bpf.py mirror them;
// tests/test_kernel_layout.py compiles this header with cc and checks that
// every struct's size and offsets match the Python decoders).
//
// Without RINGFENCE_BPF (plain cc) only the types are defined.

#ifndef RINGFENCE_H
#define RINGFENCE_H

#ifdef RINGFENCE_BPF
#include <uapi/linux/bpf.h>
#endif

// Per session cgroup: which controls apply.
#define SESSION_RESTRICTED 1
#define SESSION_RECORDED 2

struct session_flags {
    u32 flags;
};

// --- network (restricted.bpf.c) ------------------------------------------------------

#define OP_CONNECT 0
#define OP_SEND 1
#define OP_PACKET 2  // a packet of a raw/ICMP socket, judged as it leaves

#define ACTION_OBSERVED 0
#define ACTION_DENIED 1

// settings[0] of restricted.bpf.c, written by user space.
struct settings {
    u32 enforce;  // a network_restrictions resource exists and restricted sessions are on
    u32 observe;  // enhanced recording wants allowed connections of sessions reported too
    u64 tree_id;  // cgroup id of <cgroup2>/ringfence/<node>: session cgroups are below it
    u64 ringfence_id;  // cgroup id of <cgroup2>/ringfence: every node's tree is below it
    u32 tree_level;  // level of tree_id (the hierarchy's root is level 0)
    u32 big_logins;  // restricted logins with a uid >= LOGIN_BITS_UIDS (only in the `logins` hash)
};

// Restricted logins with a uid below this are also bits in the `login_bits`
// array: an array lookup is what every other process of the host pays.
#define LOGIN_BITS_UIDS (1 << 20)

// net_event.subject
#define SUBJECT_SESSION 1  // a process of a session cgroup
#define SUBJECT_OUTSIDE 2  // a process of a restricted login outside any session

struct net_event {
    u64 boot_ns;  // CLOCK_BOOTTIME: user space turns it into wall time
    u64 cgroup_id;
    u32 pid;
    u32 uid;
    u16 family;
    u16 dst_port;
    u8 operation;
    u8 action;
    u8 subject;
    u8 protocol;  // IP protocol of an OP_PACKET record (1 ICMP, 58 ICMPv6, ...)
    u8 src_addr[16];
    u8 dst_addr[16];
    char comm[16];
};

// --- enhanced recording (recording.bpf.c) ----------------------------------------------

#define MAX_ARGS 20
#define ARG_BYTES 128
#define EXEC_PATH_BYTES 512
#define EXEC_DATA_BYTES (EXEC_PATH_BYTES + MAX_ARGS * ARG_BYTES)
#define DISK_PATH_BYTES 512

// exec_event.truncated / disk_event.truncated
#define TRUNC_PATH 1  // the path was longer than the buffer
#define TRUNC_ARGS 2  // more than MAX_ARGS arguments, or an unreadable one: the rest is missing

// Emitted at exec exit: header, then data[] = path (path_len bytes, NUL
// included) followed by argc NUL-terminated arguments (args_len bytes).
struct exec_event {
    u64 boot_ns;  // CLOCK_BOOTTIME at exit
    u64 cgroup_id;
    u32 pid;  // tgid
    u32 ppid;  // real parent's tgid
    s32 ret;  // 0 or -errno
    u32 args_truncated;  // bit i: argument i was cut to ARG_BYTES - 1 bytes
    u16 path_len;
    u16 args_len;
    u16 argc;
    u16 truncated;
    char comm[16];
    char data[EXEC_DATA_BYTES];
};

// Emitted at open exit: header, then path_len bytes of path (NUL included).
struct disk_event {
    u64 boot_ns;
    u64 cgroup_id;
    u32 pid;
    s32 flags;  // open flags as passed (openat2: open_how.flags)
    s32 ret;  // the fd or -errno
    u16 path_len;
    u16 truncated;
    char comm[16];
    char path[DISK_PATH_BYTES];
};

// Identical opens folded in the kernel (recording.bpf.c, services/enforcer/disk_folds.py):
// the first open of a key in a fold interval is emitted as a disk_event, the
// repeats are counted in the value, and user space writes the count as one
// session.disk standing for them when it switches the fold maps.
struct disk_fold_key {
    u64 cgroup_id;
    s32 flags;
    s32 outcome;  // 0: opened; -errno: refused
    u32 truncated;  // TRUNC_PATH
    u32 pad;
    char comm[16];
    char path[DISK_PATH_BYTES];  // NUL-padded: the whole key is hashed
};

struct disk_fold {
    u64 count;  // repeats after the emitted open
    u64 first_ns;  // CLOCK_BOOTTIME of the first and last repeat
    u64 last_ns;
    u32 last_pid;
    s32 last_ret;  // the last repeat's fd
};

// Records dropped because a ring buffer was full, per session (or per login
// outside sessions): the key of the pinned `lost_by` map, shared by both files.
#define LOST_NETWORK 0
#define LOST_EXEC 1
#define LOST_DISK 2

struct lost_key {
    u64 cgroup_id;  // the session's cgroup; 0 for a restricted login outside sessions
    u32 uid;  // that login (0 for sessions)
    u32 source;  // LOST_*
};

#ifdef RINGFENCE_BPF

// The enforcer's pinned sessions map: cgroup id -> flags. Compile-time
// parameters: PIN_DIR, SESSIONS_MAX_ENTRIES.
#define RINGFENCE_SESSIONS_MAP() \
    BPF_TABLE_PINNED("hash", u64, struct session_flags, sessions, SESSIONS_MAX_ENTRIES, PIN_DIR "/sessions")

// Records are submitted without waking the reader, which drains the rings every
// few milliseconds instead: a wakeup per record made execs in a session
// markedly slower (every exec brings several opens), and a flood of denials
// then comes out in large batches.
#define RB_FLAGS BPF_RB_NO_WAKEUP

// A pinned ring buffer: bcc's BPF_RINGBUF_OUTPUT cannot be pinned, so this is
// its expansion with a "ringbuf:<path>" section.
#define PINNED_RINGBUF(_name, _bytes)                          \
    struct _name##_table_t {                                   \
        int key;                                               \
        u32 leaf;                                              \
        int (*ringbuf_output)(void *, u64, u64);               \
        void *(*ringbuf_reserve)(u64);                         \
        void (*ringbuf_discard)(void *, u64);                  \
        void (*ringbuf_submit)(void *, u64);                   \
        u32 max_entries;                                       \
    };                                                         \
    __attribute__((section("maps/ringbuf:" PIN_DIR "/" #_name))) \
    struct _name##_table_t _name = {.max_entries = (_bytes)}

// Per session or login drop counters, shared by both files. (bcc rewrites map
// calls in the .c file only, so each file has its own lost_by_add.)
#define LOST_BY_MAP() \
    BPF_TABLE_PINNED("hash", struct lost_key, u64, lost_by, LOST_BY_MAX_ENTRIES, PIN_DIR "/lost_by", BPF_F_NO_PREALLOC)

#endif  // RINGFENCE_BPF
#endif  // RINGFENCE_H
