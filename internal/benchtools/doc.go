// Package benchtools holds the programs scripts/bench.sh measures Trackstar
// against. They are baselines, not parts of Trackstar.
package benchtools
