#!/usr/bin/env bash
# The web console's front-end libraries, from their official npm packages at pinned versions,
# each tarball checked against its pinned integrity hash (the registry's sha512) before use.
# They are served by the console itself (no CDN at run time). Needs npm (Debian: apt-get
# install npm); skips everything when the files are already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

VENDOR=services/web/static/vendor
# package@version  sha512 integrity (npm view PACKAGE@VERSION dist.integrity)  files to keep (path in the package -> name)
PACKAGES=(
    "asciinema-player@3.18.0|sha512-5gpt2ipFcy4NKmgkv+c/QXnJ9zMicxqWROCOuJqgwwtiYKM8Qe9hnDOvfqke5bW6M2DW/seO3uQYkQ0xeUUVtw==|dist/bundle/asciinema-player.min.js dist/bundle/asciinema-player.css dist/bundle/asciinema-player-worker.min.js LICENSE"
    "@xterm/xterm@6.0.0|sha512-TQwDdQGtwwDt+2cgKDLn0IRaSxYu1tSUjgKarSDkUM0ZNiSRXFpjxEsvc/Zgc5kq5omJ+V0a8/kIM2WD3sMOYg==|lib/xterm.mjs css/xterm.css LICENSE"
)
say() { printf 'web assets: %s\n' "$*"; }
die() { printf 'web assets: error: %s\n' "$*" >&2; exit 1; }

stamp="$VENDOR/.pinned"
wanted=$(printf '%s\n' "${PACKAGES[@]}" | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
    exit 0
fi
command -v npm >/dev/null || die "npm is needed to fetch the console's front-end packages (apt-get install npm)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$VENDOR"
for entry in "${PACKAGES[@]}"; do
    IFS='|' read -r spec integrity files <<<"$entry"
    say "fetching $spec"
    tarball=$(cd "$work" && npm pack --silent "$spec" 2>/dev/null | tail -n 1) \
        || die "npm pack $spec failed; check the network or the npm registry settings"
    actual="sha512-$(openssl dgst -sha512 -binary "$work/$tarball" | base64 -w0)"
    [ "$actual" = "$integrity" ] || die "$spec: integrity $actual does not match the pinned $integrity; not using it"
    dir="$work/${tarball%.tgz}"
    mkdir -p "$dir"
    tar -xzf "$work/$tarball" -C "$dir"
    name=${spec%@*}
    for f in $files; do
        [ -f "$dir/package/$f" ] || die "$spec has no $f"
        base=$(basename "$f")
        [ "$base" = LICENSE ] && base="LICENSE.${name//[@\/]/_}"
        install -m 0644 "$dir/package/$f" "$VENDOR/$base"
    done
done
echo "$wanted" > "$stamp"
say "ready in $VENDOR"
