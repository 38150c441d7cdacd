#!/usr/bin/env bash
# The main job: build trackstar, make sure a local ClickHouse is running,
# create the schema, and run `trackstar all` (edge, attributor, dispatcher,
# loader and an embedded Kafka-protocol broker) with the example config.
#
#   scripts/run-local.sh              # listens on :8080, state under ./data
#   TRACKSTAR_LISTEN=:9080 TRACKSTAR_DATA=/tmp/ts scripts/run-local.sh
#
# Also: TRACKSTAR_CONFIG (examples/trackstar.yaml), TRACKSTAR_EMBEDDED_BROKER
# (127.0.0.1:9092, where the embedded broker listens) and
# TRACKSTAR_CLICKHOUSE (127.0.0.1:9000: a ClickHouse to use if one answers
# there). Needs Go and curl; as root it installs curl when it is missing.
#
# It prints a click URL and a postback URL that work against it. Ctrl-C stops
# trackstar and the ClickHouse it started (one it found running is left alone).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"

listen="${TRACKSTAR_LISTEN:-:8080}"
data="${TRACKSTAR_DATA:-./data}"
config="${TRACKSTAR_CONFIG:-examples/trackstar.yaml}"
port="${listen##*:}"
embedded="${TRACKSTAR_EMBEDDED_BROKER:-127.0.0.1:9092}"
export TRACKSTAR_EMBEDDED_BROKER="$embedded"
mkdir -p "$data" bin

if ! command -v curl >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> installing curl"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null 2>&1 ||
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null; }
  else
    echo "run-local: needs curl; install it (apt-get install curl) or run as root" >&2
    exit 1
  fi
fi

echo "==> building trackstar"
go build -o bin/trackstar ./cmd/trackstar

# ClickHouse: use the one at TRACKSTAR_CLICKHOUSE (default 127.0.0.1:9000) if
# it answers, else start a private one under $data/clickhouse.
ch="${TRACKSTAR_CLICKHOUSE:-127.0.0.1:9000}"
started_ch=""
if ! bin/trackstar migrate --clickhouse "$ch" --log-level warn >/dev/null 2>&1; then
  echo "==> no ClickHouse answering at $ch; starting one under $data/clickhouse"
  chport=$(scripts/clickhouse.sh start "$data/clickhouse")
  ch="127.0.0.1:$chport"
  started_ch="$data/clickhouse"
fi

cleanup() {
  if [ -n "${ts_pid:-}" ] && kill "$ts_pid" 2>/dev/null; then wait "$ts_pid" 2>/dev/null || true; fi
  [ -n "$started_ch" ] && scripts/clickhouse.sh stop "$started_ch"
  true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "==> migrating the schema on $ch"
bin/trackstar migrate --clickhouse "$ch"

base="http://127.0.0.1:$port"
if curl -s -o /dev/null --max-time 2 "$base/healthz"; then
  echo "run-local: something already answers on port $port; stop it or set TRACKSTAR_LISTEN=:<port>" >&2
  exit 1
fi

echo "==> starting trackstar all on $listen (state under $data)"
bin/trackstar all --config "$config" --listen "$listen" --data "$data" --clickhouse "$ch" &
ts_pid=$!

for _ in $(seq 1 100); do
  curl -fsS "$base/healthz" >/dev/null 2>&1 && break
  kill -0 "$ts_pid" 2>/dev/null || { echo "trackstar exited; see the log above" >&2; exit 1; }
  sleep 0.2
done
kill -0 "$ts_pid" 2>/dev/null || { echo "trackstar exited; see the log above" >&2; exit 1; }

click_url="$base/click?offer_id=1&aff_id=7&sub1=demo&source=run-local"
# Try it once, so the postback URL below names a real click ID.
location=$(curl -sS -o /dev/null -w '%{redirect_url}' "$click_url")
click_id=$(printf '%s' "$location" | sed -n 's/.*click_id=\([0-9a-z]*\).*/\1/p')
cat <<MSG

Trackstar is running. Try:

  click URL     $click_url
                (answered 302 -> $location)
  postback URL  $base/postback?click_id=$click_id&goal=sale&amount=19.99&txn_id=order-$click_id&token=demo-shop-token
  report        bin/trackstar report --clickhouse $ch
  metrics       $base/metrics    readiness  $base/readyz
  Kafka         the embedded broker speaks the Kafka protocol on $embedded

Ctrl-C stops it.
MSG
wait "$ts_pid"
