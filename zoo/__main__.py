"""`python -m zoo list [PATTERN ...]`: the registry's inference made visible."""

import argparse
import sys
import warnings
from typing import List, Optional

import torch

from zoo.registry import get_backbone, get_entry, list_backbones


def describe(name: str) -> str:
    """One block per backbone: arguments (type, default/required), input shape, #params."""
    entry = get_entry(name)
    kwargs = {a.name: a.default for a in entry.args if not a.required}
    kwargs.update(entry.example)  # required arguments: the registered example values
    # built on the meta device: shapes and counts without allocating or initialising weights
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # pretrained variants warn about missing weights
        net = get_backbone(name, **kwargs)
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    lines = [
        f"{name}  ({entry.doc.splitlines()[0] if entry.doc else ''})",
        "    args: " + "; ".join(a.describe() for a in entry.args),
        f"    input: {'x'.join(map(str, net.input_shape))}"
        f"{' (H,W dynamic)' if net.dynamic_hw else ''}   params: {net.num_params():,} at {shown}",
        "    full: " + ", ".join(f"{n}[{s.channels}]" for n, s in zip(net.output_names(), net.stages))
        + f", features[{net.feature_dim}], logits",
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list registered backbones with their inferred arguments")
    p_list.add_argument("patterns", nargs="*", help="glob patterns, e.g. 'resnet*'")
    p_list.add_argument("--names", action="store_true", help="print names only")
    args = parser.parse_args(argv)
    names = list_backbones(args.patterns or None)
    if not names:
        print(f"no backbone matches {args.patterns}; registered: {', '.join(list_backbones())}",
              file=sys.stderr)
        return 2
    for name in names:
        print(name if args.names else describe(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
