#!/usr/bin/env bash
# Whole-system benchmarks of Trackstar. Usage:
#
#   scripts/bench.sh [edge|all]
#
#   edge  wrk (one thread, 256 connections) against a bare fasthttp 302
#         handler, the edge alone (with the embedded broker) and `trackstar
#         all`, alternated round by round; prints requests/s, p50/p99
#         latency, errors and each one's ratio of medians to the bare
#         handler. Goal for `trackstar all`: >= 0.5x, no errors, p99 <= 10 ms.
#   all   every section above (the default).
#
# Knobs (environment): ROUNDS (3), DURATION (10s per run), WARMUP (3s),
# CONNECTIONS (256), THREADS (1), CLICKHOUSE (address `trackstar all`'s loader
# writes to; default $TRACKSTAR_TEST_CLICKHOUSE or 127.0.0.1:9000 — it may be
# down, the edge does not need it), BENCH_STRICT=1 to exit 1 when a goal is
# missed, KEEP=1 to keep the work directory (logs, data).
#
# To add a section: write bench_<name>, add <name> to SECTIONS.
set -euo pipefail

cd "$(dirname "$0")/.."

SECTIONS=(edge)
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-3s}
CONNECTIONS=${CONNECTIONS:-256}
THREADS=${THREADS:-1}
CLICKHOUSE=${CLICKHOUSE:-${TRACKSTAR_TEST_CLICKHOUSE:-127.0.0.1:9000}}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/trackstar-bench.XXXXXX")
PIDS=()
MISSED=0

cleanup() {
	for pid in "${PIDS[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	for pid in "${PIDS[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	if [[ "${KEEP:-}" == 1 ]]; then
		echo "work directory kept: $WORK"
	else
		rm -rf "$WORK"
	fi
}
trap cleanup EXIT

log() { printf '%s\n' "$*" >&2; }

need_wrk() {
	command -v wrk >/dev/null && return
	if [[ $(id -u) -ne 0 ]]; then
		log "wrk is not installed; install it (apt-get install wrk) or run as root"
		exit 1
	fi
	log "installing wrk"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null 2>&1 ||
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
}

# port_open HOST PORT: something accepts connections there.
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# free_port: a loopback port nothing listens on.
free_port() {
	local p
	while :; do
		p=$((20000 + RANDOM % 40000))
		port_open 127.0.0.1 "$p" || { echo "$p"; return; }
	done
}

# http_status HOST PORT PATH: the status code of a GET, or 000.
http_status() {
	local line
	{
		exec 3<>"/dev/tcp/$1/$2" &&
			printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$3" "$1" >&3 &&
			IFS=' ' read -r _ line _ <&3 && exec 3>&- && echo "$line"
	} 2>/dev/null || echo 000
}

# http_body HOST PORT PATH: the body of a GET.
http_body() {
	exec 3<>"/dev/tcp/$1/$2"
	printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$3" "$1" >&3
	sed '1,/^\r$/d' <&3
	exec 3>&-
}

# wait_status HOST PORT PATH CODE WHAT: wait up to 60s for CODE.
wait_status() {
	for _ in $(seq 600); do
		[[ $(http_status "$1" "$2" "$3") == "$4" ]] && return
		sleep 0.1
	done
	log "$5 did not answer $4 to $3 within 60s"
	return 1
}

# run_wrk NAME URL DURATION: one wrk run; prints "rps p50_ms p99_ms errors".
run_wrk() {
	local out
	out="$WORK/wrk-$1-$(date +%s%N).txt"
	wrk -t"$THREADS" -c"$CONNECTIONS" -d"$3" --latency "$2" >"$out" 2>&1 || true
	awk '
		function ms(v) {
			if (v ~ /us$/) return v / 1000
			if (v ~ /ms$/) return v + 0
			if (v ~ /s$/) return v * 1000
			return v
		}
		/^Requests\/sec:/ { rps = $2 }
		$1 == "50%" { p50 = ms($2) }
		$1 == "99%" { p99 = ms($2) }
		/Socket errors:/ { gsub(",", ""); err += $4 + $6 + $8 + $10 }
		/Non-2xx or 3xx responses:/ { err += $NF }
		END {
			if (rps == "") { print "0 0 0 -1"; exit }
			printf "%.0f %.2f %.2f %d\n", rps, p50, p99, err
		}' "$out"
}

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
maximum() { printf '%s\n' "$@" | sort -g | tail -1; }

bench_edge() {
	need_wrk
	log "building bareredirect, edgeonly and trackstar"
	go build -o "$WORK/bareredirect" ./internal/benchtools/bareredirect
	go build -o "$WORK/edgeonly" ./internal/benchtools/edgeonly
	go build -o "$WORK/trackstar" ./cmd/trackstar

	local bare_port edge_port ts_port
	bare_port=$(free_port)
	edge_port=$(free_port)
	ts_port=$(free_port)
	local db="trackstar_bench_$$"

	"$WORK/bareredirect" --listen "127.0.0.1:$bare_port" >"$WORK/bareredirect.log" 2>&1 &
	PIDS+=("$!")
	"$WORK/edgeonly" --config examples/trackstar.yaml --data "$WORK/data-edgeonly" \
		--listen "127.0.0.1:$edge_port" --embedded-broker "127.0.0.1:$(free_port)" >"$WORK/edgeonly.log" 2>&1 &
	PIDS+=("$!")
	"$WORK/trackstar" all --config examples/trackstar.yaml --data "$WORK/data-trackstar" \
		--listen "127.0.0.1:$ts_port" --embedded-broker "127.0.0.1:$(free_port)" \
		--ops-listen "127.0.0.1:$(free_port)" --clickhouse "$CLICKHOUSE" --clickhouse-database "$db" \
		--log-level warn >"$WORK/trackstar.log" 2>&1 &
	local ts_pid=$!
	PIDS+=("$ts_pid")

	local path="/click?offer_id=1&aff_id=7&sub1=bench"
	wait_status 127.0.0.1 "$bare_port" "$path" 302 bareredirect
	local name port
	for name in edgeonly trackstar; do
		port=$edge_port
		[[ $name == trackstar ]] && port=$ts_port
		if ! wait_status 127.0.0.1 "$port" /readyz 200 "$name" || ! wait_status 127.0.0.1 "$port" "$path" 302 "$name"; then
			tail -20 "$WORK/$name.log" >&2
			exit 1
		fi
	done

	# bare: the baseline; edge-only: the edge and the embedded broker alone;
	# trackstar: `trackstar all`, the goal's subject.
	local servers=(bare edge-only trackstar)
	local -A url=(
		[bare]="http://127.0.0.1:$bare_port$path"
		[edge-only]="http://127.0.0.1:$edge_port$path"
		[trackstar]="http://127.0.0.1:$ts_port$path"
	)
	local -A rpss=() p50s=() p99s=() errs=()
	log "warming up ($WARMUP each)"
	for name in "${servers[@]}"; do
		run_wrk "warm-$name" "${url[$name]}" "$WARMUP" >/dev/null
	done

	echo
	echo "== edge: wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency GET $path, $ROUNDS rounds, alternated"
	printf '%-10s %5s %12s %10s %10s %8s\n' server round "req/s" "p50 ms" "p99 ms" errors
	local r rps p50 p99 err
	for r in $(seq "$ROUNDS"); do
		for name in "${servers[@]}"; do
			read -r rps p50 p99 err < <(run_wrk "$name" "${url[$name]}" "$DURATION")
			printf '%-10s %5s %12s %10s %10s %8s\n' "$name" "$r" "$rps" "$p50" "$p99" "$err"
			rpss[$name]+=" $rps" p50s[$name]+=" $p50" p99s[$name]+=" $p99"
			((err < 0)) && err=1
			errs[$name]=$((${errs[$name]:-0} + err))
		done
	done

	echo
	local mb ratio
	# shellcheck disable=SC2086 # the lists split on purpose
	mb=$(median ${rpss[bare]})
	for name in "${servers[@]}"; do
		# shellcheck disable=SC2086
		printf '%-10s median req/s %8s (%sx bare), p50 %s ms, p99 %s ms (worst %s), errors %s\n' "$name" \
			"$(median ${rpss[$name]})" \
			"$(awk -v e="$(median ${rpss[$name]})" -v b="$mb" 'BEGIN { printf "%.2f", (b > 0 ? e / b : 0) }')" \
			"$(median ${p50s[$name]})" "$(median ${p99s[$name]})" "$(maximum ${p99s[$name]})" "${errs[$name]}"
	done
	# shellcheck disable=SC2086
	ratio=$(awk -v e="$(median ${rpss[trackstar]})" -v b="$mb" 'BEGIN { printf "%.2f", (b > 0 ? e / b : 0) }')
	local worst_p99 errors=${errs[trackstar]}
	# shellcheck disable=SC2086
	worst_p99=$(maximum ${p99s[trackstar]})

	local metrics spooled
	metrics=$(http_body 127.0.0.1 "$ts_port" /metrics || true)
	spooled=$(awk '/^trackstar_edge_spooled_total/ { s += $NF } END { print s + 0 }' <<<"$metrics")
	printf 'trackstar: events spooled during the run (Kafka slower than the produce timeout): %s\n' "$spooled"
	awk '/^trackstar_edge_produce_seconds_(sum|count)\{result="acked",topic="trackstar.clicks"\}/ { v[$1 ~ /_sum/] = $NF }
		END { if (v[0] > 0) printf "trackstar: mean click produce latency (to the Kafka ack): %.2f ms\n", v[1] / v[0] * 1000 }' <<<"$metrics"

	local verdict=PASS
	awk -v r="$ratio" 'BEGIN { exit !(r >= 0.5) }' || { verdict=MISS; log "goal missed: trackstar/bare $ratio < 0.5"; }
	[[ $errors == 0 ]] || { verdict=MISS; log "goal missed: $errors errors"; }
	awk -v p="$worst_p99" 'BEGIN { exit !(p <= 10) }' || { verdict=MISS; log "goal missed: p99 $worst_p99 ms > 10 ms"; }
	echo "edge goals for trackstar all (ratio >= 0.5, zero errors, p99 <= 10 ms): $verdict (ratio ${ratio}x)"
	[[ $verdict == PASS ]] || MISSED=1

	kill "$ts_pid" 2>/dev/null || true
	wait "$ts_pid" 2>/dev/null || true
	if command -v clickhouse-client >/dev/null; then
		clickhouse-client --host "${CLICKHOUSE%:*}" --port "${CLICKHOUSE##*:}" \
			--query "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
	fi
}

section=${1:-all}
case $section in
all)
	for s in "${SECTIONS[@]}"; do "bench_$s"; done
	;;
*)
	if [[ " ${SECTIONS[*]} " != *" $section "* ]]; then
		echo "usage: $0 [$(
			IFS='|'
			echo "${SECTIONS[*]}"
		)|all]" >&2
		exit 2
	fi
	"bench_$section"
	;;
esac

if [[ $MISSED == 1 && "${BENCH_STRICT:-}" == 1 ]]; then
	exit 1
fi
