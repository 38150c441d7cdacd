package dispatcher

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/schemas"
)

type metrics struct {
	conversions    *prometheus.CounterVec // consumed, by what became of them
	deliveries     *prometheus.CounterVec // attempts, by outcome
	latency        prometheus.Histogram   // attempt durations
	queueDepth     prometheus.Gauge       // conversions waiting in memory for a worker
	inflight       prometheus.Gauge       // requests in flight
	retriesPending prometheus.Gauge       // entries in the durable schedule
	deferred       *prometheus.CounterVec // sent to the schedule instead of a queue, by reason
	breakerState   *prometheus.GaugeVec   // per host: 0 closed, 1 open (paused), 2 half-open (probing)
	breakerTrips   *prometheus.CounterVec // per host: times paused
	refused        prometheus.Counter     // attempts refused by the SSRF guard
	commitErrors   prometheus.Counter     // offset commits that failed
	writeErrors    *prometheus.CounterVec // failed writes of delivery records and dead letters, by topic
	followed       prometheus.Counter     // records of trackstar.deliveries read by followDeliveries
}

func newMetrics(reg *prometheus.Registry) *metrics {
	m := &metrics{
		conversions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trackstar_dispatcher_conversions_total",
			Help: "Conversions consumed, by result: queued (to be delivered), not_wanted (the affiliate has no postback for its status or goal), duplicate (already handled), invalid (undecodable), dropped (a queued or scheduled delivery whose postback the config no longer wants), superseded (an older status not sent after a newer one).",
		}, []string{"result"}),
		deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trackstar_dispatcher_deliveries_total",
			Help: "Partner postback attempts, by outcome: delivered, retrying, failed, dead.",
		}, []string{"outcome"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "trackstar_dispatcher_delivery_seconds",
			Help:    "Duration of partner postback attempts, from the dial or send to the end of the response.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}),
		queueDepth: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "trackstar_dispatcher_queue_depth",
			Help: "Conversions waiting in memory for a delivery worker, all hosts together.",
		}),
		inflight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "trackstar_dispatcher_inflight_requests",
			Help: "Partner postback requests in flight.",
		}),
		retriesPending: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "trackstar_dispatcher_retries_pending",
			Help: "Deliveries waiting in the durable schedule: retries, and deliveries deferred by a full queue or a paused host.",
		}),
		deferred: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trackstar_dispatcher_deferred_total",
			Help: "Deliveries sent to the durable schedule instead of a host queue, by reason: queue_full, breaker_open.",
		}, []string{"reason"}),
		breakerState: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "trackstar_dispatcher_breaker_state",
			Help: "Circuit breaker of each partner host: 0 closed, 1 open (paused), 2 half-open (probing).",
		}, []string{"host"}),
		breakerTrips: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trackstar_dispatcher_breaker_trips_total",
			Help: "Times a partner host was paused by its circuit breaker.",
		}, []string{"host"}),
		refused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "trackstar_dispatcher_refused_total",
			Help: "Attempts refused by the SSRF guard: the partner host resolved to no public address.",
		}),
		commitErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "trackstar_dispatcher_commit_errors_total",
			Help: "Offset commits to the consumer group that failed.",
		}),
		writeErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trackstar_dispatcher_write_errors_total",
			Help: "Failed writes of delivery records and dead letters to Kafka (each is retried), by topic.",
		}, []string{"topic"}),
		followed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "trackstar_dispatcher_deliveries_followed_total",
			Help: "Records of trackstar.deliveries read to learn the status updates the group's members send (every member reads every partition; a restart reads on from where it stopped).",
		}),
	}
	// Every series with a known label set exists from the start, at 0, so
	// that a dashboard or an alert on a rate finds it before its first event.
	for _, r := range []string{"queued", "not_wanted", "duplicate", "invalid", "dropped", "superseded"} {
		m.conversions.WithLabelValues(r)
	}
	for _, o := range []string{schemas.OutcomeDelivered, schemas.OutcomeRetrying, schemas.OutcomeFailed, schemas.OutcomeDead} {
		m.deliveries.WithLabelValues(o)
	}
	for _, r := range []string{"queue_full", "breaker_open"} {
		m.deferred.WithLabelValues(r)
	}
	for _, t := range []string{bus.TopicDeliveries, bus.TopicDLQ} {
		m.writeErrors.WithLabelValues(t)
	}
	reg.MustRegister(m.conversions, m.deliveries, m.latency, m.queueDepth, m.inflight, m.retriesPending,
		m.deferred, m.breakerState, m.breakerTrips, m.refused, m.commitErrors, m.writeErrors, m.followed)
	return m
}
