// SPDX-License-Identifier: GPL-2.0
// Restricted sessions: egress policy for session processes, and for processes
// of restricted logins wherever they run.
//
// Attached through pinned bpf_links to the ROOT of the cgroup2 hierarchy, so
// every process of the host runs them and each decides by the current task,
// not by the cgroup that created the socket:
//
// - a process in this node's session tree (its ancestor at tree_level is the
//   node's cgroup) is judged with its session's flags;
// - a process of a uid in `logins` outside any Ringfence session tree (cron,
//   at, a systemd user manager, a leftover) is judged by the same policy and
//   its records say SUBJECT_OUTSIDE;
// - anything else returns at once (a settings lookup, a cgroup ancestor and
//   a uid bitmap lookup).
//
// A socket created elsewhere and passed in over SCM_RIGHTS is therefore judged
// by the process that connects or sends with it.
//
// Hooks: connect4/connect6 and sendmsg4/sendmsg6 see TCP, UDP (and ping
// sockets' connect). Raw, ICMP (ping) and other sockets have no sendmsg hook:
// sock_create marks them (pinned sk_storage) and the egress program judges
// each of their packets by its destination, for the current task (raw and
// ping sockets transmit in the sending task's context). Kernel sockets (ICMP
// replies, resets) are never marked, so they are never judged by whichever
// task they interrupted.
//
// Policy: one LPM trie per family holding the *effective* entries computed in
// user space: deny CIDRs, plus allow CIDRs not inside any deny CIDR. The
// longest match then decides with a single lookup: ALLOW -> allowed, DENY or
// no match -> EPERM. A single lookup per decision is what lets user space
// replace a policy entry by entry without ever allowing a destination that
// both the old and the new policy deny (see services/enforcer/policy_core.py).
//
// Every map is pinned under PIN_DIR: enforcement continues while the enforcer
// is down or restarting, and records made meanwhile wait in the ring buffer.
//
// Compile-time parameters (bcc cflags): PIN_DIR, POLICY_MAX_ENTRIES,
// SESSIONS_MAX_ENTRIES, LOGINS_MAX_ENTRIES, LOST_BY_MAX_ENTRIES, RINGBUF_BYTES.

#define RINGFENCE_BPF
#include "ringfence.h"
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/socket.h>

// Spelled out: <linux/if_ether.h> (and the socket types it drags in) doubles the compile time.
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#endif

#define VERDICT_ALLOW 1
#define VERDICT_DENY 2

#define IPPROTO_MPTCP_ 262

struct key4 {
    u32 prefixlen;
    u8 addr[4];
};

struct key6 {
    u32 prefixlen;
    u8 addr[16];
};

struct sock_mark {
    u8 unhooked;
};

BPF_TABLE_PINNED("lpm_trie", struct key4, u8, policy4, POLICY_MAX_ENTRIES, PIN_DIR "/policy4", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct key6, u8, policy6, POLICY_MAX_ENTRIES, PIN_DIR "/policy6", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", u32, struct settings, settings, 1, PIN_DIR "/settings");
RINGFENCE_SESSIONS_MAP();
// Restricted logins: uid -> 1. Their processes outside sessions obey the policy.
BPF_TABLE_PINNED("hash", u32, u32, logins, LOGINS_MAX_ENTRIES, PIN_DIR "/logins", BPF_F_NO_PREALLOC);
// The same logins with a uid below LOGIN_BITS_UIDS, one bit each (word uid / 64, bit uid % 64).
BPF_TABLE_PINNED("array", u32, u64, login_bits, LOGIN_BITS_UIDS / 64, PIN_DIR "/login_bits");
// lost[0]: network records dropped because the ring buffer was full.
BPF_TABLE_PINNED("array", u32, u64, lost, 1, PIN_DIR "/lost_network");
// What the enforcer reported of lost_by (ringfence.h): written by user space only, pinned
// so that any enforcer of this node, whatever its data dir, reports only what is new.
BPF_TABLE_PINNED("hash", struct lost_key, u64, lost_reported, LOST_BY_MAX_ENTRIES, PIN_DIR "/lost_reported",
                 BPF_F_NO_PREALLOC);
PINNED_RINGBUF(events_network, RINGBUF_BYTES);
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

// Sockets the connect/sendmsg hooks do not see (raw, ICMP, ...), marked at creation.
struct unhooked_table_t {
    int key;
    struct sock_mark leaf;
    void *(*sk_storage_get)(void *, void *, int);
    int (*sk_storage_delete)(void *);
    u32 flags;
};
__attribute__((section("maps/sk_storage:" PIN_DIR "/unhooked")))
struct unhooked_table_t unhooked = {.flags = BPF_F_NO_PREALLOC};
BPF_ANNOTATE_KV_PAIR(unhooked, int, struct sock_mark);

static __always_inline int is_v4_mapped(const u32 *w) {
    return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int allowed4(u32 addr_be) {
    struct key4 k = {.prefixlen = 32};
    __builtin_memcpy(k.addr, &addr_be, 4);
    u8 *v = policy4.lookup(&k);
    return v && *v == VERDICT_ALLOW;
}

// dst: 4 words, network order; IPv4 in dst[0] for AF_INET.
static __always_inline int allowed(u16 family, const u32 *dst) {
    if (family == AF_INET)
        return allowed4(dst[0]);
    if (is_v4_mapped(dst))
        return allowed4(dst[3]);  // IPv4 rules apply to IPv4-mapped IPv6 destinations
    struct key6 k = {.prefixlen = 128};
    __builtin_memcpy(k.addr, dst, 16);
    u8 *v = policy6.lookup(&k);
    return v && *v == VERDICT_ALLOW;
}

static __always_inline int restricted_login(const struct settings *st, u32 uid) {
    if (uid < LOGIN_BITS_UIDS) {
        u32 word = uid / 64;
        u64 *bits = login_bits.lookup(&word);
        return bits && (*bits >> (uid % 64)) & 1;
    }
    return st->big_logins && logins.lookup(&uid);
}

// Who the current task is to this node: 0 (not ours), SUBJECT_SESSION or SUBJECT_OUTSIDE.
static __always_inline int subject_of(const struct settings *st, u32 *uid) {
    if (st->tree_id && bpf_get_current_ancestor_cgroup_id(st->tree_level) == st->tree_id)
        return SUBJECT_SESSION;
    if (!st->enforce)
        return 0;
    *uid = (u32)bpf_get_current_uid_gid();
    if (!restricted_login(st, *uid))
        return 0;
    // Another node's session (several enforcers on one host): that node judges it.
    if (st->ringfence_id && bpf_get_current_ancestor_cgroup_id(st->tree_level - 1) == st->ringfence_id)
        return 0;
    return SUBJECT_OUTSIDE;
}

static __always_inline u32 session_flags_of(u64 cgid) {
    // Every cgroup below the node's tree is a session; one missing from the map
    // (it should not happen) is treated as restricted: fail closed.
    struct session_flags *sf = sessions.lookup(&cgid);
    return sf ? sf->flags : SESSION_RESTRICTED;
}

static __always_inline void emit(u64 cgid, u32 uid, u8 subject, u16 family, const u32 *dst, const u32 *src,
                                 u16 dst_port, u8 op, u8 protocol, u8 action) {
    struct net_event *e = events_network.ringbuf_reserve(sizeof(*e));
    if (!e) {
        u32 zero = 0;
        u64 *n = lost.lookup(&zero);
        if (n)
            __sync_fetch_and_add(n, 1);
        if (subject == SUBJECT_OUTSIDE)
            lost_by_add(LOST_NETWORK, 0, uid);
        else
            lost_by_add(LOST_NETWORK, cgid, 0);
        return;
    }
    __builtin_memset(e, 0, sizeof(*e));
    e->boot_ns = bpf_ktime_get_boot_ns();
    e->cgroup_id = cgid;
    e->pid = bpf_get_current_pid_tgid() >> 32;
    e->uid = (u32)bpf_get_current_uid_gid();
    e->family = family;
    e->dst_port = dst_port;
    e->operation = op;
    e->action = action;
    e->subject = subject;
    e->protocol = protocol;
    __builtin_memcpy(e->dst_addr, dst, 16);  // IPv4: the first 4 bytes, the rest zero
    __builtin_memcpy(e->src_addr, src, 16);
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    events_network.ringbuf_submit(e, RB_FLAGS);
}

// connect()/sendmsg(): 1 lets the call proceed, 0 fails it with EPERM.
static __always_inline int decide(struct bpf_sock_addr *ctx, u16 family, u8 op) {
    u32 zero = 0;
    struct settings *st = settings.lookup(&zero);
    if (!st)
        return 1;
    u32 uid = 0;
    int subject = subject_of(st, &uid);
    if (!subject)
        return 1;

    u32 dst[4] = {};
    if (family == AF_INET) {
        dst[0] = ctx->user_ip4;
    } else {
        dst[0] = ctx->user_ip6[0];
        dst[1] = ctx->user_ip6[1];
        dst[2] = ctx->user_ip6[2];
        dst[3] = ctx->user_ip6[3];
    }
    int ok = !st->enforce || allowed(family, dst);
    // The session's flags matter only for a destination the policy denies, or
    // when allowed connections are observed: the common allowed connect pays no
    // hash lookup.
    if (ok && !(st->observe && subject == SUBJECT_SESSION))
        return 1;

    u64 cgid = bpf_get_current_cgroup_id();
    u32 flags = subject == SUBJECT_SESSION ? session_flags_of(cgid) : SESSION_RESTRICTED;
    u8 action;
    if (!ok && (flags & SESSION_RESTRICTED))
        action = ACTION_DENIED;
    else if (ok && (flags & SESSION_RECORDED))
        action = ACTION_OBSERVED;
    else
        return 1;

    u32 src[4] = {};
    struct bpf_sock *sk = ctx->sk;
    if (sk) {
        if (family == AF_INET) {
            src[0] = sk->src_ip4;
        } else {
            src[0] = sk->src_ip6[0];
            src[1] = sk->src_ip6[1];
            src[2] = sk->src_ip6[2];
            src[3] = sk->src_ip6[3];
        }
    }
    emit(cgid, uid, subject, family, dst, src, bpf_ntohs((u16)ctx->user_port), op, 0, action);
    return action != ACTION_DENIED;
}

int restricted_connect4(struct bpf_sock_addr *ctx) { return decide(ctx, AF_INET, OP_CONNECT); }
int restricted_connect6(struct bpf_sock_addr *ctx) { return decide(ctx, AF_INET6, OP_CONNECT); }
int restricted_sendmsg4(struct bpf_sock_addr *ctx) { return decide(ctx, AF_INET, OP_SEND); }
int restricted_sendmsg6(struct bpf_sock_addr *ctx) { return decide(ctx, AF_INET6, OP_SEND); }

// socket(): mark what the hooks above do not see. Never refuses.
int restricted_sock_create(struct bpf_sock *sk) {
    if (sk->type == SOCK_STREAM && (sk->protocol == IPPROTO_TCP || sk->protocol == IPPROTO_MPTCP_))
        return 1;
    if (sk->type == SOCK_DGRAM && (sk->protocol == IPPROTO_UDP || sk->protocol == IPPROTO_UDPLITE))
        return 1;
    struct sock_mark *m = unhooked.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (m)
        m->unhooked = 1;
    return 1;
}

// Every packet leaving the host's sockets: 1 passes, 0 drops it (the sender gets EPERM).
int restricted_egress(struct __sk_buff *skb) {
    struct bpf_sock *sk = skb->sk;
    if (!sk)
        return 1;
    sk = bpf_sk_fullsock(sk);
    if (!sk || !unhooked.sk_storage_get(sk, 0, 0))
        return 1;
    u32 zero = 0;
    struct settings *st = settings.lookup(&zero);
    if (!st || !st->enforce)
        return 1;
    u32 uid = 0;
    int subject = subject_of(st, &uid);
    if (!subject)
        return 1;
    u64 cgid = bpf_get_current_cgroup_id();
    if (subject == SUBJECT_SESSION && !(session_flags_of(cgid) & SESSION_RESTRICTED))
        return 1;

    u32 dst[4] = {}, src[4] = {};
    u8 protocol = 0;
    u16 family;
    if (skb->protocol == bpf_htons(ETH_P_IP)) {
        family = AF_INET;
        if (bpf_skb_load_bytes(skb, 9, &protocol, 1) < 0 || bpf_skb_load_bytes(skb, 12, src, 4) < 0 ||
            bpf_skb_load_bytes(skb, 16, dst, 4) < 0)
            return 0;  // not even an IP header: fail closed
    } else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        family = AF_INET6;
        if (bpf_skb_load_bytes(skb, 6, &protocol, 1) < 0 || bpf_skb_load_bytes(skb, 8, src, 16) < 0 ||
            bpf_skb_load_bytes(skb, 24, dst, 16) < 0)
            return 0;
    } else {
        return 1;
    }
    if (allowed(family, dst))
        return 1;
    emit(cgid, uid, subject, family, dst, src, 0, OP_PACKET, protocol, ACTION_DENIED);
    return 0;
}
