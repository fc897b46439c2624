"""`evoprune dashboard`: optuna-dashboard on a study database, loopback only, a free port."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest
from helpers import build_study

from evoprune._cli import main

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_dashboard_serves_the_study_on_loopback(tmp_path):
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed (pip install optuna-dashboard)")
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    build_study(url).close()
    proc = subprocess.Popen([sys.executable, "-m", "evoprune", "dashboard", "--storage", url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        first = proc.stdout.readline()
        found = re.search(r"(http://127\.0\.0\.1:(\d+)/)", first)
        assert found, f"no URL in {first!r}: {proc.stderr.read() if proc.poll() is not None else ''}"
        base = found.group(1)
        deadline = time.monotonic() + 60
        status = body = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"evoprune dashboard exited: {proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "api/studies", timeout=5) as resp:
                    status, body = resp.status, resp.read().decode()
                break
            except OSError:
                time.sleep(0.3)
        assert status == 200, "the dashboard did not answer within 60 s"
        assert '"study_name": "st"' in body or '"study_name":"st"' in body
        with urllib.request.urlopen(base, timeout=5) as resp:
            assert resp.status == 200
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait()


def test_dashboard_without_optuna_dashboard_says_what_to_install(tmp_path, monkeypatch, capsys):
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    build_study(url).close()
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # import fails as if not installed
    assert main(["dashboard", "--storage", url]) == 1
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("evoprune: error:")]
    assert "pip install optuna-dashboard" in line


def test_dashboard_bad_input(tmp_path, capsys):
    pytest.importorskip("optuna_dashboard")
    missing = tmp_path / "none.db"
    assert main(["dashboard", "--storage", f"sqlite:///{missing}"]) == 2
    assert "no study database at" in capsys.readouterr().err and not missing.exists()
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    build_study(url).close()
    assert main(["dashboard", "--storage", url, "--port", "70000"]) == 2
    assert "--port must be 1..65535" in capsys.readouterr().err


def test_dashboard_port_in_use(tmp_path, capsys):
    pytest.importorskip("optuna_dashboard")
    import socket

    url = f"sqlite:///{tmp_path / 'dash.db'}"
    build_study(url).close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", "--storage", url, "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"cannot serve on 127.0.0.1:{port}" in err and "another --port" in err
