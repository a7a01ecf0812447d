"""What a user sees: a small audit through the CLI in a subprocess, at default, --quiet and --verbose verbosity.

Default: the engine's stage lines and training progress, none of Ray's INFO/WARNING lines. --quiet: the
closing summary only. --verbose: Ray's own lines too. Each run starts its own local Ray, as a user's does.
"""
import os
import re
import subprocess
import sys

import pytest
import yaml

from tests.fixtures.s3 import tiny_audit_spec

# Ray's lines that read as failures to a user (issue 24): Python logging records of Ray's format
# ("<date> <time>\tINFO streaming_executor.py:215 -- ..."), the token-auth warning, Ray Data's notices.
RAY_PATTERNS = [re.compile(p) for p in (
    r"authentication_token_setup", r"streaming_executor", r"Progress bars disabled",
    r"\b(INFO|WARNING)\s+[\w.]+\.py:\d+ --",
)]
# The driver's C++ core worker logs this once per process at error level whenever a Ray Data actor pool
# starts (ray issue 53727); the CLI drops it from its stderr unless --verbose (engine/runtime/cluster.py).
RAY_PATTERNS.append(re.compile(r"core_worker"))
PROGRESS_LINE = re.compile(r"^  model cnn: epoch 2/2, step (\d+)/\1, loss [-+.e\d]+, \d+ s$")


def _run(tmp_path, name: str, *flags: str, cache: str) -> tuple[int, list[str]]:
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(tiny_audit_spec(str(tmp_path / name))))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CFAUDIT_RAY_LOGS")}
    env.update(CFAUDIT_CACHE=cache, CFAUDIT_TORCH_THREADS="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    # jobs.audit is what `ray job submit` runs: it shares `cfaudit audit`'s parser, flags included.
    run = subprocess.run([sys.executable, "-m", "jobs.audit", str(spec), *flags], env=env, capture_output=True,
                         text=True, timeout=600)
    lines = (run.stdout + run.stderr).splitlines()
    assert run.returncode == 0, "\n".join(lines[-60:])
    return run.returncode, lines


def _ray_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if any(p.search(line) for p in RAY_PATTERNS)]


@pytest.mark.ray
def test_default_quiet_and_verbose_output(tmp_path):
    cache = str(tmp_path / "cache")  # empty: the default run trains the CNN and shows its progress
    _, default = _run(tmp_path, "default", cache=cache)
    assert _ray_lines(default) == [], "\n".join(default)
    for stage in ("data", "models", "plan", "explain", "report"):
        assert f"[{stage}] ..." in default and any(line.startswith(f"[{stage}] done in") for line in default)
    assert any(PROGRESS_LINE.match(line) for line in default), "\n".join(default)
    assert any(line.startswith("  model cnn: trained") for line in default)
    assert any(line.startswith("  explain: queries 20/20, units 2/2, failed 0") for line in default)
    assert any("writing" in line and "summary.parquet" in line for line in default)
    assert not any("\r" in line for line in default)

    _, quiet = _run(tmp_path, "quiet", "--quiet", cache=cache)
    assert _ray_lines(quiet) == [], "\n".join(quiet)
    assert len(quiet) < len(default) / 2, "\n".join(quiet)
    assert not any(line.startswith("[") or "epoch" in line or line.startswith("  ") for line in quiet), quiet
    assert any(line.startswith("units: 2 done") for line in quiet)
    assert any(line.startswith("dashboard: ") for line in quiet)
    assert any("rank 1 = most confounded" in line for line in quiet)  # the fleet table

    _, verbose = _run(tmp_path, "verbose", "--verbose", cache=cache)
    assert _ray_lines(verbose), "\n".join(verbose)  # --verbose shows Ray's own lines, which the default hides
    assert any(line.startswith("units: 2 done") for line in verbose)


def test_quiet_and_verbose_exclude_each_other(capsys):
    from engine.cli import main

    with pytest.raises(SystemExit):
        main(["audit", "x.yaml", "--quiet", "--verbose"])
    assert "not allowed with argument" in capsys.readouterr().err
