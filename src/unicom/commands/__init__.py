

def add_recipe_arguments(parser, example: str, recipes: str) -> None:
    """The arguments shared by the recipe-driven commands (``train``, ``probe``): ``KEY=VALUE``
    overrides, ``--config``, ``--out``, ``--list-keys`` and ``--print-config``; the command's
    docstring after its first paragraph becomes the help's epilog."""
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help=f"recipe values to change, e.g. {example} (see --list-keys)")
    parser.add_argument("--config", metavar="YAML", help=f"recipe file ({recipes}); defaults apply to what it leaves out")
    parser.add_argument("--out", metavar="DIR", help="output folder (same as out=DIR)")
    parser.add_argument("--list-keys", action="store_true", help="print every recipe key with its default and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit without running it")


def resolve_recipe(args, load, defaults, *extra: str):
    """The recipe of a recipe-driven command, or None when ``--list-keys`` or
    ``--print-config`` answered already. ``load(path, overrides)`` reads and checks it
    (every key and value before any work); ``defaults()`` gives ``{key: default}``;
    ``extra`` are overrides the command derived from its own options."""
    if args.list_keys:
        print("\n".join(f"{key} = {value!r}" for key, value in defaults().items()))
        return None
    overrides = [*args.overrides, *([f"out={args.out}"] if args.out else []), *extra]
    config = load(args.config, overrides)
    if args.print_config:
        from unicom.engine.recipe import to_yaml

        print(to_yaml(config), end="")
        return None
    return config
