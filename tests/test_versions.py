"""Weight versions: a Mammoth run's per-task checkpoints published into an export directory,
each verified, loadable by every engine, listed, pruned and pinned; refusals in one line; the
directory's guarantees (kill, lock, full disk) hold for publish too."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export.cli import main
from export.errors import ExportError, IntegrityError
from export.pipeline.build import export_backbone
from export.pipeline.checkpoint import read_checkpoint
from export.runtime import load
from export.store.manifest import read_manifest
from export.store.transaction import DirectoryLock, manifest_update
from export.store.versions import record_deployed, version_dir
from tests.conftest import REPO, assert_within_bound
from tests.continual import mammoth_args, save_mammoth, task_checkpoints
from zoo.registry import get_backbone

pytestmark = pytest.mark.xdist_group("versions")

ARGS = {"num_classes": 10, "num_filters": 8}
ENGINES = ("onnxruntime", "openvino", "torchscript", "exported")


def eager_of(path: Path, backbone: str = "resnet18", **args):
    net = get_backbone(backbone, **(args or ARGS))
    net.load_state_dict(read_checkpoint(path).state_dict)
    return net.eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An export of resnet18 (8 filters, shared ONNX weights; 'out' and 'full', which returns
    what the other modes return) and a 3-task Mammoth run of it."""
    root = tmp_path_factory.mktemp("continual")
    torch.manual_seed(0)
    net = get_backbone("resnet18", **ARGS)
    result = export_backbone(net, root / "export", modes=["out", "full"], onnx_weights="shared")
    assert result.ok
    return root / "export", task_checkpoints(root / "ckpts", "resnet18", 3, **ARGS)


@pytest.fixture(scope="module")
def published(run, tmp_path_factory):
    """The run published as versions 1..3 (given out of order: publish sorts by task)."""
    directory, ckpts = run
    target = tmp_path_factory.mktemp("published") / "export"
    shutil.copytree(directory, target)
    assert main(["publish", str(target), *map(str, reversed(ckpts))]) == 0
    return target, ckpts


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """mnistmlp (8 hidden units, TorchScript + ONNX) and a 3-task run: quick to publish many times."""
    root = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    assert export_backbone(get_backbone("mnistmlp", mlp_hidden_size=8), root / "export",
                           formats=["torchscript", "onnx"]).ok
    return root / "export", task_checkpoints(root / "ckpts", "mnistmlp", 3, mlp_hidden_size=8)


def copy_of(published, tmp_path: Path) -> Path:
    shutil.copytree(published[0], tmp_path / "export")
    return tmp_path / "export"


def test_versions_are_recorded_in_task_order(published):
    directory, ckpts = published
    manifest = read_manifest(directory)
    assert sorted(manifest.weight_versions) == ["1", "2", "3"]
    for n, ckpt in enumerate(ckpts, start=1):
        v = manifest.weight_versions[str(n)]
        assert v.task == n - 1 and v.checkpoint["file"] == ckpt.name and v.dataset == "seq-cifar10"
        assert v.checkpoint["kind"] == "mammoth" and len(v.checkpoint["sha256"]) == 64
        assert v.args["backbone"] == "resnet18" and v.published.endswith("Z")
        # every export file verified with the version's weights, within the bound
        assert set(v.verification) == {name for _, _, name, _ in manifest.artifacts()}
        assert all(s["ok"] for file in v.verification.values() for s in file.values())
        assert 0 <= v.max_abs < 1e-3
        assert set(v.files) == {"weights.safetensors", "graphs.json"}


def test_a_version_stores_one_copy_of_the_weights(published):
    """Graph files are stored once; a version holds the parameters and BN statistics once."""
    directory, _ = published
    manifest = read_manifest(directory)
    net = get_backbone("resnet18", **ARGS)
    weights = 4 * (net.num_params() + sum(b.numel() for b in net.buffers() if b.is_floating_point()))
    for v in manifest.weight_versions.values():
        size = sum(e.size for e in v.files.values())
        assert weights <= size < weights * 1.05 + 20_000, (size, weights)
    graphs = sum(e.size for e in manifest.files.values())
    assert graphs > 4 * weights  # each TorchScript file and program (2 modes) holds its own copy


@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_loads_each_version_as_eager(published, engine):
    directory, ckpts = published
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    outs = []
    for n, ckpt, modes in [(1, ckpts[0], ("out",)), (3, ckpts[2], ("out", "full"))]:
        net = load(directory, engine=engine, version=n)
        assert net.version == n and f"version={n}" in repr(net)
        eager = eager_of(ckpt)
        with torch.no_grad():
            for mode in modes:
                want = eager(x, returnt=mode)
                got = net(x, returnt=mode)
                for g, w in zip(got if mode == "full" else [got], want if mode == "full" else [want]):
                    assert_within_bound(g.numpy(), w.numpy())
        outs.append(net(x).numpy())
    # the versions really differ (parameters and BatchNorm statistics changed every task)
    assert not np.allclose(outs[0], outs[1], atol=1e-3)
    assert load(directory, engine=engine).version == 3  # default: the newest


def test_unknown_version_is_one_line(published):
    directory, _ = published
    with pytest.raises(ExportError, match=r"no weight version 7; published: 1, 2, 3"):
        load(directory, version=7)
    with pytest.raises(ExportError, match=r"no weight version 'two'"):
        load(directory, version="two")


def test_versions_command_lists_them(published, capsys):
    directory, _ = published
    assert main(["versions", str(directory)]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()[2:]]
    assert [line[:3] for line in lines] == [["1", "0", "seq-cifar10"], ["2", "1", "seq-cifar10"],
                                           ["3", "2", "seq-cifar10"]]
    assert main(["versions", str(directory), "--json"]) == 0
    assert sorted(json.loads(capsys.readouterr().out)) == ["1", "2", "3"]


def test_verify_checks_every_version_and_finds_a_changed_one(small_run, tmp_path, capsys):
    directory = tmp_path / "export"
    shutil.copytree(small_run[0], directory)
    assert main(["publish", str(directory), *map(str, small_run[1])]) == 0
    assert main(["verify", str(directory)]) == 0
    out = capsys.readouterr().out
    assert " v1 onnx " in out and " v3 torchscript " in out and "0 failed" in out
    weights = version_dir(directory, 2) / "weights.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\x00" * 8
    weights.write_bytes(bytes(data))
    assert main(["verify", str(directory)]) == 1
    assert "v2" in capsys.readouterr().out
    with pytest.raises(IntegrityError, match="sha256 does not match version 2"):
        load(directory, version=2)
    load(directory, version=3)  # the others are untouched


def _refused(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_checkpoints_that_do_not_fit_are_refused_in_one_line(run, tmp_path, capsys):
    directory, ckpts = run
    target = tmp_path / "export"
    shutil.copytree(directory, target)
    before = (target / "manifest.json").read_bytes()
    # another backbone
    mlp = get_backbone("mnistmlp")
    other = save_mammoth(mlp, tmp_path / "mlp_0.pt", mammoth_args("mnistmlp"))
    assert "a checkpoint of backbone 'mnistmlp'" in _refused(capsys, ["publish", str(target), str(other)])
    # other arguments
    wide = get_backbone("resnet18", num_classes=10, num_filters=16)
    other = save_mammoth(wide, tmp_path / "wide_0.pt", mammoth_args("resnet18", num_classes=10, num_filters=16))
    assert "num_filters=16" in _refused(capsys, ["publish", str(target), str(other)])
    # another parameter layout (a key missing, a shape changed) with arguments that say nothing
    state = read_checkpoint(ckpts[0]).state_dict
    broken = dict(state)
    broken.pop("linear.bias" if "linear.bias" in state else next(iter(state)))
    torch.save(broken, tmp_path / "missing.pt")
    assert "does not fit backbone" in _refused(capsys, ["publish", str(target), str(tmp_path / "missing.pt")])
    # non-finite weights
    bad = {k: v.clone() for k, v in state.items()}
    first = next(k for k, v in bad.items() if v.is_floating_point())
    bad[first].view(-1)[0] = float("nan")
    torch.save(bad, tmp_path / "nan.pt")
    assert "non-finite values in " + first in _refused(capsys, ["publish", str(target), str(tmp_path / "nan.pt")])
    # a good checkpoint beside a bad one: nothing is published
    _refused(capsys, ["publish", str(target), str(ckpts[0]), str(tmp_path / "nan.pt")])
    assert (target / "manifest.json").read_bytes() == before
    assert not (target / "versions").exists() or not any((target / "versions").iterdir())


def test_a_plain_state_dict_publishes_without_a_task(small_run, tmp_path, capsys):
    directory, ckpts = small_run
    target = tmp_path / "export"
    shutil.copytree(directory, target)
    torch.save(read_checkpoint(ckpts[1]).state_dict, tmp_path / "weights.pt")
    assert main(["publish", str(target), str(tmp_path / "weights.pt")]) == 0
    v = read_manifest(target).weight_versions["1"]
    assert v.task is None and v.checkpoint["kind"] == "state_dict" and v.dataset is None


def test_keep_prunes_old_versions_but_never_pinned_or_served(published, tmp_path, capsys):
    directory = copy_of(published, tmp_path)
    assert main(["versions", str(directory), "--pin", "1"]) == 0
    record_deployed(directory, "resnet18", 2)
    assert main(["versions", str(directory), "--keep", "1"]) == 0
    assert "removed no version" in capsys.readouterr().out  # 1 pinned, 2 served, 3 newest
    assert main(["versions", str(directory), "--unpin", "1"]) == 0
    assert main(["versions", str(directory), "--keep", "1"]) == 0
    assert "removed version(s) 1" in capsys.readouterr().out
    assert sorted(read_manifest(directory).weight_versions) == ["2", "3"]
    assert not version_dir(directory, 1).exists()
    assert "--keep 0: expected an integer >= 1" in _refused(capsys, ["versions", str(directory), "--keep", "0"])
    assert "no weight version 9" in _refused(capsys, ["versions", str(directory), "--pin", "9"])
    load(directory, version=2)


def test_weights_change_only_by_publishing(published, tmp_path, capsys):
    """`params write DIR` and a new export into the directory are refused once it has versions;
    commands that add files (quantize, accuracy: a transaction over the directory) keep them."""
    directory = copy_of(published, tmp_path)
    torch.save(torch.zeros(read_manifest(directory).flat_params.count), tmp_path / "v.pt")
    assert "publishing a new version" in _refused(capsys, ["params", "write", str(directory), str(tmp_path / "v.pt")])
    assert "a new export would drop them" in _refused(
        capsys, ["resnet18", "--num_filters", "8", "--out", str(tmp_path), "--name", "export"])
    with manifest_update(directory) as (staging, manifest):
        manifest.source = {**manifest.source, "note": "a transaction over the directory"}
    assert sorted(read_manifest(directory).weight_versions) == ["1", "2", "3"]
    assert load(directory, version=1).version == 1  # files carried over, hashes intact


def test_concurrent_publish_is_refused_with_the_owner_pid(small_run, tmp_path, capsys):
    directory, ckpts = small_run
    target = tmp_path / "export"
    shutil.copytree(directory, target)
    lock = DirectoryLock(target)
    lock.acquire()
    try:
        assert f"is locked by pid {os.getpid()}" in _refused(capsys, ["publish", str(target), str(ckpts[0])])
    finally:
        lock.release()
    assert not read_manifest(target).weight_versions


#: runs `publish`, SIGKILLing itself at the N-th rename (before or after it): the version's
#: rename into versions/ and the manifest's
KILL_AT = """
import os, signal, sys
point = int(sys.argv[1])
seen = [0]
def hook(real):
    def call(*args, **kwargs):
        seen[0] += 1
        if seen[0] == point:
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        seen[0] += 1
        if seen[0] == point:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return call
os.replace = hook(os.replace)
os.rename = hook(os.rename)
from export.cli import main
code = main(sys.argv[2:])
print("points", seen[0], file=sys.stderr)
sys.exit(code)
"""


def test_publish_killed_at_any_point_leaves_no_half_version(small_run, tmp_path):
    directory, ckpts = small_run
    base = tmp_path / "base"
    shutil.copytree(directory, base)
    assert main(["publish", str(base), str(ckpts[0])]) == 0

    def killed_at(point: int, target: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", KILL_AT, str(point), "publish", str(target), str(ckpts[1])],
                              cwd=REPO, capture_output=True, text=True, timeout=300)

    probe = killed_at(0, tmp_path / "probe")
    assert probe.returncode == 2  # no such directory: counts nothing
    shutil.copytree(base, tmp_path / "count")
    counted = killed_at(0, tmp_path / "count")
    assert counted.returncode == 0, counted.stderr[-1000:]
    points = int(counted.stderr.strip().splitlines()[-1].split()[-1])
    assert points == 4  # before and after the version's rename, then the manifest's
    seen = set()
    for point in (1, 2, 4):  # staging left, version directory unlisted, version recorded (3 is as 2)
        target = tmp_path / f"k{point}"
        shutil.copytree(base, target)
        proc = killed_at(point, target)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-1000:])
        versions = sorted(read_manifest(target).weight_versions)
        seen.add(len(versions))
        for n in versions:  # every listed version is complete and loads
            assert load(target, version=int(n)).version == int(n)
        assert main(["publish", str(target), str(ckpts[2])]) == 0  # the next publish cleans up
        listed = sorted(read_manifest(target).weight_versions)
        assert sorted(p.name for p in (target / "versions").iterdir()) == listed
    assert seen == {1, 2}, "the kill points should cover both sides of the manifest write"


def test_full_disk_is_one_line_and_publishes_nothing(small_run, tmp_path, capsys, monkeypatch):
    directory, ckpts = small_run
    target = tmp_path / "export"
    shutil.copytree(directory, target)

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    err = _refused(capsys, ["publish", str(target), str(ckpts[0])])
    monkeypatch.undo()
    assert err.startswith("error: no space left on device writing ") and "versions" in err
    assert not read_manifest(target).weight_versions
    assert [p.name for p in (target / "versions").iterdir()] == []


def test_triton_repository_has_a_numbered_directory_per_version(published, tmp_path, capsys):
    """`triton` writes versions 1-3 as REPO/<model>/<n>/ (Triton's version directories) with the
    matching version_policy; each file gives eager of its version."""
    import onnxruntime as ort

    from export.formats.torchscript import load_torchscript
    from tests.test_triton_repo import parse_config

    directory, ckpts = published
    repo = tmp_path / "repo"
    assert main(["triton", str(directory), "--repo", str(repo), "--versions", "1,3"]) == 0
    capsys.readouterr()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    onnx_cfg = parse_config(repo / "resnet18_out" / "config.pbtxt")
    assert list(onnx_cfg.version_policy.specific.versions) == [1, 3]
    assert onnx_cfg.parameters["weight_versions_sha256"].string_value.startswith("1:")
    for n in (1, 3):
        want = eager_of(ckpts[n - 1])(x).detach().numpy()
        session = ort.InferenceSession(str(repo / "resnet18_out" / str(n) / "model.onnx"))
        assert_within_bound(session.run(["logits"], {"x": x.numpy()})[0], want)
        module = load_torchscript(repo / "resnet18_out_ts" / str(n) / "model.pt")
        assert_within_bound(module(x).detach().numpy(), want)
    assert sorted(p.name for p in (repo / "resnet18_out").iterdir()) == ["1", "3", "config.pbtxt"]
    assert main(["triton", str(directory), "--repo", str(repo), "--versions", "latest"]) == 0
    assert sorted(p.name for p in (repo / "resnet18_full").iterdir()) == ["3", "config.pbtxt"]
    assert "no weight version 9" in _refused(capsys, ["triton", str(directory), "--repo", str(repo),
                                                      "--versions", "9"])


def test_a_replaced_directory_fails_signature_verification(small_run, tmp_path, capsys):
    """Hashes alone cannot tell a directory replaced whole: other weights under version 1 with
    the manifest's hashes rewritten load fine; a signature over the version refuses them."""
    from export.serving.config import versions_config
    from export.store.manifest import file_entry, write_manifest
    from export.store.signing import check_signature
    from tests.continual import key_pair

    directory, ckpts = small_run
    target = tmp_path / "export"
    shutil.copytree(directory, target)
    trusted, foreign = key_pair(tmp_path, "trusted"), key_pair(tmp_path, "foreign")
    assert main(["publish", str(target), str(ckpts[0]), "--sign-key", str(trusted[0])]) == 0
    check_signature(version_dir(target, 1), trusted[1])
    versions_config(target, [1], 1, "latest", str(trusted[1]))  # what serve and rollout check
    with pytest.raises(IntegrityError, match="signature does not verify with foreign.pub"):
        versions_config(target, [1], 1, "latest", str(foreign[1]))
    # the attacker's copy: version 1's weights replaced by another task's, hashes re-computed
    other = tmp_path / "other"
    shutil.copytree(directory, other)
    assert main(["publish", str(other), str(ckpts[2])]) == 0
    weights = version_dir(target, 1) / "weights.safetensors"
    os.chmod(weights, 0o644)
    shutil.copyfile(version_dir(other, 1) / "weights.safetensors", weights)
    manifest = read_manifest(target)
    manifest.weight_versions["1"].files["weights.safetensors"] = file_entry(weights)
    write_manifest(target, manifest)
    assert load(target, version=1).version == 1  # self-consistent: every hash matches
    with pytest.raises(IntegrityError, match="signature does not verify with trusted.pub"):
        check_signature(version_dir(target, 1), trusted[1])
    with pytest.raises(IntegrityError, match="signature does not verify"):
        versions_config(target, [1], 1, "latest", str(trusted[1]))
    # an unsigned version under a trusted key
    assert main(["publish", str(target), str(ckpts[1])]) == 0
    with pytest.raises(IntegrityError, match="version 2 is not signed"):
        versions_config(target, [2], 2, "latest", str(trusted[1]))
