#!/usr/bin/env bash
# Starts and stops a private ClickHouse server whose every file lives under
# one directory, listening on 127.0.0.1 only. Tests and local runs use it so
# that they neither need nor disturb a system-wide server.
#
#   scripts/clickhouse.sh start DIR [TCP_PORT] [HTTP_PORT]
#       Writes DIR/config.xml and DIR/users.xml (user default, no password,
#       loopback only), starts clickhouse-server in the background (pid in
#       DIR/pid), waits until it answers SELECT 1 and prints its TCP (native)
#       port on stdout. Ports not given are picked among free ones. Data in
#       DIR survives a stop and a start.
#   scripts/clickhouse.sh stop DIR
#       Stops the server started under DIR: TERM, then KILL after 30s.
#   scripts/clickhouse.sh ping HOST:PORT
#       Exits 0 when a ClickHouse server answers SELECT 1 on that native port.
#
# Without clickhouse-server it installs Debian's packages when run as root
# and fails with what to install otherwise. Messages go to stderr.
set -euo pipefail
PATH="$PATH:/usr/sbin:/sbin" # where Debian puts clickhouse-server

die() {
  echo "clickhouse.sh: $*" >&2
  exit 1
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

# server_cmd sets SERVER to the command that runs the server, installing
# the packages if we may.
server_cmd() {
  if command -v clickhouse-server >/dev/null; then
    SERVER=(clickhouse-server)
  elif command -v clickhouse >/dev/null; then
    SERVER=(clickhouse server)
  elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "clickhouse.sh: clickhouse-server is not installed; installing it with apt-get" >&2
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y clickhouse-server clickhouse-client >&2
    command -v clickhouse-server >/dev/null || die "apt-get installed no clickhouse-server"
    SERVER=(clickhouse-server)
  else
    die "clickhouse-server is not installed: install the clickhouse-server and clickhouse-client packages (Debian: sudo apt-get install clickhouse-server clickhouse-client), or run this as root to have it installed"
  fi
}

# answers HOST PORT: does a ClickHouse server answer SELECT 1 there? Uses
# clickhouse-client when there is one, else the HTTP port is not known and a
# plain TCP connect has to do.
answers() {
  local host=$1 port=$2
  if command -v clickhouse-client >/dev/null; then
    [ "$(clickhouse-client --host "$host" --port "$port" --connect_timeout 2 -q 'SELECT 1' 2>/dev/null)" = 1 ]
  elif command -v clickhouse >/dev/null; then
    [ "$(clickhouse client --host "$host" --port "$port" --connect_timeout 2 -q 'SELECT 1' 2>/dev/null)" = 1 ]
  else
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
  fi
}

# http_answers PORT: does SELECT 1 answer on the HTTP port of 127.0.0.1?
http_answers() {
  local reply
  reply=$(
    exec 2>/dev/null
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf 'GET /?query=SELECT%%201 HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
    timeout 5 cat <&3
  ) || return 1
  [ "$(printf '%s' "$reply" | tail -n 1 | tr -d '\r')" = 1 ]
}

in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# free_port [EXCEPT]: a port nothing listens on, below Linux's ephemeral
# range so that no outgoing connection takes it meanwhile.
free_port() {
  local p _
  for _ in $(seq 1 200); do
    p=$((10000 + RANDOM % 22000))
    if [ "$p" != "${1:-}" ] && ! in_use "$p"; then
      echo "$p"
      return
    fi
  done
  die "found no free port"
}

# alive DIR: is the server whose pid DIR/pid holds running, and is it ours
# (its command line names DIR/config.xml)? Guards against a reused pid.
alive() {
  local pid
  [ -f "$1/pid" ] || return 1
  pid=$(cat "$1/pid")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "--config-file=$1/config.xml"
}

# running PID: the process exists and is not a zombie. Unlike alive, it
# holds from the fork on, before setsid has exec'd the server (until then
# the child's command line is still this script's).
running() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

show_logs() {
  local f
  for f in "$1/log/server.err.log" "$1/stdout.log"; do
    if [ -s "$f" ]; then
      echo "---- $f (last 40 lines)" >&2
      tail -n 40 "$f" >&2
    fi
  done
}

write_config() {
  local dir=$1 tcp=$2 http=$3
  cat >"$dir/config.xml" <<EOF
<?xml version="1.0"?>
<!-- Written by scripts/clickhouse.sh; rewritten at every start. -->
<yandex>
  <logger>
    <level>warning</level>
    <log>$dir/log/server.log</log>
    <errorlog>$dir/log/server.err.log</errorlog>
    <size>100M</size>
    <count>2</count>
    <console>0</console>
  </logger>
  <listen_host>127.0.0.1</listen_host>
  <tcp_port>$tcp</tcp_port>
  <http_port>$http</http_port>
  <path>$dir/data/</path>
  <tmp_path>$dir/tmp/</tmp_path>
  <user_files_path>$dir/user_files/</user_files_path>
  <format_schema_path>$dir/format_schemas/</format_schema_path>
  <users_config>$dir/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>268435456</mark_cache_size>
  <max_concurrent_queries>100</max_concurrent_queries>
</yandex>
EOF
  # Our own users file rather than the system's: a packaged server may give
  # user default a password (users.d/ beside /etc/clickhouse-server/users.xml).
  cat >"$dir/users.xml" <<'EOF'
<?xml version="1.0"?>
<!-- Written by scripts/clickhouse.sh: user default, no password, loopback only. -->
<yandex>
  <profiles>
    <default>
      <max_memory_usage>4000000000</max_memory_usage>
    </default>
  </profiles>
  <users>
    <default>
      <password></password>
      <networks>
        <ip>127.0.0.1</ip>
        <ip>::1</ip>
      </networks>
      <profile>default</profile>
      <quota>default</quota>
    </default>
  </users>
  <quotas>
    <default></default>
  </quotas>
</yandex>
EOF
}

start() {
  if [ $# -lt 1 ] || [ $# -gt 3 ]; then usage; fi
  mkdir -p "$1"
  local dir tcp=${2:-} http=${3:-} fixed=${2:+yes} pid deadline _
  dir=$(cd "$1" && pwd)
  if alive "$dir"; then
    die "a server started under $dir is already running (pid $(cat "$dir/pid")); stop it first"
  fi
  server_cmd
  mkdir -p "$dir/data" "$dir/tmp" "$dir/user_files" "$dir/format_schemas" "$dir/log"

  for _ in 1 2 3 4 5; do
    [ -n "$tcp" ] || tcp=$(free_port)
    [ -n "$http" ] || http=$(free_port "$tcp")
    if in_use "$tcp" || in_use "$http"; then
      [ -z "$fixed" ] || die "port $tcp or $http is already in use"
      tcp="" http=""
      continue
    fi
    write_config "$dir" "$tcp" "$http"
    : >"$dir/log/server.err.log"
    # setsid: the server outlives this script and ignores the caller's ^C
    # until it is stopped with "stop".
    setsid "${SERVER[@]}" --config-file="$dir/config.xml" >"$dir/stdout.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$dir/pid"
    echo "$tcp" >"$dir/tcp_port"
    echo "$http" >"$dir/http_port"

    deadline=$((SECONDS + 60))
    while [ "$SECONDS" -lt "$deadline" ]; do
      # running, not kill -0: until this script exits, a server that died
      # is our zombie, and kill -0 succeeds on a zombie.
      running "$pid" || break
      if http_answers "$http" && answers 127.0.0.1 "$tcp"; then
        echo "clickhouse.sh: ClickHouse (pid $pid) answers on 127.0.0.1:$tcp (native) and :$http (HTTP), files under $dir" >&2
        echo "$tcp"
        return 0
      fi
      sleep 0.5
    done

    if running "$pid"; then
      echo "clickhouse.sh: ClickHouse (pid $pid) did not answer within 60s" >&2
      show_logs "$dir"
      stop "$dir"
      exit 1
    fi
    rm -f "$dir/pid"
    # Someone may have taken a picked port between the check and the bind.
    if [ -z "$fixed" ] && grep -qs "Address already in use" "$dir/log/server.err.log" "$dir/stdout.log"; then
      echo "clickhouse.sh: port $tcp or $http was taken meanwhile; trying others" >&2
      tcp="" http=""
      continue
    fi
    echo "clickhouse.sh: ClickHouse exited during startup" >&2
    show_logs "$dir"
    exit 1
  done
  die "could not find free ports for ClickHouse"
}

stop() {
  [ $# -eq 1 ] || usage
  [ -d "$1" ] || die "no directory $1"
  local dir pid _
  dir=$(cd "$1" && pwd)
  if ! alive "$dir"; then
    rm -f "$dir/pid"
    echo "clickhouse.sh: no server of $dir is running" >&2
    return 0
  fi
  pid=$(cat "$dir/pid")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "clickhouse.sh: ClickHouse (pid $pid) ignored TERM for 30s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
  fi
  rm -f "$dir/pid"
  echo "clickhouse.sh: stopped ClickHouse (pid $pid) of $dir" >&2
}

ping_cmd() {
  [ $# -eq 1 ] || usage
  local host=${1%:*} port=${1##*:}
  [ "$host" != "$1" ] || die "want HOST:PORT, got $1"
  answers "$host" "$port"
}

[ $# -ge 1 ] || usage
cmd=$1
shift
case "$cmd" in
start) start "$@" ;;
stop) stop "$@" ;;
ping) ping_cmd "$@" ;;
*) usage ;;
esac
