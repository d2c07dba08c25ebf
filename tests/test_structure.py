"""The codebase's structure: registration by import, no import cycles, no references to files
outside the repository, every module importable on its own."""

import ast
import subprocess
import sys

from tests.conftest import REPO

MODULES = sorted(
    ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    for package in ("zoo", "export") for p in (REPO / package).rglob("*.py")
)


def _imports(path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_registry_imports_no_family():
    imported = _imports(REPO / "zoo" / "registry.py")
    assert not any(n.startswith("zoo.backbones") for n in imported), imported


def test_library_never_imports_its_cli():
    for path in [*(REPO / "export").rglob("*.py"), *(REPO / "zoo").rglob("*.py")]:
        if path.name not in ("cli.py", "__main__.py"):
            assert "export.cli" not in _imports(path), path


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
    """Serving is an extra: importing the library, its CLI and its runtime loads no Ray."""
    code = ("import sys, zoo, export.cli, export.runtime, export.core, export.oip, export.triton_repo; "
            "from export.cli import main; main(['verify', '--help'])")
    proc = subprocess.run([sys.executable, "-c", code + "\n", "x"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    check = subprocess.run([sys.executable, "-c", "import sys, zoo, export.cli, export.runtime, export.core, "
                            "export.oip, export.triton_repo, export.loadtest; print('ray' in sys.modules)"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and check.stdout.strip() == "False", proc.stderr + check.stderr
