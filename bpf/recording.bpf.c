// SPDX-License-Identifier: GPL-2.0
// Enhanced recording: session.command from execve/execveat and session.disk
// from open/openat/openat2/creat, for processes in recorded session cgroups.
//
// Syscall tracepoints only (no kprobes, no BPF-LSM on the hosts we target).
// Every program first looks the current cgroup up in the enforcer's pinned
// `sessions` map (shared with restricted.bpf.c, identical definition) and
// does nothing unless the cgroup is a session with SESSION_RECORDED: the
// filtering happens here, in the kernel, not in user space.
//
// Enter and exit are paired per thread (key: pid_tgid). exec reads the path
// and argv at enter (the old address space is gone after a successful exec)
// and emits at exit with the return code and the comm of that moment: the new
// program's comm on success, the caller's on failure. open remembers the user
// pointer at enter and reads the path at exit, when the kernel has already
// faulted it in. Records are variable-length: only the bytes used are copied
// into the ring buffers.
//
// Ring buffers and drop counters are pinned under PIN_DIR, like the network
// ones. Tracepoint attachments belong to the loading process: events are
// produced only while the enforcer runs; what was emitted before it stopped
// waits in the pinned ring buffers for the next reader.
//
// Identical opens are folded here: per fold interval, the first open of a
// (session, program, path, flags, outcome) is emitted and the repeats are
// only counted in the active fold map (disk_fold0 or disk_fold1, chosen by
// user space through the disk_folds map-in-map). User space switches the maps
// every interval; the update of a map-in-map returns only once every program
// that could still use the old map has finished (the kernel waits an RCU grace
// period), so the old map is read and emptied with no writer left. A map that
// is full, or none active yet, folds nothing: every open is then emitted.
//
// Records, limits and the shared maps are in ringfence.h.
//
// Compile-time parameters (bcc cflags): PIN_DIR, SESSIONS_MAX_ENTRIES,
// LOST_BY_MAX_ENTRIES, RINGBUF_BYTES, DISK_FOLD_MAX_ENTRIES, TASK_REAL_PARENT_OFF and TASK_TGID_OFF (offsets in struct
// task_struct taken from the running kernel's BTF; -1 when unknown: ppid 0).

#define RINGFENCE_BPF
#include "ringfence.h"

struct disk_pending {
    u64 filename;  // user pointer, read at exit
    u64 cgroup_id;
    s32 flags;
    u32 pad;
};

// Syscall tracepoint contexts: the layout every syscalls:sys_enter_*/
// sys_exit_* event has (struct trace_entry, int nr, then 8-byte slots).
struct sys_enter_ctx {
    u64 common;
    s32 nr;
    u32 pad;
    u64 args[6];
};

struct sys_exit_ctx {
    u64 common;
    s32 nr;
    u32 pad;
    s64 ret;
};

struct sched_exec_ctx {
    u64 common;
    u32 filename_loc;
    s32 pid;
    s32 old_pid;
};

RINGFENCE_SESSIONS_MAP();
// lost_*[0]: records dropped because the ring buffer (or the pending map) was full.
BPF_TABLE_PINNED("array", u32, u64, lost_exec, 1, PIN_DIR "/lost_exec");
BPF_TABLE_PINNED("array", u32, u64, lost_disk, 1, PIN_DIR "/lost_disk");

// In-flight syscalls of this loader (not pinned: they belong to the attached programs).
BPF_F_TABLE("hash", u64, struct exec_event, exec_pending, 4096, BPF_F_NO_PREALLOC);
BPF_TABLE("hash", u64, struct disk_pending, disk_pending, 16384);
BPF_PERCPU_ARRAY(exec_scratch, struct exec_event, 1);
BPF_PERCPU_ARRAY(disk_scratch, struct disk_event, 1);
BPF_PERCPU_ARRAY(fold_scratch, struct disk_fold_key, 1);

// Pinned, so counts taken while no enforcer reads them are written by the next one.
BPF_TABLE_PINNED("hash", struct disk_fold_key, struct disk_fold, disk_fold0, DISK_FOLD_MAX_ENTRIES,
                 PIN_DIR "/disk_fold0", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct disk_fold_key, struct disk_fold, disk_fold1, DISK_FOLD_MAX_ENTRIES,
                 PIN_DIR "/disk_fold1", BPF_F_NO_PREALLOC);
BPF_ARRAY_OF_MAPS(disk_folds, "disk_fold0", 1);  // [0]: the active fold map, set by user space

PINNED_RINGBUF(events_exec, RINGBUF_BYTES);
PINNED_RINGBUF(events_disk, RINGBUF_BYTES);
LOST_BY_MAP();

// One more record of `source` dropped, counted per session or login (while the map has room).
static __always_inline void lost_by_add(u32 source, u64 cgroup_id, u32 uid) {
    struct lost_key key = {.cgroup_id = cgroup_id, .uid = uid, .source = source};
    u64 *m = lost_by.lookup(&key);
    if (m) {
        __sync_fetch_and_add(m, 1);
    } else {
        u64 one = 1;
        if (lost_by.insert(&key, &one) < 0 && (m = lost_by.lookup(&key)))
            __sync_fetch_and_add(m, 1);  // inserted meanwhile on another CPU
    }
}

static __always_inline void count_lost_exec(u64 cgid) {
    u32 zero = 0;
    u64 *n = lost_exec.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    lost_by_add(LOST_EXEC, cgid, 0);
}

static __always_inline void count_lost_disk(u64 cgid) {
    u32 zero = 0;
    u64 *n = lost_disk.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    lost_by_add(LOST_DISK, cgid, 0);
}

static __always_inline int recorded(u64 *cgid) {
    u64 id = bpf_get_current_cgroup_id();
    struct session_flags *sf = sessions.lookup(&id);
    if (!sf || !(sf->flags & SESSION_RECORDED))
        return 0;
    *cgid = id;
    return 1;
}

// A string read filled its whole buffer: was there more? (the byte where
// the NUL would have been is not NUL)
static __always_inline int continues(const char *p) {
    char c = 0;
    bpf_probe_read_user(&c, 1, p);
    return c != 0;
}

static __always_inline u32 parent_tgid(void) {
#if TASK_REAL_PARENT_OFF >= 0 && TASK_TGID_OFF >= 0
    char *task = (char *)bpf_get_current_task();
    char *parent = 0;
    u32 tgid = 0;
    if (bpf_probe_read_kernel(&parent, sizeof(parent), task + TASK_REAL_PARENT_OFF) == 0 && parent)
        bpf_probe_read_kernel(&tgid, sizeof(tgid), parent + TASK_TGID_OFF);
    return tgid;
#else
    return 0;
#endif
}

// --- exec -----------------------------------------------------------------------------

static __always_inline int exec_enter(const char *filename, const char *const *argv) {
    u64 cgid;
    if (!recorded(&cgid))
        return 0;
    u32 zero = 0;
    struct exec_event *e = exec_scratch.lookup(&zero);
    if (!e)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    e->boot_ns = 0;
    e->cgroup_id = cgid;
    e->pid = id >> 32;
    e->ppid = parent_tgid();
    e->ret = 0;
    e->args_truncated = 0;
    e->argc = 0;
    e->truncated = 0;

    long n = bpf_probe_read_user_str(e->data, EXEC_PATH_BYTES, filename);
    if (n < 0)
        n = 0;
    if (n > EXEC_PATH_BYTES)
        n = EXEC_PATH_BYTES;
    if (n == EXEC_PATH_BYTES && continues(filename + EXEC_PATH_BYTES - 1))
        e->truncated |= TRUNC_PATH;
    e->path_len = n;

    u32 off = n;
    if (!argv)  // execve(path, NULL, ...) runs with an empty argv
        goto done;
#pragma unroll
    for (int i = 0; i < MAX_ARGS; i++) {
        const char *arg = 0;
        if (bpf_probe_read_user(&arg, sizeof(arg), &argv[i]) < 0) {
            e->truncated |= TRUNC_ARGS;
            goto done;
        }
        if (!arg)
            goto done;
        if (off > EXEC_DATA_BYTES - ARG_BYTES)  // cannot happen; bounds `off` for the verifier
            goto done;
        long m = bpf_probe_read_user_str(&e->data[off], ARG_BYTES, arg);
        if (m <= 0) {
            e->truncated |= TRUNC_ARGS;
            goto done;
        }
        if (m == ARG_BYTES && continues(arg + ARG_BYTES - 1))
            e->args_truncated |= 1u << i;
        off += m;
        e->argc++;
    }
    {
        const char *more = 0;
        if (bpf_probe_read_user(&more, sizeof(more), &argv[MAX_ARGS]) < 0 || more)
            e->truncated |= TRUNC_ARGS;
    }
done:
    e->args_len = off - e->path_len;
    if (exec_pending.update(&id, e) < 0)
        count_lost_exec(e->cgroup_id);
    return 0;
}

static __always_inline int exec_exit(s64 ret) {
    u64 id = bpf_get_current_pid_tgid();
    struct exec_event *e = exec_pending.lookup(&id);
    if (!e)
        return 0;
    e->ret = ret;
    e->boot_ns = bpf_ktime_get_boot_ns();
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    u32 len = e->path_len + e->args_len;
    if (len > EXEC_DATA_BYTES)
        len = EXEC_DATA_BYTES;
    if (events_exec.ringbuf_output(e, offsetof(struct exec_event, data) + len, RB_FLAGS) < 0)
        count_lost_exec(e->cgroup_id);
    exec_pending.delete(&id);
    return 0;
}

int rec_enter_execve(struct sys_enter_ctx *ctx) {
    return exec_enter((const char *)ctx->args[0], (const char *const *)ctx->args[1]);
}

int rec_enter_execveat(struct sys_enter_ctx *ctx) {
    return exec_enter((const char *)ctx->args[1], (const char *const *)ctx->args[2]);
}

int rec_exit_exec(struct sys_exit_ctx *ctx) { return exec_exit(ctx->ret); }

// A successful exec from a thread other than the leader takes over the
// leader's pid before sys_exit: move its pending record to the new key.
int rec_sched_exec(struct sched_exec_ctx *ctx) {
    if (ctx->pid == ctx->old_pid)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u64 old = (id & 0xffffffff00000000ULL) | (u32)ctx->old_pid;
    struct exec_event *e = exec_pending.lookup(&old);
    if (!e)
        return 0;
    if (exec_pending.update(&id, e) < 0)
        count_lost_exec(e->cgroup_id);
    exec_pending.delete(&old);
    return 0;
}

// --- open -----------------------------------------------------------------------------

static __always_inline int open_enter(const char *filename, s32 flags) {
    u64 cgid;
    if (!recorded(&cgid))
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    struct disk_pending p = {.filename = (u64)filename, .cgroup_id = cgid, .flags = flags};
    if (disk_pending.update(&id, &p) < 0)
        count_lost_disk(cgid);
    return 0;
}

// One more repeat of `k` in `f`.
static __always_inline void fold_count(struct disk_fold *f, u64 now, u32 pid, s64 ret) {
    if (__sync_fetch_and_add(&f->count, 1) == 0)
        f->first_ns = now;
    f->last_ns = now;
    f->last_pid = pid;
    f->last_ret = ret;
}

// Was this open (key `k`) seen in the active fold interval? Then it is counted
// there, and 1 is returned: nothing to emit. Otherwise it is remembered as
// seen, and 0 says: emit it.
static __always_inline int folded(struct disk_fold_key *k, u64 now, u32 pid, s64 ret) {
    u32 zero = 0;
    void *seen = disk_folds.lookup(&zero);
    if (!seen)
        return 0;
    struct disk_fold *f = bpf_map_lookup_elem(seen, k);
    if (!f) {
        struct disk_fold fresh = {};
        if (bpf_map_update_elem(seen, k, &fresh, BPF_NOEXIST) == 0)
            return 0;
        f = bpf_map_lookup_elem(seen, k);  // inserted meanwhile on another CPU (or the map is full)
        if (!f)
            return 0;
    }
    fold_count(f, now, pid, ret);
    return 1;
}

static __always_inline int open_exit(s64 ret) {
    u64 id = bpf_get_current_pid_tgid();
    struct disk_pending *p = disk_pending.lookup(&id);
    if (!p)
        return 0;
    u32 zero = 0;
    struct disk_fold_key *k = fold_scratch.lookup(&zero);
    struct disk_event *e = disk_scratch.lookup(&zero);
    if (!k || !e)
        goto out;
    __builtin_memset(k, 0, sizeof(*k));
    const char *filename = (const char *)p->filename;
    k->cgroup_id = p->cgroup_id;
    k->flags = p->flags;
    k->outcome = ret < 0 ? ret : 0;
    long n = bpf_probe_read_user_str(k->path, DISK_PATH_BYTES, filename);
    if (n < 0)
        n = 0;
    if (n > DISK_PATH_BYTES)
        n = DISK_PATH_BYTES;
    if (n == DISK_PATH_BYTES && continues(filename + DISK_PATH_BYTES - 1))
        k->truncated = TRUNC_PATH;
    bpf_get_current_comm(k->comm, sizeof(k->comm));
    u64 now = bpf_ktime_get_boot_ns();
    u32 pid = id >> 32;
    if (folded(k, now, pid, ret))
        goto out;
    e->boot_ns = now;
    e->cgroup_id = p->cgroup_id;
    e->pid = pid;
    e->flags = p->flags;
    e->ret = ret;
    e->truncated = k->truncated;
    e->path_len = n;
    __builtin_memcpy(e->comm, k->comm, sizeof(e->comm));
    if (n > 0)
        bpf_probe_read_kernel(e->path, n, k->path);
    if (events_disk.ringbuf_output(e, offsetof(struct disk_event, path) + n, RB_FLAGS) < 0)
        count_lost_disk(p->cgroup_id);
out:
    disk_pending.delete(&id);
    return 0;
}

int rec_enter_open(struct sys_enter_ctx *ctx) { return open_enter((const char *)ctx->args[0], ctx->args[1]); }

int rec_enter_creat(struct sys_enter_ctx *ctx) {
    return open_enter((const char *)ctx->args[0], 01 | 0100 | 01000);  // O_WRONLY|O_CREAT|O_TRUNC
}

int rec_enter_openat(struct sys_enter_ctx *ctx) { return open_enter((const char *)ctx->args[1], ctx->args[2]); }

int rec_enter_openat2(struct sys_enter_ctx *ctx) {
    u64 flags = 0;  // struct open_how starts with u64 flags
    bpf_probe_read_user(&flags, sizeof(flags), (void *)ctx->args[2]);
    return open_enter((const char *)ctx->args[1], flags);
}

int rec_exit_open(struct sys_exit_ctx *ctx) { return open_exit(ctx->ret); }
