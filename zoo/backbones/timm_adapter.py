"""timm classifiers as backbones with all four returnt modes (the `timm` extra).

timm's `forward_intermediates(x)` returns the final feature map and every stage's output (ViTs:
each block's tokens as an NCHW map, prefix tokens dropped; CNNs: each stage); its
`forward_head(final, pre_logits=True)` pools to the vector its classifier reads. So `'full'` is
`[stage_0..stage_k, features, logits]` from one pass, stages described by `feature_info`
(module, channels, reduction). Registered as `timm --model NAME` for any timm model whose class
has `forward_intermediates`, and as `timm-<name>` for a curated set. Random weights, or a local
timm weights file (`weights=PATH`, `.safetensors` or `.pth`); never a download.
"""

import difflib
import importlib
from functools import lru_cache
from typing import Any, Dict, List, Tuple, Union

import torch
from torch import Tensor, nn

from zoo.base import MammothBackbone, Stage
from zoo.registry import register_backbone, register_presets
from zoo.weights import load_pretrained

#: registered name -> timm model: what continual-learning and deployment users pick (ViT-B/16 is
#: the backbone of the prompt methods L2P, DualPrompt and CODA-Prompt)
CURATED: Dict[str, str] = {
    "timm-vit-base-patch16-224": "vit_base_patch16_224",
    "timm-vit-small-patch16-224": "vit_small_patch16_224",
    "timm-deit-tiny-patch16-224": "deit_tiny_patch16_224",
    "timm-convnext-tiny": "convnext_tiny",
    "timm-efficientnet-b0": "efficientnet_b0",
    "timm-mobilenetv3-large-100": "mobilenetv3_large_100",
    "timm-regnetx-002": "regnetx_002",
    "timm-resnet50": "resnet50",
}

#: formats a timm backbone is not exported to, and why (the export tool reads this)
UNSUPPORTED_FORMATS: Dict[str, str] = {
    "torchscript": "timm's forward_intermediates does not script (its Union return and tuple "
                   "slicing; timm 1.0.31); use the ONNX file or the torch.export program",
}


def _timm():
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise ImportError("timm backbones need timm: pip install 'returnt-zoo[timm]' "
                          "(timm==1.0.31)") from None


@lru_cache(maxsize=1)
def intermediate_families() -> Tuple[str, ...]:
    """timm's model modules (vision_transformer, convnext, ...) with a class that defines
    `forward_intermediates`: the models `timm --model` takes."""
    timm = _timm()
    families = []
    for module_name in timm.list_modules():
        module = importlib.import_module(f"timm.models.{module_name}")
        if any(isinstance(v, type) and issubclass(v, nn.Module) and "forward_intermediates" in vars(v)
               for v in vars(module).values()):
            families.append(module_name)
    return tuple(sorted(families))


def _build(model: str, num_classes: int) -> nn.Module:
    timm = _timm()
    if not timm.is_model(model):
        close = difflib.get_close_matches(model, timm.list_models(), n=5, cutoff=0.6)
        raise ValueError(f"{model!r} is not a timm model" + (f"; did you mean: {', '.join(close)}?" if close else "")
                         + " (see timm.list_models())")
    # pretrained=False: timm would otherwise download from the Hugging Face hub
    net = timm.create_model(model, pretrained=False, num_classes=num_classes)
    if not hasattr(net, "forward_intermediates"):
        family = type(net).__module__.split(".")[-1]
        raise ValueError(f"timm model {model!r} ({type(net).__name__}, timm.models.{family}) "
                         f"has no forward_intermediates; timm --model takes models of: "
                         f"{', '.join(intermediate_families())}")
    return net


def data_config(net: nn.Module) -> Dict[str, Any]:
    """timm's own data config of the model: mean, std, input size, interpolation, crop."""
    cfg = _timm().data.resolve_model_data_config(net)
    return {"mean": tuple(float(v) for v in cfg["mean"]), "std": tuple(float(v) for v in cfg["std"]),
            "input_size": tuple(int(v) for v in cfg["input_size"]),
            "interpolation": str(cfg.get("interpolation", "")), "crop_pct": float(cfg.get("crop_pct", 1.0)),
            "crop_mode": str(cfg.get("crop_mode", "center"))}


class TimmBackbone(MammothBackbone):
    """A timm classifier whose `'full'` output comes from `forward_intermediates`."""

    unsupported_formats = UNSUPPORTED_FORMATS

    def __init__(self, model: Union[str, nn.Module], num_classes: int = 10, weights: str = "",
                 name: str = "timm") -> None:
        """`model`: a timm model name, or a timm model instance (any configuration of its
        class, e.g. fewer blocks; `num_classes` is then the instance's own)."""
        super().__init__()
        if isinstance(model, nn.Module):
            net, model = model, type(model).__name__
            if not hasattr(net, "forward_intermediates"):
                raise ValueError(f"{model} has no forward_intermediates")
        else:
            net = _build(model, num_classes)
        classifier = str(net.pretrained_cfg.get("classifier", "")) if getattr(net, "pretrained_cfg", None) else ""
        if weights:  # timm's layout; the classifier is kept when its shapes fit
            load_pretrained(net, weights, head=(classifier + ".", classifier + ".") if classifier else None,
                            name=name)
        self.model = net
        self.data_config: Dict[str, Any] = {**data_config(net), "source": f"timm data config of {model}"}
        self.input_shape: Tuple[int, ...] = self.data_config["input_size"]
        self.feature_dim = 0  # measured by the probe
        info = list(net.feature_info)
        self.stages = tuple(Stage(str(f["module"]), int(f["num_chs"])) for f in info)
        self.reductions = tuple(int(f["reduction"]) for f in info)
        self.classifier_reads_features = True
        self.dynamic_hw = False
        self._probe(model)

    def _probe(self, model: str) -> None:
        """One pass at the default size checks what the description claims (stage count and
        widths, feature width, that the classifier alone turns features into logits), a second
        at a larger size whether H and W are free (ViTs' patch embedding fixes them)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        try:
            with torch.no_grad():
                x = torch.zeros(1, *self.input_shape, device=device)
                final, stages = self.model.forward_intermediates(x)
                features = self.model.forward_head(final, pre_logits=True)
                if [int(s.shape[1]) for s in stages] != [s.channels for s in self.stages]:
                    raise ValueError(f"timm model {model!r}: forward_intermediates gave stages of "
                                     f"{[tuple(s.shape[1:]) for s in stages]}, feature_info describes "
                                     f"{[s.channels for s in self.stages]} channels")
                self.feature_dim = int(features.shape[-1])
                if device.type != "meta":
                    logits = self.model.forward_head(final)
                    # distilled models (two heads, averaged) need forward_head for their logits
                    self.classifier_reads_features = torch.equal(self.model.get_classifier()(features), logits) \
                        if isinstance(self.model.get_classifier(), nn.Module) else False
                h, w = self.input_shape[1:]
                try:
                    self.model.forward_intermediates(torch.zeros(1, self.input_shape[0], h + 32, w + 32, device=device))
                    self.dynamic_hw = True
                except (AssertionError, RuntimeError, ValueError):
                    self.dynamic_hw = False
        finally:
            self.train(was_training)

    def forward_full(self, x: Tensor) -> List[Tensor]:
        final, stages = self.model.forward_intermediates(x)
        features = self.model.forward_head(final, pre_logits=True)
        logits = (self.model.get_classifier()(features) if self.classifier_reads_features
                  else self.model.forward_head(final))
        return list(stages) + [features, logits]


@register_backbone("timm", example={"model": "resnet18"}, unsupported_formats=UNSUPPORTED_FORMATS)
def timm_model(model: str, num_classes: int = 10, weights: str = "") -> TimmBackbone:
    """Any timm model whose class has forward_intermediates, by name (timm.list_models())."""
    return TimmBackbone(model, num_classes, weights)


register_presets(CURATED, TimmBackbone, "timm's {model} (random weights, or a local timm weights file)",
                 UNSUPPORTED_FORMATS)
