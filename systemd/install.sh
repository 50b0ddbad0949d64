#!/usr/bin/env bash
# Install or update edgeagent as a systemd service on a Raspberry Pi or another Debian-based edge
# box. Run as root from a checkout (or release tarball) that has this systemd/ directory.
# Idempotent: running it again updates the code and the unit files and leaves the config,
# the credentials and the outbox alone.
set -euo pipefail

readonly PREFIX=/opt/edgeagent
readonly VENV=$PREFIX/venv
readonly CONFIG_DIR=/etc/edgeagent
readonly CONFIG=$CONFIG_DIR/edgeagent.yaml
# /usr/local/lib/... rather than /etc/...: files of the same name in /etc override these, so an
# administrator's own copies and `systemctl edit` drop-ins survive a re-install.
readonly UNIT_DIR=/usr/local/lib/systemd/system
readonly SYSUSERS_DIR=/usr/local/lib/sysusers.d
readonly TMPFILES_DIR=/usr/local/lib/tmpfiles.d
readonly MODULES_LOAD=/etc/modules-load.d/edgeagent.conf
readonly UNIT=edgeagent.service
# The system interpreter by default: a venv links back to the Python it was made with, and one
# under /root or /home (pyenv, conda, ...) is hidden from the service by ProtectHome=yes.
if [ -z "${PYTHON:-}" ]; then
    if [ -x /usr/bin/python3 ]; then PYTHON=/usr/bin/python3; else PYTHON=python3; fi
fi

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
readonly HERE

usage() {
    cat <<EOF
Usage: $(basename -- "$0") [OPTIONS] SOURCE

Install or update edgeagent as a systemd service (run as root).

SOURCE is an edgeagent wheel (edgeagent-*.whl) or the path of an edgeagent source
tree (the directory holding pyproject.toml).

Options:
  --site-id ID      site id for a new config (needed on the first install only)
  --gateway-id ID   gateway id for a new config (needed on the first install only)
  --enable          enable the service and start it now (restart it if it runs)
  -h, --help        show this help

What it does:
  - creates the system user 'edgeagent' (member of 'dialout') and
    $CONFIG_DIR/credentials (0700 root)
  - has the usbserial and cdc_acm modules loaded at boot ($MODULES_LOAD)
  - creates the virtualenv $VENV (with \$PYTHON, default /usr/bin/python3,
    Python >= 3.11) and installs SOURCE into it
  - installs $UNIT into $UNIT_DIR
  - writes $CONFIG with 'edgeagent init' if it does not exist yet
  - runs 'systemctl daemon-reload' (when systemd is running)

Examples:
  sudo ./systemd/install.sh --site-id acacia-gardens --gateway-id gw-01 --enable dist/edgeagent-0.1.0-py3-none-any.whl
  sudo ./systemd/install.sh .          # update from the source tree, keep the service as it is
EOF
}

log() { printf '==> %s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() {
    printf 'install.sh: %s\n' "$*" >&2
    exit 1
}
usage_error() {
    printf 'install.sh: %s\n' "$*" >&2
    printf "Try '%s --help'.\n" "$(basename -- "$0")" >&2
    exit 2
}

# --- arguments ---------------------------------------------------------------------------------
source_arg=""
site_id=""
gateway_id=""
enable=0
while [ $# -gt 0 ]; do
    case $1 in
        --site-id | --gateway-id)
            if [ $# -lt 2 ] || [ -z "$2" ]; then usage_error "$1 needs a value"; fi
            if [ "$1" = --site-id ]; then site_id=$2; else gateway_id=$2; fi
            shift 2
            ;;
        --site-id=*) site_id=${1#*=}; shift ;;
        --gateway-id=*) gateway_id=${1#*=}; shift ;;
        --enable) enable=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) usage_error "unknown option: $1" ;;
        *)
            [ -z "$source_arg" ] || usage_error "only one SOURCE may be given"
            source_arg=$1
            shift
            ;;
    esac
done
if [ $# -gt 0 ]; then
    if [ -n "$source_arg" ] || [ $# -gt 1 ]; then usage_error "only one SOURCE may be given"; fi
    source_arg=$1
fi
[ -n "$source_arg" ] || usage_error "missing SOURCE (a wheel or a source tree)"

# --- checks before anything is changed ---------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "must run as root (try: sudo $0 ...)"

[ -e "$source_arg" ] || die "SOURCE not found: $source_arg"
source_path=$(realpath -- "$source_arg")
if [ -d "$source_path" ]; then
    [ -f "$source_path/pyproject.toml" ] || die "not a source tree (no pyproject.toml): $source_path"
    source_kind=tree
else
    case $source_path in
        *.whl) source_kind=wheel ;;
        *) die "SOURCE must be a .whl file or a source tree: $source_path" ;;
    esac
fi

for f in edgeagent.service edgeagent.sysusers edgeagent.tmpfiles; do
    [ -f "$HERE/$f" ] || die "missing $HERE/$f (run this script from its systemd/ directory)"
done

for cmd in systemctl systemd-sysusers systemd-tmpfiles; do
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd not found: this box does not use systemd"
done

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    die "$PYTHON not found (apt-get install python3 python3-venv)"
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "edgeagent needs Python >= 3.11; $PYTHON is $("$PYTHON" -c 'import platform; print(platform.python_version())')"
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
    || die "$PYTHON cannot create virtualenvs (apt-get install python3-venv)"
python_real=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.executable))')
case $python_real in
    /root/* | /home/* | /run/user/*)
        die "$PYTHON is $python_real, which the service cannot see (ProtectHome=yes); use PYTHON=/usr/bin/python3"
        ;;
esac

if [ ! -e "$CONFIG" ] && { [ -z "$site_id" ] || [ -z "$gateway_id" ]; }; then
    die "no $CONFIG yet: the first install needs --site-id and --gateway-id (or write the config first)"
fi

systemd_running=0
# The documented test for "booted with systemd" (sd_booted(3)); false in a chroot or image build.
[ -d /run/systemd/system ] && systemd_running=1

# Whatever root's umask is, the venv and the unit files must be readable by the edgeagent user.
umask 0022

# --- user, group and directories -----------------------------------------------------------------
log "system user 'edgeagent' (sysusers.d)"
install -D -m 0644 "$HERE/edgeagent.sysusers" "$SYSUSERS_DIR/edgeagent.conf"
systemd-sysusers "$SYSUSERS_DIR/edgeagent.conf"

log "$CONFIG_DIR and $CONFIG_DIR/credentials (tmpfiles.d)"
install -D -m 0644 "$HERE/edgeagent.tmpfiles" "$TMPFILES_DIR/edgeagent.conf"
systemd-tmpfiles --create "$TMPFILES_DIR/edgeagent.conf"

# The unit's DeviceAllow=char-ttyUSB/char-ttyACM is resolved through /proc/devices when the
# service starts, and those names are only there once usbserial/cdc_acm are loaded. Loading them
# at boot means a USB-serial adapter plugged in later is not blocked until the next restart.
log "serial modules loaded at boot ($MODULES_LOAD)"
modules_conf='# Written by edgeagent install.sh: edgeagent.service allows the ttyUSB and ttyACM device
# classes, which exist only once these modules are loaded (see the unit file).
usbserial
cdc_acm'
if [ ! -f "$MODULES_LOAD" ] || [ "$(cat -- "$MODULES_LOAD")" != "$modules_conf" ]; then
    install -d -m 0755 "$(dirname -- "$MODULES_LOAD")"
    printf '%s\n' "$modules_conf" >"$MODULES_LOAD"
fi
if command -v modprobe >/dev/null 2>&1; then
    modprobe -q -a usbserial cdc_acm || warn "could not load usbserial/cdc_acm now (built in, or not in this kernel)"
fi

# --- code ----------------------------------------------------------------------------------------
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c '' 2>/dev/null; then
    log "virtualenv $VENV exists"
else
    # Missing, or broken by an upgrade of the system Python: (re)create it.
    log "creating virtualenv $VENV"
    install -d -m 0755 "$PREFIX"
    "$PYTHON" -m venv --clear "$VENV"
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT

if [ "$source_kind" = tree ]; then
    log "building a wheel from $source_path"
    "$VENV/bin/python" -m pip wheel --quiet --no-deps --wheel-dir "$work" "$source_path"
    wheels=("$work"/edgeagent-*.whl)
    [ -f "${wheels[0]}" ] || die "building $source_path produced no edgeagent wheel"
    wheel=${wheels[0]}
else
    wheel=$source_path
fi

log "installing $(basename -- "$wheel") into $VENV"
# First the package with its dependencies (upgrading only what its requirements demand), then the
# package alone once more, so that a rebuilt wheel with an unchanged version number replaces
# the installed copy too.
"$VENV/bin/python" -m pip install --quiet "$wheel"
"$VENV/bin/python" -m pip install --quiet --no-deps --force-reinstall "$wheel"
[ -x "$VENV/bin/edgeagent" ] || die "$VENV/bin/edgeagent is missing after the install"

if [ -f "$HERE/README.md" ]; then
    install -m 0644 "$HERE/README.md" "$PREFIX/README.md"
fi

# --- unit ----------------------------------------------------------------------------------------
log "installing $UNIT_DIR/$UNIT"
install -D -m 0644 "$HERE/edgeagent.service" "$UNIT_DIR/$UNIT"
if [ "$systemd_running" -eq 1 ]; then
    systemctl daemon-reload
fi

# --- config --------------------------------------------------------------------------------------
if [ -e "$CONFIG" ]; then
    log "keeping the existing $CONFIG"
    if [ -n "$site_id" ] || [ -n "$gateway_id" ]; then
        warn "--site-id/--gateway-id are used only for a new config; $CONFIG was left as it is"
    fi
else
    log "writing $CONFIG (edgeagent init)"
    if ! "$VENV/bin/edgeagent" init --site-id "$site_id" --gateway-id "$gateway_id" --config "$CONFIG"; then
        rm -f -- "$CONFIG"
        die "'edgeagent init' failed; nothing was written to $CONFIG"
    fi
    # Readable by the daemon's group, writable by root only: the daemon never writes its config.
    chown root:edgeagent "$CONFIG"
    chmod 0640 "$CONFIG"
fi

# --- service -------------------------------------------------------------------------------------
if [ "$enable" -eq 1 ]; then
    if [ "$systemd_running" -eq 1 ]; then
        if systemctl is-active --quiet "$UNIT"; then
            log "restarting $UNIT on the new code"
            systemctl restart "$UNIT"
        fi
        log "enabling and starting $UNIT"
        systemctl enable --now "$UNIT"
    else
        log "enabling $UNIT (systemd is not running here: it starts on the next boot)"
        systemctl enable "$UNIT"
    fi
elif [ "$systemd_running" -eq 1 ] && systemctl is-active --quiet "$UNIT"; then
    log "$UNIT still runs the previous code: systemctl restart $UNIT"
fi

cat <<EOF

Installed.
  code:        $VENV
  config:      $CONFIG
  credentials: $CONFIG_DIR/credentials/{mqtt-password,mqtt-client-key} (0600 root)
  state:       /var/lib/edgeagent
  unit:        $UNIT_DIR/$UNIT
Check it with: systemctl status edgeagent; journalctl -u edgeagent; $VENV/bin/edgeagent status
EOF
