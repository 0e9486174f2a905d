# Shared by scripts/run, scripts/test and scripts/bench: make sure the host has
# what nsd needs and that .venv is current. Sourced, not executed.
set -euo pipefail

NSD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$NSD_ROOT/.venv"
PY="$VENV/bin/python"

log() { printf '==> %s\n' "$*" >&2; }

# Debian packages: the interpreter (Debian's, not whatever `python3` on PATH
# is), venv support, and the tools the tests use to inspect from outside.
ensure_packages() {
    local wanted=(python3 python3-venv iproute2 util-linux passwd procps iputils-ping strace
                  systemd systemd-container dbus dbus-daemon libpam-systemd nftables "$@")
    local missing=()
    for p in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        [ "$(id -u)" -eq 0 ] || { echo "need root to install: ${missing[*]}" >&2; exit 1; }
        log "installing Debian packages: ${missing[*]}"
        # Wait for another apt or unattended-upgrades instead of failing on
        # "Could not get lock /var/lib/dpkg/lock-frontend" (10 minutes at most).
        local lock=(-o DPkg::Lock::Timeout=600)
        DEBIAN_FRONTEND=noninteractive apt-get "${lock[@]}" update -qq
        DEBIAN_FRONTEND=noninteractive apt-get "${lock[@]}" install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

# The venv is rebuilt when pyproject.toml changes (the stamp holds its hash).
ensure_venv() {
    local extras=${1:-test}
    local stamp="$VENV/.nsd-stamp" want
    want="$(sha256sum "$NSD_ROOT/pyproject.toml" | cut -d' ' -f1)-$extras"
    if [ ! -x "$PY" ]; then
        log "creating $VENV"
        /usr/bin/python3 -m venv "$VENV"
    fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        log "installing nsd and its dependencies into $VENV"
        "$PY" -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
        "$PY" -m pip install -q --disable-pip-version-check -e "$NSD_ROOT[$extras]" 2>&1 \
            | grep -vE '^WARNING: Location|BuildBackendWarning|^\s*$' || true
        "$PY" -c 'import nsd, pyroute2' || { echo "venv install failed" >&2; exit 1; }
        echo "$want" > "$stamp"
    fi
}
