package schemas

import (
	"embed"
	"fmt"
	"io/fs"
	"sort"
	"strings"
)

// The ClickHouse DDL lives in numbered files under sql/, applied in name
// order. A file, once released, is never edited: a change to the schema is
// a new file (ALTER TABLE ..., or DROP and CREATE of a view).
//
//go:embed sql/*.sql
var ddlFiles embed.FS

// DatabasePlaceholder stands for the database name in migration statements.
const DatabasePlaceholder = "{db}"

// Migration is one numbered DDL file.
type Migration struct {
	Name       string   // file name, such as "001_tables.sql"; migrations apply in Name order
	Statements []string // in file order, with DatabasePlaceholder for the database name
}

// For returns the statements with the database name in place of
// DatabasePlaceholder. The name is not quoted: callers pass a plain
// identifier.
func (m Migration) For(database string) []string {
	out := make([]string, len(m.Statements))
	for i, s := range m.Statements {
		out[i] = strings.ReplaceAll(s, DatabasePlaceholder, database)
	}
	return out
}

// Migrations returns the ClickHouse schema migrations in the order they apply.
func Migrations() []Migration {
	names, err := fs.Glob(ddlFiles, "sql/*.sql")
	if err != nil {
		panic("BUG: cannot list embedded DDL: " + err.Error())
	}
	sort.Strings(names)
	ms := make([]Migration, 0, len(names))
	for _, name := range names {
		b, err := ddlFiles.ReadFile(name)
		if err != nil {
			panic("BUG: cannot read embedded DDL: " + err.Error())
		}
		stmts, err := SplitStatements(string(b))
		if err != nil {
			panic(fmt.Sprintf("BUG: malformed embedded DDL %s: %s", name, err))
		}
		ms = append(ms, Migration{Name: strings.TrimPrefix(name, "sql/"), Statements: stmts})
	}
	return ms
}

// SplitStatements splits a DDL file into statements. A statement ends with
// ';' at the end of a line; lines holding only a "--" comment, and blank
// lines between statements, are dropped (a statement made of comments alone
// is an error in ClickHouse). Text after the last ';' is an error, so that
// a forgotten terminator does not silently glue two statements together.
func SplitStatements(text string) ([]string, error) {
	var stmts []string
	var cur []string
	for i, line := range strings.Split(text, "\n") {
		trimmed := strings.TrimSpace(line)
		if trimmed == "" && len(cur) == 0 || strings.HasPrefix(trimmed, "--") {
			continue
		}
		line = strings.TrimRight(line, " \t\r")
		if strings.HasSuffix(trimmed, ";") {
			cur = append(cur, strings.TrimSuffix(line, ";"))
			stmt := strings.TrimSpace(strings.Join(cur, "\n"))
			if stmt == "" {
				return nil, fmt.Errorf("line %d: empty statement", i+1)
			}
			stmts = append(stmts, stmt)
			cur = cur[:0]
			continue
		}
		cur = append(cur, line)
	}
	if rest := strings.TrimSpace(strings.Join(cur, "\n")); rest != "" {
		return nil, fmt.Errorf("statement without a terminating ';' at the end: %.60q", rest)
	}
	return stmts, nil
}
