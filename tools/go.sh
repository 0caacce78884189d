#!/usr/bin/env bash
# Makes sure a Go toolchain of the pinned version (tools/go.version) is at hand for building the
# test world's Go components (tools/build.sh), and prints its bin folder on stdout. The product
# (the wheel) never needs Go. What it does and its progress go to stderr, said up front.
#
#  1. The pinned toolchain already in the cache: only checked (`go version`), then printed.
#  2. Else a Go to start from (>= 1.21, which knows GOTOOLCHAIN): `go` on PATH, /usr/local/go,
#     Debian's golang from bookworm-backports (/usr/lib/go-1.2x; installed here when missing,
#     as root: Debian 12's own golang-go, 1.19, is too old).
#  3. With it, GOTOOLCHAIN=<pin> fetches the pinned toolchain from the Go module proxy
#     (golang.org/toolchain; the go command verifies it against the checksum database, through
#     the proxy) into the cache, outside the checkout:
#         ${PROVISIONER_CACHE:-~/.cache/provisioner}/go/
#
# Usage: tools/go.sh     (GOPROXY and GOSUMDB are honoured as the go command reads them)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
pin=$(tr -d '[:space:]' < "$here/go.version")
[[ $pin =~ ^go1\.[0-9]+\.[0-9]+$ ]] || { echo "tools/go.sh: tools/go.version must be like go1.24.13, got '$pin'" >&2; exit 2; }
root=${PROVISIONER_CACHE:-$HOME/.cache/provisioner}/go
case $(uname -m) in x86_64) arch=amd64 ;; aarch64) arch=arm64 ;; *) arch=$(uname -m) ;; esac
mod=golang.org/toolchain@v0.0.1-$pin.linux-$arch
bin=$root/mod/$mod/bin
unset GOROOT GOTOOLCHAIN GOFLAGS   # the pinned toolchain's own, not a caller's

if [ -x "$bin/go" ] && [ "$("$bin/go" env GOVERSION 2>/dev/null)" = "$pin" ]; then
    echo "$bin"; exit 0
fi

minor() { local v; v=$("$1" env GOVERSION 2>/dev/null) || return 1; v=${v#go1.}; echo "${v%%[.a-z]*}"; }
start=
for g in "$(command -v go || true)" /usr/local/go/bin/go $(ls -d /usr/lib/go-1.*/bin/go 2>/dev/null | sort -V -r); do
    [ -n "$g" ] && [ -x "$g" ] && [ "$(minor "$g" || echo 0)" -ge 21 ] && { start=$g; break; }
done
echo "Getting Go $pin for building the test world's Kubernetes components (once; kept in $root)" >&2
if [ -z "$start" ]; then
    echo "  [1/2] no Go >= 1.21 here: installing Debian's golang-go from bookworm-backports..." >&2
    [ "$(id -u)" = 0 ] || { echo "FAILED: run as root (apt-get), or put a Go >= 1.21 on PATH" >&2; exit 1; }
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            > /etc/apt/sources.list.d/bookworm-backports.sources
        echo "      (added /etc/apt/sources.list.d/bookworm-backports.sources)" >&2
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends -t bookworm-backports golang-go >&2 ||
        { echo "FAILED: apt-get install -t bookworm-backports golang-go (is the Debian mirror reachable?)" >&2; exit 1; }
    start=$(ls -d /usr/lib/go-1.*/bin/go 2>/dev/null | sort -V | tail -1)
    [ -n "$start" ] || { echo "FAILED: golang-go from bookworm-backports left no /usr/lib/go-1.*/bin/go" >&2; exit 1; }
else
    echo "  [1/2] starting from $start ($("$start" env GOVERSION))" >&2
fi
echo "  [2/2] fetching $pin from the Go module proxy, checksum verified (about 75 MB)..." >&2
mkdir -p "$root"
# GOTOOLCHAIN makes the go command fetch, verify and run the pinned toolchain; GOMODCACHE keeps
# it in our cache. `go version` is enough to trigger it.
GOTOOLCHAIN=$pin GOPATH=$root/gopath GOMODCACHE=$root/mod GOFLAGS=-modcacherw "$start" version >&2 ||
    { echo "FAILED: fetching $pin through the Go module proxy (GOPROXY=$("$start" env GOPROXY)); retry: tools/go.sh" >&2; exit 1; }
[ "$("$bin/go" env GOVERSION 2>/dev/null)" = "$pin" ] ||
    { echo "FAILED: $bin/go does not report $pin" >&2; exit 1; }
echo "Go $pin ready: $bin" >&2
echo "$bin"
