#!/usr/bin/env bash
# Fetch clip-retrieval's front end for the browser test that points it at `unicom serve`.
#
# clip-retrieval's PyPI wheel ships its built front end (front/build: index.html, the
# webpack bundle, assets); this unpacks that folder, as released, into
# .cache/clip-retrieval-front/VERSION/ of the repository. The wheel is fetched with pip
# (no dependencies, nothing installed). Does nothing when the folder is there. Never fails
# the caller: the test skips itself, saying why, when the folder is absent.
#
# Environment: PYTHON (default: python3; any Python with pip), CLIP_RETRIEVAL_VERSION.
set -u

VERSION="${CLIP_RETRIEVAL_VERSION:-2.45.0}"
PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.cache/clip-retrieval-front/$VERSION"

if [ -f "$DEST/index.html" ]; then
    echo "install-clip-front: $DEST is present"
    exit 0
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
if ! "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WORK" "clip-retrieval==$VERSION" >"$WORK/log" 2>&1; then
    echo "install-clip-front: could not download clip-retrieval $VERSION with $PYTHON -m pip; the test will be skipped"
    tail -n 3 "$WORK/log"
    exit 0
fi
if "$PYTHON" - "$WORK" "$DEST" <<'PY'
import shutil
import sys
import zipfile
from pathlib import Path

work, dest = Path(sys.argv[1]), Path(sys.argv[2])
wheel = next(work.glob("clip_retrieval-*.whl"))
staging = dest.with_name(dest.name + ".partial")
shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted run
prefix = "front/build/"
with zipfile.ZipFile(wheel) as archive:
    members = [name for name in archive.namelist() if name.startswith(prefix) and not name.endswith("/")]
    if not any(name == prefix + "index.html" for name in members):
        sys.exit(f"{wheel.name} holds no {prefix}index.html")
    for name in members:
        target = staging / name[len(prefix):]
        if ".." in Path(name).parts:
            sys.exit(f"{wheel.name}: unexpected member {name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(archive.read(name))
staging.rename(dest)  # complete or absent
PY
then
    echo "install-clip-front: clip-retrieval $VERSION's front end is in $DEST"
else
    echo "install-clip-front: could not unpack clip-retrieval $VERSION's front end; the test will be skipped"
fi
exit 0
