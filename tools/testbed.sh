#!/usr/bin/env bash
# Multi-NIC testbed for pmigrate benchmarks (see docs/testbed.md).
#
# Two network namespaces, pm-src and pm-dst, joined by K veth pairs
# pmv<i>s (pm-src) <-> pmv<i>d (pm-dst), link i on 10.77.<i>.0/24 with the
# source at 10.77.<i>.1 and the destination at 10.77.<i>.2, each direction of
# each link shaped by a tc qdisc. The 10.77/16 addresses exist only inside
# the two namespaces: nothing is routed to or from the host's namespace.
#
#   tools/testbed.sh up [--links K] [--rate RATE] [--delay D] [--mtu M] [--qdisc tbf|htb]
#   tools/testbed.sh down
#   tools/testbed.sh status
#   tools/testbed.sh env
#   tools/testbed.sh ceiling [--seconds S]
#
# Needs root, iproute2 (installed with apt-get if missing) and, for
# `ceiling`, iperf3 (likewise).

set -euo pipefail

NS_SRC=${PM_NS_SRC:-pm-src}
NS_DST=${PM_NS_DST:-pm-dst}
TAG=pmigrate-testbed
# Highest link count: link i uses 10.77.<i>.0/24, and 10.77.255.0/24 is kept
# free so a /16 never looks "full".
MAX_LINKS=255
IPERF_BASE_PORT=5201

prog=${0##*/}

die() {
    echo "$prog: $*" >&2
    exit 1
}
note() { echo "$prog: $*" >&2; }

usage() {
    cat <<EOF
usage: $prog up [--links K] [--rate RATE] [--delay D] [--mtu M] [--qdisc tbf|htb]
       $prog down
       $prog status
       $prog env
       $prog ceiling [--seconds S]

  up       create namespaces \$PM_NS_SRC (default pm-src) and \$PM_NS_DST
           (default pm-dst) joined by K veth links (default 1); link i is
           pmv<i>s 10.77.<i>.1/24 <-> pmv<i>d 10.77.<i>.2/24. Each direction
           of each link is limited to RATE (tc syntax: 500mbit, 1gbit,
           10gbit, or 'none'; default 1gbit) by a tbf (default) or htb
           qdisc, optionally with a one-way netem delay D (e.g. 5ms; default
           0, needs sch_netem). MTU M defaults to 1500. Idempotent: the same
           parameters leave a healthy testbed alone, other ones rebuild it.
  down     remove the links and namespaces (succeeds if nothing exists).
  status   print namespaces, links, addresses, routes and qdiscs.
  env      print PM_LINKS, PM_SRC_ADDRS, PM_DST_ADDRS, PM_SRC_IFACES,
           PM_DST_IFACES, PM_NS_SRC, PM_NS_DST, PM_RATE, PM_DELAY, PM_MTU
           for eval "\$($prog env)".
  ceiling  raw TCP throughput with iperf3 (one stream per link), each link
           alone and then all links at once, S seconds each (default 5).
EOF
}

# --- dependencies ------------------------------------------------------------

apt_install() { # apt_install PACKAGE
    command -v apt-get >/dev/null || die "$1 is missing and apt-get is not available"
    note "installing $1 with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q "$1" >/dev/null; then
        apt-get update -q >/dev/null
        apt-get install -y -q "$1" >/dev/null
    fi
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces, veth, tc)"
}

need_iproute2() {
    if ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
        apt_install iproute2
    fi
    command -v ip >/dev/null && command -v tc >/dev/null || die "ip/tc still missing after installing iproute2"
}

need_iperf3() {
    command -v iperf3 >/dev/null || apt_install iperf3
    command -v iperf3 >/dev/null || die "iperf3 still missing after installing it"
}

# --- helpers -----------------------------------------------------------------

ns_exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx -- "$1"; }

# ns_sysctl NS KEY VALUE: write /proc/sys/KEY (dots → slashes) inside NS.
ns_sysctl() {
    local path=/proc/sys/${2//.//}
    ip netns exec "$1" sh -c "echo $3 > $path"
}

# Bits per second of a tc rate (SI units as tc reads them: bit, kbit, mbit,
# gbit, tbit; bps, kbps, mbps, gbps are bytes per second).
rate_bps() {
    local r=${1,,}
    [[ $r =~ ^([0-9]+(\.[0-9]+)?)([kmgt]?)(bit|bps)$ ]] || return 1
    local n=${BASH_REMATCH[1]} p=${BASH_REMATCH[3]} u=${BASH_REMATCH[4]}
    awk -v n="$n" -v p="$p" -v u="$u" 'BEGIN {
        m = 1; if (p == "k") m = 1e3; if (p == "m") m = 1e6; if (p == "g") m = 1e9; if (p == "t") m = 1e12
        if (u == "bps") m *= 8
        printf "%.0f\n", n * m }'
}

# The parameters of the testbed now up, from the alias of pmv0s
# ("pmigrate-testbed links=K rate=R delay=D mtu=M qdisc=Q"), or nothing.
current_tag() {
    ns_exists "$NS_SRC" || return 0
    ip -n "$NS_SRC" -o link show dev pmv0s 2>/dev/null |
        sed -n 's/.* alias \(pmigrate-testbed .*\)$/\1/p' | sed 's/[[:space:]]*$//'
}

tag_get() { # tag_get TAG KEY
    local kv
    for kv in $1; do
        [[ $kv == "$2="* ]] && { echo "${kv#*=}"; return 0; }
    done
    return 1
}

# Our links in NS whose names end in SUFFIX (s or d), one per line.
our_links() {
    ns_exists "$1" || return 0
    ip -n "$1" -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' |
        grep -E "^pmv[0-9]+$2\$" || true
}

# healthy K QDISC: the live state matches a K-link testbed with QDISC at the root.
healthy() {
    local k=$1 q=$2 i
    ns_exists "$NS_SRC" && ns_exists "$NS_DST" || return 1
    [[ $(our_links "$NS_SRC" s | wc -l) -eq $k ]] || return 1
    [[ $(our_links "$NS_DST" d | wc -l) -eq $k ]] || return 1
    for ((i = 0; i < k; i++)); do
        ip -n "$NS_SRC" -o addr show dev "pmv${i}s" 2>/dev/null | grep -q " 10\.77\.$i\.1/24 " || return 1
        ip -n "$NS_DST" -o addr show dev "pmv${i}d" 2>/dev/null | grep -q " 10\.77\.$i\.2/24 " || return 1
        ip -n "$NS_SRC" -o link show dev "pmv${i}s" | grep -q "state UP" || return 1
        ip -n "$NS_DST" -o link show dev "pmv${i}d" | grep -q "state UP" || return 1
        if [[ $q != none ]]; then
            tc -n "$NS_SRC" qdisc show dev "pmv${i}s" root | grep -q "^qdisc $q " || return 1
            tc -n "$NS_DST" qdisc show dev "pmv${i}d" root | grep -q "^qdisc $q " || return 1
        fi
    done
}

# shape NS DEV: rate limit (and delay) DEV's egress with the chosen qdisc.
#
# tbf: burst = max(2 ms at RATE, 256 KiB). It must exceed the largest GSO
#      packet (64 KiB on veth), or tbf splits every GSO packet into MTU-sized
#      segments in software (and loses rate); a few times that, and 2 ms at
#      RATE, keeps the tokens that accrue while a loaded CPU dequeues late
#      (docs/testbed.md). The queue holds QLAT (default 5 ms) at RATE on top
#      of the burst; more only adds queueing delay to every stream.
# htb: one class, rate = ceil = RATE, same burst, a byte FIFO of the same size
#      as tbf's queue as the leaf.
# netem (when --delay): the leaf under tbf/htb, with a queue large enough for
#      the bandwidth-delay product.
shape() {
    local ns=$1 dev=$2
    [[ $RATE == none && $DELAY == 0 ]] && return 0
    local parent="root"
    if [[ $RATE != none ]]; then
        local bps burst qbytes
        bps=$(rate_bps "$RATE")
        burst=$((bps / 8 * 2 / 1000))
        ((burst < 262144)) && burst=262144
        qbytes=$((bps / 8 * QLAT_MS / 1000 + burst))
        case $QDISC in
            tbf)
                tc -n "$ns" qdisc add dev "$dev" root handle 1: tbf rate "$RATE" burst "$burst" limit "$qbytes"
                parent="parent 1:1"
                ;;
            htb)
                tc -n "$ns" qdisc add dev "$dev" root handle 1: htb default 1
                tc -n "$ns" class add dev "$dev" parent 1: classid 1:1 htb rate "$RATE" ceil "$RATE" \
                    burst "$burst" cburst "$burst" quantum 200000
                [[ $DELAY == 0 ]] && tc -n "$ns" qdisc add dev "$dev" parent 1:1 handle 10: bfifo limit "$qbytes"
                parent="parent 1:1"
                ;;
        esac
    fi
    if [[ $DELAY != 0 ]]; then
        modprobe -q sch_netem 2>/dev/null || true
        # netem's limit counts packets held during the delay; it must cover
        # RATE x DELAY in MTU-sized packets (10gbit x 100ms = 83k at 1500).
        local limit=100000
        if ! tc -n "$ns" qdisc add dev "$dev" $parent handle 10: netem delay "$DELAY" limit "$limit" 2>/tmp/pm-testbed-netem.$$; then
            local err
            err=$(cat /tmp/pm-testbed-netem.$$)
            rm -f /tmp/pm-testbed-netem.$$
            note "tc netem failed: $err"
            note "this kernel may lack sch_netem (CONFIG_NET_SCH_NETEM); --delay needs it"
            return 1
        fi
        rm -f /tmp/pm-testbed-netem.$$
    fi
}

# --- subcommands -------------------------------------------------------------

cmd_down() {
    local quiet=${1:-}
    local ns l removed=0
    for ns in "$NS_SRC" "$NS_DST"; do
        ns_exists "$ns" || continue
        # Deleting one end of a veth pair deletes both.
        for l in $(our_links "$ns" s) $(our_links "$ns" d); do
            ip -n "$ns" link del dev "$l" 2>/dev/null || true
            removed=1
        done
        local others pids
        others=$(ip -n "$ns" -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -vx lo || true)
        if [[ -n $others ]]; then
            note "leaving namespace $ns: it holds interfaces this script did not create: $(echo $others)"
            continue
        fi
        pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        [[ -n $pids ]] && note "processes still in namespace $ns (pids $pids); the namespace lives on until they exit"
        ip netns del "$ns"
        removed=1
    done
    [[ -z $quiet ]] && { ((removed)) && echo "testbed down" || echo "testbed was not up"; }
    return 0
}

cmd_up() {
    local k=1
    RATE=1gbit DELAY=0 MTU=1500 QDISC=tbf
    QLAT_MS=${PM_QUEUE_MS:-5}
    while (($#)); do
        case $1 in
            --links) k=${2:?--links needs a value}; shift 2 ;;
            --rate) RATE=${2:?--rate needs a value}; shift 2 ;;
            --delay) DELAY=${2:?--delay needs a value}; shift 2 ;;
            --mtu) MTU=${2:?--mtu needs a value}; shift 2 ;;
            --qdisc) QDISC=${2:?--qdisc needs a value}; shift 2 ;;
            --links=*) k=${1#*=}; shift ;;
            --rate=*) RATE=${1#*=}; shift ;;
            --delay=*) DELAY=${1#*=}; shift ;;
            --mtu=*) MTU=${1#*=}; shift ;;
            --qdisc=*) QDISC=${1#*=}; shift ;;
            *) usage >&2; exit 2 ;;
        esac
    done
    [[ $k =~ ^[0-9]+$ ]] && ((k >= 1 && k <= MAX_LINKS)) || die "--links must be 1..$MAX_LINKS"
    RATE=${RATE,,}
    [[ $RATE == none ]] || rate_bps "$RATE" >/dev/null || die "bad --rate $RATE (e.g. 500mbit, 1gbit, 10gbit, none)"
    [[ $DELAY =~ ^0+(\.0+)?(us|ms|s)?$ ]] && DELAY=0
    [[ $DELAY == 0 || $DELAY =~ ^[0-9]+(\.[0-9]+)?(us|ms|s)$ ]] || die "bad --delay $DELAY (e.g. 2ms)"
    [[ $MTU =~ ^[0-9]+$ ]] && ((MTU >= 576 && MTU <= 65535)) || die "--mtu must be 576..65535"
    [[ $QDISC == tbf || $QDISC == htb ]] || die "--qdisc must be tbf or htb"
    [[ $QLAT_MS =~ ^[0-9]+$ ]] && ((QLAT_MS >= 1)) || die "PM_QUEUE_MS must be a positive integer"
    local qkind=$QDISC
    [[ $RATE == none ]] && qkind=none
    [[ $RATE == none && $DELAY != 0 ]] && qkind=netem

    local shaping="$QDISC rate $RATE"
    [[ $RATE == none ]] && shaping="unshaped"
    [[ $DELAY != 0 ]] && shaping+=" + netem delay $DELAY"
    local tag="$TAG links=$k rate=$RATE delay=$DELAY mtu=$MTU qdisc=$QDISC queue_ms=$QLAT_MS"
    if [[ $(current_tag) == "$tag" ]] && healthy "$k" "$qkind"; then
        echo "testbed already up: $k link(s), $shaping, mtu $MTU ($NS_SRC <-> $NS_DST)"
        return 0
    fi
    cmd_down quiet

    ip netns add "$NS_SRC"
    ip netns add "$NS_DST"
    local ns
    for ns in "$NS_SRC" "$NS_DST"; do
        ip -n "$ns" link set lo up
        # Several links in one namespace: no reverse-path filter, and ARP
        # answered and sourced only on the interface that owns the address.
        ns_sysctl "$ns" net.ipv4.conf.all.rp_filter 0
        ns_sysctl "$ns" net.ipv4.conf.default.rp_filter 0
        ns_sysctl "$ns" net.ipv4.conf.all.arp_ignore 1
        ns_sysctl "$ns" net.ipv4.conf.all.arp_announce 2
        # No IPv6 chatter (router solicitations, DAD) on the shaped links.
        ns_sysctl "$ns" net.ipv6.conf.default.disable_ipv6 1 2>/dev/null || true
    done

    local i s d
    for ((i = 0; i < k; i++)); do
        s=pmv${i}s d=pmv${i}d
        ip link add "$s" mtu "$MTU" netns "$NS_SRC" type veth peer name "$d" mtu "$MTU" netns "$NS_DST"
        ip -n "$NS_SRC" addr add "10.77.$i.1/24" dev "$s"
        ip -n "$NS_DST" addr add "10.77.$i.2/24" dev "$d"
        if ! shape "$NS_SRC" "$s" || ! shape "$NS_DST" "$d"; then
            cmd_down quiet
            die "could not shape link $i; testbed removed"
        fi
        ip -n "$NS_SRC" link set "$s" up
        ip -n "$NS_DST" link set "$d" up
    done
    ip -n "$NS_SRC" link set dev pmv0s alias "$tag"

    # Each link is its own /24, so the route to 10.77.<i>.2 must be pmv<i>s.
    for ((i = 0; i < k; i++)); do
        ip -n "$NS_SRC" route get "10.77.$i.2" | grep -q " dev pmv${i}s " ||
            die "route to 10.77.$i.2 does not leave by pmv${i}s: $(ip -n "$NS_SRC" route get "10.77.$i.2")"
        ip -n "$NS_DST" route get "10.77.$i.1" | grep -q " dev pmv${i}d " ||
            die "route to 10.77.$i.1 does not leave by pmv${i}d"
    done
    healthy "$k" "$qkind" || die "testbed came up incomplete; see '$prog status'"
    echo "testbed up: $k link(s), $shaping, mtu $MTU ($NS_SRC <-> $NS_DST)"
}

# Sets K RATE DELAY MTU from the live testbed, or fails.
load_state() {
    local tag
    tag=$(current_tag)
    [[ -n $tag ]] || die "testbed is not up (no $NS_SRC/pmv0s); run '$prog up'"
    K=$(tag_get "$tag" links) RATE=$(tag_get "$tag" rate) DELAY=$(tag_get "$tag" delay)
    MTU=$(tag_get "$tag" mtu) QDISC=$(tag_get "$tag" qdisc)
}

cmd_env() {
    load_state
    local i src=() dst=() sif=() dif=()
    for ((i = 0; i < K; i++)); do
        src+=("10.77.$i.1") dst+=("10.77.$i.2") sif+=("pmv${i}s") dif+=("pmv${i}d")
    done
    local IFS=,
    echo "PM_LINKS=$K"
    echo "PM_SRC_ADDRS=${src[*]}"
    echo "PM_DST_ADDRS=${dst[*]}"
    echo "PM_SRC_IFACES=${sif[*]}"
    echo "PM_DST_IFACES=${dif[*]}"
    echo "PM_NS_SRC=$NS_SRC"
    echo "PM_NS_DST=$NS_DST"
    echo "PM_RATE=$RATE"
    echo "PM_DELAY=$DELAY"
    echo "PM_MTU=$MTU"
}

cmd_status() {
    local ns
    echo "namespaces:"
    for ns in "$NS_SRC" "$NS_DST"; do
        if ns_exists "$ns"; then echo "  $ns"; else echo "  $ns (absent)"; fi
    done
    local tag
    tag=$(current_tag)
    if [[ -z $tag ]]; then
        echo "testbed is not up"
        return 0
    fi
    echo "config: ${tag#"$TAG "}"
    for ns in "$NS_SRC" "$NS_DST"; do
        echo
        echo "== $ns: links and addresses"
        ip -n "$ns" -br addr show
        echo "== $ns: routes"
        ip -n "$ns" route show
        echo "== $ns: qdiscs"
        local l
        for l in $(our_links "$ns" s) $(our_links "$ns" d); do
            echo "  $l:"
            tc -n "$ns" -s qdisc show dev "$l" | sed "s/^/    /"
            tc -n "$ns" class show dev "$l" | grep -v "^class tbf " | sed "s/^/    /" || true
        done
    done
    echo
    echo "== route check (from $NS_SRC)"
    local i K
    K=$(tag_get "$tag" links)
    for ((i = 0; i < K; i++)); do
        echo "  $(ip -n "$NS_SRC" route get "10.77.$i.2" | head -1)"
    done
}

cmd_ceiling() {
    local secs=5
    while (($#)); do
        case $1 in
            --seconds) secs=${2:?--seconds needs a value}; shift 2 ;;
            --seconds=*) secs=${1#*=}; shift ;;
            *) usage >&2; exit 2 ;;
        esac
    done
    [[ $secs =~ ^[0-9]+$ ]] && ((secs >= 1)) || die "--seconds must be a positive integer"
    load_state
    need_iperf3

    local tmp i pids=()
    tmp=$(mktemp -d /tmp/pm-ceiling.XXXXXX)
    # shellcheck disable=SC2064
    trap "kill ${pids[*]:-} 2>/dev/null; rm -rf '$tmp'" EXIT
    for ((i = 0; i < K; i++)); do
        ip netns exec "$NS_DST" iperf3 -s -B "10.77.$i.2" -p $((IPERF_BASE_PORT + i)) >"$tmp/server$i.log" 2>&1 &
        pids+=($!)
    done
    trap "kill ${pids[*]} 2>/dev/null; wait 2>/dev/null; rm -rf '$tmp'" EXIT
    local t
    for ((i = 0; i < K; i++)); do
        for ((t = 0; t < 50; t++)); do
            ip netns exec "$NS_DST" ss -Hltn "sport = :$((IPERF_BASE_PORT + i))" | grep -q . && break
            sleep 0.1
        done
    done

    # client I OUT: one TCP stream over link I for $secs seconds.
    client() {
        ip netns exec "$NS_SRC" iperf3 -c "10.77.$1.2" -B "10.77.$1.1" -p $((IPERF_BASE_PORT + $1)) \
            -t "$secs" -f m -V >"$2" 2>&1
    }
    # gbit OUT: receiver-side Gbit/s; retr OUT: sender retransmits; cpu OUT.
    gbit() { awk '/ receiver$/ && /Mbits\/sec/ { for (j = 1; j <= NF; j++) if ($j == "Mbits/sec") v = $(j-1) } END { if (v == "") exit 1; printf "%.3f", v / 1000 }' "$1"; }
    retr() { awk '/ sender$/ && /Mbits\/sec/ { for (j = 1; j <= NF; j++) if ($j == "Mbits/sec") v = $(j+1) } END { print (v == "" ? "?" : v) }' "$1"; }
    cpu() { sed -n 's/^CPU Utilization: local\/sender \([0-9.]*%\).*remote\/receiver \([0-9.]*%\).*/snd \1 rcv \2/p' "$1"; }

    echo "raw TCP ceiling, iperf3, one stream per link, ${secs}s per run, rate $RATE per link, delay $DELAY, mtu $MTU, $QDISC"
    echo "link alone:"
    for ((i = 0; i < K; i++)); do
        client "$i" "$tmp/alone$i.log" || { cat "$tmp/alone$i.log" >&2; die "iperf3 over link $i failed"; }
        printf "  link %d  10.77.%d.1 -> 10.77.%d.2  %7s Gbit/s  (retr %s, cpu %s)\n" "$i" "$i" "$i" \
            "$(gbit "$tmp/alone$i.log")" "$(retr "$tmp/alone$i.log")" "$(cpu "$tmp/alone$i.log")"
    done
    if ((K == 1)); then
        printf "  aggregate  %7s Gbit/s over 1 link\n" "$(gbit "$tmp/alone0.log")"
        return 0
    fi
    echo "all $K links at once:"
    local cpids=()
    for ((i = 0; i < K; i++)); do
        client "$i" "$tmp/all$i.log" &
        cpids+=($!)
    done
    local fail=0
    for i in "${!cpids[@]}"; do wait "${cpids[$i]}" || fail=1; done
    ((fail)) && { cat "$tmp"/all*.log >&2; die "iperf3 run with all links failed"; }
    local sum=0 g
    for ((i = 0; i < K; i++)); do
        g=$(gbit "$tmp/all$i.log")
        sum=$(awk -v a="$sum" -v b="$g" 'BEGIN { printf "%.3f", a + b }')
        printf "  link %d  %7s Gbit/s  (retr %s, cpu %s)\n" "$i" "$g" "$(retr "$tmp/all$i.log")" "$(cpu "$tmp/all$i.log")"
    done
    printf "  aggregate  %7s Gbit/s over %d links\n" "$sum" "$K"
}

main() {
    local cmd=${1:-}
    (($#)) && shift
    case $cmd in
        up) need_root; need_iproute2; cmd_up "$@" ;;
        down) need_root; need_iproute2; cmd_down "" ;;
        status) need_root; need_iproute2; cmd_status ;;
        env) need_root; need_iproute2; cmd_env ;;
        ceiling) need_root; need_iproute2; cmd_ceiling "$@" ;;
        -h | --help | help) usage ;;
        *) usage >&2; exit 2 ;;
    esac
}

main "$@"
