"""Any torchvision classifier as a backbone with all four returnt modes.

`torchvision.models.feature_extraction` turns the model into a graph that returns its natural
stage outputs (ResNet: stem and layer1-4; MobileNetV3/EfficientNet/ConvNeXt: each block of
`features`; ViT: each encoder layer and the final norm), the input of its last Linear layer
(features) and that layer's output (logits). Registered as `tv-<name>` for a few members of
each family, and as `tv --model NAME` for every classification model torchvision has.
Random weights, or a local torchvision weights file (`weights=PATH`); never a download.
"""

import difflib
from typing import Dict, List, Tuple, Union

import torch
from torch import Tensor, nn

from zoo.base import MammothBackbone, Stage
from zoo.registry import register_backbone, register_presets
from zoo.weights import load_pretrained

#: registered name -> torchvision builder: the small member of each convolutional family.
#: Every other classifier (ViT included: vit_b_16 is torchvision's smallest) is `tv --model NAME`.
FAMILIES: Dict[str, str] = {
    "tv-resnet18": "resnet18",
    "tv-mobilenet-v3-small": "mobilenet_v3_small",
    "tv-mobilenet-v3-large": "mobilenet_v3_large",
    "tv-efficientnet-b0": "efficientnet_b0",
    "tv-convnext-tiny": "convnext_tiny",
}


def classification_models() -> List[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _stage_nodes(model: nn.Module, name: str) -> List[str]:
    """The model's natural stage outputs, as feature-extraction node names."""
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        return ["maxpool" if hasattr(model, "maxpool") else "relu", "layer1", "layer2", "layer3", "layer4"]
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        return [f"features.{i}" for i in range(len(features))]
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    if isinstance(layers, nn.Sequential):
        return [f"encoder.layers.{n}" for n, _ in layers.named_children()] + ["encoder.ln"]
    raise ValueError(f"torchvision model {name!r}: no known stage structure (layer1-4, features, "
                     "or encoder.layers)")


def _build(model: str, num_classes: int) -> nn.Module:
    import torchvision

    known = classification_models()
    if model not in known:
        close = difflib.get_close_matches(model, known, n=5, cutoff=0.5)
        raise ValueError(f"{model!r} is not a torchvision classification model"
                         + (f"; did you mean: {', '.join(close)}?" if close else "")
                         + f" (see torchvision.models.list_models(), {len(known)} models)")
    return torchvision.models.get_model(model, weights=None, num_classes=num_classes)


class TorchvisionBackbone(MammothBackbone):
    """A torchvision classifier whose `'full'` output comes from one feature-extraction graph."""

    def __init__(self, model: Union[str, nn.Module], num_classes: int = 10, weights: str = "",
                 name: str = "tv") -> None:
        """`model`: a torchvision model name, or a torchvision model instance (any configuration
        of its class, e.g. fewer blocks; `num_classes` is then the instance's own)."""
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        if isinstance(model, nn.Module):
            net, model = model, type(model).__name__
        else:
            net = _build(model, num_classes)
        linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"torchvision model {model!r} has no Linear classifier")
        classifier = linears[-1]
        if weights:  # the torchvision layout; the classifier is kept when its shapes fit
            load_pretrained(net, weights, head=(classifier + ".", classifier + "."), name=name)
        _, eval_nodes = get_graph_node_names(net)
        features_node = eval_nodes[eval_nodes.index(classifier) - 1]
        stage_nodes = _stage_nodes(net, model)
        names = [f"stage_{i}" for i in range(len(stage_nodes))] + ["features", "logits"]
        self.output_keys: List[str] = names
        net.eval()
        extractor = create_feature_extractor(
            net, return_nodes=dict(zip(stage_nodes + [features_node, classifier], names)))
        # A plain GraphModule of the eval graph: torchvision's train/eval DualGraphModule loses
        # its mode on deepcopy (it comes back in training mode with the train graph). Modules
        # (BatchNorm, Dropout) still follow .train()/.eval(); Python-level `if self.training`
        # branches (stochastic depth) are those of eval.
        self.model = torch.fx.GraphModule(extractor, extractor.eval_graph, class_name=model)
        self.input_shape: Tuple[int, ...] = (3, 224, 224)
        self.dynamic_hw = not hasattr(net, "encoder")  # ViT: the position embedding fixes H, W
        self.feature_dim = dict(net.named_modules())[classifier].in_features
        with torch.no_grad():  # stage widths from one small dry run
            probe = self.model(torch.zeros(1, *(self.input_shape if not self.dynamic_hw else (3, 64, 64))))
        self.stages = tuple(
            Stage(node, probe[key].shape[-1 if probe[key].dim() == 3 else 1],
                  channel_dim=-1 if probe[key].dim() == 3 else 1)
            for node, key in zip(stage_nodes, names))

    def forward_full(self, x: Tensor) -> List[Tensor]:
        out = self.model(x)
        return [out[k] for k in self.output_keys]


@register_backbone("tv", example={"model": "mobilenet_v3_small"})
def tv(model: str, num_classes: int = 10, weights: str = "") -> TorchvisionBackbone:
    """Any torchvision classification model by name (torchvision.models.list_models())."""
    return TorchvisionBackbone(model, num_classes, weights)


register_presets(FAMILIES, TorchvisionBackbone, "torchvision's {model} (random weights, or a local weights file)")
