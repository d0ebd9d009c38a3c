

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
