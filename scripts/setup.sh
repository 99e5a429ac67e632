#!/usr/bin/env bash
# Installs everything overlaylab and its lab need, on Debian 12 (Ubuntu: best effort).
# Idempotent and quick when nothing is missing: `make demo` and `make test` call it every time.
set -euo pipefail
venv=${1:-.venv}
cd "$(dirname "$0")/.."

packages=(docker.io debootstrap busybox-static iptables nftables iproute2 openssh-client file ca-certificates)
python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null 2>&1; then
    packages+=(python3 python3-venv)
elif ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    packages+=(python3-venv)
fi

missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: these packages are missing and installing them needs root: ${missing[*]}" >&2
        exit 2
    fi
    echo "setup: apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The Python side, in a venv of the project's own; reinstalled only when pyproject.toml changes.
stamp="$venv/.overlaylab-installed"
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: pip install -e .[dev] into $venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$venv/bin/python" -m pip install -q -e '.[dev]'
    echo "$want" > "$stamp"
fi
