"""`export.runtime.load`: every engine gives eager's outputs, flat parameters and errors."""

import copy
import json
import re
import shutil

import numpy as np
import pytest
import torch

from export.cli import main
from export.errors import ExportError, IntegrityError, ManifestError, ParamsError
from export.runtime import load
from tests.conftest import (
    assert_runtime_matches_eager,
    assert_within_bound,
    backbone_format_params,
    backbone_params,
    flat_outputs,
)

#: the engines of the default export's files (engine -> format)
DEFAULT_ENGINES = {"onnxruntime": "onnx", "torchscript": "torchscript", "exported": "exported"}



@pytest.mark.parametrize("name, engine", backbone_format_params(DEFAULT_ENGINES))
def test_every_engine_matches_eager(name, engine, export):
    net, result = export
    runtime = load(result.directory, engine=engine)
    x = torch.randn(3, *runtime.input_shape, generator=torch.Generator().manual_seed(5))
    # every mode's file is compared with eager in test_export; here the engine's API on two
    # (each torch.export program costs 0.5-2 s to load)
    assert_runtime_matches_eager(runtime, net, x, ("both", "full"))
    got_np = runtime(x[:1].numpy(), returnt="full")
    assert all(isinstance(t, np.ndarray) for t in got_np)
    assert torch.equal(runtime.get_params(), net.get_params())


@pytest.mark.parametrize("engine", DEFAULT_ENGINES)
@pytest.mark.parametrize("name", backbone_params("resnet18", "mnistmlp"))
def test_every_engine_takes_a_new_vector(name, engine, export):
    net, result = export
    net = copy.deepcopy(net)
    runtime = load(result.directory, engine=engine)
    x = torch.randn(2, *runtime.input_shape, generator=torch.Generator().manual_seed(6))
    runtime(x, returnt="out")  # a mode loaded before the change must follow it too
    v = net.get_params()
    new = v * (1 + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7)))
    runtime.set_params(new)
    net.set_params(new)
    assert torch.equal(runtime.get_params(), new)
    for mode in ("out", "full"):
        with torch.no_grad():
            want = flat_outputs(net(x, returnt=mode))
        for g, w in zip(flat_outputs(runtime(x, returnt=mode)), want):
            assert_within_bound(g.numpy(), w.numpy())
    with pytest.raises(ParamsError, match="expected 1-D|expected .* elements"):
        runtime.set_params(new[:-1])
    with pytest.raises(ParamsError, match="NaN/inf"):
        runtime.set_params(torch.full_like(new, float("nan")))


@pytest.mark.parametrize("name", backbone_params("resnet18"))
def test_load_refuses_bad_choices(name, export, tmp_path):
    _, result = export
    with pytest.raises(ExportError, match="unknown engine 'tensorrt'; allowed: auto, onnxruntime, openvino"):
        load(result.directory, engine="tensorrt")
    with pytest.raises(ExportError, match=re.escape("engine 'torchscript' has no precision 'int8'; it runs: fp32")):
        load(result.directory, engine="torchscript", precision="int8")
    with pytest.raises(ManifestError, match="lists no AOTInductor package .*--formats including aoti"):
        load(result.directory, engine="aoti")
    with pytest.raises(ValueError, match=r"rank 3; expected rank 4: \[batch, 3, any, any\]"):
        load(result.directory, engine="exported")(np.zeros((3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="unknown returnt 'all'"):
        load(result.directory, engine="torchscript")(np.zeros((1, 3, 32, 32), np.float32), returnt="all")


@pytest.mark.parametrize("engine", ["torchscript", "exported"])
@pytest.mark.parametrize("name", backbone_params("resnet18"))
def test_engines_refuse_a_tampered_file(name, engine, export, tmp_path):
    """A valid file of other weights in place of the exported one: refused by its sha256; with
    verify_hashes=False (the user's explicit choice) the changed file is what runs."""
    from export.formats import get_format

    net, result = export
    copy_dir = tmp_path / "copy"
    shutil.copytree(result.directory, copy_dir)
    name = f"both{get_format(engine).suffix}"
    other = tmp_path / name
    get_format(engine).write_params(result.directory / name, net.get_params() * 2, other,
                                    result.manifest.flat_params.layout)
    shutil.copy(other, copy_dir / name)
    with pytest.raises(IntegrityError, match=f"{name}: sha256 does not match"):
        load(copy_dir, engine=engine)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    original = load(result.directory, engine=engine)(x, returnt="both")
    tampered = load(copy_dir, engine=engine, verify_hashes=False)(x, returnt="both")
    assert not torch.allclose(tampered[0], original[0], rtol=1e-2, atol=1e-2), "the tampered file did not run"
    assert main(["verify", str(copy_dir)]) == 1


@pytest.mark.parametrize("name", backbone_params("resnet18", "mnistmlp"))
def test_params_cli_on_programs(name, export, tmp_path, capsys):
    """params read/write on a .ep.pt2: bit-equal vectors, a copy that runs the new weights."""
    net, result = export
    program = result.directory / "both.ep.pt2"
    assert main(["params", "read", str(program), "--out", str(tmp_path / "v.pt")]) == 0
    v = torch.load(tmp_path / "v.pt", weights_only=True)
    assert torch.equal(v, net.get_params())
    new = v * 1.01
    torch.save(new, tmp_path / "new.pt")
    out = tmp_path / "new.ep.pt2"
    assert main(["params", "write", str(program), str(tmp_path / "new.pt"), "--out", str(out),
                 "--manifest", str(result.directory / "manifest.json")]) == 0
    assert main(["params", "read", str(out), "--out", str(tmp_path / "back.npy"),
                 "--manifest", str(result.directory / "manifest.json")]) == 0
    assert np.array_equal(np.load(tmp_path / "back.npy"), new.numpy())
    capsys.readouterr()
    # overwriting a listed artifact is refused
    assert main(["params", "write", str(program), str(tmp_path / "new.pt"), "--out",
                 str(result.directory / "out.ep.pt2")]) == 2
    assert "refusing to overwrite an exported artifact" in capsys.readouterr().err


@pytest.mark.parametrize("name", backbone_params("resnet18"))
def test_program_of_another_model_is_refused(name, export, export_root, tmp_path, capsys):
    """A .ep.pt2 of mnistmlp written with resnet18's layout: one line with the expected layout."""
    from tests.conftest import exported

    _, result = export
    _, other = exported("mnistmlp", export_root)
    torch.save(torch.zeros(result.manifest.flat_params.count), tmp_path / "v.pt")
    code = main(["params", "write", str(other.directory / "out.ep.pt2"), str(tmp_path / "v.pt"),
                 "--out", str(tmp_path / "x.ep.pt2"), "--manifest", str(result.directory / "manifest.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "do not match the manifest's layout (missing conv1.weight); expected conv1.weight[8, 3, 3, 3]" in err
    not_a_program = tmp_path / "junk.ep.pt2"
    not_a_program.write_bytes(b"not a zip")
    assert main(["params", "read", str(not_a_program), "--manifest", str(result.directory / "manifest.json")]) == 2
    assert "not a torch.export program" in capsys.readouterr().err


@pytest.mark.parametrize("name", backbone_params("mnistmlp"))
def test_formats_subset_and_manifest(name, export, tmp_path):
    """Only the asked formats are written; an engine without its files says what to export."""
    from export.pipeline.build import export_backbone

    net, _ = export
    result = export_backbone(net, tmp_path / "m", modes=["out"], formats=["exported"])
    assert result.ok and sorted(result.manifest.files) == ["out.ep.pt2"]
    assert result.manifest.verification["exported"]["out"]["logits"]["ok"]
    with pytest.raises(ManifestError, match="lists no ONNX file"):
        load(result.directory)
    assert load(result.directory, engine="exported")(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    manifest = json.loads((result.directory / "manifest.json").read_text())
    assert manifest["programs"]["out.ep.pt2"]["dynamic"] == ["batch"]
