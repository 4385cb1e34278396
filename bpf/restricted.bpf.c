// SPDX-License-Identifier: GPL-2.0
// Restricted sessions: egress policy for processes in session cgroups.
//
// Attached (BPF_F_ALLOW_MULTI) to the enforcer's parent cgroup for
// connect4/connect6/sendmsg4/sendmsg6, so it applies to every session cgroup
// below it. All maps are pinned under PIN_DIR: they outlive the enforcer
// process, so enforcement continues while it is down or restarting, and the
// events produced meanwhile wait in the ring buffer for the next reader.
//
// Policy: one LPM trie per family holding the *effective* entries computed in
// user space: deny CIDRs, plus allow CIDRs not inside any deny CIDR. The
// longest match then decides with a single lookup: ALLOW -> allowed, DENY or
// no match -> EPERM. A single lookup per decision is what lets user space
// replace a policy entry by entry without ever allowing a destination that
// both the old and the new policy deny (see services/enforcer/policy_core.py).
//
// Compile-time parameters (bcc cflags): PIN_DIR, POLICY_MAX_ENTRIES,
// SESSIONS_MAX_ENTRIES, RINGBUF_BYTES.

#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/socket.h>

#define VERDICT_ALLOW 1
#define VERDICT_DENY 2

#define OP_CONNECT 0
#define OP_SEND 1

#define ACTION_OBSERVED 0
#define ACTION_DENIED 1

struct key4 {
    u32 prefixlen;
    u8 addr[4];
};

struct key6 {
    u32 prefixlen;
    u8 addr[16];
};

// settings[0]: enforce = 1 once a network_restrictions resource exists and
// restricted sessions are enabled on this node; observe = 1 when enhanced
// recording wants allowed connections reported too.
struct settings {
    u32 enforce;
    u32 observe;
};

// Per session cgroup: which controls apply (bit 0: restricted, bit 1: recorded).
struct session_flags {
    u32 flags;
};
#define SESSION_RESTRICTED 1
#define SESSION_RECORDED 2

struct net_event {
    u64 boot_ns;  // CLOCK_BOOTTIME: user space turns it into wall time
    u64 cgroup_id;
    u32 pid;
    u16 family;
    u16 dst_port;
    u8 operation;
    u8 action;
    u8 pad[6];
    u8 src_addr[16];
    u8 dst_addr[16];
    char comm[16];
};

BPF_TABLE_PINNED("lpm_trie", struct key4, u8, policy4, POLICY_MAX_ENTRIES, PIN_DIR "/policy4", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct key6, u8, policy6, POLICY_MAX_ENTRIES, PIN_DIR "/policy6", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", u32, struct settings, settings, 1, PIN_DIR "/settings");
BPF_TABLE_PINNED("hash", u64, struct session_flags, sessions, SESSIONS_MAX_ENTRIES, PIN_DIR "/sessions");
// lost[0]: network events dropped because the ring buffer was full.
BPF_TABLE_PINNED("array", u32, u64, lost, 1, PIN_DIR "/lost_network");

// A pinned ring buffer: bcc's BPF_RINGBUF_OUTPUT cannot be pinned, so this is
// its expansion with a "ringbuf:<path>" section.
struct events_table_t {
    int key;
    u32 leaf;
    int (*ringbuf_output)(void *, u64, u64);
    void *(*ringbuf_reserve)(u64);
    void (*ringbuf_discard)(void *, u64);
    void (*ringbuf_submit)(void *, u64);
    u32 max_entries;
};
__attribute__((section("maps/ringbuf:" PIN_DIR "/events_network")))
struct events_table_t events = {.max_entries = RINGBUF_BYTES};

static __always_inline int is_v4_mapped(const u32 *w) {
    return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int verdict4(u32 addr_be) {
    struct key4 k = {.prefixlen = 32};
    __builtin_memcpy(k.addr, &addr_be, 4);
    u8 *v = policy4.lookup(&k);
    return v && *v == VERDICT_ALLOW;
}

static __always_inline void emit(struct bpf_sock_addr *ctx, u64 cgid, u16 family, const u32 *dst, u8 op,
                                 u8 action) {
    struct net_event *e = events.ringbuf_reserve(sizeof(*e));
    if (!e) {
        u32 zero = 0;
        u64 *n = lost.lookup(&zero);
        if (n)
            __sync_fetch_and_add(n, 1);
        return;
    }
    __builtin_memset(e, 0, sizeof(*e));
    e->boot_ns = bpf_ktime_get_boot_ns();
    e->cgroup_id = cgid;
    e->pid = bpf_get_current_pid_tgid() >> 32;
    e->family = family;
    e->dst_port = bpf_ntohs((u16)ctx->user_port);
    e->operation = op;
    e->action = action;
    if (family == AF_INET) {
        __builtin_memcpy(e->dst_addr, dst, 4);
        struct bpf_sock *sk = ctx->sk;
        if (sk) {
            u32 src = sk->src_ip4;
            __builtin_memcpy(e->src_addr, &src, 4);
        }
    } else {
        __builtin_memcpy(e->dst_addr, dst, 16);
        struct bpf_sock *sk = ctx->sk;
        if (sk) {
            u32 s0 = sk->src_ip6[0], s1 = sk->src_ip6[1], s2 = sk->src_ip6[2], s3 = sk->src_ip6[3];
            __builtin_memcpy(e->src_addr, &s0, 4);
            __builtin_memcpy(e->src_addr + 4, &s1, 4);
            __builtin_memcpy(e->src_addr + 8, &s2, 4);
            __builtin_memcpy(e->src_addr + 12, &s3, 4);
        }
    }
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    events.ringbuf_submit(e, 0);
}

static __always_inline u32 session_flags_of(u64 cgid) {
    // Every cgroup below the attach point is a session; one missing from the
    // map (it should not happen) is treated as restricted: fail closed.
    struct session_flags *sf = sessions.lookup(&cgid);
    return sf ? sf->flags : SESSION_RESTRICTED;
}

// Returns 1 to let the call proceed, 0 to fail it with EPERM.
//
// The session's flags are looked up only when they can change the outcome (a
// destination the policy denies, or observe on): an allowed connect with
// enhanced recording off, the common case, costs one settings array lookup
// and one LPM lookup, no hash lookup.
static __always_inline int decide(struct bpf_sock_addr *ctx, u16 family, u8 op) {
    u32 zero = 0;
    struct settings *st = settings.lookup(&zero);
    if (!st)
        return 1;

    u32 dst[4] = {};
    int allowed = 1;
    if (family == AF_INET) {
        dst[0] = ctx->user_ip4;
        if (st->enforce)
            allowed = verdict4(dst[0]);
    } else {
        dst[0] = ctx->user_ip6[0];
        dst[1] = ctx->user_ip6[1];
        dst[2] = ctx->user_ip6[2];
        dst[3] = ctx->user_ip6[3];
        if (st->enforce) {
            if (is_v4_mapped(dst)) {
                // IPv4 rules apply to IPv4-mapped IPv6 destinations.
                allowed = verdict4(dst[3]);
            } else {
                struct key6 k = {.prefixlen = 128};
                __builtin_memcpy(k.addr, dst, 16);
                u8 *v = policy6.lookup(&k);
                allowed = v && *v == VERDICT_ALLOW;
            }
        }
    }
    if (allowed && !st->observe)
        return 1;

    u64 cgid = bpf_get_current_cgroup_id();
    u32 flags = session_flags_of(cgid);
    if (!allowed && (flags & SESSION_RESTRICTED)) {
        emit(ctx, cgid, family, dst, op, ACTION_DENIED);
        return 0;
    }
    if (st->observe && (flags & SESSION_RECORDED))
        emit(ctx, cgid, family, dst, op, ACTION_OBSERVED);
    return 1;
}

int restricted_connect4(struct bpf_sock_addr *ctx) { return decide(ctx, AF_INET, OP_CONNECT); }
int restricted_connect6(struct bpf_sock_addr *ctx) { return decide(ctx, AF_INET6, OP_CONNECT); }
int restricted_sendmsg4(struct bpf_sock_addr *ctx) { return decide(ctx, AF_INET, OP_SEND); }
int restricted_sendmsg6(struct bpf_sock_addr *ctx) { return decide(ctx, AF_INET6, OP_SEND); }
