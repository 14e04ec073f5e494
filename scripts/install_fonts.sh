#!/usr/bin/env bash
# Fonts for rendering text in tests and examples: DejaVu (Latin) and WenQuanYi Zen Hei (Chinese),
# from Debian's packages. Installs them when missing and this user may (root with apt-get);
# otherwise prints how, and the tests that need a missing font say so when they skip.
set -u
missing=()
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
[ -e /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc ] || missing+=(fonts-wqy-zenhei)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "install_fonts: installing ${missing[*]}"
  apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; } \
    || echo "install_fonts: could not install ${missing[*]}; run: sudo apt-get install ${missing[*]}"
else
  echo "install_fonts: missing ${missing[*]}; run: sudo apt-get install ${missing[*]}"
fi
exit 0
