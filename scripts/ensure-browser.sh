#!/usr/bin/env bash
# Makes sure a headless Chromium and its ChromeDriver are installed, for the console's
# browser test: installs Debian's `chromium` and `chromium-driver` with apt when missing, and
# otherwise stops with a clear message. Used by scripts/test.sh.
set -euo pipefail
say() { echo "ensure-browser: $*" >&2; }
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else say "error: need root to run: $*"; exit 1; fi; }
if ! command -v apt-get >/dev/null; then
  say "error: the console's browser test needs Chromium and ChromeDriver (chromium, chromedriver on PATH); install them"
  exit 1
fi
say "installing chromium and chromium-driver with apt"
as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver fonts-dejavu-core >/dev/null
command -v chromedriver >/dev/null || { say "error: chromedriver is still missing after the install"; exit 1; }
say "Chromium $(chromium --version 2>/dev/null | awk '{print $2}') and its ChromeDriver are installed"
