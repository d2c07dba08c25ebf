"""AOTInductor packages (`--formats aoti`): verified, loadable without the zoo and from C++,
weights replaceable without recompiling, and clear refusals.

Compiling costs ~8-25 s per package here (~6-9 s of it g++ on the generated wrapper, whatever
the model's size; a ResNet-18's kernels twice an MLP's), so these tests share one small export per
backbone, the four modes between them (mnistmlp 'out', 'features' and 'both'; an 8-filter
ResNet-18 'full', which holds every output the other modes return, from convolutions, BatchNorm
and pooling: the heads are the same code for every backbone), and run on one xdist worker.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.cli import main
from export.errors import ExportError, IntegrityError, ParamsError
from export.pipeline.build import export_backbone
from export.runtime import load
from tests.conftest import REPO, assert_runtime_matches_eager, assert_within_bound, build_small, flat_outputs
from zoo import RETURNT_MODES

pytestmark = pytest.mark.xdist_group("aoti")
NAMES = ["mnistmlp", "resnet18"]
MODES = {"mnistmlp": ["out", "features", "both"], "resnet18": ["full"]}


@pytest.fixture(scope="module")
def aoti_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("aoti")
    yield root
    shutil.rmtree(root, ignore_errors=True)


_BUILT = {}


def built(name: str, root: Path):
    """(net, result): MODES[name] as any-batch packages (and mnistmlp's TorchScript, for C++), once."""
    if name not in _BUILT:
        net, shape = build_small(name)
        formats = ["torchscript", "exported", "aoti"] if name == "mnistmlp" else ["exported", "aoti"]
        result = export_backbone(net, root / name, modes=MODES[name], formats=formats, input_shape=shape)
        _BUILT[name] = (net, result)
    return _BUILT[name]


@pytest.fixture
def aoti_export(name, aoti_root):
    return built(name, aoti_root)



@pytest.mark.parametrize("name", NAMES)
def test_packages_are_verified_and_recorded(name, aoti_export):
    _, result = aoti_export
    assert result.ok, result.failures
    assert sorted(sum(MODES.values(), [])) == sorted(RETURNT_MODES)  # every mode, between the two
    m = result.manifest
    assert sorted(m.modes) == sorted(MODES[name])
    for mode in MODES[name]:
        info = m.programs[f"{mode}.aoti.pt2"]
        assert info.format == "aoti" and info.mode == mode and info.batch is None
        assert info.torch == torch.__version__ and info.seconds > 0 and info.compiler
        assert info.inductor_configs["aot_inductor.use_runtime_constant_folding"] is True
        assert info.weights_replaceable is True
        assert all(s["ok"] for s in m.verification["aoti"][f"{mode}.aoti.pt2"].values())
    assert m.timing["seconds"]["aoti_compile"] > 0


@pytest.mark.parametrize("name", NAMES)
def test_aoti_engine_matches_eager_and_takes_new_weights(name, aoti_export):
    net, result = aoti_export
    runtime = load(result.directory, engine="aoti")
    assert torch.equal(runtime.get_params(), net.get_params())  # from a package of a mode with logits
    if "features" in MODES[name]:
        from export.formats.aoti import package_params

        with pytest.raises(ParamsError, match="holds 4 of the 6 parameters .* an 'out', 'both' or 'full' package"):
            package_params(result.directory / "features.aoti.pt2", result.manifest.flat_params.layout)
    for batch in (1, 5, 40):  # 40: above the wrong bound torch 2.14's input check would apply
        x = torch.randn(batch, *runtime.input_shape, generator=torch.Generator().manual_seed(batch))
        assert_runtime_matches_eager(runtime, net, x, MODES[name])
    # new weights through load_constants, no recompiling; BatchNorm's folded constants follow
    v = net.get_params()
    new = v * (1 + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(9)))
    runtime.set_params(new)
    eager = build_small(name)[0]
    eager.set_params(new)
    x = torch.randn(2, *runtime.input_shape, generator=torch.Generator().manual_seed(3))
    for mode in MODES[name]:
        with torch.no_grad():
            want = flat_outputs(eager(x, returnt=mode))
        for g, w in zip(flat_outputs(runtime(x, returnt=mode)), want):
            assert_within_bound(g.numpy(), w.numpy())
    assert torch.equal(runtime.get_params(), new)


_CHECKED_RUN = """
import sys, torch
model = torch._inductor.aoti_load_package(sys.argv[1])
for batch in (1, 16, 64):
    logits = model(torch.randn(batch, 3, 32, 32))[-1]  # 'full': the stages, features, logits
    print(batch, tuple(logits.shape))
"""


@pytest.mark.parametrize("name", ["resnet18"])
def test_input_check_keeps_the_exported_batch_range(name, aoti_export):
    """With AOTInductor's own input check on, the dynamic-batch package takes batch 16 and 64:
    before the compile suppressed the re-trace's guards, the check refused anything above 15
    (NNPACK's batch >= 16 heuristic, evaluated on the example batch of 2, narrowed the range)."""
    _, result = aoti_export
    env = {**os.environ, "AOTI_RUNTIME_CHECK_INPUTS": "1"}
    proc = subprocess.run([sys.executable, "-I", "-c", _CHECKED_RUN, str(result.directory / "full.aoti.pt2")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert proc.stdout.split() == ["1", "(1,", "10)", "16", "(16,", "10)", "64", "(64,", "10)"]


@pytest.mark.parametrize("name", ["resnet18"])
def test_fixed_batch_frozen_package(name, aoti_export, tmp_path):
    """--aoti-batch 2 --aoti-weights frozen: `out.aoti.b2.pt2` with oneDNN convolutions (BatchNorm
    and the residual adds fused into prepacked kernels), used at batch 2; other sizes are refused
    by name; its weights are fixed, and set_params, get_params and publish say so in one line."""
    import re
    import zipfile

    from tests.continual import task_checkpoints

    net, shape = build_small(name)
    result = export_backbone(net, tmp_path / "b2", modes=["out"], formats=["aoti"], input_shape=shape,
                             aoti_batches=[2], aoti_weights="frozen")
    assert result.ok and sorted(result.manifest.files) == ["out.aoti.b2.pt2"]
    info = result.manifest.programs["out.aoti.b2.pt2"]
    assert info.batch == 2 and info.dynamic == []  # H x W fixed too: the weights prepacked when compiling
    assert info.aoti_weights == "frozen" and info.weights_replaceable is False
    assert info.inductor_configs["freezing"] is True and info.inductor_configs["cpp.weight_prepack"] is True
    with zipfile.ZipFile(result.directory / "out.aoti.b2.pt2") as archive:
        code = "".join(archive.read(n).decode(errors="ignore") for n in archive.namelist() if n.endswith(".cpp"))
    kernels = re.findall(r"aoti_torch_cpu_(?:mkldnn__convolution_pointwise\w*|convolution)\b", code)
    assert kernels and all("mkldnn" in k for k in kernels), sorted(set(kernels))  # no generic aten conv left
    runtime = load(result.directory, engine="aoti")
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert_within_bound(runtime(x).numpy(), net(x).numpy())
    with pytest.raises(ValueError, match=r"batch 3: the 'out' packages .* were compiled for batch 2 only"):
        runtime(torch.randn(3, *shape))
    hw = "x".join(map(str, shape[1:]))
    with pytest.raises(ValueError, match=rf"input 40x48: the 'out' package out.aoti.b2.pt2 .* compiled for {hw} only"):
        runtime(torch.randn(2, shape[0], 40, 48))
    # no convolution weight is reordered per call: oneDNN's own log of a call after the first
    weights = {"x".join(map(str, m.weight.shape)) for m in net.modules() if isinstance(m, torch.nn.Conv2d)}
    probe = (f"import torch; m = torch._inductor.aoti_load_package({str(result.directory / 'out.aoti.b2.pt2')!r}); "
             f"x = torch.randn(2, *{shape!r}); m(x); print('second call', flush=True); m(x)")
    log = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ONEDNN_VERBOSE": "1"}).stdout
    assert "second call" in log and "exec,cpu,convolution" in log.split("second call")[1], log[-2000:]
    reordered = [line for line in log.split("second call")[1].splitlines()
                 if ",exec,cpu,reorder," in line and line.split(",")[-2] in weights]
    assert not reordered, reordered[:3]
    with pytest.raises(ParamsError, match=r"out.aoti.b2.pt2: compiled with --aoti-weights frozen .* "
                                          r"re-export with --aoti-weights replaceable"):
        runtime.set_params(net.get_params())
    with pytest.raises(ParamsError, match="compiled with --aoti-weights frozen, its weights are folded"):
        runtime.get_params()
    ckpt = task_checkpoints(tmp_path / "ckpts", name, 1, **result.manifest.backbone.args)[-1]
    assert main(["publish", str(result.directory), str(ckpt)]) != 0
    # loaded directly, the package checks its input (turned on by our loader, and by the C++ example)
    code = (f"import os, torch; os.environ['AOTI_RUNTIME_CHECK_INPUTS'] = '1'; "
            f"m = torch._inductor.aoti_load_package({str(result.directory / 'out.aoti.b2.pt2')!r}); "
            f"m(torch.randn(3, *{shape!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "expected: 2, but got: 3" in proc.stderr


@pytest.mark.parametrize("name", ["mnistmlp"])
def test_verify_rechecks_packages(name, aoti_export, capsys):
    _, result = aoti_export
    assert main(["verify", str(result.directory)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    aoti_rows = [r for r in rows if len(r) >= 6 and r[2] == "aoti" or r[1:3] == ["flat", "params"] and r[3] == "aoti"]
    # per package: its flat-parameter row and one row per output of its mode
    expected = sum(1 + len(result.manifest.modes[m].outputs) for m in MODES[name])
    assert len(aoti_rows) == expected and all(r[-1] == "ok" for r in aoti_rows), aoti_rows


@pytest.mark.parametrize("name", ["mnistmlp"])
def test_packages_load_without_the_zoo(name, aoti_export):
    _, result = aoti_export
    code = f"""
import sys, torch
m = torch._inductor.aoti_load_package({str(result.directory / "both.aoti.pt2")!r})
outs = m(torch.randn(3, 1, 28, 28))
assert len(outs) == 2 and outs[0].shape == (3, 10)
assert not any(k == "zoo" or k.startswith(("zoo.", "export")) for k in sys.modules), "zoo imported"
print("ok")
"""
    proc = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                          cwd=result.directory)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("name", ["mnistmlp"])
def test_tampered_or_foreign_packages_are_refused(name, aoti_export, tmp_path, capsys):
    _, result = aoti_export
    d = tmp_path / "copy"
    shutil.copytree(result.directory, d)
    target = d / "features.aoti.pt2"
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="features.aoti.pt2: sha256 does not match"):
        load(d, engine="aoti")
    shutil.copy(result.directory / "features.aoti.pt2", target)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["programs"]["both.aoti.pt2"]["torch"] = "2.13.0+cpu"
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"both.aoti.pt2: compiled with torch 2.13.0\+cpu, this is torch"):
        load(d, engine="aoti")
    # params write cannot rewrite compiled-in weights: one line saying what to do instead
    torch.save(torch.zeros(manifest["flat_params"]["count"]), tmp_path / "v.pt")
    assert main(["params", "write", str(result.directory / "features.aoti.pt2"), str(tmp_path / "v.pt"),
                 "--out", str(tmp_path / "x.aoti.pt2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "set_params" in err and "load_constants" in err


def test_missing_compiler_is_one_line(monkeypatch, tmp_path, capsys):
    from torch._inductor import config

    monkeypatch.setattr(config.cpp, "cxx", (None, "no-such-c++"))
    assert main(["mnistmlp", "--formats", "aoti", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "no compiler no-such-c++ was found: install g++" in err
    assert not (tmp_path / "mnistmlp").exists()


def test_aoti_batch_option_is_checked(tmp_path, capsys):
    for bad, message in (("0", "batch sizes go from 1 to 4096"), ("big", "expected batch sizes and/or 'dynamic'")):
        assert main(["mnistmlp", "--formats", "aoti", "--aoti-batch", bad, "--out", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err


def _cxx_build(tmp_path: Path) -> Path:
    """Build examples/cpp with its Makefile (g++ against the wheel's libtorch), unoptimised: the
    test checks what it computes, and -O0 compiles in ~25 s where -O2 takes ~31 s here."""
    missing = [tool for tool in ("g++", "make") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"the C++ example needs {' and '.join(missing)}: install them (apt install g++ make)")
    proc = subprocess.run(["make", "-C", str(REPO / "examples" / "cpp"), f"BUILD={tmp_path}",
                           f"PYTHON={sys.executable}", "CXXFLAGS=-O0"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / "run_model"


def test_cpp_example_matches_eager(aoti_root, tmp_path):
    """examples/cpp/run_model loads mnistmlp's out.aoti.pt2 and ResNet-18's full.aoti.pt2
    (AOTIModelPackageLoader; a tensor and a list) and mnistmlp's both.pt (torch::jit::load; a
    tuple) in C++ and writes outputs equal to eager's."""
    binary = _cxx_build(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "AOTI_RUNTIME_CHECK_INPUTS"}
    for name, file, mode in (("mnistmlp", "out.aoti.pt2", "out"), ("resnet18", "full.aoti.pt2", "full"),
                             ("mnistmlp", "both.pt", "both")):
        net, result = built(name, aoti_root)
        x = torch.randn(3, *result.manifest.input.shape[1:], generator=torch.Generator().manual_seed(1))
        torch.save(x, tmp_path / "input.pt")
        out = tmp_path / f"{file}.out.pt"
        proc = subprocess.run([str(binary), str(result.directory / file), str(tmp_path / "input.pt"), str(out)],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = torch.load(out, weights_only=True)
        with torch.no_grad():
            want = flat_outputs(net(x, returnt=mode))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_within_bound(g.numpy(), w.numpy())
    # a wrong batch for a fixed-size package, or a wrong file, fails with a message, not garbage
    proc = subprocess.run([str(binary), str(result.directory / "manifest.json"), str(tmp_path / "input.pt"),
                           str(tmp_path / "x.pt")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "expected a .aoti.pt2 or .pt file" in proc.stderr


@pytest.mark.parametrize("name", ["mnistmlp"])
def test_aoti_params_are_not_a_silent_no_op(name, aoti_export, tmp_path):
    """A package compiled without runtime constant folding has BatchNorm's parameters folded into
    other constants: it is detected as not replaceable, and the engine refuses set_params in one
    line instead of silently keeping the old weights."""
    from export.formats.aoti import AOTI_CONFIGS, compile_package, replaceable_weights

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].running_var.uniform_(0.5, 1.5)
    program = torch.export.export(net, (torch.randn(2, 3, 8, 8),))
    frozen = {k: v for k, v in AOTI_CONFIGS["replaceable"].items() if k != "aot_inductor.use_runtime_constant_folding"}
    data, _ = compile_package(program, {}, configs=frozen)
    assert replaceable_weights(program, data) is False
    # the engine refuses set_params for a directory whose package is recorded so
    net, result = aoti_export
    d = tmp_path / "copy"
    shutil.copytree(result.directory, d)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["programs"]["features.aoti.pt2"]["weights_replaceable"] = False
    (d / "manifest.json").write_text(json.dumps(manifest))
    runtime = load(d, engine="aoti")
    with pytest.raises(ParamsError, match="features.aoti.pt2: inductor folded parameters .* cannot be replaced"):
        runtime.set_params(net.get_params() * 2)
    assert torch.equal(runtime.get_params(), net.get_params())


@pytest.mark.parametrize("name", ["resnet18"])
def test_a_published_version_runs_in_the_packages(name, aoti_export, tmp_path):
    """A task's checkpoint published into a directory with packages: verified in a fresh process
    with its parameters and BatchNorm statistics loaded as constants; the aoti engine runs it."""
    from export.pipeline.checkpoint import read_checkpoint
    from export.store.manifest import read_manifest
    from tests.continual import task_checkpoints

    net, result = aoti_export
    target = tmp_path / name
    shutil.copytree(result.directory, target)
    ckpt = task_checkpoints(tmp_path / "ckpts", name, 2, **result.manifest.backbone.args)[-1]
    assert main(["publish", str(target), str(ckpt)]) == 0
    verification = read_manifest(target).weight_versions["1"].verification
    assert "full.aoti.pt2" in verification
    eager = build_small(name)[0]
    eager.load_state_dict(read_checkpoint(ckpt).state_dict)
    runtime = load(target, engine="aoti", version=1)
    x = torch.randn(3, *runtime.input_shape, generator=torch.Generator().manual_seed(4))
    assert_runtime_matches_eager(runtime, eager.eval(), x, MODES[name])


def test_compiling_logs_no_cuda_noise():
    """`--formats aoti` on a machine without CUDA: inductor's import of cpp_extension logged "No
    CUDA runtime is found" (a warning no user can act on); the compiler check imports it quietly
    first, so the import inductor makes while compiling says nothing."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: torch logs no 'No CUDA runtime is found' to silence")
    code = ("from export.formats.aoti import check_compiler; check_compiler(); "
            "import torch.utils.cpp_extension; print('imported')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr
    assert "CUDA" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("name", ["mnistmlp"])
def test_loading_a_package_logs_no_cuda_noise(name, aoti_export):
    """The aoti engine on a machine without CUDA: aoti_load_package imports cpp_extension too."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: torch logs no 'No CUDA runtime is found' to silence")
    _, result = aoti_export
    code = (f"import torch; from export.runtime import load; "
            f"print(tuple(load({str(result.directory)!r}, engine='aoti')(torch.zeros(2, 1, 28, 28)).shape))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "(2, 10)", proc.stderr
    assert "CUDA" not in proc.stderr, proc.stderr


def test_a_frozen_size_goes_to_the_any_batch_package_elsewhere():
    """The aoti engine's choice, without compiling: a frozen batch-2 package (H x W fixed at
    32x32) runs batch 2 at 32x32 only; other sizes go to the any-batch package when there is one,
    and are refused by size when there is not; a replaceable batch-2 package takes any H x W."""
    from types import SimpleNamespace

    from export.runtime.torch_engines import AotiBackbone

    def engine(packages, dynamic):
        programs = {name: SimpleNamespace(dynamic=dynamic) for name in packages.values()}
        manifest = SimpleNamespace(programs=programs, input=SimpleNamespace(shape=["batch", 3, 32, 32]))
        fake = SimpleNamespace(packages={"out": packages}, manifest=manifest, directory="d")
        fake._export_hw = lambda: AotiBackbone._export_hw(fake)
        return lambda batch, hw: AotiBackbone.package_name(fake, "out", batch, hw)

    both = engine({None: "out.aoti.pt2", 2: "out.aoti.b2.pt2"}, [])
    assert both(2, (32, 32)) == "out.aoti.b2.pt2"
    assert both(2, (40, 48)) == "out.aoti.pt2" and both(3, (32, 32)) == "out.aoti.pt2"
    alone = engine({2: "out.aoti.b2.pt2"}, [])
    with pytest.raises(ValueError, match="input 40x48: the 'out' package out.aoti.b2.pt2 of d was compiled for 32x32"):
        alone(2, (40, 48))
    replaceable = engine({2: "out.aoti.b2.pt2"}, ["height", "width"])
    assert replaceable(2, (40, 48)) == "out.aoti.b2.pt2"
