"""Integrity on every load, `verify` that checks the layout and reports strays, protected files."""

import json
import shutil

import numpy as np
import pytest
import torch

from export.cli import main
from export.errors import IntegrityError, ManifestError
from export.runtime import OnnxBackbone
from tests.conftest import backbone_params

pytestmark = pytest.mark.parametrize("name", backbone_params("mnistmlp"))


@pytest.fixture
def copy(name, export, tmp_path):
    """A private copy of the backbone's export directory."""
    _, result = export
    d = tmp_path / "copy"
    shutil.copytree(result.directory, d)
    return d


def _flip(path, where=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_is_refused_before_any_session(copy):
    _flip(copy / "full.onnx")
    with pytest.raises(IntegrityError, match=r"full\.onnx: sha256 does not match manifest\.json"):
        OnnxBackbone(copy)
    net = OnnxBackbone(copy, verify_hashes=False)  # the user's explicit choice
    assert net(np.zeros((1, 1, 28, 28), np.float32)).shape == (1, 10)


def test_mixed_directory_is_refused(copy, tmp_path, capsys):
    """A file from another export of the same architecture (other weights) in the directory."""
    assert main(["mnistmlp", "--mlp_hidden_size", "32", "--seed", "5", "--out", str(tmp_path),
                 "--name", "other", "--formats", "onnx"]) == 0
    shutil.copy(tmp_path / "other" / "out.onnx", copy / "out.onnx")
    with pytest.raises(IntegrityError, match=r"out\.onnx: sha256 does not match .*another export"):
        OnnxBackbone(copy)
    assert main(["verify", str(copy)]) == 1


def test_missing_file_and_bad_manifests_are_one_line(copy):
    good = json.loads((copy / "manifest.json").read_text())
    (copy / "both.onnx").unlink()
    with pytest.raises(IntegrityError, match=r"both\.onnx: listed in manifest\.json but missing"):
        OnnxBackbone(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"manifest\.json: not valid JSON") as info:
        OnnxBackbone(copy)
    assert "\n" not in str(info.value)
    (copy / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ManifestError, match="expected a JSON object, found list"):
        OnnxBackbone(copy)
    (copy / "manifest.json").write_text(json.dumps({"files": {}}))
    with pytest.raises(ManifestError, match="manifest.json: backbone: Field required") as info:
        OnnxBackbone(copy)
    assert "\n" not in str(info.value)
    for change, message in ((lambda m: m["files"]["out.onnx"].update(sha256="abc"),
                             r"files\.out\.onnx\.sha256: String should match pattern"),
                            (lambda m: m["flat_params"].update(count="many"), r"flat_params\.count: Input should be"),
                            (lambda m: m["files"].update({"../x.onnx": m["files"]["out.onnx"]}),
                             r"bad files entry '\.\./x\.onnx'")):
        bad = json.loads(json.dumps(good))
        change(bad)
        (copy / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(ManifestError, match=message) as info:
            OnnxBackbone(copy)
        assert "\n" not in str(info.value)


def test_set_params_nonfinite_keeps_the_object_usable(name, export, copy):
    net = OnnxBackbone(copy)
    v = net.get_params()
    v[0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf values"):
        net.set_params(v)
    net.set_params(v, allow_nonfinite=True)
    x = np.ones((2, 1, 28, 28), np.float32)
    assert np.isnan(net(x)).all()  # NaN in the first weight reaches every logit
    assert len(net(x, returnt="full")) == 4
    net.set_params(export[0].get_params())
    assert np.isfinite(net(x)).all()


def test_verify_checks_the_layout(copy, capsys):
    manifest = json.loads((copy / "manifest.json").read_text())
    for entry in manifest["flat_params"]["layout"]:
        entry["offset"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "flat-parameter layout is" in err and "offset 1, expected 0" in err
    with pytest.raises(ValueError, match="layout is inconsistent: .*offset 1, expected 0"):
        OnnxBackbone(copy).set_params(torch.zeros(manifest["flat_params"]["count"]))


def test_verify_reports_stray_files(copy, capsys):
    (copy / ".out.onnx.abc123.tmp").write_bytes(b"half")
    shutil.copy(copy / "out.onnx", copy / "old.int8.onnx")
    assert main(["verify", str(copy)]) == 0
    err = capsys.readouterr().err
    assert "stray files" in err and ".out.onnx.abc123.tmp" in err and "old.int8.onnx" in err


def test_verify_on_a_manifest_listing_nothing(copy, capsys):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"] = {}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(copy)]) == 1
    assert "lists no files: nothing to verify" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["manifest.json", "out.onnx", "full.pt"])
def test_params_never_overwrite_export_files(copy, tmp_path, capsys, target):
    before = (copy / target).read_bytes()
    assert main(["params", "read", str(copy / "out.onnx"), "--out", str(copy / target)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    torch.save(OnnxBackbone(copy).get_params(), tmp_path / "v.pt")
    assert main(["params", "write", str(copy / "full.onnx"), str(tmp_path / "v.pt"),
                 "--out", str(copy / target)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (copy / target).read_bytes() == before
    assert main(["params", "write", str(copy / "full.onnx"), str(tmp_path / "v.pt"),
                 "--out", str(copy / "new.onnx")]) == 0  # a new name beside them is fine
