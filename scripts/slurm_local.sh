#!/usr/bin/env bash
# slurm_local.sh - a real single-node SLURM cluster on loopback for gradproj's tests and CI.
#
# Debian's slurm-wlm (slurmctld + slurmd + munge), no systemd, no cgroups. Everything the cluster
# writes (config, controller state, slurmd spool, logs, job completion log, PID files) lives under
# one state dir, by default /tmp/gradproj-slurm.
#
#   scripts/slurm_local.sh start    install packages if missing, write the config, start munged,
#                                   slurmctld and slurmd (unless they already run healthy with the
#                                   same config), wait until the node is idle, cancel jobs left
#                                   over from an earlier run, resume a drained node, and check that
#                                   a batch job really runs. Idempotent; root only.
#   scripts/slurm_local.sh stop     cancel all jobs and stop the daemons this script started, by the
#                                   PIDs it recorded (never by name). Root only.
#   scripts/slurm_local.sh status   exit 0 if the daemons run and the controller answers; prints
#                                   the daemons, the node and the client environment.
#   scripts/slurm_local.sh env      print `export SLURM_CONF=...` for the clients, e.g.
#                                       eval "$(scripts/slurm_local.sh env)"
#
# Clients (sbatch, squeue, scontrol, sacct, sinfo, srun) need SLURM_CONF=<dir>/etc/slurm.conf,
# unless /etc/slurm/slurm.conf is the symlink to it that `start` creates where that path is free.
#
# Environment:
#   GRADPROJ_SLURM_DIR          state dir (default /tmp/gradproj-slurm)
#   GRADPROJ_SLURM_CTLD_PORT    slurmctld port (default 6817); GRADPROJ_SLURM_SLURMD_PORT (6818)
#   GRADPROJ_SLURM_CLEAN=1      wipe the saved controller/slurmd state on (re)start: old jobs, node
#                               state, job ids restart at 1. Default keeps it (ids keep counting).
#   GRADPROJ_SLURM_RESTART=1    restart the daemons even if they run healthy.
#   GRADPROJ_SLURM_LINK_ETC=0   do not create the /etc/slurm/slurm.conf symlink.
#   GRADPROJ_SLURM_READY_TIMEOUT  seconds to wait for the node (default 60).
#
# Exit codes of `start`: 0 ok, 1 failure, 3 SLURM cannot be installed here (not root, no apt-get,
# apt-get install failed): tests skip on 3.
#
# Job accounting without a database: JobCompType=jobcomp/filetxt writes one line per finished job
# to <dir>/log/jobcomp.log; read it with `sacct -c ...` or parse it. Plain `sacct` does not work.
# With no GPU on the node and no GresTypes, `--gres=gpu:1` is rejected at submission
# ("Invalid generic resource (gres) specification"); override an #SBATCH --gres line with
# `sbatch --gres=none`.
set -euo pipefail

ACTION=${1:-start}
export DEBIAN_FRONTEND=noninteractive
PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH

D=${GRADPROJ_SLURM_DIR:-/tmp/gradproj-slurm}
case "$D" in /*) ;; *) D="$PWD/$D" ;; esac
CONF_DIR=$D/etc
CONF=$CONF_DIR/slurm.conf
CTLD_DIR=$D/ctld
SPOOL_DIR=$D/spool
LOG_DIR=$D/log
RUN_DIR=$D/run
JOBCOMP=$LOG_DIR/jobcomp.log
CTLD_PORT=${GRADPROJ_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${GRADPROJ_SLURM_SLURMD_PORT:-6818}
READY_TIMEOUT=${GRADPROJ_SLURM_READY_TIMEOUT:-60}
CLUSTER=gradproj
PARTITION=debug
NODE=$(hostname -s)
PKGS=(slurmctld slurmd slurm-client munge)
export SLURM_CONF=$CONF

log() { echo "[slurm_local $(date +%H:%M:%S)] $*" >&2; }
die() { log "ERROR: $*"; exit "${2:-1}"; }
now_ms() { date +%s%3N; }

# alive PID NAME: PID exists and is a NAME process that is not a zombie (a multi-threaded daemon
# whose main thread exited shows Z but still has live tasks: count it as alive).
alive() {
    [ -n "$1" ] && [ -d "/proc/$1" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] || return 1
    [ "$(awk '/^State:/{print $2}' "/proc/$1/status" 2>/dev/null)" != Z ] && return 0
    [ "$(find "/proc/$1/task" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)" -gt 1 ]
}
# our_pid NAME: print the PID recorded for NAME if that process is alive and really is NAME.
our_pid() {
    local f="$RUN_DIR/$1.pid" p
    [ -s "$f" ] || return 1
    p=$(cat "$f" 2>/dev/null) || return 1
    alive "$p" "$1" && echo "$p"
}
# PIDs of live processes named $1, whoever started them (only used to refuse to start twice).
live_pids() { local p; for p in $(pgrep -x "$1" || true); do alive "$p" "$1" && echo "$p"; done; return 0; }

ctld_answers() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_field() { timeout 10 scontrol show node -o "$NODE" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$1=//p"; }
node_state() { timeout 10 sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1; }

cancel_all_jobs() {   # best effort; needs a live slurmctld
    local jobs _
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
    [ -n "$jobs" ] || return 0
    log "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
    # shellcheck disable=SC2046  # one word per job id
    timeout 20 scancel $(timeout 10 squeue -h -o %A | sort -u) 2>/dev/null || true
    for _ in $(seq 1 300); do [ -z "$(timeout 10 squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
}

stop_one() {   # $1 = daemon name; only touches the PID this script recorded
    local p _
    if p=$(our_pid "$1"); then
        log "stopping $1 (pid $p)"
        kill -TERM "$p" 2>/dev/null || true
        for _ in $(seq 1 300); do our_pid "$1" >/dev/null || break; sleep 0.1; done
        if our_pid "$1" >/dev/null; then log "$1 still alive after 30 s: SIGKILL"; kill -KILL "$p" 2>/dev/null || true; sleep 0.2; fi
    fi
    rm -f "$RUN_DIR/$1.pid"
}

stop_all() {
    if our_pid slurmctld >/dev/null && ctld_answers; then cancel_all_jobs; fi
    stop_one slurmd
    stop_one slurmctld
    stop_one munged
}

print_env() { echo "export SLURM_CONF=$CONF"; }

status() {
    local d p rc=0
    for d in munged slurmctld slurmd; do
        if p=$(our_pid $d); then
            echo "$d: running (pid $p)"
        elif [ $d = munged ] && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
            echo "munged: a working munged not started by this script"
        else
            echo "$d: not running"; rc=1
        fi
    done
    if [ $rc = 0 ] && ctld_answers; then
        sinfo -N -o '%N %T %c %m %G %E' 2>/dev/null || true
    else
        echo "slurmctld: not answering"; rc=1
    fi
    echo "state dir: $D"
    print_env
    return $rc
}

case "$ACTION" in
    stop)
        [ "$(id -u)" = 0 ] || die "stop needs root"
        [ -d "$RUN_DIR" ] || { log "nothing to stop (no $RUN_DIR)"; exit 0; }
        exec 9>"$D/.lock"; flock -w 300 9 || die "could not lock $D/.lock"
        stop_all; log "stopped"; exit 0 ;;
    status) status; exit $? ;;
    env) print_env; exit 0 ;;
    start) ;;
    *) die "usage: $0 start|stop|status|env" ;;
esac

########## start ##########
T_ALL=$(now_ms)
[ "$(id -u)" = 0 ] || die "start needs root (to install packages and run slurmd)" 3
install -d -m 0755 "$D" "$RUN_DIR" "$CONF_DIR"
exec 9>"$D/.lock"
flock -w 600 9 || die "could not lock $D/.lock (another start/stop running?)"

# 1. packages (only if missing). policy-rc.d keeps the maintainer scripts from starting daemons.
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "SLURM packages missing (${missing[*]}) and no apt-get" 3
    T=$(now_ms)
    log "installing ${missing[*]}"
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1
    fi
    ok=1
    { apt-get update -qq -o DPkg::Lock::Timeout=300 &&
      apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 "${PKGS[@]}"; } \
        >"$D/apt.log" 2>&1 || ok=0
    [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ $ok = 1 ] || { tail -20 "$D/apt.log" >&2; die "apt-get install failed (log: $D/apt.log)" 3; }
    log "installed in $(( $(now_ms) - T )) ms"
fi

# 2. configuration, written to a temp file first: restart only when it changed.
# With NoCtldInAddrAny/NoInAddrAny the daemons and srun bind to the address the hostname resolves
# to; use that (loopback only) mode only when the hostname resolves to 127.x.
ADDR=$(getent ahostsv4 "$NODE" 2>/dev/null | awk 'NR==1{print $1}')
case "$ADDR" in
    127.*) COMM="CommunicationParameters=NoCtldInAddrAny,NoInAddrAny" ;;
    *) log "note: '$NODE' resolves to '${ADDR:-nothing}', not loopback: talking to 127.0.0.1, listening on all addresses"
       ADDR=127.0.0.1; COMM="" ;;
esac
HW=$(slurmd -C | head -1)     # NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 ... RealMemory=24105
CPUS=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$HW")
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$HW")
if [ -z "$CPUS" ] || [ -z "$MEM" ]; then die "could not parse 'slurmd -C': $HW"; fi
MEM=$(( MEM * 95 / 100 ))     # never more than slurmd reports, or the node goes INVAL/drained
DEFMEM=$(( MEM / CPUS / 4 )); DEFMEM=$(( DEFMEM > 2048 ? 2048 : DEFMEM < 100 ? 100 : DEFMEM ))

NEW=$CONF_DIR/slurm.conf.new
cat >"$NEW" <<EOF
# generated by scripts/slurm_local.sh: one node on loopback, no cgroups, no systemd, no database
ClusterName=$CLUSTER
SlurmctldHost=$NODE($ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
$COMM
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MailProg=/bin/true
StateSaveLocation=$CTLD_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.daemon.pid
SlurmdPidFile=$RUN_DIR/slurmd.daemon.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1,sched_min_interval=100000
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
DefMemPerCPU=$DEFMEM
MaxArraySize=1001
MaxJobCount=20000
ReturnToService=2
SlurmctldTimeout=60
SlurmdTimeout=120
InactiveLimit=0
KillWait=5
UnkillableStepTimeout=60
Waittime=0
# sbatch --wait polls after 2 s, then backs off to 8 s and 32 s while the poll interval is below
# MinJobAge/2: MinJobAge=4 keeps it at 2 s. Finished jobs stay visible to scontrol/squeue for
# MinJobAge to MinJobAge+~60 s only; later, read the final state from the jobcomp log (sacct -c).
MinJobAge=4
NodeName=$NODE NodeAddr=$ADDR NodeHostname=$NODE CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
chmod 644 "$NEW"

changed=1
[ -f "$CONF" ] && cmp -s "$NEW" "$CONF" && changed=0
if [ "${GRADPROJ_SLURM_RESTART:-0}" != 1 ] && [ $changed = 0 ] && [ "${GRADPROJ_SLURM_CLEAN:-0}" != 1 ] &&
   our_pid slurmctld >/dev/null && our_pid slurmd >/dev/null && ctld_answers; then
    rm -f "$NEW"
    st=$(node_state)
    case "$st" in
        drain*|down*|inval*|fail*)
            log "node '$NODE' is '$st' ($(timeout 10 sinfo -h -N -n "$NODE" -o %E)): resuming"
            timeout 10 scontrol update NodeName="$NODE" State=RESUME || true ;;
    esac
    # after a resume the node is "idle*" (not responding) until the next ping; nothing runs then
    deadline=$(( $(date +%s) + READY_TIMEOUT ))
    until case "$(node_state)" in idle|mixed|allocated|completing) true ;; *) false ;; esac; do
        [ "$(date +%s)" -lt "$deadline" ] || die "node $NODE is '$(node_state)' after ${READY_TIMEOUT}s (GRADPROJ_SLURM_RESTART=1 restarts the daemons)"
        sleep 0.2
    done
    log "already running (slurmctld pid $(our_pid slurmctld), slurmd pid $(our_pid slurmd), node '$(node_state)')"
    print_env
    exit 0
fi

# 3. (re)start: stop what we started before, refuse to fight daemons somebody else started
stop_all
for d in slurmctld slurmd; do
    pids=$(live_pids "$d")
    [ -z "$pids" ] || die "a $d not started by this script is running (pid $(echo "$pids" | tr '\n' ' ')); stop it first"
done
mv -f "$NEW" "$CONF"
install -d -o slurm -g slurm -m 0755 "$CTLD_DIR" "$LOG_DIR"
install -d -o root -g root -m 0755 "$SPOOL_DIR"
if [ "${GRADPROJ_SLURM_CLEAN:-0}" = 1 ]; then
    log "GRADPROJ_SLURM_CLEAN=1: wiping $CTLD_DIR and $SPOOL_DIR"
    find "$CTLD_DIR" "$SPOOL_DIR" -mindepth 1 -delete
    if [ -s "$JOBCOMP" ]; then mv -f "$JOBCOMP" "$JOBCOMP.old"; fi   # job ids restart at 1
fi
touch "$JOBCOMP"; chown slurm:slurm "$JOBCOMP"; chmod 644 "$JOBCOMP"

# Let plain clients (no SLURM_CONF) find the config, if /etc/slurm/slurm.conf is free or ours.
if [ "${GRADPROJ_SLURM_LINK_ETC:-1}" = 1 ]; then
    if [ -L /etc/slurm/slurm.conf ] || [ ! -e /etc/slurm/slurm.conf ]; then
        install -d -m 0755 /etc/slurm; ln -sfn "$CONF" /etc/slurm/slurm.conf
    else
        log "note: /etc/slurm/slurm.conf exists and is not ours: clients need SLURM_CONF=$CONF"
    fi
fi

# 4. munge: reuse a working munged, else start one as user munge
T=$(now_ms)
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    our_pid munged >/dev/null || log "reusing a working munged not started by this script"
else
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    mp=/run/munge/munged.pid
    if [ -s $mp ] && alive "$(cat $mp)" munged; then
        die "munged (pid $(cat $mp)) runs but does not work; not touching it"
    fi
    rm -f $mp
    runuser -u munge -- /usr/sbin/munged 9>&-   # daemonizes, writes its pidfile; must not inherit the lock
    for _ in $(seq 1 100); do [ -s $mp ] && break; sleep 0.05; done
    [ -s $mp ] || die "munged wrote no pidfile (see /var/log/munge/munged.log)"
    cp $mp "$RUN_DIR/munged.pid"
    munge -n | unmunge >/dev/null || die "munge self-test failed (see /var/log/munge/munged.log)"
    log "munged started (pid $(cat "$RUN_DIR/munged.pid")) in $(( $(now_ms) - T )) ms"
fi

# 5. slurmctld + slurmd (they daemonize and write their pidfiles)
start_daemon() {   # $1 name, rest: args
    local name=$1 pidf="$RUN_DIR/$1.daemon.pid" _; shift
    rm -f "$pidf"
    "/usr/sbin/$name" -f "$CONF" "$@" 9>&- || die "$name failed to start; see $LOG_DIR/$name.log"
    for _ in $(seq 1 200); do [ -s "$pidf" ] && break; sleep 0.05; done
    [ -s "$pidf" ] || { tail -20 "$LOG_DIR/$name.log" >&2; die "$name wrote no pidfile; see $LOG_DIR/$name.log"; }
    cp "$pidf" "$RUN_DIR/$name.pid"
    sleep 0.1
    our_pid "$name" >/dev/null || { tail -20 "$LOG_DIR/$name.log" >&2; die "$name exited right after start; see $LOG_DIR/$name.log"; }
}
T=$(now_ms)
start_daemon slurmctld
for _ in $(seq 1 200); do ctld_answers && break; sleep 0.1; done
ctld_answers || { tail -20 "$LOG_DIR/slurmctld.log" >&2; die "slurmctld does not answer"; }
SLURMD_T0=$(date +%s)
start_daemon slurmd

# 6. wait for the node. The state recovered from the saved state can say "idle" before this slurmd
# registered: also require SlurmdStartTime >= the moment slurmd was launched.
resumed=0; st=""; ready=0
deadline=$(( $(date +%s) + READY_TIMEOUT ))
while [ "$(date +%s)" -lt "$deadline" ]; do
    st=$(node_state || true)
    sst=$(date -d "$(node_field SlurmdStartTime)" +%s 2>/dev/null || echo 0)
    case "$st" in
        idle|mixed|allocated|completing) [ "$sst" -ge "$SLURMD_T0" ] && { ready=1; break; } ;;
        drain*|down*|inval*|fail*)
            if [ $resumed = 0 ] && [ "$sst" -ge "$SLURMD_T0" ]; then
                log "node state '$st' ($(timeout 10 sinfo -h -N -n "$NODE" -o %E)): resuming"
                timeout 10 scontrol update NodeName="$NODE" State=RESUME || true; resumed=1
            fi ;;
    esac
    sleep 0.2
done
[ $ready = 1 ] || { tail -20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2; die "node $NODE not ready after ${READY_TIMEOUT}s (state '$st')"; }
log "slurmctld (pid $(our_pid slurmctld)) and slurmd (pid $(our_pid slurmd)) up, node '$st', in $(( $(now_ms) - T )) ms"

# 7. jobs recovered from the saved state would keep running/pending: start from an empty queue
cancel_all_jobs
for _ in $(seq 1 100); do st=$(node_state || true); [ "$st" = idle ] && break; sleep 0.2; done
[ "$st" = idle ] || die "node $NODE is '$st', not idle, after cancelling old jobs"

# 8. end to end: a batch job runs and completes (polling; sbatch --wait would sleep >= 2 s)
T=$(now_ms)
jid=$(cd / && timeout 20 sbatch --parsable -J slurm-local-smoke -o /dev/null -e /dev/null --wrap true) \
    || die "smoke test: sbatch failed"
jid=${jid%%;*}; js=""
for _ in $(seq 1 300); do
    js=$(timeout 10 scontrol show job -o "$jid" 2>/dev/null | tr ' ' '\n' | sed -n 's/^JobState=//p')
    case "$js" in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|BOOT_FAIL|OUT_OF_MEMORY) break ;; esac
    sleep 0.1
done
[ "$js" = COMPLETED ] || die "smoke test: job $jid is '$js', not COMPLETED (see $LOG_DIR/slurmd.log)"
log "smoke test ok (batch job $jid COMPLETED) in $(( $(now_ms) - T )) ms"
log "started in $(( $(now_ms) - T_ALL )) ms; clients need: $(print_env)"
print_env
