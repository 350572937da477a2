#!/usr/bin/env bash
# `make test` needs Chromium: the report tests open report.html in a real headless browser.
# Installs Debian's `chromium` when it is missing and this user can install packages; otherwise one line says how.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
  if [ "$SUDO" != none ]; then
    echo "make test: installing Chromium for the report tests (Debian package chromium)..."
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
    command -v chromium >/dev/null 2>&1 && exit 0
  fi
fi
echo "make test: the report tests need Chromium, which is not installed and cannot be installed from here;" \
  "run \`sudo apt-get install -y chromium\` (Debian/Ubuntu), then \`make test\` again." >&2
exit 1
