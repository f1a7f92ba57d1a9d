#!/usr/bin/env bash
# tests/slurm/cluster.sh — a real one-node SLURM cluster on localhost, for tests.
#
#   tests/slurm/cluster.sh start    # install (if needed) + start munged, slurmctld, slurmd
#   tests/slurm/cluster.sh status   # show daemons / sinfo; exit 0 only if the node is usable
#   tests/slurm/cluster.sh stop     # cancel jobs, stop exactly the daemons `start` started
#   tests/slurm/cluster.sh env      # print the `export SLURM_CONF=...` line
#
# Must run as root (Debian 12, no systemd needed).  Everything lives in the state folder
# ${DIST_TRAIN_SLURM_DIR:-/tmp/dist_train_slurm}:
#   slurm.conf            the config (also symlinked to /etc/slurm/slurm.conf if that did not exist)
#   run/*.pid             PIDs of munged, slurmctld, slurmd that this script started
#   log/*.log             daemon logs (look here first when something fails)
#   state/, spool/        slurmctld StateSaveLocation / slurmd SlurmdSpoolDir (wiped on a fresh start)
#   munge/                private munged socket, pid, log, seed (does not touch /run/munge)
#
# Facts found on Debian 12's SLURM 22.05.8 (measured on a 2-core VM):
#  * Requeue delay.  When a job is requeued (`scontrol requeue`, RequeueExit, node failure)
#    slurmctld sets the job's BeginTime to now + cred_expire + 1 so that no old job-step
#    credential can still be used against the new run.  cred_expire is the job-step credential
#    lifetime, `AuthInfo=cred_expire=N`, default 120 s  -> a requeued job waits ~121 s by default.
#    The minimum slurm accepts is 5 (smaller values are rejected with
#    "AuthInfo=cred_expire=N invalid" and the 120 s default is used instead).  We set
#    AuthInfo=cred_expire=5 and make the schedulers poll every second
#    (SchedulerParameters=sched_interval=1,bf_interval=1), because a BeginTime expiring is not
#    an event that triggers scheduling by itself.  Measured: the requeued job starts again
#    6.0 s after `scontrol requeue` (121.2 s with the default cred_expire=120).
#    `scontrol update JobId=<id> BeginTime=now` on the requeued PENDING job does NOT help: 22.05
#    answers "Update of this parameter is not supported: BeginTime=now".  RequeueExit is not set
#    here (jobs can still requeue themselves with `scontrol requeue $SLURM_JOB_ID`).
#  * `--requeue` (or JobRequeue=1, set here) makes a batch job requeue-able; SLURM_RESTART_COUNT
#    is set to 1, 2, ... in the restarted runs (unset in the first run).  The restarted run
#    TRUNCATES the job's output file unless the job uses `--open-mode=append`.
#  * Time-limit signals (`--signal=[B:]USR1@T`) are sent by slurmctld's periodic time-limit
#    check, which runs every ~30 s (hard-coded), so the signal can come up to ~30 s earlier than
#    T seconds before the limit (measured: --time=1 --signal=B:USR1@5 arrived after 48 s,
#    @30 after 18 s).  The time limit itself is enforced with the same granularity.
#    `scancel --signal=USR1 --batch <id>` signals only the batch shell (not its children, and
#    bash runs the trap only after the foreground command returns — `wait` on a background
#    child is interrupted at once); `scancel -s USR1 <id>` signals every process of every srun
#    step (proctrack/linuxproc: the whole process tree of each task) but NOT the batch shell.
#  * KillWait (SIGTERM -> SIGKILL grace) is 5 s here (env DIST_TRAIN_SLURM_KILLWAIT).
#  * No accounting daemon: `sacct` does not work; use `scontrol show job` / `squeue`
#    (finished jobs stay visible to scontrol for MinJobAge=300 s).
#
# Only one such cluster per machine: the ports (6817/6818) are fixed.
#
# Env knobs: DIST_TRAIN_SLURM_DIR (state folder), DIST_TRAIN_SLURM_CPUS (CPUs the node
# advertises; default nproc — the node is configured with SlurmdParameters=config_overrides,
# so advertising more CPUs than exist is allowed and oversubscribes), DIST_TRAIN_SLURM_KILLWAIT,
# DIST_TRAIN_SLURM_CRED_EXPIRE (>= 5).
set -euo pipefail

STATE_DIR="${DIST_TRAIN_SLURM_DIR:-/tmp/dist_train_slurm}"
CONF="$STATE_DIR/slurm.conf"
RUN_DIR="$STATE_DIR/run"
LOG_DIR="$STATE_DIR/log"
MUNGE_DIR="$STATE_DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
ETC_CONF=/etc/slurm/slurm.conf
ETC_MARK="$STATE_DIR/created_etc_slurm_conf"
POLICY_RC=/usr/sbin/policy-rc.d
PARTITION=debug
START_TIMEOUT=60

log() { echo "[slurm-cluster] $*" >&2; }
die() { echo "[slurm-cluster] ERROR: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root"; }

node_name() {
    local h
    h="$(hostname -s 2>/dev/null || true)"
    [ -n "$h" ] || h="$(hostname 2>/dev/null || true)"
    [ -n "$h" ] || h=localhost
    echo "$h"
}

# ---------------------------------------------------------------- installation
_created_policy=0
_cleanup_policy() {
    if [ "$_created_policy" = 1 ]; then rm -f "$POLICY_RC"; _created_policy=0; fi
}

have_slurm() {
    local b
    for b in slurmctld slurmd sbatch srun sinfo squeue scontrol scancel munged munge; do
        command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || return 1
    done
}

install_slurm() {
    export PATH="$PATH:/usr/sbin:/sbin"
    have_slurm && return 0
    command -v apt-get >/dev/null 2>&1 || die "SLURM is not installed and apt-get is not available"
    log "installing slurmctld slurmd slurm-client munge via apt-get"
    # Keep the packages' postinst from starting daemons (no systemd here; an init.d munged
    # would otherwise start outside our control).
    if [ ! -e "$POLICY_RC" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC"
        chmod 755 "$POLICY_RC"
        _created_policy=1
        trap _cleanup_policy EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    local pkgs=(slurmctld slurmd slurm-client munge)
    local aptopts=(-y -q --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    if ! apt-cache show slurmctld >/dev/null 2>&1 || ! apt-get install "${aptopts[@]}" "${pkgs[@]}"; then
        log "apt-get install failed or package lists are missing; running apt-get update"
        apt-get update -q || true
        apt-get install "${aptopts[@]}" "${pkgs[@]}" || { _cleanup_policy; die "could not install SLURM (apt-get install ${pkgs[*]} failed)"; }
    fi
    _cleanup_policy
    have_slurm || die "SLURM packages installed but binaries (slurmctld/slurmd/sbatch/munged) are still missing"
}

# ---------------------------------------------------------------- pid helpers
# alive PIDFILE EXE_BASENAME -> 0 if the PID in PIDFILE is a live process running that binary
alive() {
    local pidfile=$1 want=$2 pid exe
    [ -s "$pidfile" ] || return 1
    pid="$(tr -dc 0-9 <"$pidfile")"
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    # zombies do not count
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1
    exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
    exe="${exe% (deleted)}"
    case "$(basename "$exe")" in
        "$want" | "$want"-wlm) return 0 ;;
    esac
    return 1
}

pid_of() { tr -dc 0-9 <"$1"; }

# stop_pid PIDFILE EXE_BASENAME NAME
stop_pid() {
    local pidfile=$1 want=$2 name=$3 pid i
    if ! alive "$pidfile" "$want"; then
        [ -e "$pidfile" ] && log "$name not running (stale pid file removed)"
        rm -f "$pidfile"
        return 0
    fi
    pid="$(pid_of "$pidfile")"
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        alive "$pidfile" "$want" || break
        sleep 0.1
    done
    if alive "$pidfile" "$want"; then
        log "$name did not exit on SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for i in $(seq 1 50); do
            alive "$pidfile" "$want" || break
            sleep 0.1
        done
    fi
    alive "$pidfile" "$want" && die "could not stop $name (pid $pid)"
    rm -f "$pidfile"
}

# ---------------------------------------------------------------- munge
start_munge() {
    local pidfile="$RUN_DIR/munged.pid"
    if alive "$pidfile" munged; then log "munged already running (pid $(pid_of "$pidfile"))"; return 0; fi
    rm -f "$pidfile"
    # key
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --force --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    # private socket/pid/log/seed dir owned by munge
    mkdir -p "$MUNGE_DIR"
    chown munge:munge "$MUNGE_DIR"
    chmod 0755 "$MUNGE_DIR"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "$MUNGE_DIR/munged.pid"
    local args=(--socket="$MUNGE_SOCKET" --pid-file="$MUNGE_DIR/munged.pid"
        --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
        --key-file=/etc/munge/munge.key --num-threads=4)
    log "starting munged as user munge (socket $MUNGE_SOCKET)"
    if command -v runuser >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged "${args[@]}" || die "munged failed to start; see $MUNGE_DIR/munged.log"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -u munge /usr/sbin/munged "${args[@]}" || die "munged failed to start; see $MUNGE_DIR/munged.log"
    else
        su -s /bin/sh munge -c "/usr/sbin/munged ${args[*]}" || die "munged failed to start; see $MUNGE_DIR/munged.log"
    fi
    local i
    for i in $(seq 1 50); do
        [ -s "$MUNGE_DIR/munged.pid" ] && [ -S "$MUNGE_SOCKET" ] && break
        sleep 0.1
    done
    [ -s "$MUNGE_DIR/munged.pid" ] || die "munged wrote no pid file; see $MUNGE_DIR/munged.log"
    cp "$MUNGE_DIR/munged.pid" "$pidfile"
    munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null ||
        die "munge self-test failed; see $MUNGE_DIR/munged.log"
    log "munged running (pid $(pid_of "$pidfile"))"
}

# ---------------------------------------------------------------- config
write_conf() {
    local node cpus memkb mem killwait cred
    node="$(node_name)"
    cpus="${DIST_TRAIN_SLURM_CPUS:-$(nproc)}"
    memkb="$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)"
    [ -n "$memkb" ] || memkb="$(awk '/^MemFree:/ {print $2}' /proc/meminfo)"
    mem=$((memkb / 1024 * 9 / 10))
    [ "$mem" -ge 256 ] || mem=256
    killwait="${DIST_TRAIN_SLURM_KILLWAIT:-5}"
    cred="${DIST_TRAIN_SLURM_CRED_EXPIRE:-5}"
    [ "$cred" -ge 5 ] || die "DIST_TRAIN_SLURM_CRED_EXPIRE must be >= 5 (slurm rejects smaller values)"
    cat >"$CONF.tmp" <<EOF
# Generated by tests/slurm/cluster.sh — one-node test cluster. Do not edit; rerun start.
ClusterName=disttrain
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job is held (BeginTime = now + cred_expire + 1);
# default 120 s, minimum 5.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$cred
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SchedulerType=sched/backfill
# Poll often so that a requeued job is started as soon as its BeginTime passes.
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Trust the configured CPUs/memory (allows DIST_TRAIN_SLURM_CPUS > nproc; no DRAIN on mismatch).
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=$killwait
MinJobAge=300
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=10
NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$node CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mv "$CONF.tmp" "$CONF"
    chmod 644 "$CONF"
}

link_etc_conf() {
    # plain `sbatch` (without SLURM_CONF) reads /etc/slurm/slurm.conf
    if [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$CONF" ]; then return 0; fi
    if [ -e "$ETC_CONF" ] || [ -L "$ETC_CONF" ]; then
        log "$ETC_CONF already exists and is not ours; leaving it alone (export SLURM_CONF=$CONF)"
        return 0
    fi
    mkdir -p /etc/slurm
    ln -s "$CONF" "$ETC_CONF"
    echo "$ETC_CONF" >"$ETC_MARK"
    log "created symlink $ETC_CONF -> $CONF"
}

unlink_etc_conf() {
    if [ -e "$ETC_MARK" ]; then
        if [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$CONF" ]; then
            rm -f "$ETC_CONF"
            log "removed symlink $ETC_CONF"
        fi
        rm -f "$ETC_MARK"
    fi
}

# ---------------------------------------------------------------- slurm daemons
ctl_up() { SLURM_CONF="$CONF" scontrol ping 2>/dev/null | grep -q 'is UP'; }

node_state() { SLURM_CONF="$CONF" sinfo -h -N -n "$(node_name)" -o '%T' 2>/dev/null | head -n1; }

start_slurmctld() {
    local pidfile="$RUN_DIR/slurmctld.pid" i
    if alive "$pidfile" slurmctld; then log "slurmctld already running (pid $(pid_of "$pidfile"))"; return 0; fi
    rm -f "$pidfile"
    # fresh start: no jobs or node state left over from an earlier run
    rm -rf "$STATE_DIR/state"
    mkdir -p "$STATE_DIR/state"
    log "starting slurmctld"
    SLURM_CONF="$CONF" slurmctld -f "$CONF" -i ||
        die "slurmctld failed to start; see $LOG_DIR/slurmctld.log"
    for i in $(seq 1 $((START_TIMEOUT * 4))); do
        ctl_up && break
        alive "$pidfile" slurmctld || { [ "$i" -lt 20 ] || break; }
        sleep 0.25
    done
    ctl_up || { tail -n 30 "$LOG_DIR/slurmctld.log" >&2 || true; die "slurmctld did not come up; see $LOG_DIR/slurmctld.log"; }
    log "slurmctld running (pid $(pid_of "$pidfile"))"
}

start_slurmd() {
    local pidfile="$RUN_DIR/slurmd.pid"
    if alive "$pidfile" slurmd; then log "slurmd already running (pid $(pid_of "$pidfile"))"; return 0; fi
    rm -f "$pidfile"
    rm -rf "$STATE_DIR/spool"
    mkdir -p "$STATE_DIR/spool"
    log "starting slurmd"
    SLURM_CONF="$CONF" slurmd -f "$CONF" -N "$(node_name)" ||
        die "slurmd failed to start; see $LOG_DIR/slurmd.log"
    local i
    for i in $(seq 1 50); do
        alive "$pidfile" slurmd && break
        sleep 0.1
    done
    alive "$pidfile" slurmd || { tail -n 30 "$LOG_DIR/slurmd.log" >&2 || true; die "slurmd exited; see $LOG_DIR/slurmd.log"; }
    log "slurmd running (pid $(pid_of "$pidfile"))"
}

wait_node_idle() {
    local i st=""
    for i in $(seq 1 $((START_TIMEOUT * 4))); do
        st="$(node_state)"
        case "$st" in
            idle* | mixed* | allocated*) log "node $(node_name) is $st"; return 0 ;;
            drain* | down*)
                # e.g. left over from an earlier run: bring it back
                SLURM_CONF="$CONF" scontrol update NodeName="$(node_name)" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.25
    done
    SLURM_CONF="$CONF" sinfo -N -l >&2 || true
    die "node $(node_name) did not become idle within ${START_TIMEOUT}s (state '$st'); see $LOG_DIR/"
}

# ---------------------------------------------------------------- commands
cmd_start() {
    need_root
    install_slurm
    export PATH="$PATH:/usr/sbin:/sbin"
    mkdir -p "$STATE_DIR" "$RUN_DIR" "$LOG_DIR"
    chmod 755 "$STATE_DIR"
    start_munge
    if alive "$RUN_DIR/slurmctld.pid" slurmctld && [ -s "$CONF" ]; then
        : # running: keep the config it was started with
    else
        write_conf
    fi
    link_etc_conf
    start_slurmctld
    start_slurmd
    wait_node_idle
    log "cluster up: partition '$PARTITION', node $(node_name), $(SLURM_CONF="$CONF" sinfo -h -o '%c') CPUs"
    echo "export SLURM_CONF=$CONF"
}

# Cancel every job and wait until no job is running/completing, so that no slurmstepd or
# job process of ours outlives the daemons.
drain_jobs() {
    ctl_up || return 0
    local ids i
    ids="$(SLURM_CONF="$CONF" squeue -h -o '%i' 2>/dev/null || true)"
    [ -n "$ids" ] || return 0
    log "cancelling jobs: $(echo $ids)"
    # shellcheck disable=SC2086
    SLURM_CONF="$CONF" scancel $ids 2>/dev/null || true
    for i in $(seq 1 $(((${DIST_TRAIN_SLURM_KILLWAIT:-5} + 15) * 4))); do
        [ -z "$(SLURM_CONF="$CONF" squeue -h -o '%i' 2>/dev/null)" ] && return 0
        sleep 0.25
    done
    log "some jobs are still listed after cancel; continuing"
}

# slurmstepd processes launched by our slurmd (identified by our spool dir in their
# environment/cwd) that are still alive after the jobs were cancelled.
kill_stray_stepds() {
    local p pids=""
    for p in /proc/[0-9]*; do
        p="${p#/proc/}"
        case "$(readlink "/proc/$p/exe" 2>/dev/null || true)" in
            */slurmstepd) ;;
            *) continue ;;
        esac
        if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "SLURM_CONF=$CONF" ||
            [ "$(readlink "/proc/$p/cwd" 2>/dev/null)" = "$STATE_DIR/spool" ]; then
            pids="$pids $p"
        fi
    done
    [ -n "$pids" ] || return 0
    log "killing leftover slurmstepd:$pids"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
}

cmd_stop() {
    need_root
    export PATH="$PATH:/usr/sbin:/sbin"
    if [ ! -d "$STATE_DIR" ]; then log "nothing to stop ($STATE_DIR does not exist)"; return 0; fi
    drain_jobs || true
    stop_pid "$RUN_DIR/slurmd.pid" slurmd slurmd
    stop_pid "$RUN_DIR/slurmctld.pid" slurmctld slurmctld
    kill_stray_stepds
    stop_pid "$RUN_DIR/munged.pid" munged munged
    rm -f "$MUNGE_DIR/munged.pid"
    unlink_etc_conf
    log "stopped"
}

cmd_status() {
    export PATH="$PATH:/usr/sbin:/sbin"
    local rc=0 d
    for d in munged slurmctld slurmd; do
        if alive "$RUN_DIR/$d.pid" "$d"; then
            echo "$d: running (pid $(pid_of "$RUN_DIR/$d.pid"))"
        else
            echo "$d: not running"; rc=1
        fi
    done
    if [ "$rc" = 0 ]; then
        SLURM_CONF="$CONF" sinfo -N -o '%N %P %T %c %m' || rc=1
        local st
        st="$(node_state)"
        case "$st" in
            idle* | mixed* | allocated* | completing*) ;;
            *) echo "node $(node_name) is not usable (state '$st')"; rc=1 ;;
        esac
        echo "export SLURM_CONF=$CONF"
    fi
    return "$rc"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 {start|stop|status|env}" >&2; exit 2 ;;
esac
