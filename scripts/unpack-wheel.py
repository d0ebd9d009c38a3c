"""Unpack chosen files of a package's released wheel into a folder, for a test that compares with them.

    python scripts/unpack-wheel.py REQUIREMENT DEST MEMBER...

fetches the wheel of REQUIREMENT (``name==version``) with this Python's pip, without its
dependencies and installing nothing, and writes each MEMBER (a path inside the wheel) under
DEST at the same path. DEST appears whole or not at all (written beside it, then renamed);
what an interrupted run left is removed. Exit status 1, saying why, when the wheel cannot be
fetched or lacks a member.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def main(requirement: str, dest: Path, members: list[str]) -> int:
    with tempfile.TemporaryDirectory() as work:
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                                  "--dest", work, requirement], capture_output=True, text=True)
        wheels = list(Path(work).glob("*.whl"))
        if fetched.returncode != 0 or not wheels:
            print(f"could not download {requirement} with {sys.executable} -m pip:", *fetched.stderr.splitlines()[-3:],
                  sep="\n  ")
            return 1
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted run
        with zipfile.ZipFile(wheels[0]) as archive:
            absent = sorted(set(members) - set(archive.namelist()))
            if absent:
                print(f"{wheels[0].name} holds no {', '.join(absent)}")
                return 1
            for name in members:
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:]))
