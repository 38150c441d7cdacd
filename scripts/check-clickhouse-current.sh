#!/usr/bin/env bash
# Checks that Trackstar's ClickHouse SQL runs, and answers the same, on a
# current ClickHouse release as on the Debian 18.16 server the tests use.
#
#   scripts/check-clickhouse-current.sh
#
# 1. scripts/test.sh runs TestSQLTranscript on ClickHouse 18.16 (started
#    as for the tests): the migrations, the loader's inserts and the
#    report queries, writing every statement and the rows each query
#    returned to a transcript.
# 2. The transcript is replayed on chDB, ClickHouse's engine as a library
#    (npm package chdb with its @chdb/lib-linux-x64-gnu build, a current
#    release: 26.7 at the time of writing), in a fresh session, and every
#    query's rows are compared, numbers by value ("2.5000" and "2.5" are
#    the same: servers since 21.x drop a Decimal's trailing zeros).
#
# Needs Node.js and npm; the chdb package (about 550 MB) is installed once
# under ${XDG_CACHE_HOME:-~/.cache}/trackstar/chdb. Not part of
# scripts/test.sh: it is a check to run when the SQL changes.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in node npm; do
	command -v "$tool" >/dev/null || {
		echo "check-clickhouse-current.sh: $tool is not installed" >&2
		exit 1
	}
done

cache="${XDG_CACHE_HOME:-$HOME/.cache}/trackstar/chdb"
if [ ! -d "$cache/node_modules/chdb" ]; then
	echo "check-clickhouse-current.sh: installing chdb into $cache" >&2
	mkdir -p "$cache"
	(cd "$cache" && { [ -f package.json ] || npm init -y >/dev/null; } && npm install --no-audit --no-fund chdb >&2)
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/trackstar-chcheck.XXXXXX")
trap 'rm -rf "$work"' EXIT
transcript="$work/transcript.json"

echo "check-clickhouse-current.sh: recording the transcript on ClickHouse 18.16" >&2
TRACKSTAR_TEST_PKGS=./internal/warehouse/ TRACKSTAR_SQL_TRANSCRIPT="$transcript" \
	scripts/test.sh -run '^TestSQLTranscript$' >&2
[ -s "$transcript" ] || {
	echo "check-clickhouse-current.sh: TestSQLTranscript wrote no transcript" >&2
	exit 1
}

echo "check-clickhouse-current.sh: replaying it on chDB" >&2
NODE_PATH="$cache/node_modules" node - "$transcript" "$work/chdb" <<'JS'
const { Session } = require("chdb");
const fs = require("fs");
const [transcriptPath, dataDir] = process.argv.slice(2);
const entries = JSON.parse(fs.readFileSync(transcriptPath, "utf8"));
const session = new Session(dataDir);
const version = session.query("SELECT version()", "TSVRaw").trim();
console.log(`chDB: ClickHouse ${version}`);

const number = /^-?\d+(\.\d+)?$/;
const norm = (cell) => (number.test(cell) && cell.includes(".") ? cell.replace(/\.?0+$/, "") : cell);
const text = (rows) => rows.map((r) => r.map(norm).join("\t"));
let failures = 0;
const fail = (i, e, why) => {
	failures++;
	console.log(`FAIL #${i}: ${why}\n  ${e.sql.slice(0, 300).replace(/\n/g, "\n  ")}`);
};
entries.forEach((e, i) => {
	let out;
	try {
		out = session.query(e.sql, "TSVRaw");
	} catch (err) {
		const code = Number((String(err.message).match(/Code: (\d+)/) || [])[1]);
		if (e.error_code && code === e.error_code) return;
		return fail(i, e, `error: ${String(err.message).slice(0, 300)}`);
	}
	if (e.error_code) return fail(i, e, `ran, but 18.16 answered error ${e.error_code}`);
	if (!e.query || !e.rows) return;
	const lines = out.replace(/\n$/, "");
	const got = text(lines === "" ? [] : lines.split("\n").map((l) => l.split("\t")));
	const want = text(e.rows);
	if (e.unordered) {
		got.sort();
		want.sort();
	}
	if (JSON.stringify(got) !== JSON.stringify(want)) {
		fail(i, e, `rows differ\n  18.16:   ${JSON.stringify(want)}\n  current: ${JSON.stringify(got)}`);
	}
});
console.log(`${entries.length} statements, ${entries.filter((e) => e.query && e.rows).length} answers compared, ${failures} failed`);
process.exit(failures ? 1 : 0);
JS
