"""The ``unicom`` command: a thin layer that parses arguments and calls the library.

Subcommands live in :mod:`unicom.commands`, one module each, listed in ``COMMANDS`` as
data. A module defines ``add_arguments(parser)`` and ``run(args) -> int``; it is imported
only when its subcommand runs, so ``unicom --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import signal
import sys

from unicom import __version__
from unicom.errors import InputError

# name -> (module, one-line help). Order is the order shown by ``unicom --help``.
COMMANDS: dict[str, tuple[str, str]] = {
    "embed": ("unicom.commands.embed", "embed images (and captions) into the img_emb/text_emb/metadata layout"),
    "cluster": ("unicom.commands.cluster", "k-means pseudo-labels from image/text embeddings"),
    "train": ("unicom.commands.train", "cluster-discrimination pre-training or retrieval fine-tuning"),
    "probe": ("unicom.commands.probe", "train a projection head on a frozen foundation model (UniFEx)"),
    "evaluate": ("unicom.commands.evaluate", "retrieval benchmarks, compact dimensions, linear probe, kNN, zero-shot, image-text"),
    "dedup": ("unicom.commands.dedup", "near duplicates within an embedding folder, or of another folder's images"),
    "index": ("unicom.commands.index", "build or extend a faiss index from embedding folders"),
    "search": ("unicom.commands.search", "query an index with images, texts or indexed items"),
    "serve": ("unicom.commands.serve", "web page and HTTP API over an index"),
    "convert": ("unicom.commands.convert", "convert released Unicom checkpoints to and from this project's format, or a model to ONNX"),
}

# the commands that share their work over the processes of a torchrun launch; the others
# run in one process, and a launch of several would write the same outputs several times
UNDER_TORCHRUN = {"embed", "train", "cluster"}


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors name the closest option or command to a
    misspelt one (``--batchsize``: did you mean --batch-size?)."""

    def error(self, message: str):
        import difflib

        words: list[str] = []
        if message.startswith("unrecognized arguments: "):
            words = [word.split("=", 1)[0] for word in message.split(": ", 1)[1].split() if word.startswith("-")]
            known = [option for action in self._actions for option in action.option_strings]
        elif "invalid choice: '" in message:
            words = [message.split("invalid choice: '", 1)[1].split("'", 1)[0]]
            # the choices of the argument the message names, not those of another option
            known = [str(choice) for action in self._actions if action.choices
                     and message.startswith(f"argument {_argument_name(action)}: ") for choice in action.choices]
        hints = [f"{word}: did you mean {close[0]}?" for word in words
                 for close in [difflib.get_close_matches(word, known, n=1, cutoff=0.6)] if close]
        super().error("; ".join([message, *hints]))


def _argument_name(action: argparse.Action) -> str:
    """How argparse names ``action`` in its usage errors ("argument --dtype: ...")."""
    if action.option_strings:
        return "/".join(action.option_strings)
    return str(action.metavar if action.metavar not in (None, argparse.SUPPRESS) else action.dest)


def available_commands() -> dict[str, tuple[str, str]]:
    return {name: entry for name, entry in COMMANDS.items() if importlib.util.find_spec(entry[0]) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="unicom",
        description="Universal and compact image embeddings: extract, cluster, train, evaluate, search.",
    )
    parser.add_argument("--version", action="version", version=f"unicom {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in available_commands().items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C: the stages write under temporary names and rename, so nothing half-written is
        # left for a traceback to warn about; say what happened, as the shell would. When this is
        # the `unicom` program (no argv given), a second Ctrl-C while the interpreter shuts down
        # ends it at once, not in a handler's traceback; a Python program that called main()
        # keeps its own Ctrl-C (a notebook's interrupt must not kill its kernel next time)
        if argv is None:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        from unicom.progress import close_open_bars

        close_open_bars()  # their last line before the message, not after it
        argv = list(sys.argv[1:] if argv is None else argv)
        name = f"unicom {argv[0]}" if argv and argv[0] in COMMANDS else "unicom"
        print(f"{name}: interrupted (Ctrl-C)", file=sys.stderr)
        return 128 + 2  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C
    except BrokenPipeError:
        # the reader of the output left (`unicom train --list-keys | head`): stop quietly, as a
        # process killed by SIGPIPE does; stdout goes to /dev/null so that the flush at exit
        # does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # 128 + SIGPIPE, what a shell reports for such a process


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = available_commands()
    if not argv or argv[0] not in commands:
        parser = build_parser()
        if not argv:
            parser.print_help()
            return 0
        parser.parse_args(argv)  # prints --help/--version or the usage error and exits
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(commands[name][0])
    parser = Parser(prog=f"unicom {name}", description=commands[name][1])
    module.add_arguments(parser)
    parser.add_argument("--storage-options", metavar="JSON", default=None,
                        help="fsspec options for s3://, gs://, hf://, http(s):// paths, e.g. "
                             "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}' or '{\"s3\": {...}, \"gs\": {...}}' "
                             "(credentials come from the usual environment variables: AWS_*, GOOGLE_APPLICATION_CREDENTIALS)")
    args = parser.parse_intermixed_args(rest) if getattr(parser, "intermixed", False) else parser.parse_args(rest)
    from unicom import storage

    try:
        _check_launch(name)
        storage.configure(args.storage_options)
        return int(module.run(args) or 0)
    except InputError as error:  # a problem with what the user gave us: no traceback
        print(f"unicom {name}: error: {error}", file=sys.stderr)
        return 2
    except storage.FetchError as error:  # a URL that stayed unreadable through the retries
        print(f"unicom {name}: error: {error.advice()}", file=sys.stderr)
        return 1


def _check_launch(name: str) -> None:
    """Refuse a one-process command started by torchrun in several processes."""
    if name in UNDER_TORCHRUN or os.environ.get("WORLD_SIZE", "1") == "1":  # (no torch import for the common case)
        return
    from unicom import distributed

    world = distributed.launched_world_size()
    if world == 1:
        return
    raise InputError(
        f"`unicom {name}` runs in one process, but torchrun started {world} (WORLD_SIZE): each "
        f"would do the whole work and write the same outputs. Run it without torchrun (only "
        f"{', '.join(sorted(UNDER_TORCHRUN))} share their work over torchrun's processes); a command started from a "
        f"process of a torchrun job inherits its RANK and WORLD_SIZE: remove them from the command's environment"
    )


if __name__ == "__main__":
    raise SystemExit(main())
