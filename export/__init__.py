"""returnt-zoo's export tool: every `returnt` mode of a backbone as verified deployable files.

The public API (everything else is private by convention):

    from export import export_backbone, load, verify, read_params, write_params
    result = export_backbone(net, "artifacts/resnet")      # files + manifest.json, each verified
    runtime = load("artifacts/resnet")                       # onnxruntime; engine=... for others
    logits, feats = runtime(x, returnt="both")
    report = verify("artifacts/resnet")                      # hashes, layout, eager vs every file

The package is layered, each layer importing only the ones below it (enforced by the
import-linter contract in pyproject.toml): cli -> serving, tools -> runtime -> pipeline ->
formats -> store -> zoo. Names load on first use: `import export` loads no torch.
"""

import importlib
from typing import Any

#: public name -> the module that defines it
_PUBLIC = {
    "export_backbone": "export.pipeline.build",
    "ExportResult": "export.pipeline.build",
    "load": "export.runtime",
    "verify": "export.pipeline.verify",
    "read_params": "export.pipeline.params",
    "write_params": "export.pipeline.params",
    "ExportError": "export.errors",
    "ManifestError": "export.errors",
    "IntegrityError": "export.errors",
    "LockedError": "export.errors",
    "DiskFullError": "export.errors",
    "ParamsError": "export.errors",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), "verify_directory" if name == "verify" else name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'export' has no attribute {name!r}")
