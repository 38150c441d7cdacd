#!/usr/bin/env bash
# Runs go vet and every test, race detector on, against a private ClickHouse
# that it starts on free ports and stops at the end (or against the one at
# TRACKSTAR_TEST_CLICKHOUSE, when the caller set it and it answers). Tests
# that need ClickHouse fail rather than skip here.
#
#   scripts/test.sh                      # the whole tree
#   scripts/test.sh -run TestMigrate -v  # extra arguments go to go test
#   TRACKSTAR_TEST_PKGS="./schemas/... ./internal/warehouse/..." scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v go >/dev/null; then
  export PATH="$PATH:/usr/local/go/bin"
fi
command -v go >/dev/null || {
  echo "test.sh: go is not installed (looked on PATH and in /usr/local/go/bin)" >&2
  exit 1
}

ch_dir=""
# shellcheck disable=SC2317 # called by the trap
cleanup() {
  if [ -n "$ch_dir" ]; then
    scripts/clickhouse.sh stop "$ch_dir" || true
    rm -rf "$ch_dir"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -n "${TRACKSTAR_TEST_CLICKHOUSE:-}" ] && scripts/clickhouse.sh ping "$TRACKSTAR_TEST_CLICKHOUSE"; then
  echo "test.sh: using the ClickHouse at $TRACKSTAR_TEST_CLICKHOUSE" >&2
else
  if [ -n "${TRACKSTAR_TEST_CLICKHOUSE:-}" ]; then
    echo "test.sh: no ClickHouse answers at $TRACKSTAR_TEST_CLICKHOUSE; starting a private one" >&2
  fi
  ch_dir=$(mktemp -d "${TMPDIR:-/tmp}/trackstar-test-clickhouse.XXXXXX")
  port=$(scripts/clickhouse.sh start "$ch_dir")
  export TRACKSTAR_TEST_CLICKHOUSE="127.0.0.1:$port"
fi
export TRACKSTAR_REQUIRE_CLICKHOUSE=1

# Word splitting is wanted: TRACKSTAR_TEST_PKGS is a list of patterns.
# shellcheck disable=SC2206
pkgs=(${TRACKSTAR_TEST_PKGS:-./...})

echo "test.sh: go vet ${pkgs[*]}" >&2
go vet "${pkgs[@]}"

echo "test.sh: go test -race -count=1 -timeout 20m $* ${pkgs[*]}" >&2
status=0
go test -race -count=1 -timeout 20m "$@" "${pkgs[@]}" || status=$?
exit "$status"
