package warehouse

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"
	"github.com/shopspring/decimal"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/ops"
	"github.com/trackstar/trackstar/schemas"
)

// LoaderConfig configures RunLoader. The zero value of every field but
// Brokers is a working default.
type LoaderConfig struct {
	// Brokers are the Kafka bootstrap addresses. Required.
	Brokers []string

	// ClickHouse is the server's native-protocol address. Default
	// "127.0.0.1:9000".
	ClickHouse string

	// Database holds the tables Migrate created. Default "trackstar".
	Database string

	// Group is the Kafka consumer group. Every loader of a deployment joins
	// it, and no other role does. Default "trackstar-loader".
	Group string

	// MaxRows caps the records in one batch, which is one INSERT per
	// table. Default 50000.
	MaxRows int

	// MaxBytes caps the Kafka record bytes in one batch. Default 16 MiB.
	MaxBytes int

	// FlushInterval is how long a batch that has not filled up collects
	// records before it is inserted. Default 1s.
	FlushInterval time.Duration

	// MaxRetryWait caps the wait between attempts at a batch that failed
	// (the wait doubles from 100ms). Default 5s.
	MaxRetryWait time.Duration

	// ShutdownTimeout bounds how long RunLoader keeps trying to insert and
	// commit what it holds once its context ends; what it cannot is loaded
	// again at the next start. Default 10s.
	ShutdownTimeout time.Duration

	// Registry gets the trackstar_loader_* metrics. Default: a registry of
	// its own.
	Registry *prometheus.Registry

	// Health gets the readiness check "loader", failing while ClickHouse
	// is unreachable or refuses inserts. Default: no check.
	Health *ops.Health

	// Logger defaults to slog.Default() with role=loader.
	Logger *slog.Logger
}

// Loader defaults.
const (
	DefaultLoaderGroup    = "trackstar-loader"
	defaultClickHouseAddr = "127.0.0.1:9000"
	defaultMaxRows        = 50_000
	defaultMaxBytes       = 16 << 20
	defaultFlushInterval  = time.Second
)

const (
	// attemptTimeout bounds one attempt at inserting, dead-lettering and
	// committing a batch.
	attemptTimeout = time.Minute
	// monitorInterval is how often the loader pings ClickHouse and
	// measures its consumer lag.
	monitorInterval = 5 * time.Second
)

// loaderTable maps one topic onto one table.
type loaderTable struct {
	topic   string
	name    string   // table name in the database
	columns []string // the values row returns, in this order
	// row decodes a record into the values of its table row. An error
	// means the record can never be loaded: it goes to the dead-letter
	// topic.
	row func(value []byte) ([]any, error)
}

// loaderTables are the topics the loader consumes and the tables they
// fill. Every INSERT names its columns (ClickHouse 18.16 requires it).
var loaderTables = []*loaderTable{
	{
		topic: bus.TopicClicks,
		name:  "clicks",
		columns: []string{"click_id", "ts", "offer_id", "advertiser_id", "aff_id", "source",
			"sub1", "sub2", "sub3", "sub4", "sub5", "ip", "user_agent", "referer"},
		row: clickRow,
	},
	{
		topic: bus.TopicConversions,
		name:  "conversions",
		columns: []string{"conversion_id", "version", "postback_event_id", "click_id", "ts", "click_ts",
			"offer_id", "advertiser_id", "aff_id", "goal", "status", "reject_reason", "txn_id",
			"sale_amount", "revenue", "payout", "currency", "ctit_seconds", "source",
			"sub1", "sub2", "sub3", "sub4", "sub5"},
		row: conversionRow,
	},
	{
		topic: bus.TopicDeliveries,
		name:  "postback_deliveries",
		columns: []string{"conversion_id", "version", "status", "aff_id", "attempt", "ts",
			"method", "url", "status_code", "duration_ms", "outcome", "error"},
		row: deliveryRow,
	},
}

func (t *loaderTable) insertStatement(database string) string {
	return "INSERT INTO " + database + "." + t.name + " (" + strings.Join(t.columns, ", ") + ")"
}

func clickRow(value []byte) ([]any, error) {
	c, err := schemas.DecodeClick(value)
	if err != nil {
		return nil, err
	}
	if c.ClickID == "" {
		return nil, errors.New("click event without click_id")
	}
	ts, err := dateTime("ts", c.TS)
	if err != nil {
		return nil, err
	}
	return []any{c.ClickID, ts, c.OfferID, c.AdvertiserID, c.AffID, c.Source,
		c.Sub1, c.Sub2, c.Sub3, c.Sub4, c.Sub5, c.IP, c.UserAgent, c.Referer}, nil
}

func conversionRow(value []byte) ([]any, error) {
	c, err := schemas.DecodeConversion(value)
	if err != nil {
		return nil, err
	}
	if c.ConversionID == "" {
		return nil, errors.New("conversion event without conversion_id")
	}
	ts, err := dateTime("ts", c.TS)
	if err != nil {
		return nil, err
	}
	clickTS, err := dateTime("click_ts", c.ClickTS)
	if err != nil {
		return nil, err
	}
	var money [3]decimal.Decimal
	for i, a := range []struct {
		name string
		v    schemas.Amount
	}{{"sale_amount", c.SaleAmount}, {"revenue", c.Revenue}, {"payout", c.Payout}} {
		if money[i], err = decimal18x4(a.name, a.v); err != nil {
			return nil, err
		}
	}
	return []any{c.ConversionID, c.Version, c.PostbackEventID, c.ClickID, ts, clickTS,
		c.OfferID, c.AdvertiserID, c.AffID, c.Goal, c.Status, c.RejectReason, c.TxnID,
		money[0], money[1], money[2], c.Currency, c.CTITSeconds, c.Source,
		c.Sub1, c.Sub2, c.Sub3, c.Sub4, c.Sub5}, nil
}

func deliveryRow(value []byte) ([]any, error) {
	d, err := schemas.DecodeDelivery(value)
	if err != nil {
		return nil, err
	}
	if d.ConversionID == "" {
		return nil, errors.New("delivery event without conversion_id")
	}
	ts, err := dateTime("ts", d.TS)
	if err != nil {
		return nil, err
	}
	return []any{d.ConversionID, d.Version, d.Status, d.AffID, d.Attempt, ts,
		d.Method, d.URL, d.StatusCode, d.DurationMS, d.Outcome, d.Error}, nil
}

// dateTime converts Unix milliseconds to a DateTime value (whole seconds).
// A time DateTime cannot hold is an error rather than a silently wrapped
// value, so that such a record is dead-lettered instead of mangled.
func dateTime(field string, ms int64) (time.Time, error) {
	if ms < 0 || ms/1000 > math.MaxUint32 {
		return time.Time{}, fmt.Errorf("%s %d is outside the range of a ClickHouse DateTime", field, ms)
	}
	return time.Unix(ms/1000, 0), nil
}

// decimal18x4 converts an Amount to a Decimal(18, 4) value, refusing what
// the column cannot hold: an Amount has up to 19 digits. The edge and the
// config refuse amounts over schemas.MaxAmount, so this only catches a
// record that came from elsewhere.
func decimal18x4(field string, a schemas.Amount) (decimal.Decimal, error) {
	if a > schemas.MaxAmount || a < -schemas.MaxAmount {
		return decimal.Decimal{}, fmt.Errorf("%s %s does not fit a Decimal(18, 4)", field, a)
	}
	return decimal.New(a.Units(), -schemas.AmountScale), nil
}

// sendRows inserts rows into table t of database in one INSERT.
func sendRows(ctx context.Context, conn driver.Conn, database string, t *loaderTable, rows [][]any) error {
	b, err := conn.PrepareBatch(ctx, t.insertStatement(database))
	if err != nil {
		return fmt.Errorf("cannot prepare insert into %s.%s: %w", database, t.name, err)
	}
	defer b.Close()
	for _, r := range rows {
		if err := b.Append(r...); err != nil {
			return fmt.Errorf("cannot add a row to the insert into %s.%s: %w", database, t.name, err)
		}
	}
	if err := b.Send(); err != nil {
		return fmt.Errorf("cannot insert %d rows into %s.%s: %w", len(rows), database, t.name, err)
	}
	return nil
}

// DeadLetter is the JSON value of a record the loader writes to
// trackstar.dlq: a record it could not decode, where it came from and why.
// Its Kafka key is the original record's key.
type DeadLetter = schemas.DeadLetter

// record is a fetched Kafka record, decoded.
type record struct {
	table      int // index into loaderTables
	partition  int
	offset     int64
	size       int
	row        []any         // nil when the record is dead-lettered
	deadLetter kafka.Message // the trackstar.dlq record, when row is nil
}

type topicPartition struct {
	topic     string
	partition int
}

// batch is the records of one table collected for one INSERT. Once handed
// to its table's flusher it never changes: a failed insert is retried with
// exactly the same rows, so that a retry after an insert that did land (but
// whose answer was lost) repeats the same block, which the sorting keys of
// the ReplacingMergeTree tables collapse.
type batch struct {
	rows        [][]any
	deadLetters []kafka.Message
	size        int                      // Kafka value bytes
	next        map[topicPartition]int64 // per partition, the offset after the last record
	started     time.Time                // when the first record came

	// Flushing progress, so that a retry redoes only what failed.
	inserted, deadLettered bool
	shrunk                 bool // deadLetters lost their values (bus.ShrinkDeadLetter)
}

func (b *batch) records() int { return len(b.rows) + len(b.deadLetters) }

func (b *batch) add(topic string, r record) {
	if b.records() == 0 {
		b.started = time.Now()
		b.next = make(map[topicPartition]int64)
	}
	if r.row != nil {
		b.rows = append(b.rows, r.row)
	} else {
		b.deadLetters = append(b.deadLetters, r.deadLetter)
	}
	b.size += r.size
	// After a rebalance a partition may be read again from an earlier
	// committed offset; the highest offset still marks everything before
	// it as loaded, by this batch or an earlier one.
	tp := topicPartition{topic, r.partition}
	b.next[tp] = max(b.next[tp], r.offset+1)
}

// commits returns, per partition, the last record of the batch, which is
// what kafka-go's CommitMessages wants. Every record of a partition goes
// through the batches of its table in fetch order and the batches of a
// table are flushed one after another, so once this batch is flushed every
// record of the partition before these offsets is loaded too.
func (b *batch) commits(topic string) []kafka.Message {
	msgs := make([]kafka.Message, 0, len(b.next))
	for tp, next := range b.next {
		msgs = append(msgs, kafka.Message{Topic: topic, Partition: tp.partition, Offset: next - 1})
	}
	sort.Slice(msgs, func(i, j int) bool { return msgs[i].Partition < msgs[j].Partition })
	return msgs
}

type loaderMetrics struct {
	rowsInserted  *prometheus.CounterVec
	insertErrors  *prometheus.CounterVec
	insertSeconds *prometheus.HistogramVec
	deadLetters   *prometheus.CounterVec
	commitErrors  prometheus.Counter
	buffered      *prometheus.GaugeVec
	lag           *prometheus.GaugeVec
}

func newLoaderMetrics(reg *prometheus.Registry) *loaderMetrics {
	m := &loaderMetrics{
		rowsInserted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trackstar_loader_rows_inserted_total",
			Help: "Rows inserted into ClickHouse, by table.",
		}, []string{"table"}),
		insertErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trackstar_loader_insert_errors_total",
			Help: "Failed attempts at inserting a batch into ClickHouse, by table.",
		}, []string{"table"}),
		insertSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "trackstar_loader_insert_seconds",
			Help:    "Time a successful batch INSERT took, by table.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 12),
		}, []string{"table"}),
		deadLetters: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trackstar_loader_dead_letters_total",
			Help: "Records that could not be decoded and went to the dead-letter topic, by source topic.",
		}, []string{"topic"}),
		commitErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "trackstar_loader_commit_errors_total",
			Help: "Failed attempts at committing Kafka offsets after an insert.",
		}),
		buffered: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "trackstar_loader_buffered_rows",
			Help: "Records consumed but not inserted yet, by table.",
		}, []string{"table"}),
		lag: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "trackstar_loader_lag_records",
			Help: "Records in Kafka past the loader group's committed offsets, by topic.",
		}, []string{"topic"}),
	}
	m.rowsInserted = registerOrReuse(reg, m.rowsInserted)
	m.insertErrors = registerOrReuse(reg, m.insertErrors)
	m.insertSeconds = registerOrReuse(reg, m.insertSeconds)
	m.deadLetters = registerOrReuse(reg, m.deadLetters)
	m.commitErrors = registerOrReuse(reg, m.commitErrors)
	m.buffered = registerOrReuse(reg, m.buffered)
	m.lag = registerOrReuse(reg, m.lag)
	for _, t := range loaderTables {
		m.rowsInserted.WithLabelValues(t.name)
		m.insertErrors.WithLabelValues(t.name)
		m.buffered.WithLabelValues(t.name)
		m.deadLetters.WithLabelValues(t.topic)
	}
	return m
}

// registerOrReuse registers c, or returns the collector registered before
// under the same name: a loader restarted in the same process (tests, the
// all command) keeps counting on the same series.
func registerOrReuse[C prometheus.Collector](reg *prometheus.Registry, c C) C {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if prev, ok := are.ExistingCollector.(C); ok {
				return prev
			}
		}
		panic("BUG: cannot register loader metrics: " + err.Error())
	}
	return c
}

// loader is one RunLoader.
type loader struct {
	cfg    LoaderConfig
	log    *slog.Logger
	m      *loaderMetrics
	reader *kafka.Reader
	dlq    *kafka.Writer

	connMu   sync.Mutex
	conn     driver.Conn         // opened on first use, so that ClickHouse may come up after the loader
	settings clickhouse.Settings // of every insert (insertSettings)

	stateMu    sync.Mutex
	pingErr    error
	insertErrs map[string]error // by table
	// flushErrs holds, by table, why its batch's dead letters or offset
	// commit keep failing: its records stay unloaded behind it meanwhile.
	flushErrs map[string]error
}

// RunLoader consumes the clicks, conversions and deliveries topics in
// consumer group cfg.Group and inserts them into ClickHouse in batches,
// until ctx ends. It commits a record's offset only once its row is
// inserted (or, for a record it cannot decode, once it is on trackstar.dlq),
// so delivery is at least once; the ReplacingMergeTree tables and the
// report views, which read them with FINAL, make a row loaded twice count
// once.
//
// While ClickHouse is down the loader retries the batch of each table it
// handed over, with backoff, and reads on until the next batch of some
// table is full too; then it stops reading, so it never holds more than two
// batches per table. It catches up when ClickHouse returns. It returns
// nil once ctx ends and what it held is flushed or given up
// (cfg.ShutdownTimeout), or an error for a configuration it cannot run with.
func RunLoader(ctx context.Context, cfg LoaderConfig) error {
	if len(cfg.Brokers) == 0 {
		return errors.New("cannot start loader: no Kafka brokers given")
	}
	if cfg.ClickHouse == "" {
		cfg.ClickHouse = defaultClickHouseAddr
	}
	if cfg.Database == "" {
		cfg.Database = DefaultDatabase
	}
	if err := CheckDatabaseName(cfg.Database); err != nil {
		return fmt.Errorf("cannot start loader: %w", err)
	}
	if cfg.Group == "" {
		cfg.Group = DefaultLoaderGroup
	}
	if cfg.MaxRows <= 0 {
		cfg.MaxRows = defaultMaxRows
	}
	if cfg.MaxBytes <= 0 {
		cfg.MaxBytes = defaultMaxBytes
	}
	if cfg.FlushInterval <= 0 {
		cfg.FlushInterval = defaultFlushInterval
	}
	if cfg.MaxRetryWait <= 0 {
		cfg.MaxRetryWait = 5 * time.Second
	}
	if cfg.ShutdownTimeout <= 0 {
		cfg.ShutdownTimeout = 10 * time.Second
	}
	if cfg.Registry == nil {
		cfg.Registry = prometheus.NewRegistry()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default().With("role", "loader")
	}
	log := cfg.Logger

	l := &loader{
		cfg:        cfg,
		log:        log,
		m:          newLoaderMetrics(cfg.Registry),
		insertErrs: make(map[string]error),
		flushErrs:  make(map[string]error),
	}
	if cfg.Health != nil {
		cfg.Health.Register("loader", l.ready)
	}
	topics := make([]string, len(loaderTables))
	for i, t := range loaderTables {
		topics[i] = t.topic
	}
	l.reader = kafka.NewReader(kafka.ReaderConfig{
		Brokers:     cfg.Brokers,
		GroupID:     cfg.Group,
		GroupTopics: topics,
		// A new group loads everything the topics hold.
		StartOffset: kafka.FirstOffset,
		// Commits are synchronous: CommitMessages returns once the
		// broker has them.
		CommitInterval:        0,
		MinBytes:              bus.FetchMinBytes,
		MaxWait:               bus.FetchMaxWait,
		MaxBytes:              4 << 20,
		JoinGroupBackoff:      time.Second,
		WatchPartitionChanges: true,
		ErrorLogger: kafka.LoggerFunc(func(msg string, args ...any) {
			log.Warn("kafka reader: " + fmt.Sprintf(msg, args...))
		}),
	})
	l.dlq = bus.NewWriter(bus.WriterConfig{Brokers: cfg.Brokers, Topic: bus.TopicDLQ})
	log.Info("loader starting", "brokers", cfg.Brokers, "group", cfg.Group,
		"clickhouse", cfg.ClickHouse, "database", cfg.Database, "max_rows", cfg.MaxRows, "flush_interval", cfg.FlushInterval)

	l.run(ctx)

	if err := l.reader.Close(); err != nil {
		log.Warn("cannot close Kafka reader", "err", err)
	}
	if err := l.dlq.Close(); err != nil {
		log.Warn("cannot close dead-letter writer", "err", err)
	}
	l.connMu.Lock()
	if l.conn != nil {
		_ = l.conn.Close()
	}
	l.connMu.Unlock()
	log.Info("loader stopped")
	return nil
}

// tableState is the main loop's view of one table.
type tableState struct {
	t    *loaderTable
	open *batch // collecting records
	// held is a record that would take open past MaxBytes: it starts the
	// next batch once open is handed off.
	held *record
	busy bool        // its flusher holds a batch
	work chan *batch // to its flusher
}

// run is the loader's main loop: it adds fetched records to the open batch
// of their table and hands a batch to the table's flusher when it is full
// or old enough and the flusher is idle. While a table's batch is full and
// its flusher busy, it stops taking records (records of all tables come
// through one reader), which bounds what the loader holds.
func (l *loader) run(ctx context.Context) {
	// Flushers outlive ctx by the shutdown timeout, to insert and commit
	// what was consumed.
	flushCtx, cancelFlush := context.WithCancel(context.Background())
	defer cancelFlush()

	fetched := make(chan record)
	fetchDone := make(chan struct{})
	go func() {
		defer close(fetchDone)
		l.fetch(ctx, fetched)
	}()
	monitorDone := make(chan struct{})
	go func() {
		defer close(monitorDone)
		l.monitor(ctx)
	}()

	done := make(chan int, len(loaderTables)) // a flusher finished a batch of table i
	var flushers sync.WaitGroup
	states := make([]*tableState, len(loaderTables))
	for i, t := range loaderTables {
		st := &tableState{t: t, open: &batch{}, work: make(chan *batch, 1)}
		states[i] = st
		flushers.Add(1)
		go func() {
			defer flushers.Done()
			for b := range st.work {
				l.flush(flushCtx, t, b)
				done <- i
			}
		}()
	}
	// A record alone may exceed MaxBytes; it then has a batch to itself.
	full := func(st *tableState) bool {
		return st.held != nil || st.open.records() >= l.cfg.MaxRows || st.open.size >= l.cfg.MaxBytes
	}
	handOff := func(st *tableState) {
		st.busy = true
		st.work <- st.open
		st.open = &batch{}
		if st.held != nil {
			st.open.add(st.t.topic, *st.held)
			st.held = nil
		}
	}

	tick := time.NewTicker(max(l.cfg.FlushInterval/4, 5*time.Millisecond))
	defer tick.Stop()
	for ctx.Err() == nil {
		paused := false
		for _, st := range states {
			if st.open.records() == 0 {
				continue
			}
			ready := full(st) || time.Since(st.open.started) >= l.cfg.FlushInterval
			switch {
			case ready && !st.busy:
				handOff(st)
			case full(st):
				paused = true
			}
		}
		in := fetched
		if paused {
			in = nil
		}
		select {
		case <-ctx.Done():
		case r := <-in:
			st := states[r.table]
			if st.open.records() > 0 && st.open.size+r.size > l.cfg.MaxBytes {
				st.held = &r
			} else {
				st.open.add(st.t.topic, r)
			}
			if r.row != nil {
				l.m.buffered.WithLabelValues(st.t.name).Inc()
			}
		case i := <-done:
			states[i].busy = false
		case <-tick.C:
		}
	}

	// Shutting down: flush what was consumed, for at most ShutdownTimeout.
	giveUp := time.AfterFunc(l.cfg.ShutdownTimeout, cancelFlush)
	defer giveUp.Stop()
	for {
		pending := false
		for _, st := range states {
			if !st.busy && st.open.records() > 0 {
				handOff(st)
			}
			pending = pending || st.busy
		}
		if !pending {
			break
		}
		states[<-done].busy = false
	}
	for _, st := range states {
		close(st.work)
	}
	flushers.Wait()
	<-fetchDone
	<-monitorDone
}

// fetch reads records until ctx ends, decodes them and sends them to out.
func (l *loader) fetch(ctx context.Context, out chan<- record) {
	index := make(map[string]int, len(loaderTables))
	for i, t := range loaderTables {
		index[t.topic] = i
	}
	for {
		m, err := l.reader.FetchMessage(ctx)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, io.EOF) {
				return
			}
			l.log.Warn("cannot fetch from Kafka; retrying", "err", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
			}
			continue
		}
		i, ok := index[m.Topic]
		if !ok {
			panic(fmt.Sprintf("BUG: loader fetched a record of topic %s it does not consume", m.Topic))
		}
		r := record{table: i, partition: m.Partition, offset: m.Offset, size: len(m.Value)}
		if r.row, err = loaderTables[i].row(m.Value); err != nil {
			l.log.Warn("cannot decode record; sending it to the dead-letter topic",
				"topic", m.Topic, "partition", m.Partition, "offset", m.Offset, "err", err)
			r.deadLetter = bus.DeadLetter(m, err, time.Now())
		}
		select {
		case out <- r:
		case <-ctx.Done():
			return
		}
	}
}

// flush inserts, dead-letters and commits b, retrying with backoff until it
// succeeds or ctx ends.
func (l *loader) flush(ctx context.Context, t *loaderTable, b *batch) {
	defer l.m.buffered.WithLabelValues(t.name).Sub(float64(len(b.rows)))
	wait := 100 * time.Millisecond
	for {
		err := l.flushOnce(ctx, t, b)
		if ctx.Err() == nil && (b.inserted || len(b.rows) == 0) {
			// Past the insert (whose failures setInsertErr reports): the
			// dead letters or the commit.
			l.setFlushErr(t.name, err)
		}
		if err == nil {
			return
		}
		if ctx.Err() != nil {
			l.log.Warn("giving up on a batch at shutdown; its records are loaded again at the next start",
				"table", t.name, "records", b.records(), "err", err)
			return
		}
		l.log.Warn("cannot flush batch; retrying", "table", t.name, "records", b.records(), "retry_in", wait, "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
		wait = min(2*wait, l.cfg.MaxRetryWait)
	}
}

func (l *loader) flushOnce(ctx context.Context, t *loaderTable, b *batch) error {
	ctx, cancel := context.WithTimeout(ctx, attemptTimeout)
	defer cancel()
	if len(b.rows) > 0 && !b.inserted {
		start := time.Now()
		err := l.insertRows(ctx, t, b.rows)
		if err != nil {
			l.m.insertErrors.WithLabelValues(t.name).Inc()
			l.setInsertErr(t.name, err)
			l.checkClickHouse(ctx)
			return err
		}
		l.m.insertSeconds.WithLabelValues(t.name).Observe(time.Since(start).Seconds())
		l.m.rowsInserted.WithLabelValues(t.name).Add(float64(len(b.rows)))
		l.setInsertErr(t.name, nil)
		b.inserted = true
	}
	if len(b.deadLetters) > 0 && !b.deadLettered {
		if err := l.dlq.WriteMessages(ctx, b.deadLetters...); err != nil {
			if bus.TooLarge(err) && !b.shrunk {
				// A topic whose record size limit is below
				// bus.MaxDeadLetterBytes: send them without their values
				// rather than never.
				l.log.Warn("dead letters too large for Kafka; sending them without the records' values",
					"table", t.name, "records", len(b.deadLetters), "err", err)
				for i := range b.deadLetters {
					b.deadLetters[i] = bus.ShrinkDeadLetter(b.deadLetters[i])
				}
				b.shrunk = true
			}
			return fmt.Errorf("cannot write %d records to %s: %w", len(b.deadLetters), bus.TopicDLQ, err)
		}
		l.m.deadLetters.WithLabelValues(t.topic).Add(float64(len(b.deadLetters)))
		b.deadLettered = true
	}
	if err := l.reader.CommitMessages(ctx, b.commits(t.topic)...); err != nil {
		l.m.commitErrors.Inc()
		return fmt.Errorf("cannot commit offsets of %s: %w", t.topic, err)
	}
	return nil
}

func (l *loader) insertRows(ctx context.Context, t *loaderTable, rows [][]any) error {
	conn, err := l.clickHouse(ctx)
	if err != nil {
		return err
	}
	l.connMu.Lock()
	settings := l.settings
	l.connMu.Unlock()
	insertCtx := ctx
	if len(settings) > 0 {
		insertCtx = clickhouse.Context(ctx, clickhouse.WithSettings(settings))
	}
	err = sendRows(insertCtx, conn, l.cfg.Database, t, rows)
	if exc := (*clickhouse.Exception)(nil); errors.As(err, &exc) && (exc.Code == 115 || exc.Code == 252) {
		// UNKNOWN_SETTING, TOO_MANY_PARTS: the pool now reaches a server
		// without the setting, or with it where it had none (a server
		// downgraded or upgraded, or another behind the same address):
		// ask again, for the retry.
		if s, serr := insertSettings(ctx, conn); serr == nil {
			l.connMu.Lock()
			l.settings = s
			l.connMu.Unlock()
		}
	}
	return err
}

// insertSettings returns the settings of the loader's inserts into the
// server at conn. Current releases refuse an insert that touches more than
// 100 partitions (months) of a table unless max_partitions_per_insert_block
// lifts it, and a batch spanning years (a backfill of old events) would be
// retried forever; 18.16 has no such limit, and refuses settings it does
// not know.
func insertSettings(ctx context.Context, conn driver.Conn) (clickhouse.Settings, error) {
	var n uint64
	if err := conn.QueryRow(ctx, "SELECT count() FROM system.settings WHERE name = 'max_partitions_per_insert_block'").Scan(&n); err != nil {
		return nil, fmt.Errorf("cannot read the server's settings: %w", err)
	}
	if n == 0 {
		return nil, nil
	}
	return clickhouse.Settings{"max_partitions_per_insert_block": 0}, nil
}

// clickHouse returns the connection pool, opening it on first use. The
// pool redials by itself once it is open.
func (l *loader) clickHouse(ctx context.Context) (driver.Conn, error) {
	l.connMu.Lock()
	defer l.connMu.Unlock()
	if l.conn == nil {
		conn, err := Open(ctx, l.cfg.ClickHouse, l.cfg.Database)
		if err != nil {
			return nil, err
		}
		settings, err := insertSettings(ctx, conn)
		if err != nil {
			_ = conn.Close()
			return nil, err
		}
		l.conn, l.settings = conn, settings
	}
	return l.conn, nil
}

// checkClickHouse pings ClickHouse and records the outcome for readiness.
func (l *loader) checkClickHouse(ctx context.Context) {
	pingCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := l.clickHouse(pingCtx)
	if err == nil {
		err = conn.Ping(pingCtx)
	}
	if ctx.Err() != nil {
		return // shutting down, not an outage
	}
	l.stateMu.Lock()
	l.pingErr = err
	l.stateMu.Unlock()
}

func (l *loader) setInsertErr(table string, err error) {
	l.stateMu.Lock()
	l.insertErrs[table] = err
	if err == nil {
		l.pingErr = nil // an insert that landed says more than a ping
	}
	l.stateMu.Unlock()
}

func (l *loader) setFlushErr(table string, err error) {
	l.stateMu.Lock()
	l.flushErrs[table] = err
	l.stateMu.Unlock()
}

// ready is the loader's readiness check.
func (l *loader) ready() error {
	l.stateMu.Lock()
	defer l.stateMu.Unlock()
	if l.pingErr != nil {
		return fmt.Errorf("clickhouse unreachable: %w", l.pingErr)
	}
	for _, t := range loaderTables {
		if err := l.insertErrs[t.name]; err != nil {
			return fmt.Errorf("clickhouse inserts failing: %w", err)
		}
	}
	for _, t := range loaderTables {
		if err := l.flushErrs[t.name]; err != nil {
			return fmt.Errorf("a batch of %s is inserted but cannot be finished, so loading %s waits: %w", t.name, t.name, err)
		}
	}
	return nil
}

// monitor pings ClickHouse and measures the group's lag every
// monitorInterval until ctx ends.
func (l *loader) monitor(ctx context.Context) {
	client := &kafka.Client{Addr: kafka.TCP(l.cfg.Brokers...), Timeout: 10 * time.Second}
	tick := time.NewTicker(monitorInterval)
	defer tick.Stop()
	for {
		l.checkClickHouse(ctx)
		if err := l.measureLag(ctx, client); err != nil && ctx.Err() == nil {
			l.log.Debug("cannot measure consumer lag", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// measureLag sets the lag gauge of every topic: the records between the
// group's committed offset (the log start when it has none) and the end
// of each partition.
func (l *loader) measureLag(ctx context.Context, client *kafka.Client) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	topics := make([]string, len(loaderTables))
	for i, t := range loaderTables {
		topics[i] = t.topic
	}
	md, err := client.Metadata(ctx, &kafka.MetadataRequest{Topics: topics})
	if err != nil {
		return fmt.Errorf("cannot read topic metadata: %w", err)
	}
	parts := make(map[string][]int)
	first := make(map[string][]kafka.OffsetRequest)
	last := make(map[string][]kafka.OffsetRequest)
	for _, t := range md.Topics {
		if t.Error != nil {
			continue
		}
		for _, p := range t.Partitions {
			parts[t.Name] = append(parts[t.Name], p.ID)
			first[t.Name] = append(first[t.Name], kafka.FirstOffsetOf(p.ID))
			last[t.Name] = append(last[t.Name], kafka.LastOffsetOf(p.ID))
		}
	}
	committed, err := client.OffsetFetch(ctx, &kafka.OffsetFetchRequest{GroupID: l.cfg.Group, Topics: parts})
	if err != nil {
		return fmt.Errorf("cannot fetch committed offsets of group %s: %w", l.cfg.Group, err)
	}
	if committed.Error != nil {
		return fmt.Errorf("cannot fetch committed offsets of group %s: %w", l.cfg.Group, committed.Error)
	}
	starts, err := client.ListOffsets(ctx, &kafka.ListOffsetsRequest{Topics: first})
	if err != nil {
		return fmt.Errorf("cannot list first offsets: %w", err)
	}
	ends, err := client.ListOffsets(ctx, &kafka.ListOffsetsRequest{Topics: last})
	if err != nil {
		return fmt.Errorf("cannot list last offsets: %w", err)
	}
	for topic := range parts {
		pos := make(map[int]int64)
		for _, p := range starts.Topics[topic] {
			pos[p.Partition] = p.FirstOffset
		}
		for _, p := range committed.Topics[topic] {
			if p.Error == nil && p.CommittedOffset >= 0 {
				pos[p.Partition] = max(pos[p.Partition], p.CommittedOffset)
			}
		}
		var lag int64
		for _, p := range ends.Topics[topic] {
			if p.Error == nil && p.LastOffset > pos[p.Partition] {
				lag += p.LastOffset - pos[p.Partition]
			}
		}
		l.m.lag.WithLabelValues(topic).Set(float64(lag))
	}
	return nil
}
