package ingest

import (
	"fmt"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

type route uint8

const (
	routeClick route = iota
	routeAffC
	routePostback
	routeAffLsr
	routeAffGoal
	routeHealthz
	routeReadyz
	routeMetrics
	routeUnknown // a path the edge does not serve
	routeInvalid // a request fasthttp could not parse
	numRoutes
)

var routeNames = [numRoutes]string{"click", "aff_c", "postback", "aff_lsr", "aff_goal", "healthz", "readyz", "metrics", "unknown", "invalid"}

// knownCodes are the status codes the edge answers with; their counters
// are resolved once so that counting a request costs no label lookup.
var knownCodes = []int{200, 302, 400, 403, 404, 405, 408, 413, 415, 431, 500, 503}

func codeIndex(code int) int {
	for i, c := range knownCodes {
		if c == code {
			return i
		}
	}
	return -1
}

// The phases of an acked event's wait, from the handler's hand-over to the
// producer until the handler runs again with the ack.
const (
	phaseQueue  = iota // until the produce round carrying it goes out
	phaseKafka         // that round's request until its answer is back
	phaseWakeup        // the answer until the handler runs again
	numPhases
)

var phaseNames = [numPhases]string{"queue", "kafka", "wakeup"}

const (
	reasonTimeout = iota
	reasonError
	numReasons
)

type metrics struct {
	requests       *prometheus.CounterVec
	byCode         [numRoutes][]prometheus.Counter
	produceSeconds [numTopics][numResults]prometheus.Observer
	producePhase   [numPhases]prometheus.Observer
	kafkaErrors    [numTopics][numReasons]prometheus.Counter
	spooled        [numTopics]prometheus.Counter
	drained        [numTopics]prometheus.Counter
	spoolErrors    prometheus.Counter
	panics         prometheus.Counter
}

func newMetrics(reg *prometheus.Registry, sp *spool) (*metrics, error) {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trackstar_edge_requests_total",
			Help: "Requests answered by the edge, by route and status code.",
		}, []string{"route", "code"}),
		spoolErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "trackstar_edge_spool_errors_total",
			Help: "Events neither Kafka nor the spool could take (answered 503).",
		}),
		panics: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "trackstar_edge_panics_total",
			Help: "Handler panics recovered (answered 500). Any is a bug.",
		}),
	}
	produce := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "trackstar_edge_produce_seconds",
		Help:    "Time from handing an event to the producer until it is durable, by topic and result (acked by Kafka, spooled, failed).",
		Buckets: []float64{.0005, .001, .002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
	}, []string{"topic", "result"})
	// Where an acked event's produce time went: a high p99 in "kafka" is
	// the brokers (or the network to them); in "queue" and "wakeup" it is
	// the edge's own process waiting for CPU.
	phase := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "trackstar_edge_produce_phase_seconds",
		Help: "Phases of trackstar_edge_produce_seconds{result=\"acked\"}: queue (waiting for the produce round that carried the event), " +
			"kafka (that round's request until the brokers' answer), wakeup (the answer until the request's handler runs again).",
		Buckets: []float64{.0005, .001, .002, .005, .01, .025, .05, .1, .25, .5, 1},
	}, []string{"phase"})
	for ph := range numPhases {
		m.producePhase[ph] = phase.WithLabelValues(phaseNames[ph])
	}
	kafkaErrors := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "trackstar_edge_kafka_errors_total",
		Help: "Events Kafka did not ack in time (timeout) or refused (error); each went to the spool.",
	}, []string{"topic", "reason"})
	spooled := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "trackstar_edge_spooled_total",
		Help: "Events written to the spool.",
	}, []string{"topic"})
	drained := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "trackstar_edge_spool_drained_total",
		Help: "Spooled events produced to Kafka and deleted from the spool.",
	}, []string{"topic"})
	for r := range numRoutes {
		m.byCode[r] = make([]prometheus.Counter, len(knownCodes))
		for i, c := range knownCodes {
			m.byCode[r][i] = m.requests.WithLabelValues(routeNames[r], strconv.Itoa(c))
		}
	}
	resultNames := [numResults]string{"acked", "spooled", "failed"}
	for t := range numTopics {
		for r := range numResults {
			m.produceSeconds[t][r] = produce.WithLabelValues(topicNames[t], resultNames[r])
		}
		m.kafkaErrors[t][reasonTimeout] = kafkaErrors.WithLabelValues(topicNames[t], "timeout")
		m.kafkaErrors[t][reasonError] = kafkaErrors.WithLabelValues(topicNames[t], "error")
		m.spooled[t] = spooled.WithLabelValues(topicNames[t])
		m.drained[t] = drained.WithLabelValues(topicNames[t])
	}
	gauges := []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "trackstar_edge_spool_events",
			Help: "Events in the spool waiting for Kafka.",
		}, func() float64 { return float64(sp.count.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "trackstar_edge_spool_bytes",
			Help: "Approximate size of the events in the spool.",
		}, func() float64 { return float64(sp.bytes.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "trackstar_edge_spool_oldest_age_seconds",
			Help: "How long the oldest spooled event has waited for Kafka; 0 when the spool is empty.",
		}, func() float64 { return sp.ageSeconds(time.Now()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "trackstar_edge_spool_active",
			Help: "1 while new events go to the spool instead of Kafka.",
		}, func() float64 {
			if sp.active.Load() {
				return 1
			}
			return 0
		}),
	}
	for _, c := range append([]prometheus.Collector{m.requests, m.spoolErrors, m.panics, produce, phase, kafkaErrors, spooled, drained}, gauges...) {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("cannot register edge metrics: %w", err)
		}
	}
	return m, nil
}

func (m *metrics) count(r route, code int) {
	if i := codeIndex(code); i >= 0 {
		m.byCode[r][i].Inc()
		return
	}
	m.requests.WithLabelValues(routeNames[r], strconv.Itoa(code)).Inc()
}
