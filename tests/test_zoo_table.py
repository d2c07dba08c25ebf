"""The generated zoo table (docs/zoo.md, docs/zoo.csv): its static columns are the registry's,
so it cannot drift, and `zoo-table` measures what it writes."""

import csv

import pytest

from export.cli import main
from export.tools.zoo_table import COLUMNS, STATIC, csv_text, static_row
from tests.conftest import REPO
from zoo.registry import REGISTRY

TABLE = REPO / "docs" / "zoo.csv"


def _rows(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_static_columns_match_the_registry():
    """Names (every registered backbone, in registry order), arguments, input, parameter count
    and formats of each row are what the registry says now; regenerate with `make zoo-table`
    (or `python -m export zoo-table --names NAME` for one) when they differ."""
    rows = _rows(TABLE)
    assert [r["backbone"] for r in rows] == REGISTRY.names(), "docs/zoo.csv does not list the registry"
    for row in rows:
        assert {k: row[k] for k in STATIC} == static_row(row["backbone"]), row["backbone"]
    markdown = (REPO / "docs" / "zoo.md").read_text()
    for row in rows:
        assert f"| `{row['backbone']}` | {row['arguments']} | {row['input']} | {int(row['params']):,} |" in markdown


def test_measured_columns_are_measurements():
    """Every row was measured (no blanks): the formats it has carry an error within the bound,
    the ones it lacks a dash; times are positive; the machine is named with its flags."""
    for row in _rows(TABLE):
        for fmt in ("torchscript", "onnx", "exported"):
            value = row[f"max_err_{fmt}"]
            if fmt in row["formats"].split(","):
                assert 0 <= float(value) < 1e-2, (row["backbone"], fmt, value)
            else:
                assert value == "-", (row["backbone"], fmt)
        assert float(row["export_s"]) > 0 and float(row["ort_bs1_ms"]) > 0
        assert float(row["ort_bs64_ms"]) > float(row["ort_bs1_ms"]), row["backbone"]
        assert float(row["gmacs"]) > 0 and "(" in row["measured_on"]


def test_a_limited_run_replaces_its_rows_and_keeps_the_others(tmp_path, capsys):
    md, table = tmp_path / "zoo.md", tmp_path / "zoo.csv"
    kept = {**static_row("resnet32"), "gmacs": "1", "export_s": "9", "ort_bs1_ms": "1", "ort_bs64_ms": "2",
            "measured_on": "Another CPU (avx512f)", "date": "2026-01-01"}
    gone = {**kept, "backbone": "no-longer-registered"}
    table.write_text(csv_text([kept, gone]))
    assert main(["zoo-table", "--names", "mnist*", "--md", str(md), "--csv", str(table)]) == 0
    rows = {r["backbone"]: r for r in _rows(table)}
    assert list(rows) == ["mnistmlp", "resnet32"] and list(_rows(table)[0]) == list(COLUMNS)
    assert rows["resnet32"]["measured_on"] == "Another CPU (avx512f)"
    mlp = rows["mnistmlp"]
    assert float(mlp["export_s"]) > 0 and float(mlp["ort_bs1_ms"]) > 0 and float(mlp["max_err_onnx"]) < 1e-4
    assert mlp["params"] == "89610" and mlp["formats"] == "torchscript,onnx,exported"
    text = md.read_text()
    assert "Another CPU (avx512f)" in text and mlp["measured_on"] in text


def test_no_match_is_one_line(capsys, tmp_path):
    assert main(["zoo-table", "--names", "nothing*", "--csv", str(tmp_path / "z.csv")]) == 2
    err = capsys.readouterr().err
    assert "--names nothing*: no registered backbone matches" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["timm-vit-base-patch16-224", "resnet32"])
def test_static_row_describes_the_backbone(name):
    row = static_row(name)
    assert ("torchscript" in row["formats"]) == (not name.startswith("timm"))
    assert row["input"].startswith("3x") and int(row["params"]) > 0
