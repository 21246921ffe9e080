#!/usr/bin/env bash
# Bring up a single-node Slurm on THIS machine, for the cluster runner's tests.
#
# Exit 0 and print "slurm ready: <sinfo line>" when Slurm works (a trivial job ran).
# Exit 3 with ONE line on stderr saying why when Slurm cannot be had here
# (no root, apt-get fails, daemons do not start), so that tests can skip with that reason.
#
# Idempotent: when both daemons run and sinfo reports the node idle (or busy), it only prints "ready".
# Recipe and observed behaviours: see SLURM.md (slurm-wlm + munge from Debian, no systemd).
# Noisy output goes to $REPRO_SLURM_SETUP_LOG (default /tmp/repro-slurm-setup.log).
set -Eeuo pipefail

LOG=${REPRO_SLURM_SETUP_LOG:-/tmp/repro-slurm-setup.log}
CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
MARK='# written by repro tests/slurm/setup.sh (delete this line to keep your own edits)'
MUNGE_KEY=/etc/munge/munge.key
{ : >>"$LOG"; } 2>/dev/null || LOG=/dev/null # e.g. not root and the log belongs to root

die() {
    trap - ERR
    echo "slurm unavailable: $*" >&2
    exit 3
}
trap 'die "unexpected failure at line $LINENO: $BASH_COMMAND (see $LOG)"' ERR

log() { echo "[$(date +%T)] $*" >>"$LOG" 2>/dev/null || true; }

HOST=$(hostname -s 2>/dev/null) || die "hostname -s fails"
[ -n "$HOST" ] || die "hostname -s is empty"

# State of this node as sinfo reports it ("idle", "mixed", "down*", ...), empty if sinfo fails.
node_state() {
    command -v sinfo >/dev/null 2>&1 || return 0
    timeout 10 sinfo -h -N -n "$HOST" -o %T 2>>"$LOG" | head -n1 || true
}

ready_line() {
    timeout 10 sinfo -h -N -n "$HOST" -o '%N %P %T cpus=%c mem=%mM' 2>>"$LOG" | head -n1 || true
}

healthy() {
    case "$1" in idle | mixed | allocated) return 0 ;; *) return 1 ;; esac
}

# ---- the slurm.conf this script wants (written further down) ------------------------------
cpus=$(nproc)
mem_total=$(free -m | awk '/^Mem:/ {print $2}')
[ -n "$mem_total" ] && [ "$mem_total" -gt 0 ] || die "cannot read total memory from free -m"
# A bit below the total: slurmd drains the node when it finds less than RealMemory.
real_mem=$((mem_total * 95 / 100))

new_conf=$(
    cat <<EOF
$MARK
ClusterName=localtest
SlurmctldHost=$HOST
# one pretend GPU (gres.conf binds it to /dev/null), so that --gres=gpu:1 jobs can run
GresTypes=gpu
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
# no cgroup setup inside containers
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without it one job takes all memory: jobs serialise
DefMemPerCPU=500
MinJobAge=300
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
AccountingStorageType=accounting_storage/none
ReturnToService=2
# quiet harmless errors in the logs (no PMIx library, no mail program)
MpiDefault=none
MailProg=/bin/true
NodeName=$HOST CPUs=$cpus RealMemory=$real_mem Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)

# ---- fast path: everything is up already -------------------------------------------------
# (sinfo alone is not enough: slurmctld keeps a node idle for SlurmdTimeout after slurmd died)
# (nor when root and our slurm.conf is out of date: then fall through, rewrite it and restart)
ours_conf() { [ ! -e "$CONF" ] || head -n1 "$CONF" 2>/dev/null | grep -qxF "$MARK"; }
conf_stale() { [ "$(id -u)" = 0 ] && ours_conf && [ "$(cat "$CONF" 2>/dev/null)" != "$new_conf" ]; }
if pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null && healthy "$(node_state)" && ! conf_stale; then
    echo "slurm ready: $(ready_line)"
    exit 0
fi

log "setup starting on $HOST"

[ "$(id -u)" = 0 ] || die "setting up Slurm needs root (uid $(id -u)) and it is not running here"

# One setup at a time (test harnesses may call this in parallel); the others wait, then re-check.
# Daemons started below get `9>&-`: one that kept this fd would hold the lock for ever.
exec 9>/run/repro-slurm-setup.lock
if command -v flock >/dev/null 2>&1; then
    flock -w 180 9 || die "another tests/slurm/setup.sh holds /run/repro-slurm-setup.lock for over 180 s"
fi

# ---- packages ----------------------------------------------------------------------------
if ! command -v sbatch >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "sbatch is missing and there is no apt-get to install slurm-wlm"
    log "apt-get install slurm-wlm munge"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get update -qq >>"$LOG" 2>&1; then
        die "apt-get update failed (see $LOG)"
    fi
    if ! apt-get install -y -qq --no-install-recommends slurm-wlm munge >>"$LOG" 2>&1; then
        die "apt-get install slurm-wlm munge failed (see $LOG)"
    fi
    command -v sbatch >/dev/null 2>&1 || die "sbatch still missing after installing slurm-wlm"
fi
for bin in munged slurmctld slurmd sinfo scontrol; do
    command -v "$bin" >/dev/null 2>&1 || die "$bin is missing (slurm-wlm/munge incomplete)"
done
id munge >/dev/null 2>&1 || die "user munge does not exist"
id slurm >/dev/null 2>&1 || die "user slurm does not exist"

# ---- munge -------------------------------------------------------------------------------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s "$MUNGE_KEY" ]; then
    log "creating $MUNGE_KEY"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile="$MUNGE_KEY" >>"$LOG" 2>&1 || die "mungekey failed (see $LOG)"
    elif command -v create-munge-key >/dev/null 2>&1; then
        create-munge-key -f >>"$LOG" 2>&1 || die "create-munge-key failed (see $LOG)"
    else
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 >>"$LOG" 2>&1 || die "cannot write $MUNGE_KEY"
    fi
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 "$MUNGE_KEY"

if ! pgrep -x munged >/dev/null; then
    log "starting munged"
    su munge -s /bin/sh -c munged 9>&- >>"$LOG" 2>&1 || die "munged does not start (see $LOG, /var/log/munge/munged.log)"
fi
for _ in $(seq 1 20); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.5
done
munge -n 2>>"$LOG" | unmunge >>"$LOG" 2>&1 || die "munge does not work: munge -n | unmunge fails (see $LOG)"

# ---- slurm.conf --------------------------------------------------------------------------
conf_changed=no
if ours_conf; then
    if [ ! -e "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
        log "writing $CONF (CPUs=$cpus RealMemory=$real_mem)"
        mkdir -p "$(dirname "$CONF")"
        printf '%s\n' "$new_conf" >"$CONF.tmp.$$"
        chmod 0644 "$CONF.tmp.$$"
        mv -f "$CONF.tmp.$$" "$CONF"
        conf_changed=yes
    fi
    new_gres="$MARK
NodeName=$HOST Name=gpu File=/dev/null"
    if [ "$(cat "$GRES_CONF" 2>/dev/null)" != "$new_gres" ]; then
        log "writing $GRES_CONF"
        printf '%s\n' "$new_gres" >"$GRES_CONF.tmp.$$"
        chmod 0644 "$GRES_CONF.tmp.$$"
        mv -f "$GRES_CONF.tmp.$$" "$GRES_CONF"
        conf_changed=yes
    fi
else
    log "$CONF exists and was not written by this script: using it as it is"
fi

mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
chown slurm:slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
chmod 0755 /var/spool/slurmctld /var/spool/slurmd /var/log/slurm

# ---- daemons -----------------------------------------------------------------------------
stop_daemon() { # $1: process name; only daemons of this node's Slurm, by pid
    local pids
    pids=$(pgrep -x "$1" || true)
    [ -n "$pids" ] || return 0
    log "stopping $1 ($pids) to load the new slurm.conf"
    # shellcheck disable=SC2086
    kill $pids 2>/dev/null || true
    for _ in $(seq 1 20); do
        pgrep -x "$1" >/dev/null || return 0
        sleep 0.5
    done
    die "$1 does not stop after SIGTERM; cannot load the new slurm.conf"
}
if [ "$conf_changed" = yes ]; then
    stop_daemon slurmd
    stop_daemon slurmctld
fi

if ! pgrep -x slurmctld >/dev/null; then
    log "starting slurmctld"
    slurmctld 9>&- >>"$LOG" 2>&1 || die "slurmctld does not start (see $LOG, /var/log/slurm/slurmctld.log)"
fi
for _ in $(seq 1 20); do
    timeout 5 scontrol ping 2>>"$LOG" | grep -q 'is UP' && break
    sleep 0.5
done
timeout 5 scontrol ping 2>>"$LOG" | grep -q 'is UP' ||
    die "slurmctld is not answering (see /var/log/slurm/slurmctld.log)"

if ! pgrep -x slurmd >/dev/null; then
    log "starting slurmd"
    slurmd 9>&- >>"$LOG" 2>&1 || die "slurmd does not start (see $LOG, /var/log/slurm/slurmd.log)"
fi

# ---- wait for the node (bounded) ---------------------------------------------------------
state=
deadline=$((SECONDS + 30))
while [ "$SECONDS" -lt "$deadline" ]; do
    state=$(node_state)
    healthy "$state" && break
    case "$state" in
    down* | drain* | fail* | inval*)
        log "node is $state: resuming"
        timeout 5 scontrol update nodename="$HOST" state=resume >>"$LOG" 2>&1 || true
        ;;
    esac
    sleep 1
done
if ! healthy "$state"; then
    reason=$(timeout 5 sinfo -h -N -n "$HOST" -o %E 2>/dev/null | head -n1 || true)
    die "node $HOST is '${state:-unknown}' after 30 s${reason:+ (reason: $reason)}; see /var/log/slurm/slurmd.log"
fi

# ---- prove it with a trivial job ---------------------------------------------------------
if ! job=$(cd /tmp && timeout 60 sbatch --parsable --wait --job-name=repro-setup-check \
    --output=/dev/null --time=0:01:00 --wrap 'true' 2>>"$LOG"); then
    die "a trivial job (sbatch --wait --wrap true) did not succeed within 60 s (see $LOG)"
fi
log "trivial job $job completed"

echo "slurm ready: $(ready_line)"
