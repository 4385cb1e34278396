"""NATS side of fleet membership, in the policy service: join tokens, joins, `nodes ls/rm`,
and the NATS auth callout that turns a joined node's nkey into a user JWT scoped to that node.

Why an auth callout: nodes join and leave while NATS runs, on one server or a cluster, in
compose or under `ringfence up`; no process has to rewrite and reload a server config file,
and a removal takes effect at once (the registry entry goes, then the node's open
connections are disconnected through the system account: $SYS.REQ.SERVER.<id>.KICK).
Everything still travels over NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from ringfence.contract import api, fleet, names
from ringfence.runtime import kv_read, nats_jwt
from ringfence.runtime.nats_conn import connect, wait_closed
from ringfence.runtime.operator_auth import SELF_AUTHORIZED
from ringfence.runtime.service import Call, StartupError

from . import fleet_core as core

if TYPE_CHECKING:
    from .adapter import Adapter

log = logging.getLogger(__name__)

CONNZ_WAIT = 0.3  # seconds to gather every cluster server's answer about a removed node's connections
COUNTERS = ("callout_allowed", "callout_refused", "nodes_joined", "nodes_removed", "connections_kicked")


class Fleet:
    def __init__(self, policy: Adapter) -> None:
        self.policy = policy
        self.ctx = policy.ctx
        self.issuer_seed = ""
        self.system: Client | None = None
        self._subs: list = []

    async def start(self) -> None:
        ctx, cfg = self.ctx, self.ctx.config
        for counter in COUNTERS:
            ctx.counters.setdefault(counter, 0)
        for verb, subject, handler, body, action in (
            ("tokens-add", fleet.TOKENS_ADD_SUBJECT, self.tokens_add, fleet.TokenAddRequest, ("token", "create")),
            ("tokens-ls", fleet.TOKENS_LS_SUBJECT, self.tokens_ls, None, ("token", "list")),
            ("tokens-rm", fleet.TOKENS_RM_SUBJECT, self.tokens_rm, fleet.TokenRmRequest, ("token", "delete")),
            ("nodes-ls", fleet.NODES_LS_SUBJECT, self.nodes_ls, None, ("node", "list")),
            ("nodes-rm", fleet.NODES_RM_SUBJECT, self.nodes_rm, fleet.NodeRmRequest, ("node", "delete")),
            ("join", fleet.JOIN_SUBJECT, self.join, fleet.JoinRequest, SELF_AUTHORIZED),  # the token is the proof
        ):
            decode = (lambda data, t=body: core.decode_body(data, t)) if body else (lambda _data: None)
            await ctx.add_endpoint(verb, subject, handler, request=decode, action=action)
        if cfg.node_auth_issuer:
            try:  # a bad file stops start-up here, not at the first join
                self.issuer_seed = Path(cfg.node_auth_issuer).read_text().strip()
                nats_jwt.keypair(self.issuer_seed)
            except (OSError, nats_jwt.JwtError) as exc:
                raise StartupError(f"node_auth_issuer {cfg.node_auth_issuer}: {exc}; it must be the account nkey "
                                   "seed (SA...) that nats-server.conf's auth_callout names as issuer") from None
            self._subs.append(await ctx.nc.subscribe(
                "$SYS.REQ.USER.AUTH", queue="ringfence-callout", cb=self._callout))
            log.info("answering the NATS auth callout for joined nodes")
        else:
            log.warning("node_auth_issuer is not set: this policy service does not admit joined nodes")
        if cfg.nats_system_nkey:
            self.system = await connect(cfg.nats_urls, f"ringfence-policy-system@{cfg.nodename}",
                                        nkey_seed=cfg.nats_system_nkey, tls_ca=cfg.nats_tls_ca or None)

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self.system is not None:
            await wait_closed(self.system, 2)

    # --- reading the registry ----------------------------------------------------------------

    async def _entry(self, key: str):
        try:
            return await kv_read.get(self.policy.kv, key, deadline=1.5)
        except kv_read.StaleSnapshotError as exc:
            raise api.ApiError(f"cannot read the policy bucket: {exc}", "unavailable") from None

    async def _token(self, digest: str) -> tuple[fleet.JoinToken | None, int]:
        entry = await self._entry(names.join_token_key(digest))
        if entry is None or not entry.value:
            return None, 0
        return msgspec.json.decode(entry.value, type=fleet.JoinToken), entry.revision

    async def _nodes(self) -> list[fleet.NodeRecord]:
        return [msgspec.json.decode(v, type=fleet.NodeRecord)
                for v in await self.policy._read_prefix(names.NODE_KEY_PREFIX)]

    async def _node_by_nkey(self, nkey: str) -> fleet.NodeRecord | None:
        entry = await self._entry(names.node_nkey_key(nkey))
        if entry is None or not entry.value:
            return None
        record_entry = await self._entry(names.node_key(entry.value.decode()))
        if record_entry is None or not record_entry.value:
            return None
        record = msgspec.json.decode(record_entry.value, type=fleet.NodeRecord)
        return record if record.nkey == nkey else None

    # --- endpoints ----------------------------------------------------------------------------

    async def tokens_add(self, call: Call[fleet.TokenAddRequest]) -> bytes:
        added, change = core.plan_token_add(call.body, call.actor, time.time())
        async with self.policy.ctx.write_lock:
            await self.policy._apply([change])
        return api.ok_reply(added)

    async def tokens_ls(self, _call: Call[None]) -> bytes:
        entries = await kv_read.snapshot(self.ctx.js, self.policy.kv, names.JOIN_TOKEN_KEY_PREFIX + ">")
        now = time.time()
        found = []
        for key, entry in sorted(entries.items()):
            token = msgspec.json.decode(entry.value, type=fleet.JoinToken)
            if token.expires > now:
                digest = key.removeprefix(names.JOIN_TOKEN_KEY_PREFIX)
                found.append(fleet.TokenInfo(token_id=fleet.token_id(digest), type=token.type, expires=token.expires,
                                             created=token.created, created_by=token.created_by))
        return api.ok_reply(found)

    async def tokens_rm(self, call: Call[fleet.TokenRmRequest]) -> bytes:
        body = call.body
        async with self.policy.ctx.write_lock:
            keys = await kv_read.snapshot(self.ctx.js, self.policy.kv, names.JOIN_TOKEN_KEY_PREFIX + ">")
            matches = core.token_hashes_matching(body.token, [k.removeprefix(names.JOIN_TOKEN_KEY_PREFIX)
                                                              for k in keys])
            if len(matches) != 1:
                what = "no join token" if not matches else f"{len(matches)} join tokens"
                raise api.ApiError(f'{what} match "{body.token[:40]}" (see `ringfence tokens ls`)', "not_found")
            change = core.plan_token_rm(matches[0], call.actor)
            await self.policy._apply([change])
        return api.ok_reply({"message": change.message})

    async def join(self, call: Call[fleet.JoinRequest]) -> bytes:
        body = call.body
        digest = core.token_digest(body.token)
        async with self.policy.ctx.write_lock:
            token, revision = await self._token(digest)
            core.check_token(token, time.time())
            core.check_join(body, await self._nodes())
            changes = core.plan_join(body, digest, revision, time.time())
            await self.policy._apply(changes)
        self.ctx.counters["nodes_joined"] += 1
        return api.ok_reply(fleet.JoinReply(nodename=body.nodename, server_id=body.server_id,
                                            cluster_name=self.ctx.config.cluster_name))

    async def nodes_ls(self, _call: Call[None]) -> bytes:
        statuses: list[fleet.NodeStatus] = []
        with contextlib.suppress(Exception):  # no node has reported yet: no bucket
            kv = await kv_read.open_bucket(self.ctx.js, names.NODE_STATUS_BUCKET)
            for entry in (await kv_read.snapshot(self.ctx.js, kv)).values():
                with contextlib.suppress(msgspec.DecodeError):
                    statuses.append(msgspec.json.decode(entry.value, type=fleet.NodeStatus))
        return api.ok_reply(core.node_list(await self._nodes(), statuses))

    async def nodes_rm(self, call: Call[fleet.NodeRmRequest]) -> bytes:
        body = call.body
        async with self.policy.ctx.write_lock:
            node = next((n for n in await self._nodes() if n.name == body.name), None)
            if node is None:
                raise api.ApiError(f'node "{body.name[:80]}" has not joined (see `ringfence nodes ls`)', "not_found")
            await self.policy._apply(core.plan_node_rm(node, call.actor))
        self.ctx.counters["nodes_removed"] += 1
        # The callout refuses the node from now on; now end the connections it has.
        result = fleet.NodeRemoved(name=node.name)
        if self.system is not None:
            result.connections_closed = await self._kick(core.node_user_name(node.name))
            result.kicked = True
            result.message = f'node "{node.name}" has been removed; {result.connections_closed} connection(s) closed'
        else:
            result.message = (f'node "{node.name}" has been removed; its open connections end within '
                              f"{core.NODE_JWT_SECONDS // 60} minutes (set nats_system_nkey on the policy "
                              "service to close them at once)")
        log.info(result.message)
        return api.ok_reply(result)

    async def _kick(self, user: str) -> int:
        """Disconnect every connection of `user` on every server of the cluster."""
        assert self.system is not None
        nc = self.system
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("$SYS.REQ.SERVER.PING.CONNZ", json.dumps({"user": user, "limit": 10000}).encode(),
                         reply=inbox)
        targets: list[tuple[str, int]] = []
        loop = asyncio.get_running_loop()
        until = loop.time() + CONNZ_WAIT
        while (left := until - loop.time()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except Exception:  # nats TimeoutError: no more servers answering
                break
            reply = json.loads(msg.data)
            server = (reply.get("server") or {}).get("id", "")
            targets += [(server, c["cid"]) for c in (reply.get("data") or {}).get("connections") or []]
        await sub.unsubscribe()
        closed = 0
        for server, cid in targets:
            try:
                await nc.request(f"$SYS.REQ.SERVER.{server}.KICK", json.dumps({"cid": cid}).encode(), timeout=2)
                closed += 1
            except Exception as exc:  # the node is refused from now on; this connection ends with its JWT
                log.error("cannot disconnect %s (connection %d on server %s): %r", user, cid, server, exc)
        self.ctx.counters["connections_kicked"] += closed
        return closed

    # --- the auth callout -----------------------------------------------------------------------

    async def _callout(self, msg: Msg) -> None:
        try:
            claims = nats_jwt.decode(msg.data.decode(), nats_jwt.SERVER_PREFIXES)
            req = core.parse_callout(claims)
        except (nats_jwt.JwtError, UnicodeDecodeError) as exc:
            log.warning("auth callout: ignoring a request that does not verify: %s", exc)
            return
        try:
            grant = await self._grant(req)
            self.ctx.counters["callout_allowed"] += 1
            body = core.callout_response(req, self.issuer_seed, grant)
        except api.ApiError as exc:
            self.ctx.counters["callout_refused"] += 1
            log.warning("auth callout: refused %s: %s", req.client, exc)
            body = core.callout_response(req, self.issuer_seed, None, str(exc))
        await msg.respond(body)

    async def _grant(self, req: core.CalloutRequest) -> core.Grant:
        now = time.time()
        if req.token:
            digest = core.token_digest(req.token)
            token, _ = await self._token(digest)
            return core.grant_join(core.check_token(token, now), digest, now)
        if req.client_nkey:
            try:
                nats_jwt.verify_nonce(req.client_nkey, req.nonce, req.signature)
            except nats_jwt.JwtError as exc:
                raise api.ApiError(f"nkey {req.client_nkey}: {exc}") from None
            node = await self._node_by_nkey(req.client_nkey)
            if node is None:
                raise api.ApiError(f"nkey {req.client_nkey} belongs to no joined node")
            return core.grant_node(node, now)
        raise api.ApiError("no credential this server knows (an nkey of a joined node, or a join token)")

