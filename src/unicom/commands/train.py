"""``unicom train``: cluster-discrimination pre-training or retrieval fine-tuning from a recipe.

Examples::

    unicom train --config pretrain_vit_b32 data.shards='laion/{00000..41407}.tar' \\
        data.labels=clusters/ out=runs/b32
    torchrun --nnodes 16 --nproc_per_node 8 ... -m unicom.train --config pretrain_vit_b32 ...
    unicom train --config finetune_sop model.init=ViT-B/32 loss.feature_rate=1.0 data.root=data/SOP \\
        out=runs/sop
    unicom train --config finetune_sop out=runs/sop --resume                  # after a crash (automatic too)
    unicom train --export-from runs/b32 --model-out models/b32                # any checkpoint as a model folder
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from unicom.commands import add_recipe_arguments

    add_recipe_arguments(parser, "optim.lr=5e-4 data.batch_size=64", "pretrain_vit_b32, finetune_sop, ...")
    parser.epilog = __doc__.split("\n", 2)[2]
    parser.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                        help="resume the newest intact checkpoint of the output folder (the default when there is one; "
                             "with --resume, an output folder without one is an error), or the given checkpoint or run folder")
    parser.add_argument("--export-from", metavar="RUN_OR_CHECKPOINT",
                        help="export a run's newest intact checkpoint (or the given checkpoint) as a model folder and exit")
    parser.add_argument("--model-out", metavar="DIR", help="with --export-from: the model folder to write")


def run(args: argparse.Namespace) -> int:
    from unicom.errors import InputError

    if args.export_from:
        from unicom.engine.checkpoint import export_checkpoint

        if not args.model_out:
            raise InputError("--export-from needs --model-out DIR (the model folder to write)")
        folder = export_checkpoint(args.export_from, args.model_out)
        print(f"exported {args.export_from} to {folder}")
        return 0

    from unicom.commands import resolve_recipe
    from unicom.train.config import default_values, load_config

    if args.resume and args.resume.split("=", 1)[0] in default_values():  # `--resume out=run`: argparse's reading
        raise InputError(f"--resume took the override {args.resume!r} for its CHECKPOINT; write --resume after the "
                         "overrides (or --resume=auto), or give the checkpoint or run folder after it")
    config = resolve_recipe(args, load_config, default_values, *([f"checkpoint.resume={args.resume}"] if args.resume else []))
    if config is None:
        return 0

    from unicom import distributed
    from unicom.engine.step import TrainingStopped
    from unicom.train.trainer import train

    # NCCL for GPU runs; gloo when the run is told to stay on the CPU (or there is no GPU)
    try:
        with distributed.process_group("gloo" if config.train.device == "cpu" else None):
            if args.resume == "auto":
                _require_checkpoint(config.out)
            train(config)
    except TrainingStopped as stop:
        print(f"unicom train: {stop}", file=sys.stderr)
        return 1
    return 0


def _require_checkpoint(out: str) -> None:
    """``--resume`` asks for a run to go on with, not a start from scratch (after a typo in
    ``out=``): rank 0's folder must hold a checkpoint (other nodes may not see it)."""
    from unicom import distributed
    from unicom.engine.checkpoint import complete_checkpoints
    from unicom.errors import InputError

    found = distributed.broadcast_object(bool(complete_checkpoints(out)) if distributed.get_rank() == 0 else None)
    if not found:
        raise InputError(f"--resume: {out} holds no checkpoint to resume; check out=, give the checkpoint "
                         "(--resume PATH), or leave --resume out to start a run there")
