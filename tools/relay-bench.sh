#!/usr/bin/env bash
# CPU of the exec relay (`pmigrate send` + `pmigrate recv`, what QEMU's
# `exec:` migration runs through) against a plain copy of the same bytes
# through one TCP connection over loopback: a reader of a pipe writing a
# socket, a reader of the socket writing a pipe, 256 KiB at a time (the
# least any relay does). Both are fed the same file through `cat` and
# write into `cat > /dev/null`; the CPU (user + system) of the two ends is
# counted, not the cats'. Runs alternate; the medians and their ratio are
# printed.
#
#   tools/relay-bench.sh [MiB] [runs] [send options...]   (default 2048 MiB, 5 runs, --streams 4)
#
# RATE=300 feeds both as QEMU does when it is the slower end: 32 KiB
# writes paced to 300 MiB/s (a paced writer in python instead of cat), so
# each read finds a few writes' worth, not a full chunk.
#
# Needs python3 and target/release/pmigrate (or the binary in $PMIGRATE).

set -euo pipefail

MIB=${1:-2048}
RUNS=${2:-5}
shift $(( $# < 2 ? $# : 2 ))
SEND_ARGS=("$@")
((${#SEND_ARGS[@]})) || SEND_ARGS=(--streams 4)
HERE=$(cd "$(dirname "$0")/.." && pwd)
BIN=${PMIGRATE:-$HERE/target/release/pmigrate}
[[ -x $BIN ]] || { echo "build first: cargo build --release -p pmigrate-tools" >&2; exit 1; }

WORK=$(mktemp -d /dev/shm/pm-relay.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
head -c $((MIB << 20)) /dev/urandom >"$WORK/in"
head -c 32 /dev/urandom >"$WORK/psk" && chmod 600 "$WORK/psk"

# Runs a command and appends the CPU seconds it and its children took to $2.
cat >"$WORK/cpu.py" <<'PY'
import resource, subprocess, sys
subprocess.run(sys.argv[2:], check=False)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "a") as f:
    f.write(f"{r.ru_utime + r.ru_stime:.3f}\n")
PY
cat >"$WORK/plain_send.py" <<'PY'
import os, socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
buf = bytearray(1 << 18); mv = memoryview(buf)
while n := os.readv(0, [buf]):
    c.sendall(mv[:n])
c.close()
PY
cat >"$WORK/plain_recv.py" <<'PY'
import os, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1); c, _ = s.accept()
buf = bytearray(1 << 18); mv = memoryview(buf)
while n := c.recv_into(buf):
    v = mv[:n]
    while v:
        v = v[os.write(1, v):]
PY

cat >"$WORK/feed.py" <<'PY'
import os, sys, time
rate = float(sys.argv[2]) * (1 << 20)
with open(sys.argv[1], "rb") as f:
    data = memoryview(f.read())
t0, k = time.monotonic(), 32 << 10
for i in range(0, len(data), k):
    v = data[i:i + k]
    while v:
        v = v[os.write(1, v):]
    ahead = (i + k) / rate - (time.monotonic() - t0)
    if ahead > 0.0005:
        time.sleep(ahead)
PY
feed() {
    if [[ ${RATE:-0} != 0 ]]; then python3 "$WORK/feed.py" "$WORK/in" "$RATE"; else cat "$WORK/in"; fi
}

cpu() { python3 "$WORK/cpu.py" "$@"; }
sum_last() { echo "$(tail -1 "$1") + $(tail -1 "$2")" | bc; }

plain() {
    rm -f "$WORK/a" "$WORK/b"
    cpu "$WORK/b" python3 "$WORK/plain_recv.py" 7395 | cat >/dev/null &
    sleep 0.3
    feed | cpu "$WORK/a" python3 "$WORK/plain_send.py" 7395
    wait
    sum_last "$WORK/a" "$WORK/b"
}

relay() {
    rm -f "$WORK/a" "$WORK/b"
    cpu "$WORK/b" "$BIN" recv --psk-file "$WORK/psk" --listen 127.0.0.1:7396 -q | cat >/dev/null &
    sleep 0.3
    feed | cpu "$WORK/a" "$BIN" send --psk-file "$WORK/psk" "${SEND_ARGS[@]}" -q 127.0.0.1:7396
    wait
    sum_last "$WORK/a" "$WORK/b"
}

median() { sort -n | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }

if [[ ${RATE:-0} != 0 ]]; then FED="32 KiB writes at $RATE MiB/s"; else FED=cat; fi
echo "$MIB MiB through pipes over loopback (fed by $FED), CPU s of both ends; relay: send ${SEND_ARGS[*]}"
P=() R=()
for ((r = 1; r <= RUNS; r++)); do
    p=$(plain); x=$(relay)
    P+=("$p"); R+=("$x")
    echo "run $r: plain copy $p s, relay $x s"
done
pm=$(printf '%s\n' "${P[@]}" | median); rm=$(printf '%s\n' "${R[@]}" | median)
printf 'medians: plain copy %.3f s, relay %.3f s: relay %.2fx the plain copy (%.2f against %.2f CPU s/GiB)\n' \
    "$pm" "$rm" "$(echo "$rm / $pm" | bc -l)" "$(echo "$pm * 1024 / $MIB" | bc -l)" "$(echo "$rm * 1024 / $MIB" | bc -l)"
