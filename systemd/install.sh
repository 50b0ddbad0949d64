#!/usr/bin/env bash
# Install or update edgeagent as a systemd service on a Raspberry Pi or another Debian-based edge
# box. Run as root from a checkout (or release tarball) that has this systemd/ directory.
# Idempotent: running it again updates the code and the unit files and leaves the config,
# the credentials and the outbox alone.
# With --root DIR it writes the same files under DIR instead, as any user, and leaves the machine
# itself alone (no user, owner, kernel module or systemctl changes): for tests and for looking
# at an install.
set -euo pipefail

# Where the files go; with --root DIR each of these is prefixed with DIR once the arguments are read.
PREFIX=/opt/edgeagent
VENV=$PREFIX/venv
CONFIG_DIR=/etc/edgeagent
CONFIG=$CONFIG_DIR/edgeagent.yaml
# /usr/local/lib/... rather than /etc/...: files of the same name in /etc override these, so an
# administrator's own copies and `systemctl edit` drop-ins survive a re-install.
UNIT_DIR=/usr/local/lib/systemd/system
SYSUSERS_DIR=/usr/local/lib/sysusers.d
TMPFILES_DIR=/usr/local/lib/tmpfiles.d
MODULES_LOAD=/etc/modules-load.d/edgeagent.conf
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
  --local-broker    also set up the box's own mosquitto for wristband gateways and
                    guard-room panels ('edgeagent broker setup': no anonymous clients,
                    an ACL, TLS on the LAN listener, the daemon's account). Needs
                    Debian's mosquitto (apt-get install mosquitto). Idempotent.
  --lan-address ADDR
                    with --local-broker: the LAN address for the TLS listener
                    (default: every interface), also named in its certificate
  --root DIR        write every file under DIR (DIR/opt/edgeagent, DIR/etc/edgeagent,
                    DIR/usr/local/lib/..., DIR/etc/modules-load.d) instead of /, as any
                    user. The machine is left alone: no user is created, no owner
                    changed, no module loaded, systemctl is not run (so no --enable),
                    and any \$PYTHON is accepted. For tests and for looking at an
                    install: the venv's scripts name DIR/opt/edgeagent/venv, so the
                    tree cannot be copied elsewhere and run.
  -h, --help        show this help

What it does:
  - creates the system user 'edgeagent' (member of 'dialout') and
    $CONFIG_DIR/credentials (0700 root)
  - has the usbserial and cdc_acm modules loaded at boot ($MODULES_LOAD)
  - creates the virtualenv $VENV (with \$PYTHON, default /usr/bin/python3,
    Python >= 3.11) and installs SOURCE into it
  - installs $UNIT into $UNIT_DIR
  - writes $CONFIG with 'edgeagent init' if it does not exist yet
  - with --local-broker: /etc/mosquitto/conf.d/edgeagent.conf, the password file
    and ACL, the LAN certificate, and the daemon's broker password in
    $CONFIG_DIR/credentials/local-mqtt-password; restarts mosquitto if its config changed
  - runs 'systemctl daemon-reload' (when systemd is running)

Examples:
  sudo ./systemd/install.sh --site-id acacia-gardens --gateway-id gw-01 --enable dist/edgeagent-0.1.0-py3-none-any.whl
  sudo ./systemd/install.sh .          # update from the source tree, keep the service as it is
  ./systemd/install.sh --root /tmp/ea --site-id s1 --gateway-id gw-01 edgeagent-0.1.0-py3-none-any.whl
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
root=""
local_broker=0
lan_address=""
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
        --local-broker) local_broker=1; shift ;;
        --lan-address)
            if [ $# -lt 2 ] || [ -z "$2" ]; then usage_error "$1 needs a value"; fi
            lan_address=$2
            shift 2
            ;;
        --lan-address=*) lan_address=${1#*=}; shift ;;
        --root)
            if [ $# -lt 2 ] || [ -z "$2" ]; then usage_error "$1 needs a value"; fi
            root=$2
            shift 2
            ;;
        --root=*) root=${1#*=}; shift ;;
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
if [ -n "$lan_address" ] && [ "$local_broker" -eq 0 ]; then
    usage_error "--lan-address is for the local broker: add --local-broker"
fi
if [ -n "$root" ]; then
    [ "$enable" -eq 0 ] || usage_error "--enable cannot be used with --root (nothing runs from DIR)"
    [ "$(realpath -m -- "$root")" != / ] || usage_error "--root /: leave --root out for a real install"
fi

# --- checks before anything is changed ---------------------------------------------------------
if [ -z "$root" ]; then
    [ "$(id -u)" -eq 0 ] || die "must run as root (try: sudo $0 ...)"
fi

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

if [ -z "$root" ]; then
    for cmd in systemctl systemd-sysusers systemd-tmpfiles; do
        command -v "$cmd" >/dev/null 2>&1 || die "$cmd not found: this box does not use systemd"
    done
fi

# Installing mosquitto is apt's job (its package brings the user, the unit and /etc/mosquitto); this
# script only configures it, with the password hashing of that same package (mosquitto_passwd).
if [ "$local_broker" -eq 1 ]; then
    if ! command -v mosquitto_passwd >/dev/null 2>&1 \
        || { ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; }; then
        die "--local-broker needs Debian's mosquitto: apt-get install mosquitto, then run this again"
    fi
fi

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
        # Under --root the service never runs this venv: any interpreter will do.
        [ -n "$root" ] \
            || die "$PYTHON is $python_real, which the service cannot see (ProtectHome=yes); use PYTHON=/usr/bin/python3"
        ;;
esac

# Every path written below starts with ROOT: empty for a real install.
if [ -n "$root" ]; then
    mkdir -p -- "$root"
    root=$(realpath -- "$root")
fi
readonly ROOT=$root
PREFIX=$ROOT$PREFIX VENV=$ROOT$VENV CONFIG_DIR=$ROOT$CONFIG_DIR CONFIG=$ROOT$CONFIG
UNIT_DIR=$ROOT$UNIT_DIR SYSUSERS_DIR=$ROOT$SYSUSERS_DIR TMPFILES_DIR=$ROOT$TMPFILES_DIR
MODULES_LOAD=$ROOT$MODULES_LOAD
readonly PREFIX VENV CONFIG_DIR CONFIG UNIT_DIR SYSUSERS_DIR TMPFILES_DIR MODULES_LOAD

if [ ! -e "$CONFIG" ] && { [ -z "$site_id" ] || [ -z "$gateway_id" ]; }; then
    die "no $CONFIG yet: the first install needs --site-id and --gateway-id (or write the config first)"
fi

systemd_running=0
# The documented test for "booted with systemd" (sd_booted(3)); false in a chroot or image build.
# Under --root this machine's systemd is left alone whether it runs or not.
if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then systemd_running=1; fi

# Whatever root's umask is, the venv and the unit files must be readable by the edgeagent user.
umask 0022

if [ -n "$ROOT" ]; then
    log "installing under $ROOT (--root): this machine's users, owners, modules and systemd are left alone"
fi

# --- user, group and directories -----------------------------------------------------------------
log "system user 'edgeagent' (sysusers.d)"
install -D -m 0644 "$HERE/edgeagent.sysusers" "$SYSUSERS_DIR/edgeagent.conf"
if [ -z "$ROOT" ]; then
    systemd-sysusers "$SYSUSERS_DIR/edgeagent.conf"
else
    log "skipping systemd-sysusers (--root): no user 'edgeagent' is created"
fi

log "$CONFIG_DIR and $CONFIG_DIR/credentials (tmpfiles.d)"
install -D -m 0644 "$HERE/edgeagent.tmpfiles" "$TMPFILES_DIR/edgeagent.conf"
if [ -z "$ROOT" ]; then
    systemd-tmpfiles --create "$TMPFILES_DIR/edgeagent.conf"
else
    # The modes of the tmpfiles.d entries; the owner is whoever runs this.
    log "skipping systemd-tmpfiles (--root): directories made with the same modes, owned by $(id -un)"
    install -d -m 0755 "$CONFIG_DIR"
    install -d -m 0700 "$CONFIG_DIR/credentials"
fi

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
if [ -n "$ROOT" ]; then
    log "skipping modprobe (--root)"
elif command -v modprobe >/dev/null 2>&1; then
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
    # From a clean copy: setuptools puts into the wheel whatever an earlier build left in build/lib
    # (modules since moved or deleted), and a build run as root would leave root's files in the tree.
    mkdir -- "$work/src"
    tar -C "$source_path" --exclude=./build --exclude=./dist --exclude=./.venv --exclude=./.git \
        --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$work/src" -xf -
    "$VENV/bin/python" -m pip wheel --quiet --no-deps --wheel-dir "$work" "$work/src"
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
if [ -n "$ROOT" ]; then
    log "skipping systemctl daemon-reload (--root)"
elif [ "$systemd_running" -eq 1 ]; then
    systemctl daemon-reload
fi

# --- config --------------------------------------------------------------------------------------
if [ -e "$CONFIG" ]; then
    log "keeping the existing $CONFIG"
    if [ -n "$site_id" ] || [ -n "$gateway_id" ]; then
        warn "--site-id/--gateway-id are used only for a new config; $CONFIG was left as it is"
    fi
    # The new code must accept the existing config, with every file it refers to in place (secret files,
    # TLS files, platform keys), before the service is restarted on it.
    if ! "$VENV/bin/edgeagent" config validate --strict --config "$CONFIG"; then
        if [ "$enable" -eq 1 ]; then
            die "$CONFIG does not pass 'edgeagent config validate --strict' with the new code; fix it, then run again"
        fi
        warn "$CONFIG does not pass 'edgeagent config validate --strict'; fix it before restarting the service"
    fi
else
    log "writing $CONFIG (edgeagent init)"
    if ! "$VENV/bin/edgeagent" init --site-id "$site_id" --gateway-id "$gateway_id" --config "$CONFIG"; then
        rm -f -- "$CONFIG"
        die "'edgeagent init' failed; nothing was written to $CONFIG"
    fi
    # Readable by the daemon's group, writable by root only: the daemon never writes its config.
    if [ -z "$ROOT" ]; then
        chown root:edgeagent "$CONFIG"
    else
        log "skipping chown root:edgeagent $CONFIG (--root)"
    fi
    chmod 0640 "$CONFIG"
fi

# --- the box's own broker ---------------------------------------------------------------------------
if [ "$local_broker" -eq 1 ]; then
    log "the box's own broker (edgeagent broker setup)"
    broker_args=(broker setup --config "$CONFIG")
    if [ -n "$ROOT" ]; then broker_args+=(--root "$ROOT"); fi
    if [ -n "$lan_address" ]; then broker_args+=(--lan-address "$lan_address"); fi
    if ! "$VENV/bin/edgeagent" "${broker_args[@]}"; then
        # Under --root there is usually no mosquitto.conf to include the drop-in: the files are still
        # there to look at.
        [ -n "$ROOT" ] || die "the local broker is not safe yet (see above); fix it, then run this again"
        warn "'edgeagent broker setup' reported problems under $ROOT (see above)"
    fi
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
EOF
if [ "$local_broker" -eq 1 ]; then
    echo "  broker:      $ROOT/etc/mosquitto/conf.d/edgeagent.conf; add each gateway and panel with"
    echo "               $VENV/bin/edgeagent broker add-client NAME --role ble-gateway|lora|panel${ROOT:+ --root $ROOT}"
fi
if [ -z "$ROOT" ]; then
    echo "Check it with: systemctl status edgeagent; journalctl -u edgeagent; $VENV/bin/edgeagent status"
else
    echo "Under $ROOT only: no user, no state directory, nothing enabled (--root)."
fi
