"""The codebase's structure: registration by import, no import cycles, no references to files
outside the repository, every module importable on its own."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

MODULES = sorted(
    ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    for package in ("zoo", "export") for p in (REPO / package).rglob("*.py")
)


def _lint_imports(root) -> subprocess.CompletedProcess:
    """import-linter's contracts (pyproject.toml) on the packages under `root`."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--no-cache", "--no-logo",
                           "--config", str(root / "pyproject.toml")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_layers_hold():
    proc = _lint_imports(REPO)
    assert proc.returncode == 0 and "3 kept, 0 broken" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("module, line, broken", [
    ("export/store/atomic.py", "import export.cli", "layers import only downward"),
    ("export/formats/onnx.py", "from export.formats.program import load_program", "never imports another format"),
    ("zoo/registry.py", "import zoo.backbones.resnet", "imports no backbone family"),
])
def test_an_import_against_the_plan_breaks_the_contract(tmp_path, module, line, broken):
    """The contracts can fail: one upward, sideways or family import in a copy of the tree."""
    for part in ("export", "zoo"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    proc = _lint_imports(tmp_path)
    assert proc.returncode == 1 and "1 broken" in proc.stdout and broken in proc.stdout.replace("\n", " "), \
        proc.stdout + proc.stderr


def test_registry_is_complete_after_import_zoo():
    """`import zoo` loads no torch; the first lookup, by any import path, loads every family."""
    from zoo import list_backbones

    for code in ("import sys, zoo; assert 'torch' not in sys.modules; print(len(zoo.REGISTRY.names()))",
                 "from zoo.registry import list_backbones as names; print(len(names()))",
                 "from zoo.registry import get_backbone as get; get('mnistmlp', num_classes=3); "
                 "from zoo import REGISTRY; print(len(REGISTRY.entries))"):
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0 and int(proc.stdout) == len(list_backbones()) >= 19, (code, proc.stderr)


def test_a_family_name_registered_first_is_refused_at_once():
    code = ("from zoo.registry import register_backbone\n"
            "try:\n    register_backbone('resnet18')(lambda num_classes: None)\n"
            "except ValueError as e:\n    print(e)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.stdout.strip() == "backbone 'resnet18' is already registered", proc.stdout + proc.stderr


#: imports every project module as the first project import of a forked child: the heavy
#: third-party libraries are loaded once in the parent, the project's modules never are
IMPORT_EACH_ALONE = """
import os, sys, traceback
import numpy, torch, torchvision, onnx, onnxruntime, onnxscript  # noqa: F401 (shared, loaded once)
failed = []
for module in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(module)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed.append(module)
print(",".join(failed))
"""


def test_every_module_imports_alone():
    """Each module as the first import of the project in a fresh process: a cycle breaks here."""
    assert len(MODULES) > 20
    proc = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, *MODULES], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr[-3000:]


def test_no_comment_points_outside_the_repository():
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in [*REPO.glob("zoo/**/*.py"), *REPO.glob("export/**/*.py"),
                                                        *REPO.glob("tests/*.py")]
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "SPEC " + "§" in line or "SPEC" + ".md" in line]
    assert offenders == []


def test_zoo_and_the_export_cli_do_not_import_ray():
    """Serving is an extra: importing the library, its CLI and its runtime, and running a
    command's --help, loads no Ray."""
    code = ("import sys, zoo, export.cli, export.runtime, export.pipeline.build, export.serving.oip, "
            "export.serving.triton, export.serving.loadtest, export.serving.config, export.tools.bench\n"
            "from export.cli import main\n"
            "try:\n    main(['verify', '--help'])\nexcept SystemExit as e:\n    print('exit', e.code)\n"
            "print('ray imported' if 'ray' in sys.modules else 'no ray')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "usage: python -m export verify" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("exit 0\nno ray"), proc.stdout + proc.stderr


def test_every_import_is_a_declared_dependency():
    """Each third-party package the zoo and the tool import is named in pyproject.toml (the
    dependencies or an extra), not only installed as something else's dependency."""
    import ast
    import importlib.metadata as metadata
    import re

    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    declared = {norm(re.match(r"[A-Za-z0-9_.-]+", r).group(0)) for r in requirements}
    distributions = metadata.packages_distributions()
    undeclared = {}
    for path in [*REPO.glob("zoo/**/*.py"), *REPO.glob("export/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in (n.split(".")[0] for n in names):
                if name in sys.stdlib_module_names or name in ("zoo", "export"):
                    continue
                if not {norm(d) for d in distributions.get(name, [name])} & declared:
                    undeclared.setdefault(name, str(path.relative_to(REPO)))
    assert undeclared == {}, f"imported but not declared in pyproject.toml: {undeclared}"
