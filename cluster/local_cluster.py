"""A local multi-node Ray cluster on 127.0.0.1: a head and N worker nodes, each with its own resources.

    python -m cluster.local_cluster [--workers 2] [--cpus-per-worker 1] [--dashboard-port 8265]

It prints the cluster address and the `ray job submit` command, then runs until Ctrl-C (or SIGTERM).
Every node binds to loopback. Why `ray.cluster_utils.Cluster` and not `ray start`: with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (needed in Ray 2.60 to keep a local Ray on 127.0.0.1 instead of the
machine's non-loopback address) `ray start --address ...` refuses to add worker nodes; the Cluster
utility (a Ray DeveloperAPI used by Ray's own tests) starts each node's raylet directly.

Token authentication is on (RAY_AUTH_MODE=token, unless you set RAY_AUTH_MODE yourself or pass
--no-auth): the token is ~/.ray/auth_token (created if missing), or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH.
A client such as `ray job submit` sends it only when RAY_AUTH_MODE=token is set in its environment.
The token itself is never printed.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading

LOOPBACK = "127.0.0.1"
AUDIT = 'python -m jobs.audit jobs/specs/demo.yaml --output "$PWD/cfaudit-out/cluster-demo"'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cluster.local_cluster", description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2, help="worker nodes (default %(default)s)")
    p.add_argument("--head-cpus", type=int, default=0,
                   help="CPUs of the head node (default %(default)s: job drivers only, work goes to the workers)")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs of each worker node (default %(default)s)")
    p.add_argument("--gpus-per-worker", type=int, default=0, help="GPUs of each worker node (default %(default)s)")
    p.add_argument("--object-store-mb", type=int, default=300, help="object store per node (default %(default)s)")
    p.add_argument("--dashboard-port", type=int, default=8265,
                   help="dashboard and job server port on 127.0.0.1 (default %(default)s)")
    p.add_argument("--no-auth", action="store_true", help="start without token authentication (not advised)")
    return p.parse_args(argv)


def prepare_environment(no_auth: bool) -> None:
    """Loopback, token auth, and this interpreter first on PATH (job entrypoints say plain `python`)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if no_auth:
        os.environ["RAY_AUTH_MODE"] = "disabled"
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    bin_dir = os.path.dirname(sys.executable)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])


def ensure_token() -> None:
    """Create ~/.ray/auth_token when token auth is on and no token exists (as `ray get-auth-token --generate`)."""
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled

    ensure_token_if_auth_enabled(None, create_token_if_missing=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def start(args: argparse.Namespace):
    """Start the head (with the dashboard / job server) and the workers; returns the Cluster."""
    prepare_environment(args.no_auth)
    from ray.cluster_utils import Cluster

    if os.environ["RAY_AUTH_MODE"] == "token":
        ensure_token()
    store = args.object_store_mb * 1024 * 1024
    cluster = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": LOOPBACK, "num_cpus": args.head_cpus, "object_store_memory": store,
        "include_dashboard": True, "dashboard_host": LOOPBACK, "dashboard_port": args.dashboard_port,
        # The head's agent serves job submission; its default port (52365) may be held by another local Ray.
        "dashboard_agent_listen_port": free_port(),
    })
    for i in range(args.workers):
        cluster.add_node(node_ip_address=LOOPBACK, num_cpus=args.cpus_per_worker, num_gpus=args.gpus_per_worker,
                         object_store_memory=store, resources={f"worker{i + 1}": 1})
    cluster.wait_for_nodes()
    return cluster


def instructions(cluster, args: argparse.Namespace) -> str:
    dashboard = f"http://{cluster.webui_url}"  # Ray moves to another port when the asked one is taken
    auth = "" if os.environ["RAY_AUTH_MODE"] != "token" else "RAY_AUTH_MODE=token "
    env = f"{auth}RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"  # without it a client rewrites 127.0.0.1
    return "\n".join([
        f"cfaudit local cluster: head + {args.workers} workers on {LOOPBACK}",
        f"  address:   {cluster.address}",
        f"  dashboard: {dashboard}",
        f"  auth:      {'token (~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)' if auth else 'disabled'}",
        "submit a job from the repository root:",
        f"  {env} ray job submit --address {dashboard} --working-dir . -- {AUDIT}",
        "or join as a driver:",
        f"  {env} RAY_ADDRESS={cluster.address} {AUDIT}",
        "(a relative output would land in the job's copy of the working directory, under /tmp/ray/session_*)",
        "Ctrl-C stops the cluster.",
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cluster = start(args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(instructions(cluster, args), flush=True)
    while not stop.wait(1.0):
        pass
    print("stopping the cluster", flush=True)
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
