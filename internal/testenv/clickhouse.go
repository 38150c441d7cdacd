package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
)

// DefaultClickHouse is the ClickHouse native address used when
// TRACKSTAR_TEST_CLICKHOUSE is unset.
const DefaultClickHouse = "127.0.0.1:9000"

// clickHousePings remembers, per address, the outcome of the first ping, so
// that a package with many tests waits for an absent server once, not per test.
var clickHousePings sync.Map // addr -> *clickHousePing

type clickHousePing struct {
	once sync.Once
	err  error
}

// ClickHouse returns the native address of the test ClickHouse server,
// from TRACKSTAR_TEST_CLICKHOUSE (default 127.0.0.1:9000), once it answers a
// ping. When it does not, the test fails if the run requires the server
// (CI=true or TRACKSTAR_REQUIRE_CLICKHOUSE=1, which scripts/test.sh sets),
// and is skipped otherwise.
func ClickHouse(t testing.TB) string {
	t.Helper()
	addr := os.Getenv("TRACKSTAR_TEST_CLICKHOUSE")
	if addr == "" {
		addr = DefaultClickHouse
	}
	v, _ := clickHousePings.LoadOrStore(addr, &clickHousePing{})
	p := v.(*clickHousePing)
	p.once.Do(func() { p.err = pingClickHouse(addr) })
	if p.err != nil {
		if os.Getenv("CI") == "true" || os.Getenv("TRACKSTAR_REQUIRE_CLICKHOUSE") == "1" {
			t.Fatalf("test ClickHouse at %s is required but unreachable: %v", addr, p.err)
		}
		t.Skipf("no ClickHouse at %s (%v): run scripts/test.sh, which starts one, or set TRACKSTAR_TEST_CLICKHOUSE", addr, p.err)
	}
	return addr
}

func pingClickHouse(addr string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := openClickHouse(addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	return conn.Ping(ctx)
}

func openClickHouse(addr string) (driver.Conn, error) {
	return clickhouse.Open(&clickhouse.Options{
		Addr:        []string{addr},
		Auth:        clickhouse.Auth{Username: "default"},
		DialTimeout: 5 * time.Second,
	})
}

// ClickHouseDB returns the test server's address and the name of a database
// created for this test alone (trackstar_test_<random>), dropped when the
// test ends.
func ClickHouseDB(t testing.TB) (addr, db string) {
	t.Helper()
	addr = ClickHouse(t)
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatalf("cannot make a database name: %v", err)
	}
	db = "trackstar_test_" + hex.EncodeToString(b[:])

	exec := func(query string) error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		conn, err := openClickHouse(addr)
		if err != nil {
			return err
		}
		defer conn.Close()
		return conn.Exec(ctx, query)
	}
	if err := exec("CREATE DATABASE " + db); err != nil {
		t.Fatalf("cannot create test database %s on ClickHouse at %s: %v", db, addr, err)
	}
	t.Cleanup(func() {
		if err := exec("DROP DATABASE IF EXISTS " + db); err != nil {
			t.Errorf("cannot drop test database %s on ClickHouse at %s: %v", db, addr, err)
		}
	})
	return addr, db
}
