// Package catalog is Trackstar's configuration: the advertisers, offers,
// affiliates and delivery settings of the YAML config file, validated
// strictly at load and held for lock-free reads by every role.
//
// A file is either loaded whole or refused: unknown keys, duplicate IDs,
// dangling references, unknown macros, malformed URLs, durations, amounts
// and CIDRs are all reported at once, each naming the file, the line and
// the field path (`trackstar.yaml:14: offers[0].goals[1].revenue: unknown
// key "fixd"`), so a user fixes the file in one pass.
//
// URL templates are compiled once at load into literal and macro parts;
// rendering them (Template.Append) does not allocate, because it runs on
// every click.
//
// A Holder keeps the current Catalog and swaps it atomically on SIGHUP; a
// file that fails to load leaves the previous Catalog in place.
package catalog
