#!/usr/bin/env bash
# Install Azurite, Microsoft's Azure Storage emulator, for the tests that read and write az:// URLs.
#
# Azurite is published on npm; this installs it, with its dependencies, into
# .cache/azurite/VERSION/ of the repository (node_modules/.bin/azurite-blob is the blob
# service the tests start on 127.0.0.1, its telemetry off). Does nothing when it is there.
# Never fails the caller: a test skips itself, saying why, when Azurite is absent (no npm
# here: Debian's `apt-get install nodejs npm`).
#
# Environment: AZURITE_VERSION.
set -u

VERSION="${AZURITE_VERSION:-3.35.0}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.cache/azurite/$VERSION"

if [ -x "$DEST/node_modules/.bin/azurite-blob" ]; then
    echo "install-azurite: $DEST is present"
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "install-azurite: npm not found (Debian: apt-get install nodejs npm); the tests will be skipped"
    exit 0
fi
WORK="$(mktemp -d "$ROOT/.cache/.azurite.XXXXXX" 2>/dev/null || { mkdir -p "$ROOT/.cache" && mktemp -d "$ROOT/.cache/.azurite.XXXXXX"; })"
trap 'rm -rf "$WORK"' EXIT
if ! npm install --prefix "$WORK" --no-audit --no-fund --silent "azurite@$VERSION" >"$WORK/log" 2>&1; then
    echo "install-azurite: npm could not install azurite@$VERSION; the tests will be skipped"
    tail -n 3 "$WORK/log"
    exit 0
fi
rm -f "$WORK/log"
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST"
mv "$WORK" "$DEST"  # whole or not at all
trap - EXIT
echo "install-azurite: installed azurite $VERSION into $DEST"
