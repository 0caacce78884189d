#!/usr/bin/env bash
# Builds a pinned Go component (tools/NAME: a wrapper module whose go.mod/go.sum pin the
# release) into a cache OUTSIDE the checkout, keyed by the pins, so a fresh clone on the same
# machine reuses it and a changed pin builds anew:
#     ~/.cache/provisioner/NAME-VERSION-KEY/bin/<command>...
# Prints that folder on stdout; what it does and its progress go to stderr. A second run only
# checks that the binaries are there.
#
# Usage: tools/build.sh NAME [--print-dir]       NAME: k8s | etcd | kueue
#        PROVISIONER_CACHE=DIR overrides ~/.cache/provisioner.
set -euo pipefail
name=${1:?usage: tools/build.sh NAME [--print-dir]}
here=$(cd "$(dirname "$0")" && pwd)
dir=$here/$name
[ -f "$dir/build.conf" ] || { echo "tools/build.sh: no component '$name' (no tools/$name/build.conf)" >&2; exit 2; }
# build.conf sets: MODULE (whose version names the build), CMDS (package paths), STATIC (commands
# built with CGO_ENABLED=0), EST (how long a cold build takes), and may define ldflags() and
# files() (copies data files the component ships, e.g. CRDs, from Go's module cache into the
# folder it is given: they land in .../share/ next to bin/).
STATIC=(); ldflags() { :; }
# shellcheck source=/dev/null
. "$dir/build.conf"
command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin   # Go's own installer puts it there
# Go >= 1.24 is needed; with none here (Debian 12's golang-go is 1.19), tools/go.sh gets the
# pinned toolchain (tools/go.version) into the cache, saying so, and we build with it.
gov=$(go env GOVERSION 2>/dev/null || true); gov=${gov#go1.}; gov=${gov%%[.a-z]*}
if [ "${gov:-0}" -lt 24 ] 2>/dev/null || [ -z "$gov" ]; then
    gobin=$("$here/go.sh") || { echo "FAILED: building $name: no Go >= 1.24 (tools/go.sh could not get one)" >&2; exit 1; }
    PATH=$gobin:$PATH
    unset GOROOT
fi
V=$(sed -n "s|^[[:space:]]*$MODULE \\(v[^ ]*\\)\\( //.*\\)\\{0,1\\}\$|\\1|p" "$dir/go.mod" | head -1)
[ -n "$V" ] || { echo "FAILED: tools/$name/go.mod does not pin $MODULE; regenerate it with tools/$name/gen-gomod.sh" >&2; exit 1; }
# The key covers what changes the binaries: the pins, the component's recipe (build.conf) and
# RECIPE, the version of the build command below (bump it when that command changes; an edit
# of a comment here, or of build.conf's EST estimate, must not cost a rebuild).
RECIPE=1
key=$( (cat "$dir/go.mod" "$dir/go.sum"; grep -v '^EST=' "$dir/build.conf"; echo "recipe $RECIPE; $(go env GOVERSION 2>/dev/null)") |
      sha256sum | cut -c1-12)
root=${PROVISIONER_CACHE:-$HOME/.cache/provisioner}
out=$root/$name-$V-$key
if [ "${2:-}" = --print-dir ]; then echo "$out"; exit 0; fi

bins=(); for p in "${CMDS[@]}"; do bins+=("${p##*/}"); done
[ "$name" = etcd ] && bins=(etcd)   # etcd's main package is its module root (.../server/v3)
has_files=0; [ "$(type -t files)" = function ] && has_files=1
have=1; for b in "${bins[@]}"; do [ -x "$out/bin/$b" ] || have=0; done
[ $has_files = 1 ] && [ ! -d "$out/share" ] && have=0
if [ $have = 1 ]; then echo "$out"; exit 0; fi

log=$out.log
fail() {
    echo "FAILED: building $name $V: $1." >&2
    echo "  Log: $log" >&2
    echo "  Retry: tools/build.sh $name (finished downloads and compiled packages are kept in Go's caches)" >&2
    exit 1
}
mkdir -p "$root"
: > "$log"
echo "Building $name $V (${bins[*]}) from the Go module proxy into $out" >&2
echo "  One-time step: $EST on 2 cores from empty Go caches (downloads included), a minute or two when only the link is missing; later runs reuse it." >&2
cd "$dir"
echo "  [1/3] downloading modules..." >&2
go mod download >>"$log" 2>&1 || fail "go mod download (is the Go module proxy reachable?)"
total=$(go list -deps "${CMDS[@]}" 2>>"$log" | wc -l) || fail "go list"
echo "  [2/3] compiling (up to $total packages; cached ones are skipped; a line per 100)..." >&2
tmp=$(mktemp -d "$root/.$name-build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS
ld="-s -w $(ldflags "$V")"
for p in "${CMDS[@]}"; do
    b=${p##*/}; [ "$name" = etcd ] && b=etcd
    cgo=1; for s in "${STATIC[@]}"; do [ "$s" = "$b" ] && cgo=0; done
    CGO_ENABLED=$cgo go build -v -p 2 -trimpath -pgo=off -ldflags "$ld" -o "$tmp/$b" "$p" 2>&1
done | tee -a "$log" |
    awk -v t="$total" '!/^(#|go: )/ { n++; if (n % 100 == 0) { printf "      %d packages compiled (of up to %d)\n", n, t > "/dev/stderr"; fflush() } }'
for b in "${bins[@]}"; do [ -x "$tmp/$b" ] || fail "no $b was produced (see the end of the log)"; done
echo "  [3/3] checking the binaries..." >&2
check "$tmp" "$V" >>"$log" 2>&1 || fail "the built binaries do not report version $V"
if [ $has_files = 1 ]; then
    mkdir -p "$tmp.share" && trap 'rm -rf "$tmp" "$tmp.share"' EXIT
    files "$tmp.share" >>"$log" 2>&1 || fail "copying the files it ships from Go's module cache"
    mkdir -p "$out" && rm -rf "$out/share" && mv "$tmp.share" "$out/share"
fi
mkdir -p "$out" && rm -rf "$out/bin" && mv "$tmp" "$out/bin" && trap - EXIT
echo "Built $name $V in $((SECONDS - start)) s: $out/bin" >&2
# Builds for other pins stay (an older checkout may still use them); say what they hold.
old=$(find "$root" -mindepth 1 -maxdepth 1 -type d -name "$name-v*" ! -path "$out" | sort)
if [ -n "$old" ]; then
    echo "  Other builds of $name here ($(du -shc $old | tail -1 | cut -f1)), unused by this checkout: remove with" >&2
    echo "    rm -rf $(echo $old) $(for d in $old; do echo -n "$d.log "; done)" >&2
fi
echo "$out"
