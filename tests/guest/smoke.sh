#!/usr/bin/env bash
# Smoke test of the test guest itself, with plain QEMU tcp: migration (no
# pmigrate involved): build the image, boot a source VM running the workload
# and a destination VM waiting with -incoming tcp:, migrate over loopback via
# QMP, then check that the destination keeps printing heartbeats with
# errors=0 and never prints PMW CORRUPT / a kernel panic.
#
#   tests/guest/smoke.sh [--mb N] [--rate MIBPS] [--mem SIZE] [--inject]
#
# --inject asks the workload to damage 3 pages on purpose right after the
# migration; the run then passes only if the checker reports exactly them
# (a self-test of the detector).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mb=64
rate=50
mem=262272K   # 256 MiB + 128 KiB: NOT a multiple of 256 KiB (QEMU 7.2 TCG bug)
inject=0
while (($#)); do
    case "$1" in
        --mb) mb="$2"; shift 2 ;;
        --rate) rate="$2"; shift 2 ;;
        --mem) mem="$2"; shift 2 ;;
        --inject) inject=1; shift ;;
        *) echo "usage: $0 [--mb N] [--rate MIBPS] [--mem SIZE] [--inject]" >&2; exit 2 ;;
    esac
done

command -v qemu-system-x86_64 >/dev/null || { echo "smoke: qemu-system-x86_64 not found" >&2; exit 1; }
t_build=$(date +%s.%N)
bash "$here/build.sh"
img="${PMIGRATE_GUEST_DIR:-$here/out}"
echo "smoke: image ready in $(python3 -c "import time;print(round(time.time()-$t_build,1))") s"

work="$(mktemp -d "${TMPDIR:-/tmp}/pmw-smoke.XXXXXX")"
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [[ "${keep:-0}" == 1 ]]; then echo "smoke: logs kept in $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

port="$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')"
append="console=ttyS0 quiet panic=-1 pmw.mb=$mb pmw.rate=$rate"
# pmw.inject=25: 25 s after workload start, i.e. after the migration below.
if ((inject)); then append="$append pmw.inject=25"; fi

vm() { # name, extra args...
    local name="$1"; shift
    qemu-system-x86_64 -name "$name" -accel tcg -nographic -nodefaults -no-user-config -no-reboot \
        -serial "file:$work/$name.log" -kernel "$img/vmlinuz" -initrd "$img/initramfs.cpio.gz" \
        -append "$append" -m "$mem" -smp 1 \
        -qmp "unix:$work/$name.qmp,server=on,wait=off" "$@" \
        >"$work/$name.stdout" 2>&1 &
    pids+=($!)
}

t_boot=$(date +%s.%N)
vm dst -incoming "tcp:127.0.0.1:$port"
vm src

keep=1
python3 - "$work" "$t_boot" "$inject" "$port" "$rate" <<'PY'
import json, os, re, socket, sys, time

work, t_boot, inject, port = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]

def fail(msg):
    print("smoke: FAIL:", msg)
    for n in ("src", "dst"):
        p = os.path.join(work, n + ".log")
        if os.path.exists(p):
            print(f"---- {n} console (tail) ----")
            print("".join(open(p, errors="replace").readlines()[-20:]))
    sys.exit(1)

class Qmp:
    def __init__(self, path, timeout=60):
        deadline = time.time() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.time() > deadline:
                    fail(f"cannot connect to QMP {path}")
                time.sleep(0.2)
        self.s.settimeout(120)
        self.f = self.s.makefile("rwb")
        greeting = self.read()
        assert "QMP" in greeting, greeting
        self.execute("qmp_capabilities")

    def read(self):
        line = self.f.readline()
        if not line:
            fail("QMP connection closed")
        return json.loads(line)

    def execute(self, cmd, args=None):
        msg = {"execute": cmd}
        if args is not None:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            r = self.read()
            if "event" in r:
                continue
            if "error" in r:
                fail(f"QMP {cmd}: {r['error']}")
            return r["return"]

def console(name):
    p = os.path.join(work, name + ".log")
    return open(p, errors="replace").read() if os.path.exists(p) else ""

def wait_console(name, pattern, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if re.search(pattern, console(name)):
            return
        time.sleep(0.2)
    fail(f"{name}: no console line matching {pattern!r} within {timeout} s")

BAD = re.compile(r"PMW CORRUPT|PMW err|PMW FATAL|Kernel panic|BUG:")

src = Qmp(os.path.join(work, "src.qmp"))
dst = Qmp(os.path.join(work, "dst.qmp"))
wait_console("src", r"PMW ready", 180)
print(f"smoke: source booted, workload ready after {time.time() - t_boot:.1f} s")
wait_console("src", r"PMW ok t=5\.", 120)
if BAD.search(console("src")):
    fail("source reported corruption before migration")

for q in (src, dst):
    q.execute("migrate-set-parameters", {"max-bandwidth": 1 << 30, "downtime-limit": 300})
t_mig = time.time()
src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
final = None
while time.time() - t_mig < 600:
    info = src.execute("query-migrate")
    if info.get("status") in ("completed", "failed", "cancelled"):
        final = info
        break
    time.sleep(0.25)
if final is None:
    fail("migration did not finish within 600 s")
print("smoke: query-migrate:", json.dumps(final))
if final["status"] != "completed":
    fail(f"migration {final['status']}: {final.get('error-desc', '')}")
ram = final.get("ram", {})
print(f"smoke: migration completed: total-time={final.get('total-time')} ms "
      f"downtime={final.get('downtime')} ms setup-time={final.get('setup-time')} ms "
      f"transferred={ram.get('transferred', 0) >> 20} MiB dirty-sync-count={ram.get('dirty-sync-count')} "
      f"wall={time.time() - t_mig:.1f} s")

# The destination must be running (QEMU autostarts it after -incoming).
deadline = time.time() + 60
while dst.execute("query-status")["status"] != "running":
    if time.time() > deadline:
        fail("destination is not running after migration")
    time.sleep(0.2)
st = src.execute("query-status")["status"]
print(f"smoke: source status {st}, destination running")

# New heartbeats on the destination, with the workload still making progress.
def beats(name):
    return [(float(t), int(g), int(v), int(e)) for t, g, v, e in re.findall(
        r"PMW (?:ok|err) t=([0-9.]+) gen=(\d+) verified=(\d+) errors=(\d+)", console(name))]

deadline = time.time() + 120
need = 5
while len(beats("dst")) < need and time.time() < deadline:
    m = BAD.search(console("dst"))
    if m and not inject:
        fail(f"destination console shows {m.group(0)!r}")
    time.sleep(0.5)
b = beats("dst")
if len(b) < need:
    fail(f"destination printed only {len(b)} heartbeats after migration")
last_src = beats("src")[-1]
print(f"smoke: last source heartbeat {last_src}, destination heartbeats {b[0]} .. {b[-1]}")
if b[-1][1] <= b[0][1] and int(sys.argv[5]) > 0:
    fail("workload made no write progress on the destination")
if b[-1][2] <= b[0][2]:
    fail("workload made no verification progress on the destination")

if inject:
    # The damage is injected 25 s after workload start: wait for the report.
    wait_console("dst", r"PMW inject", 120)
    wait_console("dst", r"PMW err .*errors=3", 60)
    time.sleep(3)
    c = console("dst")
    n = len(re.findall(r"^PMW CORRUPT page=", c, re.M))
    kinds = sorted(re.findall(r"^PMW CORRUPT page=\d+ kind=(\w+)", c, re.M))
    if n != 3 or kinds != ["body", "index", "stale"] or "errors=4" in c:
        fail(f"injected damage: expected exactly body/index/stale, got {kinds}")
    print(f"smoke: injected damage detected as expected: {kinds}")
    print("smoke: PASS (inject)")
    sys.exit(0)

time.sleep(2)
c = console("dst")
m = BAD.search(c)
if m:
    fail(f"destination console shows {m.group(0)!r}")
if not all(e == 0 for (_, _, _, e) in beats("dst")):
    fail("destination heartbeat with errors != 0")
print(f"smoke: destination OK: {len(beats('dst'))} heartbeats with errors=0, no corruption")
print("smoke: PASS")
PY
keep=0
