"""TorchScript (`<mode>.pt`): `torch.jit.script` of each fixed head, saved with `torch.jit.save`,
loadable with `torch.jit.load` (and LibTorch) without the zoo; the scripted head carries
`get_params`/`set_params` of its own."""

import hashlib
import io
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import torch
from torch import Tensor, nn

from export.errors import ParamsError
from export.formats.base import Format, Layout, Source
from export.store.atomic import atomic_path
from export.store.flat_vector import Buffers, check_params_vector, prefixed_buffers
from export.store.manifest import ARTIFACT_SUFFIX, refuse_export_file


@contextmanager
def jit_deprecations_silenced() -> Iterator[None]:
    """torch 2.14 deprecates torch.jit (script, save, load, freeze) in favour of torch.export; we
    still ship TorchScript, which users load with torch.jit.load, so exactly those warnings are
    silenced, only where we call them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def script(head: nn.Module) -> torch.jit.ScriptModule:
    """The scripted head (the pipeline builds it, in eval)."""
    with jit_deprecations_silenced():
        return torch.jit.script(head)


def save_torchscript(module: torch.jit.ScriptModule, path) -> None:
    """torch.jit.save, made reproducible. Saved through a buffer: the zip's top folder is named
    after the file, and a temporary name would make it random."""
    buffer = io.BytesIO()
    with jit_deprecations_silenced():
        torch.jit.save(module, buffer)
    Path(path).write_bytes(reproducible_archive(buffer.getvalue()))


def load_torchscript(source: Source, device: str = "cpu") -> torch.jit.ScriptModule:
    """`torch.jit.load` of a path or of bytes already checked against the manifest."""
    with jit_deprecations_silenced():
        return torch.jit.load(io.BytesIO(source) if isinstance(source, bytes) else str(source),
                              map_location=device)


def reproducible_archive(data: bytes) -> bytes:
    """The same TorchScript archive, byte-reproducible and free of the build machine's paths.

    `torch.jit.save` adds `*.debug_pkl` files (source ranges naming the absolute path of every
    source file, e.g. /home/me/zoo/heads.py) and `.data/serialization_id` (drawn from the RNG).
    The debug files are dropped (only error messages' source lines need them; the code, the
    weights and every method stay) and the id becomes a digest of the archive's content.
    """
    source = zipfile.ZipFile(io.BytesIO(data))
    entries = [(i.filename, source.read(i.filename)) for i in source.infolist()
               if not i.filename.endswith(".debug_pkl")]
    digest = hashlib.sha256()
    for name, content in entries:
        if not name.endswith("/.data/serialization_id"):
            digest.update(name.encode() + b"\0" + content)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, content in entries:
            if name.endswith("/.data/serialization_id"):
                content = str(int(digest.hexdigest()[:32], 16)).encode()
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), content)
    return out.getvalue()


def _write(head: nn.Module, path: Path) -> Optional[Dict[str, Any]]:
    save_torchscript(script(head), path)
    return None


def _load(source: Source, device: str = "cpu") -> Callable[[Tensor], Any]:
    module = load_torchscript(source, device)
    return lambda x: module(x.to(device))


def set_module_state(module: torch.jit.ScriptModule, vector: Tensor, buffers: Optional[Buffers] = None) -> None:
    """`vector` through the module's own `set_params`, and the buffers it holds (BatchNorm's
    running statistics) copied in place; buffers it does not hold are not read by it."""
    module.set_params(vector.detach().cpu().to(_device_of(module)))
    wanted = prefixed_buffers(buffers)
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in wanted and buf.is_floating_point():
                buf.copy_(wanted[name].reshape(buf.shape))


def _device_of(module: torch.jit.ScriptModule) -> torch.device:
    return next(iter(module.parameters()), torch.empty(0)).device


def _read_params(path: Path, layout: Layout) -> Tensor:
    return load_torchscript(path).get_params().cpu()


def _write_params(path: Path, vector: Tensor, out: Path, layout: Layout, allow_nonfinite: bool = False) -> Path:
    """A copy of the TorchScript file with `vector` through its own `set_params`."""
    path, out = Path(path), Path(out)
    if out.resolve() == path.resolve():
        raise ParamsError(f"{out}: write to a new file; overwriting an exported artifact would "
                          "break its sha256 in the manifest")
    refuse_export_file(out)
    check_params_vector(vector, layout, allow_nonfinite)
    module = load_torchscript(path)
    module.set_params(vector.detach().cpu())
    with atomic_path(out) as tmp:
        save_torchscript(module, tmp)
    return out


FORMAT = Format("torchscript", ARTIFACT_SUFFIX["torchscript"], _write, _load, _read_params, _write_params)
