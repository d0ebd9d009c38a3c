#!/usr/bin/env bash
# Fetch clip-retrieval's front end and its ClipClient for the tests that point them at `unicom serve`.
#
# clip-retrieval's PyPI wheel ships its built front end (front/build: index.html, the
# webpack bundle, assets) and its client (clip_retrieval/clip_client.py, which needs only
# requests). This unpacks the front end, as released, into
# .cache/clip-retrieval-front/VERSION/ of the repository, and the client module into
# .cache/clip-retrieval-client/VERSION/clip_client.py. The wheel is fetched with pip
# (no dependencies, nothing installed). Does nothing when both are there. Never fails
# the caller: a test skips itself, saying why, when what it needs is absent.
#
# Environment: PYTHON (default: python3; any Python with pip), CLIP_RETRIEVAL_VERSION.
set -u

VERSION="${CLIP_RETRIEVAL_VERSION:-2.45.0}"
PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.cache/clip-retrieval-front/$VERSION"
CLIENT="$ROOT/.cache/clip-retrieval-client/$VERSION"

if [ -f "$DEST/index.html" ] && [ -f "$CLIENT/clip_client.py" ]; then
    echo "install-clip-front: $DEST and $CLIENT are present"
    exit 0
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
if ! "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WORK" "clip-retrieval==$VERSION" >"$WORK/log" 2>&1; then
    echo "install-clip-front: could not download clip-retrieval $VERSION with $PYTHON -m pip; the tests will be skipped"
    tail -n 3 "$WORK/log"
    exit 0
fi
if "$PYTHON" - "$WORK" "$DEST" "$CLIENT" <<'PY'
import shutil
import sys
import zipfile
from pathlib import Path

work, dest, client = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
wheel = next(work.glob("clip_retrieval-*.whl"))
with zipfile.ZipFile(wheel) as archive:
    module = archive.read("clip_retrieval/clip_client.py")
client.mkdir(parents=True, exist_ok=True)
partial = client / "clip_client.py.partial"
partial.write_bytes(module)
partial.rename(client / "clip_client.py")  # complete or absent
if (dest / "index.html").is_file():
    sys.exit(0)
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
    echo "install-clip-front: clip-retrieval $VERSION's front end is in $DEST, its client in $CLIENT"
else
    echo "install-clip-front: could not unpack clip-retrieval $VERSION's front end and client; the tests will be skipped"
fi
exit 0
