"""The export CLI: bad input (one line each), Mammoth checkpoints, determinism, atomicity."""

import json

import pytest
import torch

from export.cli import main
from export.errors import ExportError
from export.formats.onnx import ort_session
from export.formats.torchscript import load_torchscript
from export.store.atomic import atomic_path
from tests.conftest import REPO, VECTORS
from zoo import Registry

CKPTS = VECTORS / "checkpoints"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv, message", [
    (["resnt18"], "unknown backbone 'resnt18'; did you mean: resnet18"),
    (["resnet18", "--modes", "out,al"], "unknown mode 'al'; allowed: out, features, both, full"),
    (["resnet18", "--formats", "tflite"], "unknown format 'tflite'; allowed: torchscript, onnx"),
    (["resnet"], "backbone 'resnet' needs --depth (int); e.g. python -m export resnet --depth 18"
                 "  or  make export BACKBONE=resnet ARGS='--depth 18'"),
    (["resnet32", "--input-shape", "3,64,64"], "does not fit backbone 'resnet32': it only takes 3x32x32"),
    (["resnet18", "--num_filters", "8", "--input-shape", "1,32,32"], "expected 3x32x32"),
    (["resnet18", "--input-shape", "3,a"], "expected C,H,W integers"),
    ([], "no backbone given; choose one of:"),
])
def test_bad_input_one_line(capsys, tmp_path, argv, message):
    code, _, err = run(capsys, *argv, "--out", tmp_path)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not any(tmp_path.rglob("*.onnx"))


def test_wrong_type_on_cli(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["resnet18", "--num_filters", "x", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "argument --num_filters: invalid int value: 'x'" in capsys.readouterr().err


def test_unwritable_output_directory(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = run(capsys, "mnistmlp", "--out", blocker)
    assert code == 2 and "is not writable" in err and str(blocker) in err


def test_checkpoint_not_matching_backbone(capsys, tmp_path):
    code, _, err = run(capsys, "resnet18", "--checkpoint", VECTORS / "resnet18.pt", "--out", tmp_path)
    assert code == 2
    assert "does not fit backbone 'resnet18': mis-shaped keys (101): conv1.weight (8, 3, 3, 3) != (64, 3, 3, 3)" in err


def test_non_weights_only_pickle_refused(capsys, tmp_path):
    code, _, err = run(capsys, "--checkpoint", CKPTS / "mammoth_oldpickle_resnet18.pt", "--out", tmp_path)
    assert code == 2
    assert "not a weights-only pickle (it needs argparse.Namespace" in err
    assert "--allow-unsafe-pickle" in err


def test_help_lists_backbone_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["resnet18", "--help"])
    out = capsys.readouterr().out
    assert "arguments of backbone 'resnet18'" in out and "--num_filters INT" in out


@pytest.mark.parametrize("ckpt, extra", [("mammoth_safe_resnet18.pt", []),
                                         ("mammoth_oldpickle_resnet18.pt", ["--allow-unsafe-pickle"])])
def test_mammoth_run_checkpoint_exports_what_was_trained(capsys, tmp_path, ckpt, extra):
    code, out, err = run(capsys, "--checkpoint", CKPTS / ckpt, *extra, "--out", tmp_path,
                         "--modes", "out", "--formats", "torchscript,onnx", "--name", "run")
    assert code == 0, err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["backbone"] == {"name": "resnet18", "args": {"num_classes": 10, "num_filters": 8},
                                    "num_params": 176402}
    assert manifest["source"]["checkpoint"] == ckpt
    ref = torch.load(VECTORS / "resnet18.pt", weights_only=True)
    x, want = ref["x"], ref["out"]
    got_ts = load_torchscript(tmp_path / "run" / "out.pt")(x)
    got_onnx = torch.from_numpy(ort_session(tmp_path / "run" / "out.onnx").run(None, {"x": x.numpy()})[0])
    torch.testing.assert_close(got_ts, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_onnx, want, rtol=1e-4, atol=1e-4)


def test_plain_state_dict_checkpoint(capsys, tmp_path):
    from safetensors.torch import save_file

    ref = torch.load(VECTORS / "resnet18.pt", weights_only=True)
    save_file({k: v.contiguous() for k, v in ref["state_dict"].items()}, str(tmp_path / "w.safetensors"))
    code, out, err = run(capsys, "resnet18", "--num_filters", "8", "--checkpoint", tmp_path / "w.safetensors",
                         "--out", tmp_path, "--formats", "torchscript", "--modes", "features")
    assert code == 0, err
    assert "1 file, max |exported-eager|" in out and "onnx export" not in out, out  # no ONNX, no ONNX time
    got = load_torchscript(tmp_path / "resnet18-num_filters8" / "features.pt")(ref["x"])
    torch.testing.assert_close(got, ref["features"], rtol=1e-5, atol=1e-5)


def test_export_is_deterministic(capsys, tmp_path):
    args = ["mnistmlp", "--mlp_hidden_size", "16", "--out", tmp_path]
    assert run(capsys, *args, "--name", "a")[0] == 0
    assert run(capsys, *args, "--name", "b")[0] == 0
    a = json.loads((tmp_path / "a" / "manifest.json").read_text())
    b = json.loads((tmp_path / "b" / "manifest.json").read_text())
    a.pop("timing"), b.pop("timing")
    assert a == b


def test_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "x.onnx"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_all_continues_past_a_failure(capsys, tmp_path, monkeypatch):
    from zoo.backbones.mlp import MNISTMLP

    small = Registry()
    small.register("tiny-mlp")(lambda num_classes=10: MNISTMLP(784, num_classes, 8))

    def broken(num_classes: int = 10):
        raise RuntimeError("boom")

    def scripted(num_classes: int = 10):  # TorchScript's errors start with a newline
        raise RuntimeError("\nThe following operation failed in the TorchScript interpreter.\n...")

    def silent(num_classes: int = 10):
        raise RuntimeError()

    def refused(num_classes: int = 10):  # the user's mistake: one line, no traceback
        raise ExportError("weights.pth: not a checkpoint")

    for name, build in (("broken", broken), ("scripted", scripted), ("silent", silent), ("refused", refused)):
        small.register(name)(build)
    monkeypatch.setattr("export.cli.export.REGISTRY", small)
    monkeypatch.setattr("export.cli.export.list_backbones", lambda: small.names())
    code, out, err = run(capsys, "--all", "--out", tmp_path, "--formats", "onnx")
    assert code == 1
    assert "1 exported, 4 failed" in out
    assert "refused: FAILED: ExportError: weights.pth: not a checkpoint (" in err, err
    # the three bugs keep their tracebacks (on stderr, after the table's one line), the refusal none
    assert err.count("Traceback (most recent call last)") == 3, err
    assert 'raise RuntimeError("boom")' in err and 'raise ExportError(' not in err
    assert "FAILED: RuntimeError: boom" in out and "tiny-mlp" in out
    assert "scripted: FAILED: RuntimeError: The following operation failed in the TorchScript" in err, err
    assert "silent: FAILED: RuntimeError: RuntimeError (" in err, err
    assert (tmp_path / "tiny-mlp" / "full.onnx").exists()
    # a line per backbone as it finishes, for logs (stderr is not a terminal here: no bar)
    assert "broken: FAILED: RuntimeError: boom (" in err and "tiny-mlp: ok (" in err, err
    assert "\r" not in err


def test_example_args_fill_required_ones(capsys, tmp_path):
    code, _, err = run(capsys, "resnet", "--example-args", "--formats", "torchscript", "--modes", "out",
                       "--out", tmp_path)
    assert code == 0, err
    assert "note: --depth not given, using the example value 18" in err
    manifest = json.loads((tmp_path / "resnet" / "manifest.json").read_text())
    assert manifest["backbone"]["args"] == {"depth": 18, "width": 1, "num_classes": 10}


def test_mammoth_checkpoint_wrappers():
    from export.pipeline.checkpoint import backbone_state_from_model

    t = torch.zeros(1)
    model = {"net.module.conv1.weight": t, "module.net.bn1.bias": t, "wrappee.net.fc.weight": t,
             "old_net.conv1.weight": t, "buffer_examples": t}
    assert sorted(backbone_state_from_model(model)) == ["bn1.bias", "conv1.weight", "fc.weight"]


def test_directory_names():
    from export.cli.export import dir_name
    from zoo import get_entry

    assert dir_name(get_entry("resnet"), {"depth": 18, "width": 1, "num_classes": 10}) == "resnet"
    assert dir_name(get_entry("resnet"), {"depth": 34, "width": 1, "num_classes": 10}) == "resnet-depth34"
    assert dir_name(get_entry("resnet18"), {"num_classes": 10, "num_filters": 8}) == "resnet18-num_filters8"
    assert dir_name(get_entry("resnet50-pt"), {"num_classes": 10, "weights": "/a/b.pth"}) == "resnet50-pt"


def test_opset_option(capsys, tmp_path):
    code, _, err = run(capsys, "mnistmlp", "--opset", "18", "--formats", "onnx", "--modes", "out",
                       "--out", tmp_path)
    assert code == 0, err
    manifest = json.loads((tmp_path / "mnistmlp" / "manifest.json").read_text())
    assert manifest["opset"] == 18
    import onnx

    model = onnx.load(str(tmp_path / "mnistmlp" / "out.onnx"))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]


def test_abbreviated_backbone_arguments(capsys, tmp_path):
    """argparse abbreviations (--dep for --depth) count as given, like the full flag."""
    code, _, err = run(capsys, "resnet", "--dep", "18", "--num_c", "3", "--formats", "torchscript",
                       "--modes", "out", "--out", tmp_path, "--name", "r")
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["backbone"]["args"] == {
        "depth": 18, "width": 1, "num_classes": 3}


def test_pretrained_weights_error_names_the_registered_backbone(tmp_path):
    from zoo import get_backbone
    from zoo.weights import CheckpointError

    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="does not fit backbone 'resnet50-pt'"):
        get_backbone("resnet50-pt", weights=str(tmp_path / "w.pth"))
    with pytest.raises(CheckpointError, match="does not fit backbone 'tv-resnet18'"):
        get_backbone("tv-resnet18", weights=str(tmp_path / "w.pth"))


def test_exports_are_byte_reproducible_and_carry_no_local_paths(tmp_path):
    """Two exports of the same weights under different RNG states: identical files."""
    from export.pipeline.build import export_backbone
    from zoo import get_backbone

    torch.manual_seed(3)
    net = get_backbone("mnistmlp", mlp_hidden_size=4)
    a = export_backbone(net, tmp_path / "a")
    torch.manual_seed(99)
    torch.randn(7)
    b = export_backbone(net, tmp_path / "b")
    assert a.manifest.files == b.manifest.files
    for name in a.manifest.files:
        data = (tmp_path / "a" / name).read_bytes()
        assert data == (tmp_path / "b" / name).read_bytes(), name
        assert str(REPO).encode() not in data, f"{name} names the build machine's source path"
