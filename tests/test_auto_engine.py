"""load(DIR) picks the engine `python -m export bench DIR --save` measured fastest on this CPU,
among the precision asked for, and says which and why."""

import json
import shutil

import pytest

from export.cli import main
from export.errors import ExportError
from export.runtime import load
from export.runtime.cpu import cpu_name
from export.runtime.openvino_engine import cpu_supports_bf16
from export.store.manifest import read_manifest
from tests.conftest import backbone_params


@pytest.mark.parametrize("name", backbone_params("mnistmlp"))
def test_bench_save_records_the_fastest_engine_and_auto_uses_it(name, export, tmp_path, capsys):
    _, result = export
    d = tmp_path / name
    shutil.copytree(result.directory, d)
    files = {p.name: p.read_bytes() for p in d.iterdir() if p.name != "manifest.json"}
    assert main(["bench", str(d), "--save", "--batches", "1,2", "--seconds", "0.2", "--rounds", "1",
                 "--threads", "1", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "b.json").read_text())
    measured = {r["runtime"] for r in report["results"]}
    assert {"onnxruntime-fp32", "torchscript-fp32", "exported-fp32"} <= measured
    choice = read_manifest(d).engine_choice[cpu_name()]["fp32"]
    # the recorded engine is the one with the best geometric-mean speed in the report
    assert choice["engine"] == report["fastest"]["fp32"]["engine"] and choice["speedup"] >= 1.0
    assert choice["date"] and choice["commit"] and choice["batches"] == [1, 2]
    assert f"now uses {choice['engine']} for fp32" in out and "measured on" in out.splitlines()[0]
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.name != "manifest.json"} == files
    net = load(d)
    assert net.engine == choice["engine"]
    assert net.auto_choice.startswith(f"{choice['engine']}: the fastest fp32 engine measured on {cpu_name()}")
    assert "auto=" in repr(net)


@pytest.mark.parametrize("name", backbone_params("mnistmlp"))
def test_auto_falls_back_and_says_so(name, export, tmp_path, capsys):
    _, result = export
    d = tmp_path / name
    shutil.copytree(result.directory, d)
    net = load(d)  # no record: onnxruntime, and the repr says why
    assert net.engine == "onnxruntime" and "no bench record for fp32" in net.auto_choice
    manifest = json.loads((d / "manifest.json").read_text())
    record = {"engine": "torchscript", "speedup": 1.5, "reference": "onnxruntime", "date": "2026-12-03",
              "commit": "x", "threads": 1, "batches": [1], "median_ms": {"1": 1.0}}
    manifest["engine_choice"] = {cpu_name(): {"fp32": record},
                                 "Another CPU (avx512f)": {"fp32": {**record, "engine": "exported"}}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    assert load(d).engine == "torchscript"  # this CPU's record, not another's
    assert load(d, engine="onnxruntime").auto_choice is None  # a named engine is used as named
    # never another precision: int8 asked, no int8 record and no int8 files -> onnxruntime int8 refuses
    with pytest.raises(ExportError):
        load(d, precision="int8")
    # a recorded engine that cannot run now (its files are gone): onnxruntime, said
    manifest["engine_choice"][cpu_name()]["fp32"]["engine"] = "executorch"
    (d / "manifest.json").write_text(json.dumps(manifest))
    net = load(d)
    assert net.engine == "onnxruntime" and "executorch was measured fastest here" in net.auto_choice
    if not cpu_supports_bf16():
        with pytest.raises(ExportError, match="no bf16 support"):
            load(d, precision="bf16")
    with pytest.raises(ExportError, match="unknown precision 'fp8'"):
        load(d, precision="fp8")
    assert main(["bench", "--save"]) == 2
    assert "give one (python -m export bench DIR --save)" in capsys.readouterr().err
