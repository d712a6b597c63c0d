#!/usr/bin/env bash
# Install headless Chromium and its WebDriver from Debian (chromium, chromium-driver) for the
# browser test of explanations.html; selenium itself comes from requirements.txt. A browser
# build cannot be downloaded at run time here, so the system packages are used.
# Idempotent: does nothing when both are installed. Without root or apt-get it says so and exits
# 0: the browser test then skips with the reason (in CI, GRADPROJ_BROWSER_REQUIRED=1 fails it).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "browser_local.sh: chromium and chromium-driver are missing and cannot be installed" \
        "here (needs root and apt-get); the browser test will skip" >&2
    exit 0
fi
echo "installing chromium and chromium-driver (a few minutes)" >&2
apt-get update -qq
apt-get install -y -qq chromium chromium-driver >/dev/null
