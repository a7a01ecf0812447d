"""Run as a script by test_security: start cfaudit's local Ray with its dashboard, report what it listens on
and how its dashboard answers a request without and with the cluster's token (JSON on stdout)."""
import json
import os
import subprocess
import urllib.error
import urllib.request


def status(url: str, headers: dict) -> int:
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=20).status
    except urllib.error.HTTPError as err:
        return err.code


def main() -> None:
    import ray

    from engine.runtime.cluster import start_ray

    start_ray(num_cpus=1, include_dashboard=True)
    import psutil  # ray's vendored copy, importable once ray is

    address = ray._private.worker.get_dashboard_url()
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH", os.path.expanduser("~/.ray/auth_token"))
    token = os.environ.get("RAY_AUTH_TOKEN") or open(token_file).read().strip()
    url = f"http://{address}/api/version"
    ours = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
    lines = subprocess.run(["ss", "-tlnp"], capture_output=True, text=True).stdout.splitlines()[1:]
    listening = sorted({line.split()[3] for line in lines if any(f"pid={pid}," in line for pid in ours)})
    print(json.dumps({"dashboard": address, "anonymous": status(url, {}),
                      "with_token": status(url, {"Authorization": f"Bearer {token}"}), "listening": listening}))
    ray.shutdown()


if __name__ == "__main__":
    main()
