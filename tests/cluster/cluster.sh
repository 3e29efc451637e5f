#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for the cluster tests (root only).
#
#   tests/cluster/cluster.sh up      install packages if missing, boot munge + slurmctld + 2 slurmds
#   tests/cluster/cluster.sh down    stop everything `up` started and remove what it added (idempotent)
#   tests/cluster/cluster.sh env     print `export SLURM_CONF=...` for a shell that wants sinfo/sbatch
#
# Two "nodes" are two network namespaces, node1 (10.77.0.11) and node2 (10.77.0.12), on a bridge
# with the controller at 10.77.0.1; each slurmd also gets its own UTS namespace, hence its own
# hostname (gloo advertises the hostname; a shared one resolves to 127.0.0.1 and ranks on different
# nodes cannot meet). The pitfalls met on the way are commented where each is handled below.
#
# Nothing outside $STATE is written except two marked lines in /etc/hosts (removed by `down`); the
# system's /etc/slurm/slurm.conf is left alone: clients find ours through SLURM_CONF.
set -euo pipefail

STATE=${DCGAN_CLUSTER_DIR:-/run/dcgan-cluster}
BRIDGE=dcgbr0
SUBNET=10.77.0
NODES=(node1 node2)
NODE_CPUS=${DCGAN_CLUSTER_NODE_CPUS:-2}   # each namespace sees the host's cores; slurmd drains a node that claims more
HOSTS_MARK="# dcgan-test-cluster"
export SLURM_CONF=$STATE/slurm.conf

log() { echo "[cluster] $*" >&2; }

install_packages() {
    local missing=()
    for cmd in slurmctld slurmd sbatch munged ip nsenter unshare; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    [ ${#missing[@]} -eq 0 ] && return
    log "installing slurm + munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge iproute2 util-linux >/dev/null
}

start_munge() {
    if munge -n </dev/null >/dev/null 2>&1; then
        log "munged already running; using it"
        return
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
    chmod 400 /etc/munge/munge.key
    chmod 755 /run/munge   # clients (sbatch, slurmd) must reach the socket
    su -s /bin/sh munge -c 'munged'   # daemonizes; writes /run/munge/munged.pid
    touch "$STATE/munged.ours"          # so `down` stops only a munged that we started
    for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && return; sleep 0.1; done
    log "munged did not come up"; return 1
}

setup_network() {
    ip link add "$BRIDGE" type bridge
    ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local i=0
    for node in "${NODES[@]}"; do
        i=$((i + 1))
        ip netns add "$node"
        ip link add "veth-$node" type veth peer name eth0 netns "$node"
        ip link set "veth-$node" master "$BRIDGE" up
        ip -n "$node" addr add "$SUBNET.1$i/24" dev eth0
        ip -n "$node" link set eth0 up
        ip -n "$node" link set lo up
    done
}

rewrite_hosts() {  # drop our lines (and add $1 if given), rewriting in place: /etc/hosts may be a bind mount
    local tmp
    tmp=$(mktemp)
    grep -v -- "$HOSTS_MARK\$" /etc/hosts >"$tmp" || true
    [ -n "${1:-}" ] && printf '%s' "$1" >>"$tmp"
    cat "$tmp" >/etc/hosts
    rm -f "$tmp"
}

write_slurm_conf() {
    mkdir -p "$STATE/ctld" "$STATE/log"
    local i=0 nodes=""
    for node in "${NODES[@]}"; do i=$((i + 1)); mkdir -p "$STATE/spool/$node"
        nodes+="NodeName=$node NodeAddr=$SUBNET.1$i CPUs=$NODE_CPUS RealMemory=4000 State=UNKNOWN"$'\n'
    done
    cat >"$SLURM_CONF" <<EOF
ClusterName=dcgan-ci
SlurmctldHost=$(hostname -s)($SUBNET.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds (default 120) before it may start again; schedule every 2 s
AuthInfo=cred_expire=15
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
SlurmctldPort=6817
SlurmdPort=6818
$nodes
PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_idle() {
    for _ in $(seq 60); do
        local idle
        idle=$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)
        if [ "$idle" -eq "${#NODES[@]}" ]; then return 0; fi
        sleep 1
    done
    log "nodes not idle after 60 s:"; sinfo -N >&2 || true
    return 1
}

up() {
    [ "$(id -u)" -eq 0 ] || { log "must run as root (namespaces, /etc/hosts, daemons)"; exit 1; }
    down quiet   # leftovers of an interrupted run
    install_packages
    mkdir -p "$STATE"
    trap 'log "boot failed; logs:"; tail -n 20 "$STATE"/log/*.log >&2 2>/dev/null || true; down' ERR
    start_munge
    setup_network
    local entries="" i=0
    for node in "${NODES[@]}"; do i=$((i + 1)); entries+="$SUBNET.1$i $node $HOSTS_MARK"$'\n'; done
    rewrite_hosts "$entries"
    write_slurm_conf
    slurmctld -i -f "$SLURM_CONF"
    for node in "${NODES[@]}"; do
        # nsenter, not `ip netns exec`: the latter remounts /sys and slurmd then finds no cgroup fs
        nsenter --net="/var/run/netns/$node" unshare --uts \
            sh -c "hostname $node; exec slurmd -f '$SLURM_CONF' -N $node"
    done
    wait_idle
    trap - ERR
    log "up: $(sinfo -h -o '%P %a %D %t %N' | tr '\n' ' ')(SLURM_CONF=$SLURM_CONF)"
}

stop_pid_file() {  # stop the daemon whose pid is in $1 (by that id only), SIGKILL after 10 s
    local pid
    [ -s "$1" ] || return 0
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

down() {
    local quiet=${1:-}
    if [ -f "$SLURM_CONF" ]; then
        scancel --full --signal=KILL --user=root 2>/dev/null || true   # the test's jobs; the cluster is ours
        scontrol shutdown 2>/dev/null || true
        stop_pid_file "$STATE/slurmctld.pid"
        for node in "${NODES[@]}"; do stop_pid_file "$STATE/slurmd-$node.pid"; done
    fi
    for node in "${NODES[@]}"; do
        if [ -e "/var/run/netns/$node" ]; then
            # whatever still lives in our namespaces (slurmstepd, job processes) was started by this cluster
            local pids
            pids=$(ip netns pids "$node" 2>/dev/null || true)
            # shellcheck disable=SC2086  # one id per word
            [ -n "$pids" ] && { kill -9 $pids 2>/dev/null || true; sleep 0.5; }
            ip netns del "$node"
        fi
        ip link del "veth-$node" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    grep -q -- "$HOSTS_MARK\$" /etc/hosts 2>/dev/null && rewrite_hosts ""
    if [ -f "$STATE/munged.ours" ]; then
        stop_pid_file /run/munge/munged.pid
    fi
    rm -rf "$STATE"
    [ -n "$quiet" ] || log "down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    env) echo "export SLURM_CONF=$SLURM_CONF" ;;
    *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
