"""cluster/: the launcher and KubeRay manifests parse and say what they must; the local multi-node script
runs an audit submitted with `ray job submit`, on its worker nodes, behind token auth, on loopback only, and
its rows equal the same job's on a one-node local Ray."""
import json
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from tests.fixtures.s3 import tiny_audit_spec

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
ENTRYPOINT = "python -m jobs.audit jobs/specs/demo.yaml"
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def test_launcher_config_is_valid_for_ray():
    import jsonschema
    import ray.autoscaler

    config = load("aws-gpu.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # Ray's own launcher schema
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    gpu = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert len(gpu) == 1 and gpu[0]["node_config"]["InstanceType"].startswith("g5.")
    assert gpu[0]["max_workers"] >= gpu[0]["min_workers"] >= 0
    assert any("pip install" in c and "~/cfaudit" in c for c in config["setup_commands"])
    assert config["file_mounts"]["~/cfaudit"] == "."
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in commands)


def container_of(pod_template: dict) -> dict:
    (container,) = pod_template["spec"]["containers"]
    return container


def check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"].startswith("2.")
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head = container_of(spec["headGroupSpec"]["template"])
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265}
    (group,) = spec["workerGroupSpecs"]
    worker = container_of(group["template"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for pod in (spec["headGroupSpec"]["template"], group["template"]):
        assert {"name": "CFAUDIT_CACHE", "value": "/cache"} in container_of(pod)["env"]
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]]
        assert claims == [load("kuberay-cache-pvc.yaml")["metadata"]["name"]]


def test_kuberay_raycluster_has_a_gpu_worker_group():
    manifest = load("kuberay-raycluster.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    check_ray_cluster_spec(manifest["spec"])
    pvc = load("kuberay-cache-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_kuberay_rayjob_runs_the_demo_audit():
    manifest = load("kuberay-rayjob.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    spec = manifest["spec"]
    assert spec["entrypoint"].startswith(ENTRYPOINT)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/cfaudit"
    assert not any(k in str(runtime_env).lower() for k in ("secret", "access_key", "token"))
    assert spec["shutdownAfterJobFinishes"] is True
    check_ray_cluster_spec(spec["rayClusterSpec"])
    assert (ROOT / "jobs" / "specs" / "demo.yaml").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_lines(proc: subprocess.Popen) -> "queue.Queue[str]":
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    return lines


def wait_for(lines: "queue.Queue[str]", text: str, seen: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in seen):
        try:
            seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            raise AssertionError(f"no {text!r} within {timeout}s:\n{''.join(seen)}") from None


def ray_cli(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    ray = str(Path(sys.executable).with_name("ray"))
    return subprocess.run([ray, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def poll_cli(ready, *args: str, env: dict, limit: float = 600) -> subprocess.CompletedProcess:
    """Run `ray *args` until ready(result) holds: the job server answers only once the head's dashboard and its
    agent are up, which on a loaded machine comes well after the nodes have registered."""
    deadline = time.monotonic() + limit
    while True:
        try:
            result = ray_cli(*args, env=env, timeout=max(30.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as e:
            result = subprocess.CompletedProcess(e.cmd, -1, str(e.stdout or ""), str(e.stderr or ""))
        if ready(result) or time.monotonic() > deadline:
            return result
        time.sleep(2.0)


def tcp_connections(pid: int) -> list[tuple[str, str]]:
    """(local ip, remote ip) of the connected TCP sockets of `pid` and its descendants."""
    import psutil

    root = psutil.Process(pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            found += [(c.laddr.ip, c.raddr.ip) for c in proc.net_connections(kind="tcp") if c.raddr]
        except psutil.Error:  # a process that ended meanwhile
            continue
    return found


@pytest.mark.ray
def test_local_cluster_runs_a_submitted_audit(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_TOKEN=secrets.token_hex(16))  # not ~/.ray/auth_token
    proc = subprocess.Popen([sys.executable, "-m", "cluster.local_cluster", "--dashboard-port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, seen = read_lines(proc), []
    try:
        # Bounds for a loaded 2-core machine, not the expected times: every wait ends as soon as its condition holds.
        wait_for(lines, "Ctrl-C stops the cluster", seen, timeout=600)
        printed = "".join(seen)
        assert f"dashboard: http://127.0.0.1:{port}" in printed and "address:   127.0.0.1:" in printed
        assert "ray job submit" in printed and "--working-dir ." in printed

        # Without the token mode the job server refuses the client (polled: it must be up to refuse anything).
        address = ("--address", f"http://127.0.0.1:{port}")
        refused = poll_cli(lambda r: "Unauthorized" in r.stderr + r.stdout, "job", "list", *address, env=env)
        assert refused.returncode != 0 and "Unauthorized" in refused.stderr + refused.stdout, refused
        client = {**env, "RAY_AUTH_MODE": "token"}
        listed = poll_cli(lambda r: r.returncode == 0, "job", "list", *address, env=client)
        assert listed.returncode == 0, listed  # with the token it answers: ready for the submission

        # The scale: 2,000 queries x 3 models x 2 methods (cheap settings: the engine is under test).
        spec = tiny_audit_spec(str(tmp_path / "out"))
        spec["dataset"]["options"] = {**spec["dataset"]["options"], "n_test": 2000}
        spec["fleet"] = [{"id": f"cnn-b{b}", "train": {"arch": "cnn", "dataset_options": {"bias": b}, "epochs": 1}}
                         for b in (0.0, 0.5, 1.0)]
        spec["queries"] = {"count": 2000, "seed": 0}
        spec["methods"] = [{"name": "fgsm"}, {"name": "wachter", "params": {"max_iter": 5}}]
        spec["runtime"] = {"batch_size": 500, "num_actors": 2,  # one model host per worker node (1 CPU each)
                           "cache_dir": str(tmp_path / "cache")}  # the local run below reuses the trained models
        (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(spec))
        job = ray_cli("job", "submit", "--address", f"http://127.0.0.1:{port}", "--working-dir", ".",
                      "--", "python", "-m", "jobs.audit", str(tmp_path / "tiny.yaml"), env=client, timeout=1200)
        log = job.stdout + job.stderr
        assert job.returncode == 0 and "succeeded" in log, log[-4000:]
        assert "units: 24 done (0 needed a retry), 0 skipped" in log and "0 failed" in log
        rows = pl.read_parquet(sorted((tmp_path / "out" / "results").rglob("part-*.parquet")),
                               columns=["model_id", "method", "query_id", "target"])
        assert rows.height == 2000 * 3 * 2 and rows.n_unique() == rows.height  # each exactly once
        assert (tmp_path / "out" / "reports" / "summary.parquet").is_file()

        # The model hosts ran on the cluster's worker nodes (the job joined the cluster, not a private Ray).
        nodes = json.loads(ray_cli("list", "nodes", "--address", f"http://127.0.0.1:{port}",
                                   "--format", "json", env=client).stdout)
        workers = {n["node_id"] for n in nodes if not n["is_head_node"]}
        assert len(nodes) == 3 and len(workers) == 2
        actors = json.loads(ray_cli("list", "actors", "--address", f"http://127.0.0.1:{port}", "--detail",
                                    "--format", "json", env=client).stdout)
        # Under load one host may do both units while the other is still pending (never placed: no node).
        hosts = {a["node_id"] for a in actors if "ModelHost" in a["class_name"] and a["node_id"]}
        assert hosts and hosts <= workers

        connections = tcp_connections(proc.pid)  # raylets, GCS, dashboard, workers
        assert connections and [c for c in connections if not set(c) <= set(LOOPBACK)] == []
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=300)  # a bound: shutting the nodes down takes seconds unless the machine is loaded
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    wait_for(lines, "stopping the cluster", seen, timeout=60)  # the reader thread drains what is left
    assert proc.returncode == 0

    # The same job on a private local Ray (one node) gives the same rows: placement across nodes changes nothing.
    local = subprocess.run([sys.executable, "-m", "jobs.audit", str(tmp_path / "tiny.yaml"), "--output",
                            str(tmp_path / "local")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert local.returncode == 0, (local.stdout + local.stderr)[-4000:]
    key, compared = ["model_id", "method", "query_id"], ["target", "pred_cf", "success", "n_iter", "l1", "l2",
                                                            "p_cf_target", "status"]
    on_cluster, on_local = (pl.read_parquet(sorted((tmp_path / out / "results").rglob("part-*.parquet")),
                                            columns=key + compared).sort(key) for out in ("out", "local"))
    assert on_local.height == on_cluster.height and on_local.equals(on_cluster)
