package attributor

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	clicks, postbacks                  prometheus.Counter
	invalidClicks, invalidPostbacks    prometheus.Counter
	replays, holds, rebuilds, restored prometheus.Counter
	conversions                        *prometheus.CounterVec
	heldPostbacks                      prometheus.Gauge
	lag                                *prometheus.GaugeVec
	storeBytes, partitions             prometheus.Gauge
	batchSeconds                       prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) *metrics {
	const ns, sub = "trackstar", "attributor"
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help})
	}
	gauge := func(name, help string) prometheus.Gauge {
		return prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help})
	}
	invalid := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "invalid_records_total",
		Help: "Records of the clicks and postbacks topics that could not be decoded, or lack an ID: skipped (postbacks dead-lettered to trackstar.dlq)."}, []string{"topic"})
	m := &metrics{
		clicks:           counter("clicks_total", "Clicks stored."),
		postbacks:        counter("postbacks_total", "Postbacks read (each is decided once, or re-emitted when seen again)."),
		invalidClicks:    invalid.WithLabelValues("clicks"),
		invalidPostbacks: invalid.WithLabelValues("postbacks"),
		replays:          counter("replays_total", "Postbacks seen again (same event ID) whose earlier conversion record was re-emitted."),
		holds:            counter("holds_total", "Postbacks held because their click had not been read yet."),
		rebuilds:         counter("rebuilds_total", "Partitions whose state was rebuilt from Kafka (gained without local state, or with stale state)."),
		restored:         counter("restored_conversions_total", "Conversion records read back from the conversions topic while rebuilding."),
		conversions: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "conversions_total",
			Help: "Conversion records decided, by status and reject reason."}, []string{"status", "reject_reason"}),
		heldPostbacks: gauge("held_postbacks", "Postbacks waiting for their click."),
		lag: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "lag_messages",
			Help: "Records not read yet, by topic and owned partition."}, []string{"topic", "partition"}),
		storeBytes: gauge("store_bytes", "Disk space used by the state store."),
		partitions: gauge("partitions", "Partition pairs this member owns."),
		batchSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "batch_seconds",
			Help: "Time to apply one batch of records and store it, Kafka writes excluded.", Buckets: prometheus.ExponentialBuckets(0.0001, 4, 9)}),
	}
	reg.MustRegister(m.clicks, m.postbacks, invalid, m.replays, m.holds, m.rebuilds, m.restored,
		m.conversions, m.heldPostbacks, m.lag, m.storeBytes, m.partitions, m.batchSeconds)
	return m
}

func (m *metrics) conversion(status, reason string) {
	m.conversions.WithLabelValues(status, reason).Inc()
}

func (m *metrics) setLag(topic string, partition int, lag int64) {
	m.lag.WithLabelValues(topic, strconv.Itoa(partition)).Set(float64(max(lag, 0)))
}
