// Package testenv gives tests the real services they need: an embedded
// Kafka-protocol broker in-process over TCP, and the ClickHouse server that
// scripts/test.sh starts. Tests that need ClickHouse fail, not skip, when it
// is required (CI) and unreachable.
package testenv
