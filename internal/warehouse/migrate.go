package warehouse

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
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
// Running it again applies nothing. Every statement is idempotent on its
// own (IF NOT EXISTS, or DROP then CREATE for views), so a migration cut
// short by a crash is simply applied again. Migrates run at once (several
// deploy jobs, several `trackstar all`) take turns: one holds the
// schema_migrations_lock table while the others wait for it, since one's
// DROP of a view could otherwise land between another's CREATEs.
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
	unlock, err := lockMigrations(ctx, conn, database)
	if err != nil {
		return err
	}
	defer unlock()
	if err := conn.Exec(ctx, migrationsTableSQL(database)); err != nil {
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

// The migration lock is a table: ClickHouse creates a table for one CREATE
// TABLE (without IF NOT EXISTS) only, and answers the others "already
// exists" (code 57).
const (
	migrationLockTable = "schema_migrations_lock"
	codeTableExists    = 57
	codeUnknownTable   = 60
	migrationLockPoll  = 250 * time.Millisecond
)

// migrationLockStale is the age past which a lock is taken to be left by a
// Migrate that died holding it (applying every migration takes seconds),
// and dropped. Two Migrates that find it stale at once may both go ahead,
// and one of them then fail on a view the other dropped: an error that
// running it again clears, and only ever after a crash. A variable for the
// tests.
var migrationLockStale = 10 * time.Minute

// lockMigrations waits until it holds database's migration lock, or ctx
// ends. unlock drops the lock, even once ctx has ended.
func lockMigrations(ctx context.Context, conn driver.Conn, database string) (unlock func(), err error) {
	table := database + "." + migrationLockTable
	var waitingSince time.Time
	for {
		err := conn.Exec(ctx, lockTableSQL(database))
		if err == nil {
			return func() {
				ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
				defer cancel()
				if err := conn.Exec(ctx, "DROP TABLE IF EXISTS "+table); err != nil {
					slog.Warn("cannot drop the migration lock; the next migrate waits until it is stale, or drop it by hand",
						"table", table, "stale_after", migrationLockStale, "err", err)
				}
			}, nil
		}
		if !isCode(err, codeTableExists) {
			return nil, fmt.Errorf("cannot create the migration lock %s: %w", table, err)
		}
		age, err := lockAge(ctx, conn, database)
		switch {
		case err != nil:
			return nil, err
		case age > migrationLockStale:
			slog.Warn("dropping a stale migration lock, left by a migrate that did not finish", "table", table, "age", age)
			if err := conn.Exec(ctx, "DROP TABLE IF EXISTS "+table); err != nil {
				return nil, fmt.Errorf("cannot drop the stale migration lock %s: %w", table, err)
			}
			continue
		case waitingSince.IsZero():
			waitingSince = time.Now()
			slog.Info("another migrate holds the migration lock; waiting for it", "table", table, "age", age,
				"stale_after", migrationLockStale)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("waited %s for the migration lock %s, held by another migrate: %w",
				time.Since(waitingSince).Round(time.Millisecond), table, ctx.Err())
		case <-time.After(migrationLockPoll):
		}
	}
}

// isCode reports whether err is a ClickHouse exception with that code.
func isCode(err error, code int32) bool {
	var ex *clickhouse.Exception
	return errors.As(err, &ex) && ex.Code == code
}

// lockAge returns how long ago the migration lock was created; 0 when it
// is gone. (ClickHouse 18.16 may answer "doesn't exist" for a table
// dropped while system.tables is read: gone too.)
func lockAge(ctx context.Context, conn driver.Conn, database string) (time.Duration, error) {
	var seconds int64
	err := conn.QueryRow(ctx, lockAgeSQL, database, migrationLockTable).Scan(&seconds)
	switch {
	case errors.Is(err, sql.ErrNoRows), isCode(err, codeUnknownTable):
		return 0, nil
	case err != nil:
		return 0, fmt.Errorf("cannot read the age of the migration lock %s.%s: %w", database, migrationLockTable, err)
	}
	return time.Duration(seconds) * time.Second, nil
}

// recordMigration adds name to schema_migrations. Like every INSERT it goes
// as a data block: over the native protocol, ClickHouse 18.16 does not read
// a VALUES clause from the query text and waits for data forever.
func recordMigration(ctx context.Context, conn driver.Conn, database, name string) error {
	batch, err := conn.PrepareBatch(ctx, recordMigrationSQL(database))
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
	rows, err := conn.Query(ctx, appliedMigrationsSQL(database))
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

// The statements of Migrate's bookkeeping, besides the migrations
// themselves; TestSQLTranscript runs them on other servers too.

func migrationsTableSQL(database string) string {
	return "CREATE TABLE IF NOT EXISTS " + database + ".schema_migrations" +
		" (name String, applied_at DateTime) ENGINE = ReplacingMergeTree ORDER BY name"
}

func lockTableSQL(database string) string {
	// Nothing is written to it; a table needs a column.
	return "CREATE TABLE " + database + "." + migrationLockTable + " (holder String) ENGINE = Memory"
}

// lockAgeSQL takes the database and the lock table's name.
const lockAgeSQL = "SELECT toInt64(now() - metadata_modification_time) FROM system.tables WHERE database = ? AND name = ?"

func recordMigrationSQL(database string) string {
	return "INSERT INTO " + database + ".schema_migrations (name, applied_at)"
}

func appliedMigrationsSQL(database string) string {
	return "SELECT DISTINCT name FROM " + database + ".schema_migrations"
}
