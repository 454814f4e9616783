#!/usr/bin/env bash
# Stop the cluster that start-slurm.sh started in $SLURM_TEST_PREFIX (same default): cancel its jobs,
# stop its daemons by PID, remove its namespaces, bridge and /etc/slurm/slurm.conf link. Safe to run
# twice. Keeps the prefix (logs) unless SLURM_TEST_KEEP=0.
set -uo pipefail

PREFIX=${SLURM_TEST_PREFIX:-/tmp/mugs-slurm-test}
RUN=$PREFIX/run
if [ ! -d "$RUN" ]; then
  echo "[stop-slurm] nothing to stop in $PREFIX"
  exit 0
fi
export SLURM_CONF=$PREFIX/etc/slurm.conf

# zombies count as gone: our daemons were re-parented and their new parent may reap them late
alive() { [ -n "$1" ] && [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
stop_pid() { # pidfile expected-command seconds-before-KILL
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 0
  if alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$2" ]; then
    echo "[stop-slurm] pid $pid from $1 is no longer $2: left alone"
  elif alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq $(($3 * 10))); do
      alive "$pid" || break
      sleep 0.1
    done
    if alive "$pid"; then
      echo "[stop-slurm] $2 ($pid) ignored TERM: KILL"
      kill -KILL "$pid" 2>/dev/null
    fi
  fi
  rm -f "$1"
}
descendants() { # pid and all its descendants, children first
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do descendants "$child"; done
  echo "$1"
}

# 1. cancel every job so that each slurmstepd ends its own tasks
if [ -f "$RUN/slurmctld.pid" ] && alive "$(cat "$RUN/slurmctld.pid")"; then
  jobs=$(squeue -h -o %A 2>/dev/null)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086
    scancel --full --quiet $jobs 2>/dev/null
    for _ in $(seq 50); do
      [ -z "$(squeue -h -t R,CG,S 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi

# 2. daemons, in reverse start order
for f in "$RUN"/slurmd-*.pid; do [ -e "$f" ] && stop_pid "$f" slurmd 5; done
stop_pid "$RUN/slurmctld.pid" slurmctld 5
stop_pid "$RUN/slurmdbd.pid" slurmdbd 5
stop_pid "$RUN/mariadbd.pid" mariadbd 15
stop_pid "$RUN/munged.pid" munged 5

# 3. left-over slurmstepd's of this cluster (each listens on a socket in our spool directory; their
#    environment is overwritten by the process title, so no variable can mark them) and their tasks
for pid in $(ss -xlp 2>/dev/null | awk -v d="$PREFIX/state/" 'index($0, d) && /slurmstepd/' |
  grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmstepd ] || continue
  victims=$(descendants "$pid" | xargs)
  # shellcheck disable=SC2086
  kill -KILL $victims 2>/dev/null
  echo "[stop-slurm] killed stray slurmstepd $pid and its tasks: $victims"
done

# 4. namespaces (and whatever still runs in them), links, the /etc/slurm/slurm.conf link
if [ -f "$RUN/netns" ]; then
  while read -r ns; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do
      kill -KILL "$pid" 2>/dev/null && echo "[stop-slurm] killed $pid left in $ns"
    done
    ip netns del "$ns" 2>/dev/null
  done <"$RUN/netns"
  rm -f "$RUN/netns"
fi
if [ -f "$RUN/links" ]; then
  while read -r link; do ip link del "$link" 2>/dev/null; done <"$RUN/links"
  rm -f "$RUN/links"
fi
if [ -f "$RUN/etc_link" ]; then
  link=$(cat "$RUN/etc_link")
  [ "$(readlink "$link")" = "$PREFIX/etc/slurm.conf" ] && rm -f "$link"
  rm -f "$RUN/etc_link"
fi
rm -f "$RUN/started"
if [ "${SLURM_TEST_KEEP:-1}" = 0 ] && [ -f "$PREFIX/.mugs-slurm-test" ]; then rm -rf "$PREFIX"; fi
echo "[stop-slurm] stopped"
