#!/bin/sh
# Fetch NTPsec's ntpd into DEST without installing the package: the Debian
# package conflicts with chrony, and the interop tests only need the binary.
# Usage: tools/fetch-ntpsec.sh DEST   (the caller has run `apt-get update`)
set -eu

if [ "$#" -ne 1 ]; then
    echo "usage: $0 DEST" >&2
    exit 2
fi
dest=$1
ntpd="$dest/usr/sbin/ntpd"

if [ -x "$ntpd" ] && "$ntpd" --version >/dev/null 2>&1; then
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# apt-get download writes into the current directory; _apt must be able to
# write there, hence a world-writable temp dir.
chmod 0777 "$work"
(cd "$work" && apt-get download ntpsec)
mkdir -p "$dest"
for deb in "$work"/ntpsec_*.deb; do
    dpkg -x "$deb" "$dest"
done

# ntpd links against libraries that a chrony-only system may lack; these are
# the ones Debian 12's ntpsec depends on besides libc.
if ! "$ntpd" --version >/dev/null 2>&1; then
    missing=$(ldd "$ntpd" | awk '/not found/ {print $1}')
    echo "ntpd is missing shared libraries: $missing" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        libbsd0 libcap2 libssl3
fi

"$ntpd" --version
