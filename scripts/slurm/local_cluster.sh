#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (munged + slurmctld + slurmd, no systemd), for tests and demos of
# scripts/slurm/*.sbatch. Needs root (it installs Debian's slurm-wlm and munge when they are missing).
#
#   scripts/slurm/local_cluster.sh start   # idempotent: installs if needed, starts what is not running, waits idle
#   scripts/slurm/local_cluster.sh stop    # stops the daemons by the PIDs in their pid files (never by name)
#   scripts/slurm/local_cluster.sh status
#
# Client commands need the config: export SLURM_CONF=${NOLA_SLURM_DIR:-/tmp/nola-slurm}/slurm.conf
set -euo pipefail
STATE=${NOLA_SLURM_DIR:-/tmp/nola-slurm}
CONF=$STATE/slurm.conf
MUNGE_PID=/run/munge/munged.pid
HOST=$(hostname -s)

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  [ "$(id -u)" = 0 ] || { echo "local_cluster.sh: installing slurm-wlm and munge needs root" >&2; exit 1; }
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_config() {
  mkdir -p "$STATE/spool/ctld" "$STATE/spool/d"
  local memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 3 / 4 ))
  cat > "$CONF" <<CONF
ClusterName=nola-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmctldPort=${NOLA_SLURMCTLD_PORT:-6817}
SlurmdPort=${NOLA_SLURMD_PORT:-6818}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
  install_packages
  mkdir -p "$STATE"
  if ! alive "$MUNGE_PID"; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    [ -f /etc/munge/munge.key ] || { mungekey --create && chown munge:munge /etc/munge/munge.key; }
    runuser -u munge -- /usr/sbin/munged
    touch "$STATE/munged.ours"  # stop only a munged this script started, never the host's own
  fi
  [ -f "$CONF" ] || write_config
  alive "$STATE/slurmctld.pid" || slurmctld -f "$CONF"
  alive "$STATE/slurmd.pid" || slurmd -f "$CONF"
  for _ in $(seq 60); do
    if SLURM_CONF=$CONF sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      echo "SLURM up: export SLURM_CONF=$CONF"
      return
    fi
    sleep 1
  done
  echo "local_cluster.sh: the node did not become idle in 60 s (see $STATE/*.log)" >&2
  exit 1
}

stop() {
  local pid_files=("$STATE/slurmd.pid" "$STATE/slurmctld.pid")
  [ -f "$STATE/munged.ours" ] && pid_files+=("$MUNGE_PID")
  for pid_file in "${pid_files[@]}"; do
    if alive "$pid_file"; then
      local pid; pid=$(cat "$pid_file")
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
  rm -f "$STATE/munged.ours"
  echo "SLURM stopped"
}

status() {
  for pid_file in "$MUNGE_PID" "$STATE/slurmctld.pid" "$STATE/slurmd.pid"; do
    if alive "$pid_file"; then echo "running: $pid_file"; else echo "stopped: $pid_file"; fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
