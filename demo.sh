#!/usr/bin/env bash
# Install ntspy into .venv and run `ntspy demo`: a local NTS server with a throwaway
# certificate and a client syncing from it, all on loopback (needs no network itself).
set -euo pipefail
cd "$(dirname "$0")"
if ! python3 -c 'import venv, ensurepip' 2>/dev/null && [ "$(id -u)" = 0 ]; then
    # Debian's Python keeps venv/ensurepip in a separate package.
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
fi
[ -x .venv/bin/python3 ] || python3 -m venv .venv
.venv/bin/python3 -m pip install -q --disable-pip-version-check .
exec .venv/bin/ntspy demo "$@"
