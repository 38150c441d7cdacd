package main

import (
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// composeFile is the part of docker-compose.yml this test reads.
type composeFile struct {
	Services map[string]struct {
		Image       string         `yaml:"image"`
		Build       any            `yaml:"build"`
		Command     []string       `yaml:"command"`
		Environment map[string]any `yaml:"environment"`
		DependsOn   map[string]any `yaml:"depends_on"`
	} `yaml:"services"`
}

var commands = []string{"all", "edge", "attributor", "dispatcher", "loader", "migrate", "report", "loadgen"}

// checkCompose returns one error line per command or TRACKSTAR_* variable
// of a trackstar service that the binary would refuse.
func checkCompose(data []byte) ([]string, error) {
	var cf composeFile
	if err := yaml.Unmarshal(data, &cf); err != nil {
		return nil, fmt.Errorf("cannot parse compose file: %w", err)
	}
	var problems []string
	names := make([]string, 0, len(cf.Services))
	for n := range cf.Services {
		names = append(names, n)
	}
	sort.Strings(names)
	checked := 0
	for _, name := range names {
		svc := cf.Services[name]
		if !strings.HasPrefix(svc.Image, "trackstar") && svc.Build == nil {
			continue // kafka, clickhouse
		}
		checked++
		if len(svc.Command) == 0 {
			problems = append(problems, name+": no command (the image's default only prints help)")
			continue
		}
		cmd := svc.Command[0]
		known := false
		for _, c := range commands {
			known = known || c == cmd
		}
		if !known {
			problems = append(problems, fmt.Sprintf("%s: unknown command %q", name, cmd))
			continue
		}
		var o options
		fs := newFlagSet(cmd, &o)
		fs.SetOutput(new(strings.Builder))
		if err := fs.Parse(svc.Command[1:]); err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", name, err))
		} else if fs.NArg() > 0 {
			problems = append(problems, fmt.Sprintf("%s: stray argument %q", name, fs.Arg(0)))
		}
		envFlags := map[string]string{}
		fs.VisitAll(func(f *flag.Flag) { envFlags[envName(f.Name)] = f.Name })
		for k, v := range svc.Environment {
			if !strings.HasPrefix(k, "TRACKSTAR_") {
				continue
			}
			flagName, ok := envFlags[k]
			if !ok {
				problems = append(problems, fmt.Sprintf("%s: %s matches no flag of 'trackstar %s'", name, k, cmd))
				continue
			}
			if err := fs.Set(flagName, fmt.Sprint(v)); err != nil {
				problems = append(problems, fmt.Sprintf("%s: %s=%v: %v", name, k, v, err))
			}
		}
	}
	if checked == 0 {
		return nil, fmt.Errorf("no trackstar services found")
	}
	return problems, nil
}

func TestComposeMatchesBinaryFlags(t *testing.T) {
	data, err := os.ReadFile("../../docker-compose.yml")
	if err != nil {
		t.Fatal(err)
	}
	problems, err := checkCompose(data)
	if err != nil {
		t.Fatal(err)
	}
	if len(problems) > 0 {
		t.Fatalf("docker-compose.yml does not match the binary:\n%s", strings.Join(problems, "\n"))
	}
	for _, role := range []string{"edge1", "edge2", "attributor1", "attributor2", "dispatcher", "loader", "migrate"} {
		if !strings.Contains(string(data), "\n  "+role+":\n") {
			t.Fatalf("docker-compose.yml has no service %s", role)
		}
	}

	// Every role waits for Kafka; only the loader waits for the schema, so
	// that a ClickHouse outage does not keep edges from starting.
	var cf composeFile
	if err := yaml.Unmarshal(data, &cf); err != nil {
		t.Fatal(err)
	}
	for _, role := range []string{"edge1", "edge2", "attributor1", "attributor2", "dispatcher", "loader"} {
		deps := cf.Services[role].DependsOn
		if _, ok := deps["kafka"]; !ok {
			t.Errorf("%s does not wait for kafka: depends_on %v", role, deps)
		}
		if _, ok := deps["migrate"]; ok != (role == "loader") {
			t.Errorf("%s: depends on migrate = %v, want %v (only the loader needs the schema)", role, ok, role == "loader")
		}
	}
}

func TestComposeCheckCatchesBadFlags(t *testing.T) {
	f := func(compose, want string) {
		t.Helper()
		problems, err := checkCompose([]byte(compose))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(strings.Join(problems, "\n"), want) {
			t.Fatalf("problems %q, want one containing %q", problems, want)
		}
	}
	f("services:\n  e:\n    image: trackstar:latest\n    command: [edge, --no-such-flag, x]\n", "flag provided but not defined: -no-such-flag")
	f("services:\n  e:\n    image: trackstar:latest\n    command: [edgy]\n", `unknown command "edgy"`)
	f("services:\n  e:\n    image: trackstar:latest\n    command: [edge]\n    environment:\n      TRACKSTAR_BROKER: k:9092\n", "TRACKSTAR_BROKER matches no flag")
	f("services:\n  e:\n    image: trackstar:latest\n    command: [attributor]\n    environment:\n      TRACKSTAR_GRACE: soon\n", "TRACKSTAR_GRACE=soon")
	f("services:\n  e:\n    build: .\n    command: [loader]\n    environment: {TRACKSTAR_PARTITIONS: many}\n", "TRACKSTAR_PARTITIONS=many")
}
