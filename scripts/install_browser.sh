#!/usr/bin/env bash
# The browser the demo's tests drive: Debian's Chromium (Playwright launches /usr/bin/chromium; no
# browser download). Installed once; needs root or sudo.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
as_root=""
[ "$(id -u)" = 0 ] || as_root="sudo"
export DEBIAN_FRONTEND=noninteractive
$as_root apt-get update -qq
$as_root apt-get install -y -qq chromium > /dev/null
/usr/bin/chromium --version
