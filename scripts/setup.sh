#!/usr/bin/env bash
# Installs everything nibble needs to build and test, from Debian 12 packages (run as root, or
# with sudo available). nvcc is optional: without it the CPU build is made.
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
  build-essential cmake ninja-build pkg-config \
  libgtest-dev libgmock-dev libbenchmark-dev \
  nlohmann-json3-dev libcli11-dev \
  libopenblas-dev libtomlplusplus-dev \
  >/dev/null
echo "setup: Debian packages installed"
