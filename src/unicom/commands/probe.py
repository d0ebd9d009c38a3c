"""``unicom probe``: a projection head on a frozen foundation model (UniFEx), from a recipe.

Examples::

    unicom probe --config unifex_siglip_so400m_m4d35k data.train=[m4d35k/train.csv] \\
        eval.query=[guiec/query.csv] eval.index=[guiec/index.csv] out=runs/siglip
    unicom probe --config unifex_clip_b16 data.train=[lists/train.csv] out=runs/b16 \\
        loss.head=dynm_arcface loss.margin=null
    unicom probe --config unifex_clip_b16 ... --cache-only        # features only (e.g. on the GPU box)
    unicom probe --config unifex_clip_b16 ... train.mode=direct   # the backbone in the loop

A rerun with the same out= resumes: finished cache parts and epochs are kept. The model
is exported to OUT/model, which `unicom embed`, `evaluate` and `search` take as --model.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from unicom.commands import add_recipe_arguments

    add_recipe_arguments(parser, "neck.embedding_dim=64 loss.head=adaface", "unifex_clip_b16, ...")
    parser.epilog = __doc__.split("\n", 2)[2]
    parser.add_argument("--cache-only", action="store_true", help="build the feature cache and stop")


def run(args: argparse.Namespace) -> int:
    from unicom.commands import resolve_recipe
    from unicom.unifex.config import default_values, load_probe_config

    config = resolve_recipe(args, load_probe_config, default_values)
    if config is None:
        return 0

    from unicom.engine.step import TrainingStopped
    from unicom.unifex.trainer import probe

    try:
        probe(config, cache_only=args.cache_only)
    except TrainingStopped as stop:
        print(f"unicom probe: {stop}", file=sys.stderr)
        return 1
    return 0
