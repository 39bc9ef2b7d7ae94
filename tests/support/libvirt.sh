#!/usr/bin/env bash
# Two libvirt daemons ("src" and "dst") on this one machine, so that a real
#   virsh migrate --live --p2p --migrateuri unix:///PATH NAME DST_URI
# runs between them with a userspace proxy carrying the migration's
# unix-socket connections. See tests/support/libvirt.md.
#
#   libvirt.sh install                      apt packages, users, QEMU wrapper (idempotent)
#   libvirt.sh up DIR [--owner PID]         start both daemons, state under DIR, write DIR/env
#   libvirt.sh down DIR                     stop everything `up DIR` started
#   libvirt.sh status DIR                   exit 0 when both daemons are up
#   libvirt.sh env DIR                      print DIR/env
#   libvirt.sh define-guest DIR NAME [opts] write DIR/NAME.xml (test guest), print its path
#   libvirt.sh start-guest DIR NAME [opts]  define-guest + `virsh create` on src
#   libvirt.sh migrate DIR NAME [virsh migrate options...]
#                                           virsh migrate --live --p2p --migrateuri
#                                           unix://$PMIGRATE_LV_MIG_DIR/NAME.sock ... (no proxy:
#                                           start your own first, see libvirt.md)
#   libvirt.sh exec DIR src|dst CMD...      run CMD inside that daemon's namespaces
#
# Guest options: --mb N (pmw.mb, 64) --rate N (pmw.rate, 20) --mem-kib K (262272,
# must be 128 mod 1024) --append 'WORDS' --vcpus N (1).
#
# Each daemon runs in its own mount, UTS and PID namespace, in which DIR/<side>/{etc,run,
# lib,cache,log} are bind-mounted over /etc/libvirt, /run/libvirt, /var/lib/libvirt,
# /var/cache/libvirt and /var/log/libvirt. Killing the namespace's init kills every
# process in it (libvirtd and its QEMUs); the mounts vanish with the namespace.
set -euo pipefail

SELF=$(realpath "${BASH_SOURCE[0]}")
SIDES=(src dst)
# Where each side's QEMU sees the migration socket directory (inside its namespace).
NS_MIG_DIR=/run/libvirt/pmigrate
# libvirt rounds guest RAM up to whole MiB, and QEMU 7.2 under TCG loses guest writes
# during migration when RAM is a multiple of 256 KiB; this wrapper undoes the rounding.
QEMU_REAL=${PMIGRATE_LV_QEMU_REAL:-/usr/bin/qemu-system-x86_64}
QEMU_WRAPPER=/usr/local/lib/pmigrate/libvirt/qemu-system-x86_64
CAPS_SEED=/var/cache/pmigrate/libvirt-qemu-capabilities
INSTALL_LOCK=/var/lock/pmigrate-libvirt-install.lock
PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)
# Generous waits: 2 loaded cores; the first start probes QEMU's capabilities (~10 s).
START_TIMEOUT=${PMIGRATE_LV_START_TIMEOUT:-180}
STOP_TIMEOUT=${PMIGRATE_LV_STOP_TIMEOUT:-30}

die() { echo "libvirt.sh: $*" >&2; exit 1; }
log() { echo "libvirt.sh: $*" >&2; }
need_root() { [[ $(id -u) == 0 ]] || die "must run as root"; }

# ------------------------------------------------------------------ install

wrapper_text() {
  cat <<EOF
#!/bin/bash
# Written by pmigrate tests/support/libvirt.sh. libvirt (x86) rounds guest RAM up to a
# whole MiB and passes "-m M" plus a pc.ram backend of M MiB. QEMU 7.2 under TCG loses
# guest writes during live migration when RAM is a multiple of 256 KiB (fixed in QEMU 9.0
# by "physmem: Fix migration dirty bitmap coherency with TCG memory access"), so this
# gives QEMU (M-1) MiB + 128 KiB instead: <memory unit='KiB'>262272</memory> (rounded by
# libvirt to 257 MiB) runs with exactly 262272 KiB. Everything else passes through.
real=$QEMU_REAL
args=("\$@")
mib=
for ((i = 0; i < \${#args[@]}; i++)); do
  if [[ \${args[i]} == -m && \${args[i+1]:-} =~ ^[0-9]+\$ ]]; then
    mib=\${args[i+1]}
    args[i+1]="\$((mib * 1024 - 896))K"
  fi
done
if [[ -n \$mib ]]; then
  for ((i = 0; i < \${#args[@]}; i++)); do
    if [[ \${args[i]} == *'"id":"pc.ram"'* ]]; then
      args[i]=\${args[i]/\"size\":\$((mib * 1048576))/\"size\":\$(((mib * 1024 - 896) * 1024))}
    fi
  done
fi
exec "\$real" "\${args[@]}"
EOF
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

do_install() {
  need_root
  mkdir -p "$(dirname "$INSTALL_LOCK")"
  exec 8>"$INSTALL_LOCK"
  flock 8
  local missing=() p
  for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
  command -v "$QEMU_REAL" >/dev/null || missing+=(qemu-system-x86)
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # --no-install-recommends: the recommends (libvirt-daemon-system, ...) would pull in
    # ~35 more packages and system services this does not use.
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/pmigrate-libvirt-apt.log 2>&1; then
      apt-get update -qq >>/tmp/pmigrate-libvirt-apt.log 2>&1 || true
      apt-get install -y -qq --no-install-recommends "${missing[@]}" >>/tmp/pmigrate-libvirt-apt.log 2>&1 ||
        { tail -20 /tmp/pmigrate-libvirt-apt.log >&2; die "apt-get install ${missing[*]} failed"; }
    fi
  fi
  # Debian's libvirt is built with qemu user and group "libvirt-qemu" and looks both up
  # at start even when qemu.conf says root; libvirt-daemon-system (not installed) would
  # create them.
  getent group kvm >/dev/null || groupadd -r kvm
  getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
  getent passwd libvirt-qemu >/dev/null ||
    useradd -r -g kvm -G libvirt-qemu -d /var/lib/libvirt -M -s /usr/sbin/nologin -c "Libvirt Qemu" libvirt-qemu
  # Write the wrapper only when it changed: its ctime keys libvirt's capability cache.
  mkdir -p "$(dirname "$QEMU_WRAPPER")" "$CAPS_SEED"
  if [[ ! -x $QEMU_WRAPPER ]] || ! cmp -s <(wrapper_text) "$QEMU_WRAPPER"; then
    wrapper_text >"$QEMU_WRAPPER.tmp.$$"
    chmod 755 "$QEMU_WRAPPER.tmp.$$"
    mv -f "$QEMU_WRAPPER.tmp.$$" "$QEMU_WRAPPER"
  fi
  # Mount points for the per-daemon bind mounts.
  mkdir -p /etc/libvirt /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt
  exec 8>&-
}

ensure_installed() {
  local p ok=1
  for p in "${PACKAGES[@]}"; do installed "$p" || ok=; done
  getent passwd libvirt-qemu >/dev/null && getent group libvirt-qemu >/dev/null || ok=
  [[ -x $QEMU_WRAPPER ]] && cmp -s <(wrapper_text) "$QEMU_WRAPPER" || ok=
  [[ -d /run/libvirt && -d /var/cache/libvirt && -d /var/log/libvirt && -d /var/lib/libvirt ]] || ok=
  [[ -n $ok ]] || do_install
}

# -------------------------------------------------------------- utilities

check_dir() {
  local d=$1
  [[ $d == /* ]] || die "DIR must be absolute: $d"
  [[ $d =~ ^[A-Za-z0-9_./+-]+$ ]] || die "DIR may hold only [A-Za-z0-9_./+-]: $d"
  local p
  for p in /etc/libvirt /run/libvirt /var/run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; do
    [[ $d/ != "$p"/* ]] || die "DIR must not lie under $p (it is mounted over in the namespaces)"
  done
  # sun_path holds 107 bytes; the longest host-side socket path is DIR/src/run/pmigrate/NAME.sock.
  ((${#d} <= 60)) || die "DIR is too long for unix socket paths (${#d} > 60 chars): $d"
}

alive() { # pid: running and not a zombie
  [[ -n ${1:-} && -r /proc/$1/stat ]] || return 1
  local st
  st=$(sed -E 's/^[0-9]+ \(.*\) ([A-Z]).*/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n $st && $st != Z && $st != X ]]
}

uri_of() { echo "qemu+unix:///system?socket=$1/$2/run/libvirt-sock"; }

vsh() { # dir side args...
  local d=$1 s=$2
  shift 2
  virsh -q -c "$(uri_of "$d" "$s")" "$@"
}

wait_for() { # timeout-seconds command...
  local end=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || return 1
    sleep 0.2
  done
}

init_pid() { cat "$1/$2/init.pid" 2>/dev/null || true; }

side_up() { # dir side: namespace init alive and socket answers
  local ip
  ip=$(init_pid "$1" "$2")
  alive "$ip" && [[ -S $1/$2/run/libvirt-sock ]]
}

# ------------------------------------------------------------------- up

write_configs() { # dir side uuid
  local d=$1 s=$2 uuid=$3 sd=$1/$2 filters=
  [[ -z ${PMIGRATE_LV_LOG_FILTERS:-} ]] || filters="log_filters = \"$PMIGRATE_LV_LOG_FILTERS\""
  # run/ holds sockets, pid files and the status of domains of a previous daemon: start clean.
  rm -rf "$sd/run"
  mkdir -p "$sd"/{etc,run,lib,cache/qemu/capabilities,log/qemu} "$sd/run/pmigrate"
  cat >"$sd/etc/libvirtd.conf" <<EOF
# pmigrate test daemon "$s" (tests/support/libvirt.sh)
# libvirt refuses a migration whose two ends report the same host UUID.
host_uuid = "$uuid"
# No polkit here; only root can reach the socket (0700, under DIR).
auth_unix_rw = "none"
auth_unix_ro = "none"
unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
log_outputs = "${PMIGRATE_LV_LOG_LEVEL:-3}:file:/var/log/libvirt/libvirtd.log"
$filters
EOF
  cat >"$sd/etc/qemu.conf" <<EOF
# pmigrate test daemon "$s" (tests/support/libvirt.sh)
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
# No cgroups: no systemd here, and two daemons would both create machine/qemu-1-NAME.
cgroup_controllers = [ ]
# QEMU sees the daemon's mount namespace (the migration socket dir) as it is.
namespaces = [ ]
# QEMU's stdout/stderr go straight to /var/log/libvirt/qemu/NAME.log: no virtlogd.
stdio_handler = "file"
EOF
  # libvirt's client config (used by src libvirtd for the p2p connection).
  : >"$sd/etc/libvirt.conf"
}

ns_init_script() { # dir side -> runs as PID 1 of the namespaces
  local d=$1 s=$2 sd=$1/$2
  cat <<EOF
set -u
hostname pm-$s
mount --bind $sd/etc /etc/libvirt
mount --bind $sd/run /run/libvirt
mount --bind $sd/lib /var/lib/libvirt
mount --bind $sd/cache /var/cache/libvirt
mount --bind $sd/log /var/log/libvirt
rm -f /run/libvirt/libvirt-sock /run/libvirt/libvirt-sock-ro /run/libvirt/libvirt-admin-sock /run/libvirt/libvirtd.pid
libvirtd -f /etc/libvirt/libvirtd.conf -p /run/libvirt/libvirtd.pid &
lv=\$!
trap 'kill -TERM \$lv 2>/dev/null' TERM INT HUP
# PID 1 of the namespace: bash reaps the QEMUs libvirtd daemonizes (they are reparented
# here). When this shell exits, the kernel kills everything left in the namespace.
while kill -0 \$lv 2>/dev/null; do wait \$lv; done
echo "libvirtd exited"
EOF
}

start_side() { # dir side
  local d=$1 s=$2 sd=$1/$2
  ns_init_script "$d" "$s" >"$sd/init.sh"
  rm -f "$sd/unshare.pid" "$sd/init.pid" "$sd/run/libvirt-sock"
  # The echo records unshare's own pid (bash execs it). --kill-child: if unshare dies,
  # the namespace's init gets SIGTERM. All output goes to files and the lock fds are
  # closed: a caller reading our stdout (Command::output()) or a later `up`/`down`
  # taking DIR/.lock must not wait for the daemons.
  # shellcheck disable=SC2016 # expanded by the inner bash
  setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$sd/unshare.pid" \
    unshare --mount --uts --pid --fork --mount-proc --propagation private --kill-child=SIGTERM \
    bash "$sd/init.sh" >>"$sd/daemon.out" 2>&1 </dev/null 8>&- 9>&- &
  local up ip end=$((SECONDS + 30))
  until [[ -s $sd/unshare.pid ]]; do ((SECONDS < end)) || die "$s: unshare did not start"; sleep 0.05; done
  up=$(cat "$sd/unshare.pid")
  until ip=$(cat "/proc/$up/task/$up/children" 2>/dev/null) && [[ -n ${ip// /} ]]; do
    alive "$up" || die "$s: unshare exited: $(tail -5 "$sd/daemon.out")"
    ((SECONDS < end)) || die "$s: namespace init did not start"
    sleep 0.05
  done
  ip=${ip%% *}
  echo "$ip" >"$sd/init.pid"
  readlink "/proc/$ip/ns/pid" >"$sd/pidns"
}

ready() { # dir side: answers and has probed the wrapper's capabilities
  vsh "$1" "$2" domcapabilities --emulatorbin "$QEMU_WRAPPER" --virttype qemu --arch x86_64
}

seed_caps() { # dir side: copy a cached capability probe in (libvirt re-probes if stale)
  local f
  for f in "$CAPS_SEED"/*.xml; do
    [[ -f $f ]] && cp -p "$f" "$1/$2/cache/qemu/capabilities/"
  done
  return 0
}

save_caps() { # dir side
  local f b
  mkdir -p "$CAPS_SEED"
  for f in "$1/$2/cache/qemu/capabilities"/*.xml; do
    [[ -f $f ]] || continue
    b=$(basename "$f")
    cmp -s "$f" "$CAPS_SEED/$b" && continue
    cp -p "$f" "$CAPS_SEED/.$b.$$" && mv -f "$CAPS_SEED/.$b.$$" "$CAPS_SEED/$b"
  done
  return 0
}

write_env() { # dir
  local d=$1
  cat >"$d/env.tmp" <<EOF
PMIGRATE_LV_DIR=$d
PMIGRATE_LV_SRC_URI=$(uri_of "$d" src)
PMIGRATE_LV_DST_URI=$(uri_of "$d" dst)
PMIGRATE_LV_MIG_DIR=$NS_MIG_DIR
PMIGRATE_LV_SRC_MIG_DIR=$d/src/run/pmigrate
PMIGRATE_LV_DST_MIG_DIR=$d/dst/run/pmigrate
PMIGRATE_LV_SRC_LOG_DIR=$d/src/log/qemu
PMIGRATE_LV_DST_LOG_DIR=$d/dst/log/qemu
PMIGRATE_LV_SRC_DAEMON_LOG=$d/src/log/libvirtd.log
PMIGRATE_LV_DST_DAEMON_LOG=$d/dst/log/libvirtd.log
PMIGRATE_LV_SRC_INIT_PID=$(init_pid "$d" src)
PMIGRATE_LV_DST_INIT_PID=$(init_pid "$d" dst)
PMIGRATE_LV_EMULATOR=$QEMU_WRAPPER
EOF
  mv -f "$d/env.tmp" "$d/env"
}

do_up() {
  need_root
  local d=${1:-} owner=
  [[ -n $d ]] || die "usage: up DIR [--owner PID]"
  shift
  while (($#)); do
    case $1 in
      --owner) owner=${2:?--owner PID}; shift 2 ;;
      *) die "up: unknown option $1" ;;
    esac
  done
  mkdir -p "$d"
  d=$(realpath "$d")
  check_dir "$d"
  ensure_installed
  exec 9>"$d/.lock"
  flock 9
  if side_up "$d" src && side_up "$d" dst && [[ -f $d/env ]]; then
    cat "$d/env"
    return 0
  fi
  do_down_locked "$d"
  local t0=$SECONDS s
  for s in "${SIDES[@]}"; do
    write_configs "$d" "$s" "$(cat /proc/sys/kernel/random/uuid)"
    seed_caps "$d" "$s"
    start_side "$d" "$s"
  done
  for s in "${SIDES[@]}"; do
    if ! wait_for "$START_TIMEOUT" test -S "$d/$s/run/libvirt-sock" ||
      ! wait_for "$START_TIMEOUT" ready "$d" "$s"; then
      log "$s daemon not ready within ${START_TIMEOUT}s; daemon.out and libvirtd.log:"
      tail -20 "$d/$s/daemon.out" "$d/$s/log/libvirtd.log" >&2 || true
      do_down_locked "$d"
      exit 1
    fi
  done
  save_caps "$d" src
  write_env "$d"
  if [[ -n $owner ]]; then
    setsid bash "$SELF" _watch "$d" "$owner" >>"$d/watch.out" 2>&1 </dev/null 8>&- 9>&- &
    echo $! >"$d/watch.pid"
  fi
  log "up in $((SECONDS - t0)) s: $d"
  cat "$d/env"
}

# ----------------------------------------------------------------- down

ns_pids() { # pidns-link: host pids of all processes in that pid namespace
  [[ -n ${1:-} ]] || return 0
  # shellcheck disable=SC2012 # /proc/PID paths are plain
  ls -l /proc/[0-9]*/ns/pid 2>/dev/null | awk -v want="$1" '$NF == want { split($(NF-2), a, "/"); print a[3] }'
}

stop_side() { # dir side
  local d=$1 s=$2 sd=$1/$2 ip up ns dom
  ip=$(init_pid "$d" "$s")
  up=$(cat "$sd/unshare.pid" 2>/dev/null || true)
  ns=$(cat "$sd/pidns" 2>/dev/null || true)
  # Only trust the recorded pids if they are still the processes we started.
  alive "$ip" && [[ $(readlink "/proc/$ip/ns/pid" 2>/dev/null) == "$ns" ]] || ip=
  alive "$up" && [[ $(cat "/proc/$up/comm" 2>/dev/null) == unshare ]] || up=
  if [[ -n $ip && -S $sd/run/libvirt-sock ]]; then
    for dom in $(timeout 20 virsh -q -c "$(uri_of "$d" "$s")" list --name 2>/dev/null); do
      timeout 20 virsh -q -c "$(uri_of "$d" "$s")" destroy "$dom" >/dev/null 2>&1 || true
    done
  fi
  [[ -z $ip ]] || kill -TERM "$ip" 2>/dev/null || true
  local end=$((SECONDS + STOP_TIMEOUT))
  while [[ -n $ip ]] && alive "$ip" && ((SECONDS < end)); do sleep 0.1; done
  # SIGKILL to a PID namespace's init kills every process in it.
  if [[ -n $ip ]] && alive "$ip"; then kill -KILL "$ip" 2>/dev/null || true; fi
  if [[ -n $up ]] && alive "$up"; then kill -KILL "$up" 2>/dev/null || true; fi
  end=$((SECONDS + STOP_TIMEOUT))
  while [[ -n $ns ]] && [[ -n $(ns_pids "$ns") ]]; do
    ((SECONDS < end)) || { log "$s: processes left in $ns: $(ns_pids "$ns" | tr '\n' ' ')"; return 1; }
    sleep 0.1
  done
  rm -f "$sd/init.pid" "$sd/unshare.pid" "$sd/pidns"
}

do_down_locked() {
  local d=$1 s rc=0 w
  w=$(cat "$d/watch.pid" 2>/dev/null || true)
  if [[ -n $w && $w != "$$" ]] && alive "$w" && grep -qa "_watch" "/proc/$w/cmdline" 2>/dev/null; then
    kill -TERM "$w" 2>/dev/null || true
  fi
  rm -f "$d/watch.pid" "$d/env"
  for s in "${SIDES[@]}"; do
    [[ -d $d/$s ]] || continue
    stop_side "$d" "$s" || rc=1
  done
  return $rc
}

do_down() {
  need_root
  local d=${1:-}
  [[ -n $d ]] || die "usage: down DIR"
  [[ -d $d ]] || return 0
  d=$(realpath "$d")
  exec 9>"$d/.lock"
  flock 9
  do_down_locked "$d"
}

do_watch() { # dir owner-pid: run down when the owner exits
  local d=$1 owner=$2
  while alive "$owner" && [[ -f $d/env ]]; do sleep 1; done
  [[ $(cat "$d/watch.pid" 2>/dev/null) == "$$" ]] || exit 0
  log "owner $owner gone: down $d"
  exec 9>"$d/.lock"
  flock 9
  do_down_locked "$d"
}

# ---------------------------------------------------------------- guests

guest_dir() {
  if [[ -n ${PMIGRATE_GUEST_DIR:-} ]]; then echo "$PMIGRATE_GUEST_DIR"; else echo "$(dirname "$(dirname "$SELF")")/guest/out"; fi
}

do_define_guest() { # dir name [opts]
  local d=${1:?DIR} name=${2:?NAME}
  shift 2
  local mb=64 rate=20 mem=262272 append='' vcpus=1
  while (($#)); do
    case $1 in
      --mb) mb=$2; shift 2 ;;
      --rate) rate=$2; shift 2 ;;
      --mem-kib) mem=$2; shift 2 ;;
      --append) append=" $2"; shift 2 ;;
      --vcpus) vcpus=$2; shift 2 ;;
      *) die "define-guest: unknown option $1" ;;
    esac
  done
  d=$(realpath "$d")
  [[ $name =~ ^[A-Za-z0-9_-]+$ ]] || die "guest NAME may hold only [A-Za-z0-9_-]"
  ((mem % 1024 == 128)) || die "--mem-kib must be 128 mod 1024 (e.g. 262272, 2097280): libvirt rounds to MiB, the wrapper subtracts 896 KiB"
  local g
  g=$(guest_dir)
  if [[ ! -f $g/vmlinuz || ! -f $g/initramfs.cpio.gz ]]; then
    bash "$(dirname "$(dirname "$SELF")")/guest/build.sh" >&2 || die "guest build failed"
  fi
  cat >"$d/$name.xml" <<EOF
<domain type='qemu'>
  <name>$name</name>
  <memory unit='KiB'>$mem</memory>
  <currentMemory unit='KiB'>$mem</currentMemory>
  <vcpu>$vcpus</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$g/vmlinuz</kernel>
    <initrd>$g/initramfs.cpio.gz</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 pmw.mb=$mb pmw.rate=$rate$append</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>$QEMU_WRAPPER</emulator>
    <serial type='file'>
      <source path='/var/log/libvirt/qemu/$name-console.log' append='on'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
  echo "$d/$name.xml"
}

do_start_guest() { # dir name [opts]
  local d=${1:?DIR} name=${2:?NAME} xml
  xml=$(do_define_guest "$@")
  vsh "$(realpath "$d")" src create "$xml" >/dev/null
  echo "$(realpath "$d")/src/log/qemu/$name-console.log"
}

do_migrate() { # dir name [virsh migrate options]
  local d=${1:?DIR} name=${2:?NAME}
  shift 2
  d=$(realpath "$d")
  virsh -c "$(uri_of "$d" src)" migrate --live --p2p --migrateuri "unix://$NS_MIG_DIR/$name.sock" "$@" "$name" "$(uri_of "$d" dst)"
}

do_exec() { # dir side cmd...
  need_root
  local d=${1:?DIR} s=${2:?src|dst}
  shift 2
  d=$(realpath "$d")
  local ip
  ip=$(init_pid "$d" "$s")
  alive "$ip" || die "$s is not running"
  exec nsenter -t "$ip" -m -u -p -- "$@"
}

cmd=${1:-}
shift || true
case $cmd in
  install) do_install ;;
  up) do_up "$@" ;;
  down) do_down "$@" ;;
  status) d=$(realpath "${1:?DIR}"); side_up "$d" src && side_up "$d" dst ;;
  env) cat "$(realpath "${1:?DIR}")/env" ;;
  define-guest) do_define_guest "$@" ;;
  start-guest) do_start_guest "$@" ;;
  migrate) do_migrate "$@" ;;
  exec) do_exec "$@" ;;
  _watch) do_watch "$@" ;;
  *) sed -n '2,26p' "$SELF" | sed 's/^# \{0,1\}//'; [[ -z $cmd || $cmd == -h || $cmd == --help ]] || exit 2 ;;
esac
