#!/usr/bin/env bash
# Install Debian's chromium for the headless-browser test of `unicom serve`'s page.
#
# Does nothing when /usr/bin/chromium is already there. Uses apt-get when it is usable
# (root, or passwordless sudo). Never fails the caller: the browser test skips itself,
# saying why, when no browser can be found.
set -u

if [ -x /usr/bin/chromium ]; then
    echo "install-browser: /usr/bin/chromium is present"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: apt-get not found; the browser test will be skipped"
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "install-browser: not root and no passwordless sudo; the browser test will be skipped"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; then
    # the package lists may be missing or stale: refresh them once and try again
    $SUDO apt-get update -qq >/dev/null 2>&1 || true
    $SUDO apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || true
fi
if [ -x /usr/bin/chromium ]; then
    echo "install-browser: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
else
    echo "install-browser: could not install chromium; the browser test will be skipped"
fi
exit 0
