"""`ringfence tokens add|ls|rm`, `ringfence nodes ls|rm` and `ringfence node join`: growing and
shrinking the fleet.

An operator makes a join token (`tokens add --type node --ttl 1h`); the new host runs
`node join --token T --nats-url URL`, which generates the host's own NATS nkey (the seed
stays in <data_dir>/nats/node.nk, 0600) and registers only its public key. From then on
NATS admits that key with permissions naming this node alone (its events, recordings,
sessions and leases; reads of policy, locks and users). `nodes rm NODE` revokes it at once.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from pathlib import Path

import nats
import yaml
from nats.errors import Error as NatsError
from nats.errors import NoServersError

from .. import __version__
from ..auth import new_user_seed, public_key_of
from ..config import ENV_NODENAME, load_config
from ..contract import fleet
from ..durations import format_duration, parse_duration
from ..keyfiles import write_secret
from ..runtime.nats_conn import is_authorization_error, tls_context
from ..runtime.service import server_id_for
from . import tls_pin
from .client import CliError, call, open_client
from .sessions import print_table

NODE_SEED = "nats/node.nk"  # in the data dir of a joined node
NODE_CONFIG = "node.yaml"  # in the data dir: what the node's services start with


def _when(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- tokens --------------------------------------------------------------------------------------


async def run_tokens_add(args: argparse.Namespace) -> int:
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        raise CliError(f"--ttl: {exc}") from None
    nc = await open_client(args)
    try:
        added = await call(nc, fleet.TOKENS_ADD_SUBJECT, fleet.TokenAddRequest(type=args.type, ttl=ttl),
                           fleet.TokenAdded)
    finally:
        await nc.close()
    if args.format == "json":
        print(json.dumps({"token": added.token, "token_id": added.token_id, "type": added.type,
                          "expires": _when(added.expires)}))
        return 0
    print(f"The invite token: {added.token}")
    print(f"This token will expire in {format_duration(round(ttl))} (at {_when(added.expires)}); it joins one node.")
    print("\nRun this on the new node (as root) to join the fleet:\n")
    print(f"  ringfence node join --token={added.token} --nats-url=<this control plane's NATS URL>"
          f"{tls_pin.join_hint(args)}")
    return 0


async def run_tokens_ls(args: argparse.Namespace) -> int:
    nc = await open_client(args)
    try:
        tokens = await call(nc, fleet.TOKENS_LS_SUBJECT, {}, list[fleet.TokenInfo])
    finally:
        await nc.close()
    if args.format == "json":
        print(json.dumps([{"token_id": t.token_id, "type": t.type, "expires": _when(t.expires),
                           "created": t.created, "created_by": t.created_by} for t in tokens], indent=2))
        return 0
    rows = [("Token ID", "Type", "Expires", "Created by")]
    rows += [(t.token_id, t.type, _when(t.expires), t.created_by) for t in tokens]
    print_table(rows)
    return 0


async def run_tokens_rm(args: argparse.Namespace) -> int:
    nc = await open_client(args)
    try:
        result = await call(nc, fleet.TOKENS_RM_SUBJECT, fleet.TokenRmRequest(token=args.token), dict)
    finally:
        await nc.close()
    print(result["message"])
    return 0


# --- nodes ---------------------------------------------------------------------------------------


def _age(seconds: float) -> str:
    return format_duration(max(0, round(seconds))) if seconds >= 1 else "0s"


async def run_nodes_ls(args: argparse.Namespace) -> int:
    nc = await open_client(args)
    try:
        nodes = await call(nc, fleet.NODES_LS_SUBJECT, {}, list[fleet.NodeInfo])
    finally:
        await nc.close()
    if args.format == "json":
        print(json.dumps([fleet_json(n) for n in nodes], indent=2))
        return 0
    now = dt.datetime.now(dt.UTC).timestamp()
    rows = [("Node", "Server ID", "Version", "Last seen", "Policy rev", "Lock view age", "Joined")]
    for n in nodes:
        s = n.status
        rows.append((n.name, n.server_id, s.version if s else "-", f"{_age(now - s.seen)} ago" if s else "never",
                     str(s.policy_revision) if s else "-",
                     _age(s.lock_view_age) if s and s.lock_view_age >= 0 else "-", n.joined or "(static credential)"))
    print_table(rows)
    return 0


def fleet_json(node: fleet.NodeInfo) -> dict:
    s = node.status
    return {"name": node.name, "server_id": node.server_id, "joined": node.joined,
            "version": s.version if s else "", "last_seen": _when(s.seen) if s else "",
            "policy_revision": s.policy_revision if s else 0,
            "lock_view_age_seconds": s.lock_view_age if s else -1}


async def run_nodes_rm(args: argparse.Namespace) -> int:
    nc = await open_client(args)
    try:
        result = await call(nc, fleet.NODES_RM_SUBJECT, fleet.NodeRmRequest(name=args.name), fleet.NodeRemoved)
    finally:
        await nc.close()
    print(result.message)
    return 0


# --- node join -----------------------------------------------------------------------------------


def _node_seed(data_dir: Path) -> Path:
    """This host's NATS nkey seed, generated here once; only its public key is ever sent."""
    path = data_dir / NODE_SEED
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_secret(path, new_user_seed() + "\n")
    return path


async def run_join(args: argparse.Namespace) -> int:
    if os.environ.get(ENV_NODENAME) and not args.nodename:
        args.nodename = os.environ[ENV_NODENAME]
    cfg = load_config(args.config, data_dir=args.data_dir, nats_url=args.nats_url, nodename=args.nodename)
    data_dir = Path(cfg.data_dir)
    urls = cfg.nats_urls
    ca_file = args.ca_file or None
    if args.ca_pin:
        ca_file = str(tls_pin.fetch_pinned_ca(urls[0], args.ca_pin, data_dir))
    seed = _node_seed(data_dir)
    nkey = public_key_of(seed.read_text())
    server_id = server_id_for(str(data_dir))
    request = fleet.JoinRequest(token=args.token, nodename=cfg.nodename, server_id=server_id, nkey=nkey,
                                version=__version__)
    tls = tls_context(ca_file) if ca_file or any(u.startswith("tls://") for u in urls) else None
    try:
        nc = await nats.connect(urls, token=args.token, inbox_prefix=fleet.join_inbox_prefix(args.token), tls=tls,
                                allow_reconnect=False, max_reconnect_attempts=1, connect_timeout=5)
    except (NoServersError, OSError, TimeoutError) as exc:
        raise CliError(f"cannot reach NATS at {','.join(urls)} ({exc.__class__.__name__}): check --nats-url and that "
                       "the control plane listens there (`ringfence up --listen`)") from None
    except NatsError as exc:
        if not is_authorization_error(exc):
            raise
        raise CliError(f"NATS at {','.join(urls)} refused the join token: it is unknown, already used or expired "
                       "(ask for a new one: `ringfence tokens add --type node`), or no policy service is running "
                       "there") from None
    try:
        joined = await call(nc, fleet.JOIN_SUBJECT, request, fleet.JoinReply)
    finally:
        await nc.close()
    config = {"cluster_name": joined.cluster_name, "nodename": joined.nodename, "data_dir": str(data_dir),
              "nats_url": ",".join(urls), "nats_nkey": str(seed)}
    if ca_file:
        config["nats_tls_ca"] = str(Path(ca_file).resolve())
    path = data_dir / NODE_CONFIG
    path.write_text("# Written by `ringfence node join`; the node's services start with --config " + str(path) +
                    "\n" + yaml.safe_dump(config, sort_keys=False))
    print(f'joined the fleet as node "{joined.nodename}" (server id {joined.server_id})')
    print(f"NATS credential: {seed} (its private key never left this host)")
    print(f"configuration: {path}; next: ringfence node install --config {path}")
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    tokens = sub.add_parser("tokens", help="join tokens for new nodes", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    group = tokens.add_subparsers(dest="tokens_command", metavar="SUBCOMMAND", required=True)
    add = group.add_parser("add", parents=[common], help="create a join token (needs create on token)")
    add.add_argument("--type", default="node", choices=fleet.TOKEN_TYPES, help="what the token lets join")
    add.add_argument("--ttl", default="1h", help="how long the token can be used (default 1h, at most 168h)")
    add.add_argument("--format", choices=["text", "json"], default="text")
    add.set_defaults(func=run_tokens_add)
    ls = group.add_parser("ls", parents=[common], help="list unexpired join tokens (their ids, never the tokens)")
    ls.add_argument("--format", choices=["text", "json"], default="text")
    ls.set_defaults(func=run_tokens_ls)
    rm = group.add_parser("rm", parents=[common], help="delete a join token")
    rm.add_argument("token", help="the token, or its id from `tokens ls`")
    rm.set_defaults(func=run_tokens_rm)

    nodes = sub.add_parser("nodes", help="the nodes of the fleet", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    group = nodes.add_subparsers(dest="nodes_command", metavar="SUBCOMMAND", required=True)
    ls = group.add_parser("ls", parents=[common], help="joined nodes: version, last seen, policy revision, "
                          "lock view age")
    ls.add_argument("--format", choices=["text", "json"], default="text")
    ls.set_defaults(func=run_nodes_ls)
    rm = group.add_parser("rm", parents=[common], help="remove a node and cut off its NATS credential at once")
    rm.add_argument("name")
    rm.set_defaults(func=run_nodes_rm)


def register_node(group: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`ringfence node join` (the `node` group is in node_host.py)."""
    join = group.add_parser("join", parents=[common], help="join this host to a fleet with a join token",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    join.add_argument("--token", required=True, help="a join token from `ringfence tokens add --type node`")
    join.add_argument("--nodename", help="this node's name (default: the host name)")
    join.add_argument("--ca-file", help="CA certificate the control plane's NATS certificate must chain to")
    join.add_argument("--ca-pin", help="sha256:HEX of the control plane's CA certificate, as `tokens add` prints "
                      "it: the CA is fetched from the server and kept only if it matches")
    join.set_defaults(func=run_join)

