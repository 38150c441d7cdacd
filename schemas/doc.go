// Package schemas holds Trackstar's event contracts: the Go types of the four
// events that travel on Kafka (click, postback, conversion, delivery), their
// versioned JSON codec, and the ClickHouse DDL that lands them.
//
// Every event is a JSON object whose field "v" is the schema version. A
// decoder refuses a version it does not know instead of returning a zero
// value, so a producer that moves ahead of a consumer is seen, not ignored.
// Money is an Amount, encoded as a decimal string.
package schemas
