#!/usr/bin/env bash
# The time repro adds per stage under Slurm, beyond the job's own run and the cluster's own
# scheduling: a chain of N trivial stages (each needs the one before), run through Slurm, timed
# from slurmctld's log (millisecond stamps; needs read access to it, e.g. root on the test node
# that tests/slurm/setup.sh brings up).
#   bench/slurm-overhead.sh [N=20] [REPRO=target/release/repro]
# Per stage it prints: repro = previous job's end -> this job's submission (seeing the end,
# hashing and storing the outs, recording, sbatch); slurm = submission -> start (the cluster).
set -euo pipefail
N=${1:-20}
REPRO=$(realpath "${2:-target/release/repro}")
LOG=/var/log/slurm/slurmctld.log
[ -r "$LOG" ] || { echo "cannot read $LOG" >&2; exit 2; }
ws=$(mktemp -d)
trap 'rm -rf "$ws"' EXIT
{
    echo "stages:"
    for i in $(seq 0 $((N - 1))); do
        echo "  s$i:"
        echo "    cmd: echo $i > s$i.txt"
        [ "$i" -gt 0 ] && echo "    deps: [s$((i - 1)).txt]"
        echo "    outs: [s$i.txt]"
    done
} >"$ws/repro.yaml"
from=$(wc -l <"$LOG")
t0=$(date +%s.%N)
(cd "$ws" && "$REPRO" run --runner slurm >/dev/null 2>&1)
t1=$(date +%s.%N)
sleep 1
pairs=$(tail -n +"$((from + 1))" "$LOG" | awk '
    function ms(stamp,   t) { # [2026-11-29T20:23:54.328] -> ms since midnight
        split(substr(stamp, 13, 12), t, ":"); return (t[1] * 3600 + t[2] * 60 + t[3]) * 1000
    }
    function id() { match($0, /JobId=[0-9]+/); return substr($0, RSTART + 6, RLENGTH - 6) }
    /_slurm_rpc_submit_batch_job: JobId=/ { j = id(); sub_t[j] = ms($1); order[++k] = j }
    /(sched: Allocate|_start_job: Started) JobId=/ { start_t[id()] = ms($1) }
    /_job_complete: JobId=[0-9]+ done/ { end_t[id()] = ms($1) }
    END {
        for (i = 2; i <= k; i++)
            print sub_t[order[i]] - end_t[order[i - 1]], start_t[order[i]] - sub_t[order[i]]
    }')
wall=$(echo "$t1 - $t0" | bc)
echo "$N stages in ${wall%????????} s"
echo "$pairs" | awk '{ r += $1; s += $2 } END { printf "mean: repro %d ms, Slurm %d ms a stage\n", r / NR, s / NR }'
echo "$pairs" | sort -n | awk '{ r[NR] = $1 } END { printf "repro: median %d ms, max %d ms\n", r[int((NR + 1) / 2)], r[NR] }'
