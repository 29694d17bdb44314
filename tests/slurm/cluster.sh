#!/usr/bin/env bash
# A throw-away, single-node SLURM cluster on loopback, for the tests and CI: partitions cpu (the
# default) and gpu over one node that declares 2 GPUs as a count in gres.conf (no devices).
#
#   cluster.sh install      install slurmctld, slurmd, slurm-client and munge (Debian/Ubuntu)
#   cluster.sh start DIR    start munged, slurmctld and slurmd with all their files under DIR,
#                           wait until the node is idle, print `export SLURM_CONF=DIR/slurm.conf`
#                           and `export PATH=DIR/bin:$PATH` (an srun wrapper, see write_srun_wrapper)
#   cluster.sh stop DIR     cancel this cluster's jobs, then stop the daemons listed in DIR/pids
#
# Nothing system-wide is configured: no /etc/slurm/slurm.conf, no /etc/munge key, no services.
# Every SLURM program (daemons and clients) finds this cluster's config through SLURM_CONF (or
# -f), and every munge client finds this cluster's munged through AuthInfo=socket=... in it.
# Several clusters can run side by side (each picks its own free ports).
#
# Needs root for the SLURM daemons (slurmd must be able to start jobs as the submitting user);
# as a normal user it runs apt-get, slurmctld, slurmd and kill through `sudo -n` (e.g. on CI
# runners). munged never needs root.
#
# Only `start` prints to stdout (two export lines: SLURM_CONF, and PATH with DIR/bin first, see
# write_srun_wrapper), so `eval "$(cluster.sh start DIR)"` works; progress and errors go to stderr.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
PROGRAMS=(slurmctld slurmd sinfo sbatch squeue scancel munged mungekey)
READY_TIMEOUT_S=30
STOP_TIMEOUT_S=15
# GPUs the test node claims in gres.conf; none exist.
GPUS=2

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    SUDO=(sudo -n)
fi

usage() {
    cat >&2 <<EOF
usage: $(basename "$0") install
       $(basename "$0") start DIR
       $(basename "$0") stop DIR

install    apt-get install ${PACKAGES[*]} unless the programs are already there
start DIR  run a one-node cluster (partitions "cpu", the default, and "gpu"; the node
           declares 2 GPUs that do not exist) with its state under DIR;
           prints: export SLURM_CONF=DIR/slurm.conf
                   export PATH=DIR/bin:\$PATH
stop DIR   stop the daemons that 'start DIR' recorded in DIR/pids
EOF
    exit 2
}

log() { echo "cluster.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

have_programs() {
    local program
    for program in "${PROGRAMS[@]}"; do
        # The daemons live in /usr/sbin, which a normal user's PATH may lack.
        command -v "$program" >/dev/null 2>&1 || [[ -x /usr/sbin/$program ]] || return 1
    done
}

cmd_install() {
    if have_programs; then
        log "slurm and munge already installed"
        return
    fi
    # A fresh CI image or container has empty package lists; an update is cheap next to failing.
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >&2
    have_programs || die "installed ${PACKAGES[*]} but the programs are still missing"
}

# A TCP port on 127.0.0.1 that nothing listens on. Fixed ports (6817/6818) would collide with a
# second test cluster (parallel sessions on one machine) or a real slurmctld. The range stays
# below Linux's ephemeral ports (32768+), which outgoing connections could be holding.
free_port() {
    local port
    for _ in $(seq 200); do
        port=$((10000 + RANDOM % 20000))
        # Connecting succeeds only if something listens there.
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    die "no free TCP port found"
}

# munged refuses a socket unless every directory above it is searchable by everyone (clients of
# any user must reach it). Fail early with a clear message instead of munged's log line.
check_searchable() {
    local dir=$1
    while [[ $dir != / ]]; do
        [[ $(( $(stat -c %#a "$dir") & 1 )) -eq 1 ]] ||
            die "$dir is not searchable by others (mode $(stat -c %a "$dir")); munged needs every" \
                "directory above its socket to be o+x: pick a DIR such as \$(mktemp -d) under /tmp"
        dir=$(dirname "$dir")
    done
}

# The node's hardware as `slurmd -C` reports it, minus 10% memory: the node line must not claim
# more than slurmd finds or the node is drained ("Low RealMemory"), and the OS needs some.
node_hardware() {
    local line memory
    line=$("${SUDO[@]}" slurmd -C | head -n 1)
    memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$line")
    [[ -n $memory ]] || die "cannot read RealMemory from: slurmd -C -> $line"
    # Keep CPUs and the socket/core/thread layout exactly as detected; drop NodeName (ours is set
    # separately) and RealMemory (replaced).
    sed -e 's/NodeName=[^ ]* //' -e 's/ RealMemory=[0-9]*//' <<<"$line" | tr -d '\n'
    echo " RealMemory=$((memory * 9 / 10))"
}

write_config() {
    local dir=$1 host=$2 ctld_port=$3 slurmd_port=$4 hardware=$5
    cat >"$dir/slurm.conf" <<EOF
# Written by tests/slurm/cluster.sh for a throw-away test cluster; regenerated on every start.
ClusterName=pastest
# The short hostname must match the machine's, but the address is loopback so nothing leaves it.
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
# Root daemons: no slurm system user or directory ownership to set up.
SlurmUser=root
SlurmdUser=root

# munge is the only authentication SLURM 22.05 ships; AuthInfo points clients and daemons at
# this cluster's own munged instead of the system one (/run/munge). cred/munge reads it too.
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket

# No cgroups: containers and CI runners often cannot delegate them. linuxproc tracks job
# processes through the process tree, which is enough for short test jobs.
ProctrackType=proctrack/linuxproc
# task/none works too but makes every job print a warning; affinity only pins CPUs.
TaskPlugin=task/affinity
# No accounting database: sacct does not work here, so callers must poll with squeue
# (Snakemake: --slurm-status-command squeue, or it treats finished jobs as running forever).
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Finished jobs stay visible to squeue this long. The Snakemake plugin polls up to 180 s apart
# and needs to see a job's final state, so keep the 300 s default, never lower.
MinJobAge=300
MpiDefault=none
# No mail program is installed or wanted.
MailProg=/bin/true

# Cores and memory are both consumable, so several small jobs share the node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job that asks for no memory is given the whole node and jobs run one at a
# time.
DefMemPerCPU=512
# A node that was down (e.g. slurmd restarted) comes back as soon as it registers.
ReturnToService=2

StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info

# Two GPUs as a generic resource, declared in gres.conf with stand-in device files (see below):
# enough for SLURM to schedule, count and report GPU requests (--gpus, --gres=gpu:N), not to run
# anything on a GPU.
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 $hardware Gres=gpu:$GPUS State=UNKNOWN
# Two partitions over the same node, as on a GPU cluster: jobs that name none go to cpu.
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$host MaxTime=INFINITE State=UP
EOF
    # slurmd drops a GPU without a device file ("Removing file-less GPU") and rejects a File= that
    # is not a character or block device; links to /dev/null pass both checks. Nothing opens them.
    mkdir -p "$dir/dev"
    local i
    for ((i = 0; i < GPUS; i++)); do ln -sfn /dev/null "$dir/dev/gpu$i"; done
    cat >"$dir/gres.conf" <<EOF
# Written by tests/slurm/cluster.sh: $GPUS GPUs that do not exist. No autodetection (there is no
# NVML); each "device" is a link to /dev/null.
AutoDetect=off
NodeName=$host Name=gpu File=$dir/dev/gpu[0-$((GPUS - 1))]
EOF
}

# Inside each job, Snakemake's jobstep plugin runs the rule through `srun`, but first drops every
# SLURM_* variable from srun's environment (SLURM_CONF included; snakemake-executor-plugin-slurm
# issue #164 is the same trap for sacctmgr). A bare srun then looks for /etc/slurm/slurm.conf and
# DNS SRV records and dies: "Could not establish a configuration source". Rather than writing
# this cluster's config into /etc/slurm (system-wide, one cluster per machine), DIR/bin/srun puts
# SLURM_CONF back; callers put DIR/bin first on PATH, and sbatch --export=ALL carries that PATH
# into the jobs. Real clusters keep their config at the default path and need none of this.
write_srun_wrapper() {
    local dir=$1 srun
    srun=$(command -v srun) || die "srun not found"
    mkdir -p "$dir/bin"
    cat >"$dir/bin/srun" <<EOF
#!/bin/sh
# Written by tests/slurm/cluster.sh: restores SLURM_CONF for srun calls that lost it.
SLURM_CONF="\${SLURM_CONF:-$dir/slurm.conf}"
export SLURM_CONF
exec $srun "\$@"
EOF
    chmod 755 "$dir/bin" "$dir/bin/srun"
}

# EXIT trap while starting: on failure, say where the logs are and stop what had started.
abort_start() {
    [[ $1 -eq 0 ]] && return
    log "start failed (exit $1); logs: $STARTING_DIR/log, $STARTING_DIR/munge/munged.log"
    cmd_stop "$STARTING_DIR"
}

# Print the PID in a pid file once the daemon has written it (they write it after forking).
wait_pid_file() {
    local file=$1 name=$2
    for _ in $(seq 50); do
        if [[ -s $file ]]; then
            cat "$file"
            return
        fi
        sleep 0.1
    done
    die "$name did not write $file; see the logs under $(dirname "$file")"
}

cmd_start() {
    local dir=$1
    have_programs || die "slurm/munge programs missing: run '$0 install' first"
    export PATH="$PATH:/usr/sbin"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd -P)
    if any_running "$dir"; then
        die "a cluster started in $dir still runs; run '$0 stop $dir' first"
    fi
    # From here on, a failed start stops whatever it had started.
    STARTING_DIR=$dir
    trap 'abort_start $?' EXIT
    # Clients of any user must reach the munge socket and read slurm.conf.
    chmod 755 "$dir"
    check_searchable "$dir"
    # A previous start in the same DIR must not leak jobs, node state or an old key into this one.
    "${SUDO[@]}" rm -rf "$dir/state" "$dir/spool" "$dir/log" "$dir/munge" "$dir/bin" "$dir/dev" \
        "$dir/slurmctld.pid" "$dir/slurmd.pid"
    mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/munge"
    # munged wants the key readable by its user only, and its socket directory searchable by all.
    chmod 755 "$dir/munge"
    : >"$dir/pids"

    local host ctld_port slurmd_port hardware
    host=$(hostname -s)
    ctld_port=$(free_port)
    slurmd_port=$(free_port)
    while [[ $slurmd_port == "$ctld_port" ]]; do slurmd_port=$(free_port); done
    hardware=$(node_hardware)
    write_config "$dir" "$host" "$ctld_port" "$slurmd_port" "$hardware"
    export SLURM_CONF=$dir/slurm.conf

    # munged runs as whoever runs this script, without sudo: it needs no privilege, and it insists
    # that every folder on its paths is owned by root or by its own user, which DIR then is (as
    # root, or as a CI user who owns DIR). Running it as the munge user would mean chowning DIR.
    mungekey --create --keyfile="$dir/munge/munge.key"
    munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --log-file="$dir/munge/munged.log" --pid-file="$dir/munge/munged.pid" \
        --seed-file="$dir/munge/munged.seed"
    echo "munged $(wait_pid_file "$dir/munge/munged.pid" munged)" >>"$dir/pids"

    # -i: start even if the state files are unreadable (there are none: the state is fresh).
    "${SUDO[@]}" env SLURM_CONF="$SLURM_CONF" slurmctld -i -f "$SLURM_CONF"
    echo "slurmctld $(wait_pid_file "$dir/slurmctld.pid" slurmctld)" >>"$dir/pids"
    # -N: our node name, in case `hostname -s` and slurmd's own guess ever differ.
    "${SUDO[@]}" env SLURM_CONF="$SLURM_CONF" slurmd -f "$SLURM_CONF" -N "$host"
    echo "slurmd $(wait_pid_file "$dir/slurmd.pid" slurmd)" >>"$dir/pids"

    write_srun_wrapper "$dir"

    local state=""
    for _ in $(seq $((READY_TIMEOUT_S * 2))); do
        # One line per partition the node is in: all of them must say idle.
        state=$(sinfo -h -N -o %T 2>/dev/null | sort -u || true)
        [[ $state == idle ]] && break
        sleep 0.5
    done
    if [[ $state != idle ]]; then
        log "node state is '${state:-unknown}' after ${READY_TIMEOUT_S} s; slurmctld log tail:"
        tail -n 20 "$dir/log/slurmctld.log" >&2 || true
        tail -n 20 "$dir/log/slurmd.log" >&2 || true
        die "cluster did not become ready"
    fi
    trap - EXIT
    log "node $host idle (slurmctld :$ctld_port, slurmd :$slurmd_port)"
    echo "export SLURM_CONF=$dir/slurm.conf"
    echo "export PATH=$dir/bin:\$PATH"
}

# True while PID is alive and still runs the program named NAME (guards against PID reuse).
# A zombie counts as gone: a killed daemon stays one until its parent (here init, which may be
# slow to reap in a container) collects it.
running() {
    local pid=$1 name=$2 stat
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    # /proc/PID/stat reads "PID (COMM) STATE ...".
    [[ $stat == "$pid ($name) "* && $stat != "$pid ($name) Z"* ]]
}

# True if a daemon recorded in DIR/pids still runs. A pids file whose daemons are all gone (killed,
# machine restarted) is stale and does not block a new start.
any_running() {
    local dir=$1 name pid
    [[ -f $dir/pids ]] || return 1
    while read -r name pid; do
        [[ -n ${name:-} ]] && running "$pid" "$name" && return 0
    done <"$dir/pids"
    return 1
}

cmd_stop() {
    local dir=$1
    [[ -f $dir/pids ]] || { log "no $dir/pids: nothing to stop"; return; }
    export PATH="$PATH:/usr/sbin"
    # Jobs still running (e.g. from a failed test) would outlive slurmd: their slurmstepd keeps
    # going. Cancel them through this cluster's own controller first.
    if [[ -f $dir/slurm.conf ]] && grep -q '^slurmctld ' "$dir/pids"; then
        local jobs
        jobs=$(SLURM_CONF=$dir/slurm.conf squeue -h -t RUNNING,PENDING,COMPLETING -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086  # one argument per job id
            "${SUDO[@]}" env SLURM_CONF="$dir/slurm.conf" scancel $jobs || true
            for _ in $(seq 20); do
                [[ -z $(SLURM_CONF=$dir/slurm.conf squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
    fi

    # TERM all at once (each takes ~2 s to exit, one after the other would take ~6 s), slurmd
    # first; then KILL whatever is left after the timeout. Only PIDs still running the recorded
    # program are signalled, so a reused PID is never hit.
    local name pid alive
    local -a entries=()
    while read -r name pid; do
        [[ -n ${name:-} ]] && entries=("$name $pid" "${entries[@]}")
    done <"$dir/pids"
    for entry in "${entries[@]}"; do
        read -r name pid <<<"$entry"
        running "$pid" "$name" && { "${SUDO[@]}" kill -TERM "$pid" 2>/dev/null || true; }
    done
    for _ in $(seq $((STOP_TIMEOUT_S * 10))); do
        alive=0
        for entry in "${entries[@]}"; do
            read -r name pid <<<"$entry"
            running "$pid" "$name" && alive=1
        done
        [[ $alive -eq 0 ]] && break
        sleep 0.1
    done
    for entry in "${entries[@]}"; do
        read -r name pid <<<"$entry"
        if running "$pid" "$name"; then
            log "$name ($pid) ignored SIGTERM for ${STOP_TIMEOUT_S} s; sending SIGKILL"
            "${SUDO[@]}" kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -f "$dir/pids"
    log "stopped the cluster in $dir"
}

[[ $# -ge 1 ]] || usage
case $1 in
    install) [[ $# -eq 1 ]] || usage; cmd_install ;;
    start) [[ $# -eq 2 ]] || usage; cmd_start "$2" ;;
    stop) [[ $# -eq 2 ]] || usage; cmd_stop "$2" ;;
    -h | --help) usage ;;
    *) usage ;;
esac
