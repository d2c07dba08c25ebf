"""`python -m zoo list`'s cache: answered without torch when valid, rebuilt whenever what the
table depends on changes, never a traceback for a bad cache file."""

import json
import os
import shutil
import subprocess
import sys

from tests.conftest import REPO
from zoo import listing
from zoo.__main__ import main as zoo_main
from zoo.listing import CACHE_ENV, table_key

#: the list command run in this process, then whether it imported torch
LIST_AND_REPORT_TORCH = ("import sys; from zoo.__main__ import main; code = main(sys.argv[1:]); "
                         "print('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr); "
                         "sys.exit(code)")


def _list(cache_dir, *args):
    env = {**os.environ, CACHE_ENV: str(cache_dir)}
    return subprocess.run([sys.executable, "-c", LIST_AND_REPORT_TORCH, "list", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


def test_second_run_answers_from_the_cache_without_torch(tmp_path):
    first = _list(tmp_path, "resnet1*", "mnist*")
    assert first.returncode == 0 and "torch imported" in first.stderr, first.stderr
    assert "params: 11,173,962" in first.stdout and "mnistmlp  (" in first.stdout
    again = _list(tmp_path, "resnet1*", "mnist*")
    assert again.returncode == 0 and again.stderr.strip() == "no torch", again.stderr
    assert again.stdout == first.stdout
    names = _list(tmp_path, "--names")  # every registered name is cached from the first run
    assert names.stderr.strip() == "no torch" and "vit" in names.stdout.split()
    missing = _list(tmp_path, "nothing*")
    assert missing.returncode == 2 and "no backbone matches ['nothing*']; registered: efficientnet" in missing.stderr
    assert "no torch" in missing.stderr


def test_a_cache_of_other_sources_or_versions_is_not_used(tmp_path, monkeypatch, capsys):
    data = {"key": "0" * 64, "names": ["resnet18"], "blocks": {"resnet18": "resnet18  (stale)"}}
    (tmp_path / "list.json").write_text(json.dumps(data))
    proc = _list(tmp_path, "resnet18")
    assert proc.returncode == 0 and "stale" not in proc.stdout and "params: 11,173,962" in proc.stdout
    assert json.loads((tmp_path / "list.json").read_text())["key"] != "0" * 64
    # the command in this process (torch is loaded here already: a new interpreter adds only its start)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    for bad in ("{not json", "[1, 2]", '{"key": null}', ""):
        (tmp_path / "list.json").write_text(bad)
        assert zoo_main(["list", "resnet18"]) == 0, bad
        captured = capsys.readouterr()
        assert "params: 11,173,962" in captured.out and captured.err == "", (bad, captured.err)
        assert json.loads((tmp_path / "list.json").read_text())["key"] == table_key()  # rewritten
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # the cache directory cannot be made: the table is still printed
    monkeypatch.setenv(CACHE_ENV, str(blocked))
    assert zoo_main(["list", "resnet18"]) == 0
    captured = capsys.readouterr()
    assert "params: 11,173,962" in captured.out and captured.err == ""


def test_the_key_follows_every_source_byte_and_the_versions(tmp_path, monkeypatch):
    copy = tmp_path / "zoo"
    shutil.copytree(REPO / "zoo", copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(listing, "ZOO_DIR", copy)
    key = table_key()
    assert key == table_key()
    source = copy / "backbones" / "resnet.py"
    source.write_bytes(source.read_bytes().replace(b"num_filters: int = 64", b"num_filters: int = 32"))
    changed = table_key()
    assert changed != key
    (copy / "backbones" / "extra.py").write_text("")
    assert table_key() != changed
    real = listing.metadata.version
    monkeypatch.setattr(listing.metadata, "version", lambda d: "0.0" if d == "torchvision" else real(d))
    assert table_key() not in (key, changed)


def test_the_cache_directory_defaults_to_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert listing.cache_path() == tmp_path / "xdg" / "returnt-zoo" / "list.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert listing.cache_path() == tmp_path / ".cache" / "returnt-zoo" / "list.json"
