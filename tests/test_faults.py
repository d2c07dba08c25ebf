"""Faults: a verified export survives failed, killed, interrupted, concurrent and disk-full runs.

Exports run in subprocesses that the tests start themselves and kill by pid. The old set is
`mnistmlp --mlp_hidden_size 8`, the new one `--mlp_hidden_size 16`: after any fault the
directory must verify and hold exactly one of the two.
"""

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from export.cli import main
from export.pipeline.verify import verify_directory
from tests.conftest import REPO

pytestmark = pytest.mark.xdist_group("faults")

# two formats: the transaction does not depend on them, and every file is one more kill point
OLD = ["mnistmlp", "--mlp_hidden_size", "8", "--name", "m", "--formats", "torchscript,onnx"]
NEW = ["mnistmlp", "--mlp_hidden_size", "16", "--name", "m", "--formats", "torchscript,onnx"]

#: runs the export CLI, SIGKILLing (or SIGTERMing) itself at the N-th rename or directory swap,
#: before or after it happens: every point where the directory's content changes
#: (a signal raised in the calling thread, with the handlers and mask a terminal gives, whatever
#: the pytest worker that starts it has inherited)
KILL_AT = """
import os, signal, sys
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
from export.store import transaction
point, sig = int(sys.argv[1]), int(sys.argv[2])
seen = [0]
def hook(real):
    def call(*args, **kwargs):
        seen[0] += 1
        if seen[0] == point:
            signal.raise_signal(sig)
        result = real(*args, **kwargs)
        seen[0] += 1
        if seen[0] == point:
            signal.raise_signal(sig)
        return result
    return call
os.replace = hook(os.replace)
os.rename = hook(os.rename)
transaction._exchange = hook(transaction._exchange)
from export.cli import main
code = main(sys.argv[3:])
print("points", seen[0], file=sys.stderr)
sys.exit(code)
"""


def export_cli(*argv, check=True):
    proc = subprocess.run([sys.executable, "-m", "export", *map(str, argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def hidden_size(directory: Path) -> int:
    return json.loads((directory / "manifest.json").read_text())["backbone"]["args"]["mlp_hidden_size"]


def assert_one_complete_set(directory: Path) -> int:
    """The directory verifies (hashes, layout, numbers) and lists exactly what it holds."""
    report = verify_directory(directory)
    assert report.failed == 0 and report.rows
    assert report.stray == [], report.stray
    return hidden_size(directory)


def leftovers(parent: Path):
    return sorted(p.name for p in parent.iterdir() if ".staging-" in p.name or ".old-" in p.name
                  or p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def old_set(tmp_path_factory):
    """A verified export of the old weights, copied fresh by each test that changes it; written
    by KILL_AT with point 0 (never killed), which counts the points an export into a new
    directory passes."""
    root = tmp_path_factory.mktemp("old")
    proc = subprocess.run([sys.executable, "-c", KILL_AT, "0", "9", *OLD, "--out", root], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    POINTS["new directory"] = int(proc.stderr.strip().splitlines()[-1].split()[-1])
    return root / "m"


#: what old_set's export counted
POINTS = {}


def fresh_copy(old_set: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(old_set, tmp_path / "m")
    return tmp_path / "m"


def test_sigkill_at_every_point_leaves_old_or_new_set(old_set, tmp_path):
    target = fresh_copy(old_set, tmp_path)
    points = POINTS["new directory"]  # OLD and NEW write the same files
    assert points >= 20  # 8 artifacts + manifest + the swap, before and after each
    seen = set()
    for point in sorted({1, points // 2, points - 1, points}):  # first write, middle, around the swap
        proc = subprocess.run([sys.executable, "-c", KILL_AT, str(point), "9", *NEW, "--out", tmp_path],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-1000:])
        seen.add(assert_one_complete_set(target))
    assert seen == {8, 16}, "the kill points should cover both sides of the swap"
    export_cli(*OLD, "--out", tmp_path)  # the next run cleans up what the killed ones left
    assert assert_one_complete_set(target) == 8
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_clean_up(old_set, tmp_path, sig):
    target = fresh_copy(old_set, tmp_path)
    proc = subprocess.run([sys.executable, "-c", KILL_AT, "5", str(int(sig)), *NEW, "--out", tmp_path],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), proc.stderr[-1000:]
    assert leftovers(tmp_path) == []  # cleaned by the interrupted run itself
    assert assert_one_complete_set(target) == 8


def test_failed_export_keeps_previous_set(old_set, tmp_path, capsys):
    """A checkpoint with Inf weights: refused with its key, the previous set untouched."""
    import torch

    from zoo import get_backbone

    target = fresh_copy(old_set, tmp_path)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    state = get_backbone("mnistmlp", mlp_hidden_size=16).state_dict()
    state["fc2.weight"][0, 0] = float("inf")
    torch.save(state, tmp_path / "inf.pt")
    code = main([*NEW, "--checkpoint", str(tmp_path / "inf.pt"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "inf.pt' has Inf in fc2.weight: nothing to export" in err, err
    assert err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_failed_verification_changes_nothing(old_set, tmp_path, capsys, monkeypatch):
    import export.pipeline.build as build

    target = fresh_copy(old_set, tmp_path)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real_verify = build.verify_file

    def bad_verify(fmt, path, names, inputs, expected, device="cpu"):
        if fmt != "onnx":
            return real_verify(fmt, path, names, inputs, expected, device)
        return {n: {"max_abs": 1.0, "max_rel": 1.0, "ok": False} for n in names}

    monkeypatch.setattr(build, "verify_file", bad_verify)
    code = main([*NEW, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "FAILED out.onnx: logits differ from eager" in err
    assert f"{target}: not changed" in err
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_subset_reexport_leaves_no_stale_files(old_set, tmp_path):
    target = fresh_copy(old_set, tmp_path)
    assert main(["quantize", str(target), "--modes", "out", "--calibration", "random"]) == 0
    assert main([*NEW, "--modes", "features", "--formats", "onnx", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in target.iterdir()) == ["features.onnx", "manifest.json"]
    assert assert_one_complete_set(target) == 16


def _lock_held(lock: Path) -> bool:
    if not lock.exists():
        return False
    with open(lock, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def test_concurrent_export_is_refused_with_the_owner_pid(old_set, tmp_path, capsys):
    target = fresh_copy(old_set, tmp_path)
    # an export that holds the lock for seconds (its ONNX export alone takes several)
    slow = subprocess.Popen([sys.executable, "-m", "export", "resnet18", "--num_filters", "8", "--formats", "onnx",
                             "--name", "m", "--out", str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _lock_held(tmp_path / ".m.lock"):
            assert slow.poll() is None and time.monotonic() < deadline, "the export never locked"
            time.sleep(0.02)
        code = main([*NEW, "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert code == 2 and f"is locked by pid {slow.pid}" in err, err
        assert main(["quantize", str(target), "--calibration", "random"]) == 2
        assert f"locked by pid {slow.pid}" in capsys.readouterr().err
    finally:
        _, stderr = slow.communicate(timeout=300)
    assert slow.returncode == 0, stderr[-2000:]
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["backbone"]["name"] == "resnet18"
    assert verify_directory(target).failed == 0


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_disk_is_one_line_and_keeps_the_previous_set(tmp_path, capsys, monkeypatch):
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "1m")
    try:
        small = ["mnistmlp", "--mlp_hidden_size", "4", "--name", "m", "--out", str(disk)]
        assert main(small) == 0
        capsys.readouterr()
        if not mounted:  # no tmpfs here: the same error, simulated where the bytes are written
            from export.store import atomic

            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(atomic.os, "replace", full)
        code = main(["mnistmlp", "--mlp_hidden_size", "64", "--name", "m", "--out", str(disk)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: no space left on device writing "), err
        assert err.count("\n") == 1
        monkeypatch.undo()
        assert assert_one_complete_set(disk / "m") == 4
        assert leftovers(disk) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)
