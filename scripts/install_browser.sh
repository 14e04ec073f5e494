#!/usr/bin/env bash
# Chromium for the annotation app's browser test (Playwright drives it headless), from Debian's
# packages: Playwright's own browser download cannot reach its host from these machines. Installs it
# when missing and this user may (root with apt-get); otherwise prints how.
set -u
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: installing chromium (Debian package)"
  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
    || echo "install_browser: could not install chromium; run: sudo apt-get install chromium"
else
  echo "install_browser: chromium missing; run: sudo apt-get install chromium"
fi
exit 0
