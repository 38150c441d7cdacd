// Package warehouse is Trackstar's ClickHouse side: connecting to the
// server, creating and upgrading the schema that package schemas ships, and
// loading the event topics into its tables.
package warehouse

import (
	"context"
	"fmt"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
)

// DefaultDatabase is the database Trackstar's tables live in unless told otherwise.
const DefaultDatabase = "trackstar"

// Open connects to the ClickHouse server at addr ("host:port" of the native
// protocol, 9000 by default) as user default, with database as the current
// database, and checks the connection with a ping. An empty database means
// the server's default; a database that does not exist yet is an error, so
// Migrate connects without one.
//
// The native protocol is negotiated down to the server's revision, which
// lets clickhouse-go v2 talk to servers as old as 18.16 (revision 54413).
// Such old servers take only integer and boolean query settings.
func Open(ctx context.Context, addr, database string) (driver.Conn, error) {
	conn, err := clickhouse.Open(&clickhouse.Options{
		Protocol: clickhouse.Native,
		Addr:     []string{addr},
		Auth: clickhouse.Auth{
			Database: database,
			Username: "default",
		},
		DialTimeout:     5 * time.Second,
		ReadTimeout:     5 * time.Minute,
		MaxOpenConns:    4,
		MaxIdleConns:    2,
		ConnMaxLifetime: time.Hour,
		Compression:     &clickhouse.Compression{Method: clickhouse.CompressionLZ4},
	})
	if err != nil {
		return nil, fmt.Errorf("cannot open ClickHouse connection to %s: %w", addr, err)
	}
	if err := conn.Ping(ctx); err != nil {
		_ = conn.Close()
		if database == "" {
			return nil, fmt.Errorf("cannot reach ClickHouse at %s: %w", addr, err)
		}
		return nil, fmt.Errorf("cannot reach ClickHouse at %s (database %q): %w", addr, database, err)
	}
	return conn, nil
}
