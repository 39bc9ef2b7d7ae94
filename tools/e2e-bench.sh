#!/usr/bin/env bash
# End-to-end wall time of the CLI over the multi-NIC testbed, as a user
# meets it: `pmigrate serve` in the destination namespace, `pmigrate
# migrate` of a memory file in the source namespace, from the migrate
# process's start to its exit; against raw TCP moving the same bytes over
# the same links (one plain sender per link, each a quarter, all at once),
# measured in the same run. Prints one line per run and the ratio.
#
#   PM_NS_SRC=pb-src PM_NS_DST=pb-dst tools/testbed.sh up --links 4 --rate 1gbit
#   tools/e2e-bench.sh [MiB] [runs]          (default 512 MiB, 3 runs)
#
# Needs root (namespaces), python3, and target/release/pmigrate.

set -euo pipefail

MIB=${1:-512}
RUNS=${2:-3}
NS_SRC=${PM_NS_SRC:-pb-src}
NS_DST=${PM_NS_DST:-pb-dst}
HERE=$(cd "$(dirname "$0")/.." && pwd)
BIN=$HERE/target/release/pmigrate
[[ -x $BIN ]] || { echo "build first: cargo build --release -p pmigrate-tools" >&2; exit 1; }
K=$(ip -n "$NS_SRC" -o link show | grep -c 'pmv[0-9]*s') || true
((K > 0)) || { echo "no testbed in $NS_SRC; see tools/testbed.sh" >&2; exit 1; }

# Guest memory lives in tmpfs, as a VM's memory-backend-file would.
WORK=$(mktemp -d /dev/shm/pm-e2e.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
head -c $((MIB << 20)) /dev/urandom >"$WORK/src.mem"
head -c 32 /dev/urandom >"$WORK/psk" && chmod 600 "$WORK/psk"
DESTS=() VIA=()
for ((i = 0; i < K; i++)); do DESTS+=("10.77.$i.2:7400"); VIA+=("10.77.$i.1"); done
VIA_CSV=$(IFS=,; echo "${VIA[*]}")

now() { date +%s.%N; }

# Raw TCP: one listener per link reading to the end, one sender per link
# sending its share with sendfile; the wall time of the senders together.
raw_tcp() {
    ip netns exec "$NS_DST" python3 - "$K" <<'EOF' &
import socket, sys, threading
k = int(sys.argv[1])
def serve(i):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((f"10.77.{i}.2", 7500)); s.listen(1); c, _ = s.accept()
    while c.recv(1 << 20):
        pass
ts = [threading.Thread(target=serve, args=(i,)) for i in range(k)]
[t.start() for t in ts]; [t.join() for t in ts]
EOF
    local server=$!
    sleep 0.5
    ip netns exec "$NS_SRC" python3 - "$K" "$WORK/src.mem" <<'EOF'
import os, socket, sys, threading, time
k, path = int(sys.argv[1]), sys.argv[2]
size = os.path.getsize(path); share = size // k
def send(i):
    with open(path, "rb") as f:
        c = socket.create_connection((f"10.77.{i}.2", 7500), source_address=(f"10.77.{i}.1", 0))
        off, end = i * share, (i + 1) * share
        while off < end:
            off += os.sendfile(c.fileno(), f.fileno(), off, end - off)
        c.close()
t = time.monotonic()
ts = [threading.Thread(target=send, args=(i,)) for i in range(k)]
[x.start() for x in ts]; [x.join() for x in ts]
print(f"{time.monotonic() - t:.3f}")
EOF
    wait "$server"
}

cli() {
    rm -f "$WORK/dst.mem"
    ip netns exec "$NS_DST" "$BIN" serve --listen "${DESTS[@]}" --memory "$WORK/dst.mem" \
        --psk-file "$WORK/psk" --wait 60 -q >/dev/null 2>"$WORK/serve.err" &
    local serve=$!
    sleep 0.5
    local t0 t1
    t0=$(now)
    ip netns exec "$NS_SRC" "$BIN" migrate --memory "$WORK/src.mem" --no-zero-copy --compress none \
        --streams "$K" --via "$VIA_CSV" --psk-file "$WORK/psk" "${DESTS[@]}" >/dev/null 2>"$WORK/migrate.err"
    t1=$(now)
    wait "$serve"
    cmp -s "$WORK/src.mem" "$WORK/dst.mem" || { echo "the copy differs" >&2; exit 1; }
    echo "$t1 - $t0" | bc
}

echo "$MIB MiB incompressible over $K links ($NS_SRC -> $NS_DST): CLI serve/migrate, process start to exit, against raw TCP (one sender a link, sendfile)"
for ((r = 1; r <= RUNS; r++)); do
    tcp=$(raw_tcp)
    pm=$(cli)
    printf 'run %d: raw TCP %.3f s, pmigrate %.3f s: %.2fx raw TCP'"'"'s rate\n' "$r" "$tcp" "$pm" "$(echo "$tcp / $pm" | bc -l)"
done
