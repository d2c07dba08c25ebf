"""Per-task checkpoints as Mammoth writes them (`--savecheck task`: `<ckpt_name>_<task>.pt`, a
dict with model/optimizer/scheduler/args/results), made with the zoo's own backbone: every task
trains a few steps on seeded random data, so parameters and BatchNorm statistics both change."""

import copy
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from zoo.registry import get_backbone


def mammoth_args(backbone: str, **backbone_args: Any) -> Dict[str, Any]:
    return {"dataset": "seq-cifar10", "model": "er", "backbone": backbone, "lr": 0.03, "n_epochs": 1,
            "batch_size": 8, "seed": 0, "savecheck": "task", "save_checkpoint_mode": "safe",
            "ckpt_name": "er_run", **backbone_args}


def train_task(net: torch.nn.Module, task: int, steps: int = 3, batch: int = 8) -> None:
    """A few SGD steps in train() (BatchNorm statistics move too), seeded by the task."""
    gen = torch.Generator().manual_seed(1000 + task)
    shape = tuple(net.input_shape)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    net.train()
    for _ in range(steps):
        x = torch.randn((batch, *shape), generator=gen) * (1 + task)
        y = torch.randint(0, 10, (batch,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()


def save_mammoth(net: torch.nn.Module, path: Path, args: Dict[str, Any]) -> Path:
    model = {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}
    model["some_method_buffer"] = torch.zeros(3)  # other method state under other prefixes
    torch.save({"model": model, "optimizer": {}, "scheduler": None, "args": args, "results": []}, path)
    return path


def task_checkpoints(out: Path, backbone: str, tasks: int, seed: int = 0, start: Optional[torch.nn.Module] = None,
                     **backbone_args: Any) -> List[Path]:
    """`er_run_0.pt ... er_run_{tasks-1}.pt` of one run of `backbone` (built with seed `seed`);
    with `start`, the run starts from a copy of that network and task 0's checkpoint holds its
    weights unchanged."""
    torch.manual_seed(seed)
    net = copy.deepcopy(start) if start is not None else get_backbone(backbone, **backbone_args)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in range(tasks):
        if start is None or task > 0:
            train_task(net, task)
        paths.append(save_mammoth(net, out / f"er_run_{task}.pt", mammoth_args(backbone, **backbone_args)))
    return paths


def key_pair(directory: Path, name: str) -> tuple:
    """(private, public) PEM files of a new NIST P-256 key: what `publish --sign-key` and
    `serve --trust-key` take (openssl ecparam -name prime256v1 -genkey makes the same)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = directory / f"{name}.pem", directory / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public
