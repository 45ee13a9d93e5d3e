#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the Slurm tests and for trying the Slurm path
# on a workstation. Runs as root (SlurmUser=root); everything lives under one folder.
#
#   bash launch/local_slurm.sh up     [DIR]   # start munged, slurmctld, slurmd (idempotent)
#   bash launch/local_slurm.sh status [DIR]   # exit 0 when the node answers
#   bash launch/local_slurm.sh down   [DIR]   # stop the three daemons by their pid files
#
# DIR defaults to $FCMAE_SLURM_DIR or /tmp/fcmae-slurm. Clients need its config:
#   export SLURM_CONF=DIR/slurm.conf     (up prints this line)
# Packages: sudo apt-get install slurmctld slurmd slurm-client munge
set -euo pipefail
CMD="${1:-status}"
DIR="${2:-${FCMAE_SLURM_DIR:-/tmp/fcmae-slurm}}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"
PARTITION="${FCMAE_SLURM_PARTITION:-local}"
# Ports away from the defaults (6817/6818), so a system cluster on this machine is left alone.
CTLD_PORT="${FCMAE_SLURMCTLD_PORT:-16817}"
SLURMD_PORT="${FCMAE_SLURMD_PORT:-16818}"
export SLURM_CONF="$CONF"
# The machine's CPUs: GNU nproc honours OMP_NUM_THREADS, which says nothing about the node.
CPUS="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"

die() { echo "local_slurm: $*" >&2; exit 1; }

need() {
  local missing=()
  for bin in munged mungekey slurmctld slurmd sbatch squeue sinfo scontrol; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    die "missing ${missing[*]}; install them with: sudo apt-get install slurmctld slurmd slurm-client munge"
  fi
  [ "$(id -u)" = 0 ] || die "runs as root (SlurmUser=root and munged as the munge user); try sudo"
  id munge >/dev/null 2>&1 || die "no 'munge' user; reinstall munge: sudo apt-get install --reinstall munge"
}

alive() {  # alive PIDFILE: the process named in it runs
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_up() {
  sinfo -h -N -o "%T" 2>/dev/null | grep -qE "^(idle|mixed|allocated|completing)"
}

write_conf() {
  local mem
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  cat > "$CONF" <<EOF
# Written by launch/local_slurm.sh: a one-node cluster for tests; state under $DIR.
ClusterName=fcmae-local
SlurmctldHost=$HOST
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
InactiveLimit=0
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$HOST CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  local m="$DIR/munge"
  alive "$m/munged.pid" && return 0
  mkdir -p "$m"
  [ -s "$m/munge.key" ] || mungekey -c -k "$m/munge.key" >/dev/null
  chown -R munge:munge "$m"
  chmod 0700 "$m"
  chmod 0600 "$m/munge.key"
  # munged runs as the munge user: every folder above DIR must let it through
  runuser -u munge -- test -w "$m" \
    || die "the munge user cannot reach $m (a folder above it is private, e.g. mode 0700); use a DIR every user can traverse, e.g. bash launch/local_slurm.sh up /tmp/fcmae-slurm"
  # --force: the folder may sit under /tmp (world-writable, sticky), which munged would refuse.
  runuser -u munge -- munged --force --key-file="$m/munge.key" --socket="$m/munge.socket" \
    --pid-file="$m/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed" \
    || die "munged did not start; see $m/munged.log"
}

up() {
  need
  if [ -f "$CONF" ] && alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd.pid" && node_up; then
    echo "local_slurm: already up ($CONF)"
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  mkdir -p "$DIR"/{state,spool,log,run}
  chmod 0755 "$DIR"
  write_conf
  start_munge
  alive "$DIR/run/slurmctld.pid" || slurmctld -f "$CONF" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
  alive "$DIR/run/slurmd.pid" || slurmd -f "$CONF" || die "slurmd did not start; see $DIR/log/slurmd.log"
  for _ in $(seq 60); do
    if node_up; then
      echo "local_slurm: up: node $HOST, partition $PARTITION, $CPUS CPUs ($CONF)"
      echo "export SLURM_CONF=$CONF"
      return 0
    fi
    # a node left DOWN by an earlier run comes back with this
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  sinfo -N -l >&2 || true
  die "the node did not become idle in 60 s; see $DIR/log/slurmctld.log and $DIR/log/slurmd.log"
}

down() {
  local stopped=0
  # Jobs first, so that no job step outlives the daemons.
  if alive "$DIR/run/slurmctld.pid" && [ -f "$CONF" ]; then
    scancel --quiet --full --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 60); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  for pidfile in "$DIR/run/slurmd.pid" "$DIR/run/slurmctld.pid" "$DIR/munge/munged.pid"; do
    if alive "$pidfile"; then
      local pid
      pid="$(cat "$pidfile")"
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
      stopped=$((stopped + 1))
    fi
  done
  echo "local_slurm: down ($stopped daemon(s) stopped; state and logs stay in $DIR)"
}

status() {
  local ok=0
  for pidfile in "$DIR/munge/munged.pid" "$DIR/run/slurmctld.pid" "$DIR/run/slurmd.pid"; do
    if alive "$pidfile"; then echo "$(basename "$pidfile" .pid): running (pid $(cat "$pidfile"))"
    else echo "$(basename "$pidfile" .pid): not running"; ok=1; fi
  done
  if [ "$ok" = 0 ] && node_up; then sinfo; echo "export SLURM_CONF=$CONF"; else return 1; fi
}

case "$CMD" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) die "usage: bash launch/local_slurm.sh up|down|status [DIR]" ;;
esac
