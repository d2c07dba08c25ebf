"""The input normalisation travels with the model: recorded from the Mammoth dataset (or
--mean/--std) and, with --bake-preprocessing, applied by the graphs themselves."""

import json

import pytest
import torch

from export.cli import main
from export.formats.onnx import ort_session
from export.formats.torchscript import load_torchscript
from export.pipeline.preprocessing import MAMMOTH_DATASETS
from tests.conftest import VECTORS

CKPT = VECTORS / "checkpoints" / "mammoth_safe_resnet18.pt"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_checkpoint_dataset_normalisation_is_recorded_and_baked(capsys, tmp_path):
    code, _, err = run(capsys, "--checkpoint", CKPT, "--out", tmp_path, "--name", "plain",
                       "--modes", "out", "--formats", "onnx")
    assert code == 0, err
    prep = json.loads((tmp_path / "plain" / "manifest.json").read_text())["preprocessing"]
    mean, std, size = MAMMOTH_DATASETS["seq-cifar10"]
    assert (prep["mean"], prep["std"], prep["input_size"]) == (list(mean), list(std), list(size))
    assert prep["source"] == "Mammoth dataset seq-cifar10" and prep["baked"] is False
    code, _, err = run(capsys, "--checkpoint", CKPT, "--out", tmp_path, "--name", "baked",
                       "--modes", "out", "--bake-preprocessing")
    assert code == 0, err
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    normalised = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    want = ort_session(tmp_path / "plain" / "out.onnx").run(None, {"x": normalised.numpy()})[0]
    got = ort_session(tmp_path / "baked" / "out.onnx").run(None, {"x": images.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        got_ts = load_torchscript(tmp_path / "baked" / "out.pt")(images)
    torch.testing.assert_close(got_ts, torch.from_numpy(want), rtol=1e-4, atol=1e-4)
    trained = torch.load(VECTORS / "resnet18.pt", weights_only=True)["flat_params"]
    assert torch.equal(load_torchscript(tmp_path / "baked" / "out.pt").get_params(), trained)
    assert main(["verify", str(tmp_path / "baked")]) == 0


def test_mean_std_options(capsys, tmp_path):
    code, _, err = run(capsys, "mnistmlp", "--mean", "0.1307", "--std", "0.3081", "--out", tmp_path,
                       "--modes", "out", "--formats", "onnx")
    assert code == 0, err
    prep = json.loads((tmp_path / "mnistmlp" / "manifest.json").read_text())["preprocessing"]
    assert prep["mean"] == [0.1307] and prep["source"] == "--mean/--std"


@pytest.mark.parametrize("argv, message", [
    (["mnistmlp", "--mean", "0.5"], "--mean and --std go together"),
    (["resnet18", "--mean", "0.5", "--std", "0.2"], "has 1 mean and 1 std values; the backbone takes 3"),
    (["resnet18", "--mean", "0.5,0.5,x", "--std", "1,1,1"], "--mean '0.5,0.5,x': expected comma-separated"),
    (["resnet18", "--mean", "0,0,0", "--std", "1,0,1"], "every value must be positive"),
    (["resnet18", "--dataset", "seq-cifar1000"], "unknown Mammoth dataset 'seq-cifar1000'"),
    (["resnet18", "--bake-preprocessing"], "--bake-preprocessing needs the normalisation"),
])
def test_bad_normalisation_is_one_line(capsys, tmp_path, argv, message):
    code, _, err = run(capsys, *argv, "--num_filters", "8", "--out", tmp_path) if argv[0] == "resnet18" \
        else run(capsys, *argv, "--out", tmp_path)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_unknown_checkpoint_dataset_is_a_note_not_an_error(capsys, tmp_path):
    ckpt = torch.load(CKPT, weights_only=True)
    ckpt["args"]["dataset"] = "seq-core50"
    torch.save(ckpt, tmp_path / "c.pt")
    code, _, err = run(capsys, "--checkpoint", tmp_path / "c.pt", "--out", tmp_path, "--modes", "out",
                       "--formats", "torchscript", "--name", "c")
    assert code == 0 and "dataset 'seq-core50' is not in the normalisation table" in err
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["preprocessing"] is None
