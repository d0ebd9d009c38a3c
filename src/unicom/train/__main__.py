"""``python -m unicom.train ...`` is ``unicom train ...``."""

import sys

from unicom.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
