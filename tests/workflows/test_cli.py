import subprocess
import sys

from engine.cli import main


def test_methods_lists_paper_defaults(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "gradual_construction: tau=0.9, lam=0.3" in out and "wachter:" in out


def test_bad_spec_exits_2_naming_the_field(tmp_path, capsys):
    spec = tmp_path / "a.yaml"
    spec.write_text("output: x\ndataset: {name: shapes}\nfleet: [{id: m, train: {}}]\nmethods: [{name: gc}]\n")
    assert main(["audit", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "cfaudit audit: error:" in err and "unknown method 'gc'" in err


def test_jobs_entry_point_is_the_same_cli(tmp_path):
    spec = tmp_path / "a.yaml"
    spec.write_text("output: x\n")
    run = subprocess.run([sys.executable, "-m", "jobs.audit", str(spec)], capture_output=True, text=True)
    assert run.returncode == 2
    assert "dataset: Field required" in run.stderr and "fleet: Field required" in run.stderr
