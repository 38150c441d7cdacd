package warehouse

import (
	"context"
	"fmt"
	"log/slog"
	"regexp"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/trackstar/trackstar/schemas"
)

// databaseName is what Migrate accepts as a database name: a plain
// identifier, so that it can stand in DDL unquoted.
var databaseName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// CheckDatabaseName returns an error unless name is a plain identifier
// (letters, digits and underscores, not starting with a digit).
func CheckDatabaseName(name string) error {
	if !databaseName.MatchString(name) {
		return fmt.Errorf("invalid ClickHouse database name %q: want letters, digits and underscores, not starting with a digit", name)
	}
	return nil
}

// Migrate creates the database when it is missing and applies, in order,
// every migration of schemas.Migrations that its schema_migrations table
// does not list yet, recording each one once all its statements succeeded.
// Running it again applies nothing; every statement is idempotent on its own
// (IF NOT EXISTS, or DROP then CREATE for views), so a migration cut short
// by a crash, or run by two processes at once, is simply applied again.
func Migrate(ctx context.Context, addr, database string) error {
	if err := CheckDatabaseName(database); err != nil {
		return err
	}
	// No current database: it may not exist yet, and every statement names it.
	conn, err := Open(ctx, addr, "")
	if err != nil {
		return err
	}
	defer conn.Close()

	if err := conn.Exec(ctx, "CREATE DATABASE IF NOT EXISTS "+database); err != nil {
		return fmt.Errorf("cannot create ClickHouse database %q: %w", database, err)
	}
	if err := conn.Exec(ctx, "CREATE TABLE IF NOT EXISTS "+database+".schema_migrations"+
		" (name String, applied_at DateTime) ENGINE = ReplacingMergeTree ORDER BY name"); err != nil {
		return fmt.Errorf("cannot create %s.schema_migrations: %w", database, err)
	}
	applied, err := appliedMigrations(ctx, conn, database)
	if err != nil {
		return err
	}
	for _, m := range schemas.Migrations() {
		if applied[m.Name] {
			continue
		}
		for i, stmt := range m.For(database) {
			if err := conn.Exec(ctx, stmt); err != nil {
				return fmt.Errorf("cannot apply migration %s to ClickHouse database %q (statement %d: %.80q): %w",
					m.Name, database, i+1, stmt, err)
			}
		}
		if err := recordMigration(ctx, conn, database, m.Name); err != nil {
			return err
		}
		slog.Info("applied ClickHouse migration", "database", database, "migration", m.Name)
	}
	return nil
}

// recordMigration adds name to schema_migrations. Like every INSERT it goes
// as a data block: over the native protocol, ClickHouse 18.16 does not read
// a VALUES clause from the query text and waits for data forever.
func recordMigration(ctx context.Context, conn driver.Conn, database, name string) error {
	batch, err := conn.PrepareBatch(ctx, "INSERT INTO "+database+".schema_migrations (name, applied_at)")
	if err == nil {
		err = batch.Append(name, time.Now())
	}
	if err == nil {
		err = batch.Send()
	}
	if err != nil {
		return fmt.Errorf("cannot record migration %s in %s.schema_migrations: %w", name, database, err)
	}
	return nil
}

// appliedMigrations returns the names schema_migrations lists.
func appliedMigrations(ctx context.Context, conn driver.Conn, database string) (map[string]bool, error) {
	rows, err := conn.Query(ctx, "SELECT DISTINCT name FROM "+database+".schema_migrations")
	if err != nil {
		return nil, fmt.Errorf("cannot read %s.schema_migrations: %w", database, err)
	}
	defer rows.Close()
	applied := make(map[string]bool)
	for rows.Next() {
		var name string
		if err := rows.Scan(&name); err != nil {
			return nil, fmt.Errorf("cannot read %s.schema_migrations: %w", database, err)
		}
		applied[name] = true
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("cannot read %s.schema_migrations: %w", database, err)
	}
	return applied, nil
}
