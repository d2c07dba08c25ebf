"""Real inputs for calibration and accuracy: tensors in a file (.npy, .pt) or an image folder
(torchvision's ImageFolder layout, `DIR/<class>/<image>`), resized to the export's input size
and normalised as the model was trained."""

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from export.errors import ExportError, first_line
from export.pipeline.params import TENSOR_SUFFIXES, load_tensor
from export.store.manifest import Manifest


def check_inputs(x: np.ndarray, manifest: Manifest, source: str) -> np.ndarray:
    """[N, C, H, W] float inputs that fit the export (H, W free where the graphs allow)."""
    if not np.issubdtype(x.dtype, np.floating):
        raise ExportError(f"{source}: inputs of dtype {x.dtype}; expected floating point images")
    problem = manifest.input_shape_problem(x.shape)
    if problem:
        raise ExportError(f"{source}: inputs of {problem}")
    return np.ascontiguousarray(x, dtype=np.float32)


def normalisation(manifest: Manifest, mean: Optional[str], std: Optional[str]):
    """(mean, std) to apply to [0, 1] images, or None when the graphs take [0, 1] images
    themselves (preprocessing baked in). From --mean/--std, else the manifest's preprocessing;
    neither is an error naming both ways."""
    from export.pipeline.preprocessing import resolve

    channels = int(manifest.input.shape[1])
    given = resolve(channels, None, mean, std)
    if given is not None:
        return given.mean, given.std
    prep = manifest.preprocessing or {}
    if prep.get("baked"):
        return None
    if prep.get("mean"):
        return tuple(prep["mean"]), tuple(prep["std"])
    raise ExportError("images need the normalisation the model was trained with: give --mean and --std "
                      "(or export with --dataset/--mean/--std so the manifest records it)")


def load_image_folder(path: Path, shape: Sequence[int], norm, limit: Optional[int] = None
                      ) -> Tuple[np.ndarray, np.ndarray, Sequence[str]]:
    """Images (sorted by class, then name) as [N, C, H, W] at the export's size, with their
    class indices and the class names."""
    from torchvision import datasets, transforms

    c, h, w = (int(d) for d in shape)
    steps = [transforms.Grayscale(1) if c == 1 else transforms.Lambda(lambda im: im.convert("RGB")),
             transforms.Resize((h, w)), transforms.ToTensor()]
    if norm is not None:
        steps.append(transforms.Normalize(norm[0], norm[1]))
    try:
        folder = datasets.ImageFolder(str(path), transform=transforms.Compose(steps))
    except (FileNotFoundError, RuntimeError) as exc:
        raise ExportError(f"{path}: no images ({first_line(exc)}); expected "
                          f"{path}/<class>/<image>.png|jpg") from None
    count = len(folder) if limit is None else min(limit, len(folder))
    if limit is not None and count < len(folder):  # an even spread over the classes
        picks = np.linspace(0, len(folder) - 1, count).round().astype(int)
    else:
        picks = np.arange(count)
    images = [folder[int(i)] for i in picks]
    x = np.stack([im.numpy() for im, _ in images]).astype(np.float32)
    y = np.array([label for _, label in images], dtype=np.int64)
    return x, y, folder.classes


def load_inputs(source: Path, manifest: Manifest, mean: Optional[str] = None, std: Optional[str] = None,
                limit: Optional[int] = None) -> Tuple[np.ndarray, Optional[np.ndarray], str]:
    """Inputs (and, for an image folder, labels) from a tensor file or an image folder, checked
    against the export's input; a description for the manifest."""
    source = Path(source)
    shape = manifest.input.shape[1:]
    if source.is_dir():
        x, y, classes = load_image_folder(source, shape, normalisation(manifest, mean, std), limit)
        return check_inputs(x, manifest, str(source)), y, f"images: {source.name} ({len(classes)} classes)"
    if source.suffix not in TENSOR_SUFFIXES:
        raise ExportError(f"{source}: expected an image folder or a tensor file "
                          f"({', '.join(TENSOR_SUFFIXES)})")
    x = load_tensor(source)
    x = check_inputs(x, manifest, str(source))
    return (x if limit is None else x[:limit]), None, f"tensors: {source.name}"


def load_labels(path: Path, count: int) -> np.ndarray:
    """Integer class labels, one per input."""
    y = load_tensor(path, "labels")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ExportError(f"labels {path}: expected a 1-D integer array, got shape {list(y.shape)} {y.dtype}")
    if len(y) != count:
        raise ExportError(f"labels {path}: {len(y)} labels for {count} inputs; expected one per input")
    return y.astype(np.int64)
