"""Thread count: CPU affinity x cgroup quota (v1 and v2, on fake cgroup files), shared among local workers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from evoprune._threads import ENV_VAR, available_cpus, cgroup_cpu_limit, local_workers, resolve_threads


def _v2(tmp_path, rel: str, files: dict[str, str]):
    root = tmp_path / "cg"
    for path, text in files.items():
        f = root / path / "cpu.max" if path else root / "cpu.max"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    proc = tmp_path / "cgroup"
    proc.write_text(f"0::{rel}\n")
    return root, proc


def test_cgroup_v2_quota_and_ancestors(tmp_path):
    root, proc = _v2(tmp_path, "/a/b", {"a/b": "max 100000\n", "a": "150000 100000\n", "": "max 100000"})
    assert cgroup_cpu_limit(root, proc) == pytest.approx(1.5)  # the parent's 1.5 CPUs bind
    assert available_cpus(affinity={0, 1, 2, 3}, cgroup_root=root, proc_cgroup=proc) == 1
    root, proc = _v2(tmp_path / "x", "/a/b", {"a/b": "300000 100000", "a": "max 100000"})
    assert available_cpus(affinity=set(range(8)), cgroup_root=root, proc_cgroup=proc) == 3
    assert available_cpus(affinity={0, 1}, cgroup_root=root, proc_cgroup=proc) == 2  # affinity is smaller
    root, proc = _v2(tmp_path / "y", "/", {"": "max 100000"})
    assert cgroup_cpu_limit(root, proc) is None
    assert available_cpus(affinity=set(range(6)), cgroup_root=root, proc_cgroup=proc) == 6
    root, proc = _v2(tmp_path / "z", "/k", {"k": "50000 100000"})  # half a CPU: still one thread
    assert available_cpus(affinity=set(range(6)), cgroup_root=root, proc_cgroup=proc) == 1


def test_cgroup_v1_quota(tmp_path):
    root = tmp_path / "cg"
    folder = root / "cpu,cpuacct" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("200000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    assert cgroup_cpu_limit(root, proc) == pytest.approx(2.0)
    assert available_cpus(affinity=set(range(16)), cgroup_root=root, proc_cgroup=proc) == 2
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(root, proc) is None


def test_missing_or_garbage_cgroup_files_mean_no_limit(tmp_path):
    assert cgroup_cpu_limit(tmp_path / "nothing", tmp_path / "nofile") is None
    root, proc = _v2(tmp_path, "/a", {"a": "garbage"})
    assert cgroup_cpu_limit(root, proc) is None
    assert available_cpus(affinity={3}, cgroup_root=root, proc_cgroup=proc) == 1
    assert available_cpus() >= 1  # this machine, whatever it is


def test_resolve_order_and_sharing(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_threads(None, workers=2, cpus=8) == 4
    assert resolve_threads(None, workers=3, cpus=2) == 1  # never 0
    assert resolve_threads(3, workers=2, cpus=8) == 3  # the config wins over automatic
    monkeypatch.setenv(ENV_VAR, "5")
    assert resolve_threads(3, workers=2, cpus=8) == 5  # --threads wins over the config
    monkeypatch.setenv(ENV_VAR, "zero")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_threads(None)
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(ValueError, match="positive integer"):
        resolve_threads(0)


def test_local_workers_counts_live_processes(tmp_path):
    run = tmp_path / "run"
    assert local_workers(run) == 1  # this process, now registered
    assert local_workers(run) == 1  # registering twice counts once
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run / str(sleeper.pid)).touch()
        (run / "999999999").touch()  # a dead worker's leftover
        assert local_workers(run) == 2
        assert not (run / "999999999").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert local_workers(run, register=False) == 1
    assert (run / str(os.getpid())).exists()


def test_config_threads_is_validated_and_not_fingerprinted():
    from evoprune.search import StudyConfig

    base = dict(model="reference:tiny", calibration={"num_sequences": 4, "seq_len": 32})
    plain, threaded = StudyConfig(**base), StudyConfig(**base, threads=2)
    assert "threads" not in plain.to_dict() and threaded.to_dict()["threads"] == 2
    assert StudyConfig.from_dict(threaded.to_dict()) == threaded
    assert plain.fingerprint == threaded.fingerprint
    with pytest.raises(ValueError, match="threads"):
        StudyConfig(**base, threads=0)
