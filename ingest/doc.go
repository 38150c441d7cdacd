// Package ingest is the edge: the fasthttp server that networks point their
// click traffic and advertisers their postbacks at.
//
// GET /click (and the HasOffers-style /aff_c) mints a click ID, produces a
// schemas.Click to trackstar.clicks keyed by that ID, and redirects (302) to
// the offer URL with its macros filled in. GET or POST /postback (and
// /aff_lsr, /aff_goal) validates the advertiser's postback, resolves its
// token, produces a schemas.Postback to trackstar.postbacks and answers
// {"status":"accepted","event_id":"..."}.
//
// Neither answer is sent before the event is durable: acknowledged by every
// in-sync replica, or — when Kafka is unreachable or slower than
// Config.ProduceTimeout — synced to a local spool (Pebble, under
// DataDir/edge-spool). Once anything is spooled, every later event goes to
// the spool too, and a drainer produces the spool in order when Kafka is
// back; so an event answered before another was sent also reaches Kafka
// before it, and a kill -9 of the edge loses nothing it answered for.
// While the spool holds events, /readyz reports the edge degraded.
package ingest
