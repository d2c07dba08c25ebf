"""Mammoth's ViT (`backbone/vit.py`, a trimmed timm VisionTransformer), scriptable.

Same keys as Mammoth: `cls_token`, `pos_embed` (parameters), `patch_embed.proj`,
`blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`, and the incremental
classifier `head.heads.0`. `'full'` = the block outputs and the final-norm output; features =
the CLS token after the final norm. Mammoth's LoRA `AB` argument is not part of the zoo.
"""

from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.base import MammothBackbone, Stage
from zoo.registry import register_backbone
from zoo.weights import load_pretrained, warn_random_weights


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class IncrementalClassifier(nn.Module):
    """Mammoth's classifier: one Linear per task (`heads.N`), outputs concatenated."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(dim, num_classes)])

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([head(x) for head in self.heads], dim=1)


class VisionTransformer(MammothBackbone):
    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.input_shape = (3, img_size, img_size)
        self.dynamic_hw = False  # the position embedding fixes the number of patches
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, embed_dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = IncrementalClassifier(embed_dim, num_classes)
        self.feature_dim = embed_dim
        self.stages = tuple(Stage(f"block{i}", embed_dim, channel_dim=-1) for i in range(depth)) + (
            Stage("norm", embed_dim, channel_dim=-1),)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_stages(self, x: Tensor) -> List[Tensor]:
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        outs: List[Tensor] = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        outs.append(self.norm(x))
        return outs

    def forward_pool(self, last: Tensor) -> Tensor:
        return last[:, 0]

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)


def _timm_rename(key: str):
    """timm ViT-B/16 files call the classifier `head`; ours is `head.heads.0` (handled by the
    head mapping); timm's `fc_norm`/`norm_pre` are identities here."""
    return None if key.startswith(("fc_norm.", "norm_pre.")) else key


@register_backbone("vit")
def vit(num_classes: int, pretrained: bool = True, pretrain_type: str = "in21k-ft-in1k",
        weights: str = "") -> VisionTransformer:
    """ViT-B/16 at 224x224 (Mammoth's); pretrained weights come from a local timm file."""
    net = VisionTransformer(num_classes=num_classes)
    if weights:
        load_pretrained(net, weights, rename=_timm_rename, head=("head.", "head.heads.0."), name="vit")
    elif pretrained:
        warn_random_weights("vit", f"timm's vit_base_patch16_224 ({pretrain_type}) weights")
    return net
