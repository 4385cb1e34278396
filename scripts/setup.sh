#!/usr/bin/env bash
# Installs what Ringfence needs on a Debian-family host, skipping what is
# already there, so a second run takes a second or two.
#   system: bcc (python3-bpfcc), kernel headers for bcc, openssh, iproute2
#   venv:   .venv with the project and its Python dependencies, bcc linked in
#   web:    the console's front-end packages from npm, pinned and hash-checked (scripts/web_assets.sh)
#   tests:  with RINGFENCE_SETUP_TESTS=1 (make test), Debian's chromium for the browser tests
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
# The system Python by default: session users (SSH logins) run the ForceCommand
# wrapper from this venv, so its interpreter must be reachable by every account
# (a pyenv under /root is not), and Debian's bcc is built for it.
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && PYTHON=/usr/bin/python3
fi
say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "$1 needs root; run 'sudo make ...' or install it yourself: $2"
}

apt_missing=()
want_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed" || apt_missing+=("$1"); }

# --- system packages -------------------------------------------------------
command -v dpkg-query >/dev/null || die "this setup knows Debian/Ubuntu (dpkg, apt-get); install bcc, kernel headers and openssh by hand elsewhere"
want_pkg python3-bpfcc
want_pkg openssh-server
want_pkg openssh-client
want_pkg iproute2
want_pkg procps
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || want_pkg python3-venv
command -v npm >/dev/null || want_pkg npm  # fetches the console's front-end packages
# The browser tests drive Debian's Chromium (Playwright never downloads a browser here).
[ "${RINGFENCE_SETUP_TESTS:-0}" = 1 ] && ! command -v chromium >/dev/null && want_pkg chromium

KREL=$(uname -r)
KBUILD=/lib/modules/$KREL/build
headers_ok() { [ -e "$KBUILD/include/generated/autoconf.h" ] || [ -e "$KBUILD/include/config/auto.conf" ]; }
headers_fallback=0
if ! headers_ok; then
    if apt-cache show "linux-headers-$KREL" >/dev/null 2>&1; then
        want_pkg "linux-headers-$KREL"
    else
        # No headers for this exact kernel (custom or newer kernel): use the
        # distribution's current headers. bcc needs only the UAPI/BPF definitions.
        want_pkg "linux-headers-$(dpkg --print-architecture)"
        headers_fallback=1
    fi
fi

if ((${#apt_missing[@]})); then
    need_root "installing ${apt_missing[*]}" "apt-get install ${apt_missing[*]}"
    say "installing Debian packages: ${apt_missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed; check the network or the apt sources"
    apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null \
        || die "apt-get install ${apt_missing[*]} failed"
fi

if ! headers_ok && ((headers_fallback)); then
    need_root "linking kernel headers" "ln -s /usr/src/linux-headers-*-ARCH $KBUILD"
    arch=$(dpkg --print-architecture)
    tree=$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -n 1)
    common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
    [ -n "$tree" ] && [ -n "$common" ] || die "no kernel header trees under /usr/src after installing linux-headers-$arch"
    mkdir -p "/lib/modules/$KREL"
    ln -sfn "$tree" "$KBUILD"
    ln -sfn "$common" "/lib/modules/$KREL/source"
    say "kernel $KREL has no headers package; bcc uses $tree (+ $common)"
fi
headers_ok || die "kernel headers for $KREL not found at $KBUILD; bcc cannot compile BPF programs without them"

# --- virtual environment ---------------------------------------------------
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); Ringfence needs Python 3.11 or newer (set PYTHON=...)"
base=$(readlink -f "$(command -v "$PYTHON")")
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.base-python" 2>/dev/null)" != "$base" ]; then
    say "$VENV was made with another Python; recreating it with $base"
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $base"
    "$PYTHON" -m venv "$VENV"
    echo "$base" > "$VENV/.base-python"
fi

# bcc is a Debian package (it must match the system libbcc), not a wheel:
# expose only the bcc package to the venv, not all of dist-packages.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
bcc_src=/usr/lib/python3/dist-packages/bcc
if [ -d "$bcc_src" ] && [ ! -e "$VENV/bcc-link/bcc" ]; then
    mkdir -p "$VENV/bcc-link"
    ln -sfn "$bcc_src" "$VENV/bcc-link/bcc"
    echo "$(cd "$VENV/bcc-link" && pwd)" > "$site/ringfence-bcc.pth"
fi

stamp="$VENV/.setup-done-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    say "installing Python dependencies into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]' \
        || die "pip install failed; see the messages above"
    rm -f "$VENV"/.setup-done-*
    touch "$stamp"
fi
"$VENV/bin/python" -c 'import bcc, nats, msgspec' 2>/dev/null \
    || die "the venv cannot import bcc, nats or msgspec; delete $VENV and run again"

# --- web console assets ------------------------------------------------------
./scripts/web_assets.sh
say "ready"
