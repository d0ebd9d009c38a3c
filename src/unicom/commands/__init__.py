

def configure_logging() -> None:
    """Progress of the library's loggers on stderr, one message a line, for the commands
    that report through ``logging`` (``index``, ``serve``).

    faiss's loader reports at INFO how it picked its build ("Loading faiss with AVX512
    support.", "Could not load library with AVX512 support due to: ..."), which reads as a
    failure and is not one: that logger shows warnings and errors only; every other faiss
    logger is untouched. So do botocore's and aiobotocore's (s3://), whose INFO lines say
    where credentials and endpoints were found ("Found credentials in environment
    variables.") on every start."""
    import logging
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for name in ("faiss.loader", "botocore", "aiobotocore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def add_recipe_arguments(parser, example: str, recipes: str) -> None:
    """The arguments shared by the recipe-driven commands (``train``, ``probe``): ``KEY=VALUE``
    overrides, ``--config``, ``--out``, ``--list-keys`` and ``--print-config``; the command's
    docstring after its first paragraph becomes the help's epilog."""
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help=f"recipe values to change, e.g. {example} (see --list-keys)")
    parser.add_argument("--config", metavar="YAML", help=f"recipe file, or the name of a recipe shipped with unicom "
                                                         f"({recipes}: see --list-configs); defaults apply to what it leaves out")
    parser.add_argument("--list-configs", action="store_true", help="print the recipes shipped with unicom for this "
                                                                    "command, each with what it is for, and exit")
    parser.add_argument("--out", metavar="DIR", help="output folder (same as out=DIR)")
    parser.add_argument("--list-keys", action="store_true", help="print every recipe key with its default and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit without running it")
    parser.intermixed = True  # KEY=VALUE overrides before and after options: `--cache-only train.epochs=1`


def resolve_recipe(args, load, defaults, *extra: str):
    """The recipe of a recipe-driven command, or None when ``--list-keys`` or
    ``--print-config`` answered already. ``load(path, overrides, validate)`` reads and
    checks it (every key and value before any work); ``defaults()`` gives ``{key: default}``;
    ``extra`` are overrides the command derived from its own options.

    ``--list-keys`` writes the defaults as YAML (``null``, ``true``), the way a recipe and an
    override spell them. ``--print-config`` needs no data source or output folder: it
    prints the recipe as resolved so far and then, on stderr, what it still lacks to run."""
    import sys

    from unicom.engine.recipe import to_yaml, yaml_value
    from unicom.errors import InputError

    if args.list_keys:
        print("\n".join(f"{key} = {yaml_value(value)}" for key, value in defaults().items()))
        return None
    if args.list_configs:
        print(shipped_recipe_table(load))
        return None
    overrides = [*args.overrides, *([f"out={args.out}"] if args.out else []), *extra]
    config = load(args.config, overrides, validate=not args.print_config)
    if args.print_config:
        print(to_yaml(config), end="")
        try:
            config.validate()
        except InputError as problems:
            print(f"note: to run, this recipe still needs changes: {problems}", file=sys.stderr)
        return None
    return config


def shipped_recipe_table(load) -> str:
    """The recipes shipped with unicom that ``load`` reads (those of one command), one line
    each: the name ``--config`` takes, then what the recipe is for."""
    from unicom.engine.recipe import recipe_summary, shipped_recipes
    from unicom.errors import InputError

    rows = []
    for name, path in shipped_recipes().items():
        try:
            load(path, [], False)
        except InputError:  # another command's recipe
            continue
        rows.append((name, recipe_summary(path)))
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join(f"{name:<{width}}  {summary}" for name, summary in rows)
