#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian 12 machine (as root),
# then run the linters and the whole test suite without CAP_SYS_TIME.
set -euo pipefail
cd "$(dirname "$0")"

export DEBIAN_FRONTEND=noninteractive
if [ "$(id -u)" = 0 ]; then
    apt-get update -q
    # chrony: interop peer (NTS server and client); faketime: a peer with a wrong clock;
    # iproute2/util-linux: network namespaces and setpriv; systemd: systemd-analyze verify
    # of contrib/systemd; tzdata: right/UTC for leapsectz; gcc, python3-dev, libssl-dev:
    # build the optional AES-SIV accelerator ntspy._accel (tests/unit/test_accel.py);
    # redis-server: the fleet key store (ntskeystore) tests.
    apt-get install -y -q --no-install-recommends chrony faketime iproute2 util-linux systemd tzdata \
        ca-certificates python3-venv gcc python3-dev libssl-dev redis-server
    # A chrony package may start a system chronyd; ours never touch it (own ports, own files).
    NTSPY_NTPSEC_DIR=${NTSPY_NTPSEC_DIR:-/opt/ntspy-peers/ntpsec}
    if [ -x tools/fetch-ntpsec.sh ]; then
        tools/fetch-ntpsec.sh "$NTSPY_NTPSEC_DIR"
    fi
    export NTSPY_NTPSEC_DIR
fi
# A virtual environment of our own: works the same with Debian's system Python
# (which refuses pip installs outside one) and with any other Python 3.11+.
[ -x .venv/bin/python3 ] || python3 -m venv .venv
export PATH="$PWD/.venv/bin:$PATH"
python3 -m pip install -q --disable-pip-version-check -e '.[test]'

echo "== ruff"; ruff check src/ bench/ tests/
echo "== mypy --strict"; mypy src/ntspy

# No test may touch the clock: drop CAP_SYS_TIME for everything the tests start.
# The suite runs twice: with the compiled parts (ntspy._accel, ntspy._ke), then on
# the pure-Python paths alone (NTSPY_NO_ACCEL=1), which must pass the same tests.
echo "== pytest"
setpriv --bounding-set -sys_time --inh-caps -sys_time \
    python3 -m pytest -p no:cacheprovider "$@"
echo "== pytest, pure Python (NTSPY_NO_ACCEL=1)"
NTSPY_NO_ACCEL=1 exec setpriv --bounding-set -sys_time --inh-caps -sys_time \
    python3 -m pytest -p no:cacheprovider "$@"
