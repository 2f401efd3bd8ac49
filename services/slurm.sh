#!/usr/bin/env bash
# A single-node Slurm 22.05 cluster on this machine, run as root without systemd, for the tests of
# `dnnrun -m hydra/launcher=slurm` (tests/test_slurm.py). Installs Debian's packages when missing,
# starts munged, slurmctld and slurmd in the background and waits until the node is idle and
# `srun true` runs. Idempotent: with the cluster up (and this configuration), it returns at once.
# Partition: $SLURM_PARTITION (default debug). Logs: /var/log/slurm/, /var/log/munge/munged.log.
set -euo pipefail

PARTITION=${SLURM_PARTITION:-debug}
CONF=/etc/slurm/slurm.conf
LOGS=/var/log/slurm
STATE=/var/lib/slurm/slurmctld
SPOOL=/var/lib/slurm/slurmd
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid

die() {
    echo "services/slurm.sh: $*" >&2
    for log in "$LOGS/slurmctld.log" "$LOGS/slurmd.log" /var/log/munge/munged.log; do
        if [[ -f $log ]]; then
            echo "--- last lines of $log" >&2
            tail -n 15 "$log" >&2
        fi
    done
    exit 1
}

running() { # the daemon of this PID file runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

munge_ok() {
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

node_state() { # idle, mixed, allocated, down*, drained, ... of this machine's node
    timeout 5 sinfo -h -n "$host" -o %T 2>/dev/null | head -n 1
}

usable() { # the controller answers and the node takes jobs (running ones or not)
    timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' \
        && [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]
}

config() {
    cat <<EOF
# Written by services/slurm.sh: one node, everything as root, with time limits, requeues and
# finished jobs handled as quickly as Slurm allows (for tests, not for production).
ClusterName=dnnrun
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=cred_expire=10
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# no cgroups (nor systemd) here: a job's processes are tracked by their parents, nothing is bound
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGS/jobcomp.log
# no mail is sent from here (Debian's default mail program is not installed)
MailProg=/bin/true
SchedulerType=sched/backfill
# sched_interval: every pending job is considered each 2 s (default 60), e.g. one whose begin time
# has come; jobs are also scheduled at once when submitted or when a job ends
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# batch jobs may be requeued (submitit requeues a job on SIGUSR2: preempted or near its time limit)
JobRequeue=1
# a finished job stays in squeue and scontrol show job for 60 s (default 300)
MinJobAge=60
# from SIGTERM to SIGKILL when a job is cancelled, requeued or past its time limit: 5 s (default 30)
KillWait=5
# the time limit is a hard one (checked by slurmctld every 30 s, a fixed interval)
OverTimeLimit=0
MessageTimeout=10
# a node that was down comes back by itself when its slurmd registers
ReturnToService=2
$node State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

host=$(hostname -s)
if command -v slurmd >/dev/null && command -v srun >/dev/null && command -v munged >/dev/null; then
    # e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
    node=$(slurmd -C | head -n 1)
    if [[ -f $CONF ]] && [[ $(config) == "$(cat "$CONF")" ]] && running "$CTLD_PID" && running "$SLURMD_PID" \
        && munge_ok && usable; then
        exit 0
    fi
fi

[[ $(id -u) == 0 ]] || die "must run as root (it starts munged, slurmctld and slurmd)"

if ! command -v slurmd >/dev/null || ! command -v slurmctld >/dev/null || ! command -v srun >/dev/null \
    || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    packages=(slurmctld slurmd slurm-client munge)
    apt-get install -y --no-install-recommends "${packages[@]}" >/dev/null 2>&1 \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${packages[@]}" >/dev/null; } \
        || die "apt-get could not install ${packages[*]}"
fi

# --- munge: a key only munge reads, and munged run as munge
if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge /var/log/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if ! munge_ok; then
    runuser -u munge -- munged --force || die "munged did not start"
    for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
    munge_ok || die "munged does not answer (munge -n | unmunge)"
fi

# --- the node: its short name resolves; its CPUs and memory as slurmd finds them
grep -qE "^[^#]*[[:space:]]$host([[:space:]]|$)" /etc/hosts || echo "127.0.0.1 $host" >>/etc/hosts
node=$(slurmd -C | head -n 1)
[[ $node == NodeName=$host\ * ]] || die "slurmd -C did not describe this machine: $node"

mkdir -p /etc/slurm "$LOGS" "$STATE" "$SPOOL"
if [[ ! -f $CONF ]] || [[ $(config) != "$(cat "$CONF")" ]]; then
    config >"$CONF"
    # daemons started with another configuration stop (by their PID files) and start again below
    for pidfile in "$SLURMD_PID" "$CTLD_PID"; do
        if running "$pidfile"; then kill "$(cat "$pidfile")"; fi
    done
    for _ in $(seq 100); do
        running "$SLURMD_PID" || running "$CTLD_PID" || break
        sleep 0.1
    done
fi

if ! running "$CTLD_PID"; then
    slurmctld || die "slurmctld did not start"
fi
for _ in $(seq 100); do timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' || die "slurmctld does not answer (scontrol ping)"
if ! running "$SLURMD_PID"; then
    slurmd || die "slurmd did not start"
fi

# A node left down or drained (e.g. by a daemon killed earlier) is resumed.
state=
for _ in $(seq 150); do
    state=$(node_state)
    case $state in
        idle | mixed | allocated | completing) break ;;
        down* | drain* | fail*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.2
done
[[ $state =~ ^(idle|mixed|allocated|completing)$ ]] || die "the node is not up (sinfo: ${state:-no answer})"
out=$(timeout 60 srun -p "$PARTITION" -t 1 -Q true 2>&1) || die "\`srun true\` failed: $out"
