#!/usr/bin/env bash
# Start a throw-away SLURM 22.05 cluster (Debian slurm-wlm + munge, slurmdbd + MariaDB) on this one
# machine, as root, without systemd, cgroups or containers. Each slurmd runs in its own network and
# UTS namespace behind a private bridge, so a `--nodes=2` job really spans two hosts.
#
# Knobs (environment, all optional):
#   SLURM_TEST_PREFIX      config, state, logs, pids              (default /tmp/mugs-slurm-test)
#   SLURM_TEST_NODES       number of nodes node1..nodeN           (default 2)
#   SLURM_TEST_CPUS        CPUs declared per node                 (default 2, whatever the machine has)
#   SLURM_TEST_GPUS        fake GPUs per node (GRES gpu)          (default 2; 0 = no gpu partition)
#   SLURM_TEST_ACCOUNTING  slurmdbd | none                        (default slurmdbd; none: no sacct)
#   SLURM_TEST_GRACE       GraceTime (s) of preempted cpu/gpu jobs (default 10)
#   SLURM_TEST_PORT_BASE   slurmctld port; slurmd +1, slurmdbd +2, mariadb +3 (default 16817)
#   SLURM_TEST_SUBNET      first three octets of the bridge subnet (default 10.77.0)
#   SLURM_TEST_NS          name prefix of namespaces and links    (default mugs; at most 9 chars)
#   SLURM_TEST_ETC_LINK    1 = symlink /etc/slurm/slurm.conf to the generated config (default 1)
#   SLURM_TEST_INSTALL     1 = apt-get install the Debian packages first (default 0)
#
# Then: source "$SLURM_TEST_PREFIX/env.sh" (exports SLURM_CONF). Stop with stop-slurm.sh.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PREFIX=${SLURM_TEST_PREFIX:-/tmp/mugs-slurm-test}
NODES=${SLURM_TEST_NODES:-2}
CPUS=${SLURM_TEST_CPUS:-2}
GPUS=${SLURM_TEST_GPUS:-2}
ACCT=${SLURM_TEST_ACCOUNTING:-slurmdbd}
GRACE=${SLURM_TEST_GRACE:-10}
PORT=${SLURM_TEST_PORT_BASE:-16817}
SUBNET=${SLURM_TEST_SUBNET:-10.77.0}
NS=${SLURM_TEST_NS:-mugs}
CLUSTER=mugstest
ETC_CONF=/etc/slurm/slurm.conf
ETC_LINK=${SLURM_TEST_ETC_LINK:-1}
T0=$(date +%s.%N)

log() { printf '[start-slurm %5.1fs] %s\n' "$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN {print b - a}')" "$*" >&2; }
die() {
  log "ERROR: $*"
  if [ "${STARTED:-0}" = 1 ]; then
    for f in "$PREFIX"/log/*; do
      [ -s "$f" ] && {
        echo "--- tail $f" >&2
        tail -n 15 "$f" >&2
      }
    done
    SLURM_TEST_PREFIX=$PREFIX "$HERE/stop-slurm.sh" >&2 || true
  fi
  exit 1
}

[ "$(id -u)" = 0 ] || die "must run as root (network namespaces, mknod, daemons as root)"
case $ACCT in slurmdbd | none) ;; *) die "SLURM_TEST_ACCOUNTING must be slurmdbd or none" ;; esac

PKGS="slurmctld slurmd slurm-client munge"
[ "$ACCT" = slurmdbd ] && PKGS="$PKGS slurmdbd mariadb-server"
if [ "${SLURM_TEST_INSTALL:-0}" = 1 ]; then
  log "apt-get install $PKGS"
  apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q \
      --no-install-recommends $PKGS >"${TMPDIR:-/tmp}/start-slurm-apt.log" 2>&1
  }
  # a fresh image often has no package lists yet: update only when the plain install fails
  apt_install || { apt-get -q update >/dev/null && apt_install; } ||
    die "apt-get install failed, see ${TMPDIR:-/tmp}/start-slurm-apt.log"
fi
for b in munged slurmctld slurmd sinfo scontrol nsenter unshare ip; do
  command -v "$b" >/dev/null || die "missing $b (apt-get install $PKGS)"
done
if [ "$ACCT" = slurmdbd ]; then
  for b in slurmdbd mariadbd mariadb-install-db sacctmgr; do
    command -v "$b" >/dev/null || die "missing $b (apt-get install slurmdbd mariadb-server)"
  done
fi

if [ "$ETC_LINK" = 1 ]; then
  if [ -L "$ETC_CONF" ]; then
    owner=$(dirname "$(dirname "$(readlink "$ETC_CONF")")")
    # a link left behind by a cluster that no longer runs is replaced below
    [ -f "$owner/run/started" ] && [ -f "$owner/.mugs-slurm-test" ] &&
      die "$ETC_CONF belongs to the cluster running in $owner: stop it, reuse it (pytest: \
MUGS_SLURM_CLUSTER=$owner/env.sh) or set SLURM_TEST_ETC_LINK=0"
  elif [ -e "$ETC_CONF" ]; then
    die "$ETC_CONF is a real file, not ours: set SLURM_TEST_ETC_LINK=0 or move it away"
  fi
fi
if [ -e "$PREFIX" ]; then
  # never wipe a folder this script did not make, nor a cluster that still runs
  [ -f "$PREFIX/.mugs-slurm-test" ] || die "$PREFIX exists and was not made by start-slurm.sh"
  [ -f "$PREFIX/run/started" ] && die "a cluster runs in $PREFIX: stop it with stop-slurm.sh first"
  rm -rf "$PREFIX"
fi
mkdir -p "$PREFIX"/{etc,munge,state,log,run,dev}
touch "$PREFIX/.mugs-slurm-test" "$PREFIX/run/started"
STARTED=1 # from here on a failure stops whatever was started
chmod 755 "$PREFIX" "$PREFIX"/{etc,munge,state,log,run,dev}
CONF=$PREFIX/etc/slurm.conf
CTLD_NAME=$(hostname -s)
CTLD_ADDR=$SUBNET.1

# ---------------------------------------------------------------- munge
log "munged"
dd if=/dev/urandom of="$PREFIX/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$PREFIX/munge/munge.key"
MSOCK=$PREFIX/munge/munge.socket
# --force: munged refuses directory permissions it dislikes; it runs as root with a private key
munged --foreground --force --key-file="$PREFIX/munge/munge.key" --socket="$MSOCK" \
  --pid-file="$PREFIX/munge/munged.pid" --seed-file="$PREFIX/munge/munged.seed" \
  --log-file="$PREFIX/log/munged.log" --num-threads=2 </dev/null >>"$PREFIX/log/munged.out" 2>&1 &
echo $! >"$PREFIX/run/munged.pid"
for _ in $(seq 50); do
  [ -S "$MSOCK" ] && break
  sleep 0.1
done
munge -n -S "$MSOCK" | unmunge -S "$MSOCK" >/dev/null || die "munge round trip failed"

# ---------------------------------------------------------------- network: one netns per node
log "bridge ${NS}br ($CTLD_ADDR/24), $NODES node namespaces"
ip link add "${NS}br" type bridge || die "cannot create bridge ${NS}br (another cluster with SLURM_TEST_NS=$NS?)"
echo "${NS}br" >>"$PREFIX/run/links"
ip addr add "$CTLD_ADDR/24" dev "${NS}br"
ip link set "${NS}br" up
{
  echo "127.0.0.1 localhost"
  echo "$CTLD_ADDR $CTLD_NAME"
  for i in $(seq "$NODES"); do echo "$SUBNET.$((10 + i)) node$i"; done
} >"$PREFIX/etc/hosts"
for i in $(seq "$NODES"); do
  ip netns add "${NS}n$i"
  echo "${NS}n$i" >>"$PREFIX/run/netns"
  ip link add "${NS}v$i" type veth peer name eth0 netns "${NS}n$i"
  ip link set "${NS}v$i" master "${NS}br" up
  ip -n "${NS}n$i" link set lo up
  ip -n "${NS}n$i" addr add "$SUBNET.$((10 + i))/24" dev eth0
  ip -n "${NS}n$i" link set eth0 up # no default route: nothing leaves the private subnet
done

# ---------------------------------------------------------------- accounting
ACCT_CONF="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
if [ "$ACCT" = slurmdbd ]; then
  DB=$PREFIX/mariadb
  mkdir -p "$DB" && chown mysql:mysql "$DB"
  runuser -u mysql -- test -x "$DB" || die "user mysql cannot reach $DB: every parent must be world-executable"
  # a small redo log and buffer pool: the throw-away database needs ~100 MB of disk instead of ~180 MB
  SMALL_DB="--innodb-log-file-size=8M --innodb-buffer-pool-size=32M"
  log "mariadb-install-db"
  mariadb-install-db --no-defaults --user=mysql --datadir="$DB/data" --skip-test-db $SMALL_DB \
    --auth-root-authentication-method=socket >"$PREFIX/log/mariadb-install.out" 2>&1 ||
    die "mariadb-install-db failed"
  log "mariadbd (127.0.0.1:$((PORT + 3)))"
  mariadbd --no-defaults --user=mysql --datadir="$DB/data" --socket="$DB/mysql.sock" \
    --pid-file="$DB/mariadbd.pid" --bind-address=127.0.0.1 --port=$((PORT + 3)) --skip-name-resolve \
    $SMALL_DB --log-error="$PREFIX/log/mariadb.err" \
    </dev/null >>"$PREFIX/log/mariadbd.out" 2>&1 &
  echo $! >"$PREFIX/run/mariadbd.pid"
  for _ in $(seq 150); do
    mariadb --no-defaults -S "$DB/mysql.sock" -uroot -e 'select 1' >/dev/null 2>&1 && break
    sleep 0.2
  done
  mariadb --no-defaults -S "$DB/mysql.sock" -uroot -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;" || die "mariadbd not answering"
  # slurmdbd listens on the bridge address so that sacct works on the host and inside jobs alike
  cat >"$PREFIX/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MSOCK
DbdHost=$CTLD_NAME
DbdAddr=$CTLD_ADDR
DbdPort=$((PORT + 2))
SlurmUser=root
DebugLevel=info
LogFile=$PREFIX/log/slurmdbd.log
PidFile=$PREFIX/state/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((PORT + 3))
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurm
EOF
  chmod 600 "$PREFIX/etc/slurmdbd.conf"
  log "slurmdbd ($CTLD_ADDR:$((PORT + 2)))"
  SLURM_CONF=$CONF slurmdbd -D </dev/null >>"$PREFIX/log/slurmdbd.out" 2>&1 &
  echo $! >"$PREFIX/run/slurmdbd.pid"
  # clients take the munge socket for slurmdbd connections from AccountingStoragePass, not AuthInfo
  ACCT_CONF="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$CTLD_ADDR
AccountingStoragePort=$((PORT + 2))
AccountingStoragePass=$MSOCK
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
fi

# ---------------------------------------------------------------- slurm.conf, gres.conf
MEM_MB=$(awk -v n="$NODES" '/MemTotal/ {printf "%d", $2 / 1024 * 0.8 / n}' /proc/meminfo)
GRES_TYPES="" GRES_NODE="" GPU_PARTITION=""
if [ "$GPUS" -gt 0 ]; then
  GRES_TYPES="GresTypes=gpu" GRES_NODE="Gres=gpu:$GPUS"
  GPU_PARTITION="PartitionName=gpu Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=$GRACE"
  # slurmd marks a node INVAL for a file-less gpu GRES and wants a device file: char devices that
  # alias /dev/null do. Jobs get CUDA_VISIBLE_DEVICES; nothing opens the files (task/none).
  for g in $(seq 0 $((GPUS - 1))); do mknod "$PREFIX/dev/fakegpu$g" c 1 3; done
  printf 'AutoDetect=off\nNodeName=node[1-%d] Name=gpu File=%s/dev/fakegpu[0-%d]\n' \
    "$NODES" "$PREFIX" $((GPUS - 1)) >"$PREFIX/etc/gres.conf"
fi
# job ids restart at FirstJobId on every fresh cluster: a time-based start (10 ids per second,
# wrapping after ~69 days) keeps %j-named output folders of earlier runs from being reused
FIRST_JOB_ID=$(($(date +%s) % 6000000 * 10 + 1000))
cat >"$CONF" <<EOF
# generated by tests/cluster/start-slurm.sh: a single-machine test cluster
ClusterName=$CLUSTER
SlurmctldHost=$CTLD_NAME($CTLD_ADDR)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again only cred_expire + 1 s after it ended (default 120 s)
AuthInfo=socket=$MSOCK,cred_expire=10
StateSaveLocation=$PREFIX/state/ctld
SlurmdSpoolDir=$PREFIX/state/slurmd-%n
SlurmctldPidFile=$PREFIX/state/slurmctld.pid
SlurmdPidFile=$PREFIX/state/slurmd-%n.pid
SlurmctldLogFile=$PREFIX/log/slurmctld.log
SlurmdLogFile=$PREFIX/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no systemd or cgroup management here: track processes through /proc
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# scheduler passes every 2 s and backfill every 1 s (defaults 60 s / 30 s): requeued jobs restart fast
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# believe the CPUs/memory/GRES declared below even though the nodes share this machine's cores
SlurmdParameters=config_overrides
# partition "urgent" (higher PriorityTier) preempts cpu/gpu jobs by requeueing them; at preemption
# the job gets its own --signal (submitit: USR2 -> checkpoint), then GraceTime seconds to exit
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmdTimeout=60
MessageTimeout=20
FirstJobId=$FIRST_JOB_ID
$ACCT_CONF
JobCompType=jobcomp/filetxt
JobCompLoc=$PREFIX/log/jobcomp.txt
$GRES_TYPES
NodeName=node[1-$NODES] NodeAddr=$SUBNET.[11-$((10 + NODES))] CPUs=$CPUS RealMemory=$MEM_MB $GRES_NODE State=UNKNOWN
PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=$GRACE
$GPU_PARTITION
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=100 PreemptMode=OFF
EOF
echo "export SLURM_CONF=$CONF" >"$PREFIX/env.sh"
export SLURM_CONF=$CONF

# Snakemake's slurm job step drops every SLURM_* variable (SLURM_CONF too) before its inner srun,
# so the config must also be found at the compiled-in default path.
if [ "$ETC_LINK" = 1 ]; then
  rm -f "$ETC_CONF" # at most a stale link of ours, checked above
  mkdir -p /etc/slurm
  ln -s "$CONF" "$ETC_CONF"
  echo "$ETC_CONF" >"$PREFIX/run/etc_link"
fi

if [ "$ACCT" = slurmdbd ]; then
  for _ in $(seq 60); do
    timeout 5 sacctmgr -i show cluster >/dev/null 2>&1 && break
    sleep 0.25
  done
  timeout 5 sacctmgr -i show cluster >/dev/null || die "slurmdbd not answering"
  sacctmgr -i add cluster "$CLUSTER" >/dev/null
  sacctmgr -i add account tests Cluster="$CLUSTER" Description=tests Organization=mugs >/dev/null
  sacctmgr -i add user root Account=tests DefaultAccount=tests >/dev/null
fi

# ---------------------------------------------------------------- daemons
log "slurmctld"
slurmctld -D -c -i </dev/null >>"$PREFIX/log/slurmctld.out" 2>&1 &
echo $! >"$PREFIX/run/slurmctld.pid"
for _ in $(seq 100); do
  scontrol ping 2>/dev/null | grep -q UP && break
  sleep 0.1
done
scontrol ping | grep -q UP || die "slurmctld not answering"

for i in $(seq "$NODES"); do
  mkdir -p "$PREFIX/state/slurmd-node$i"
  # nsenter, not `ip netns exec`: the latter remounts /sys, which hides /sys/fs/cgroup, and slurmd
  # 22.05 will not start without it even with proctrack/linuxproc. The private mount namespace
  # carries the /etc/hosts that names the nodes; the UTS namespace the hostname node$i.
  nsenter --net="/run/netns/${NS}n$i" unshare --uts --mount sh -c \
    "hostname node$i && mount --bind '$PREFIX/etc/hosts' /etc/hosts && exec slurmd -D -N node$i" \
    </dev/null >>"$PREFIX/log/slurmd-node$i.out" 2>&1 &
  echo $! >"$PREFIX/run/slurmd-node$i.pid"
done
log "slurmd node[1-$NODES]"

states=""
for _ in $(seq 300); do
  states=$(sinfo -h -N -p cpu -o %t 2>/dev/null | sort | uniq -c | xargs)
  [ "$states" = "$NODES idle" ] && break
  sleep 0.1
done
[ "$states" = "$NODES idle" ] || {
  sinfo -N -l >&2
  die "nodes not idle: $states"
}
log "ready: $(sinfo -h -o '%P %D %t' | xargs)"
log "use: source $PREFIX/env.sh"
