package schemas

import (
	"reflect"
	"strings"
	"testing"
)

func TestSplitStatements(t *testing.T) {
	f := func(text string, want []string) {
		t.Helper()
		got, err := SplitStatements(text)
		if err != nil {
			t.Fatalf("SplitStatements(%q): %v", text, err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("SplitStatements(%q)\n got %q\nwant %q", text, got, want)
		}
	}
	f("", nil)
	f("-- only a comment;\n\n", nil)
	f("SELECT 1;", []string{"SELECT 1"})
	f("SELECT 1;\nSELECT 2;\n", []string{"SELECT 1", "SELECT 2"})
	f("-- head\nCREATE TABLE t\n(\n    a String -- inline stays;x\n);  \n\n-- tail;\n",
		[]string{"CREATE TABLE t\n(\n    a String -- inline stays;x\n)"})
	f("SELECT 'a;b'\n  ,  2;\r\n", []string{"SELECT 'a;b'\n  ,  2"})

	bad := func(text string) {
		t.Helper()
		if got, err := SplitStatements(text); err == nil {
			t.Fatalf("SplitStatements(%q) = %q, want an error", text, got)
		}
	}
	bad("SELECT 1")
	bad("SELECT 1;\nSELECT 2\n-- forgot the terminator\n")
	bad("  ;\n")
}

func TestMigrations(t *testing.T) {
	ms := Migrations()
	if len(ms) < 2 {
		t.Fatalf("got %d migrations, want at least the tables and the views", len(ms))
	}
	for i, m := range ms {
		if i > 0 && ms[i-1].Name >= m.Name {
			t.Fatalf("migrations out of order: %s before %s", ms[i-1].Name, m.Name)
		}
		if len(m.Statements) == 0 {
			t.Fatalf("migration %s has no statements", m.Name)
		}
		for _, s := range m.For("somedb") {
			if !strings.Contains(s, "somedb.") || strings.Contains(s, DatabasePlaceholder) {
				t.Fatalf("migration %s: statement does not name the database through %s:\n%s", m.Name, DatabasePlaceholder, s)
			}
		}
	}
	if ms[0].Name != "001_tables.sql" {
		t.Fatalf("first migration is %s, want 001_tables.sql", ms[0].Name)
	}
}
