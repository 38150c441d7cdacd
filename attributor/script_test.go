package attributor

import (
	"crypto/sha256"
	"encoding/binary"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/schemas"
)

// The data-driven tests read scripts of blocks like
//
//	# what the block shows
//	click c1 offer=1 at=0s sub1=x
//	postback p1 click=c1 at=1h goal=sale amount=19.99 txn=o-1
//	----
//	p1 v1 approved pb=p1 click=c1 offer=1 aff=7 goal=sale txn=o-1 sale=19.99 revenue=1.999 payout=1.3993 currency=USD ctit=3600
//
// Input lines above "----", the expected output below it, up to a blank
// line. Every block starts from empty state. Names stand for IDs: a click
// named c1 gets an ID minted at its time, a postback named p1 an event ID
// minted at its time, so conversions print with the names of the
// postbacks their IDs come from. Times ("at=") are offsets from scriptT0.
//
// Commands:
//
//	click NAME offer=N [adv=N] [aff=N] [at=DUR] [source=S] [sub1=S]
//	    adv defaults to the offer's advertiser, aff to 7.
//	postback NAME click=NAME [clickat=DUR] [adv=N] [at=DUR] [goal=G] [amount=A]
//	    [currency=C] [txn=T] [status=S] [upper] [spooled]
//	    A click name never clicked in the block gets an ID minted at
//	    clickat (default: the postback's time). adv defaults to the
//	    click's advertiser, else 1. upper sends the click ID in upper case;
//	    spooled marks the postback as an edge's spool does.
//
// partition.txt runs the blocks through a partition over a real (in
// memory) Pebble store, and also knows:
//
//	replay NAME              the same postback record read again
//	tick at=DUR [caught-up]  the clock moves; caught-up: nothing left in the clicks partition
//	expire at=DUR            expiry runs at that time, postbacks caught up
//	restart                  the store is closed and opened again
//	rebuild                  the partition moves: a new store gets the clicks and
//	                         the conversions emitted so far, as a rebuild reads them
//
// and prints "held NAME" when a postback waits for its click.
//
// go test -run TestScripts -rewrite rewrites the expected outputs.

var rewrite = flag.Bool("rewrite", false, "rewrite the expected output of the data-driven scripts")

var scriptT0 = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)

const scriptGrace = 2 * time.Minute

// makeID returns the ID a name gets when minted at t: the time and 80 bits
// from the name's hash, so that scripts are deterministic.
func makeID(t time.Time, name string) string {
	var raw [16]byte
	ms := uint64(t.UnixMilli())
	binary.BigEndian.PutUint16(raw[0:2], uint16(ms>>32))
	binary.BigEndian.PutUint32(raw[2:6], uint32(ms))
	h := sha256.Sum256([]byte(name))
	copy(raw[6:], h[:10])
	const alphabet = "0123456789abcdefghjkmnpqrstvwxyz"
	hi, lo := binary.BigEndian.Uint64(raw[0:8]), binary.BigEndian.Uint64(raw[8:16])
	var out [schemas.IDLen]byte
	for i := schemas.IDLen - 1; i >= 0; i-- {
		out[i] = alphabet[lo&31]
		lo = lo>>5 | hi<<59
		hi >>= 5
	}
	return string(out[:])
}

func TestMakeID(t *testing.T) {
	at := scriptT0.Add(90 * time.Minute)
	id := makeID(at, "c1")
	if ms, err := schemas.IDTime(id); err != nil || ms != at.UnixMilli() {
		t.Fatalf("IDTime(%s) = %d, %v; want %d", id, ms, err, at.UnixMilli())
	}
	if id[:10] != minIDAt(at)[:10] || minIDAt(at) > id || minIDAt(at.Add(time.Millisecond)) <= id {
		t.Fatalf("minIDAt(%s) = %s does not bound %s", at, minIDAt(at), id)
	}
}

func loadTestCatalog(t testing.TB) *catalog.Catalog {
	t.Helper()
	c, err := catalog.Load("testdata/catalog.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestScripts(t *testing.T) {
	for _, mode := range []string{"decide", "partition"} {
		t.Run(mode, func(t *testing.T) { runScriptFile(t, "testdata/"+mode+".txt", mode) })
	}
}

type scriptBlock struct {
	line     int // of the first input line
	input    []string
	expected []string
	start    int // index into the file's lines where the expected output starts
	end      int // index after the expected output
}

func runScriptFile(t *testing.T, path, mode string) {
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	var blocks []scriptBlock
	for i := 0; i < len(lines); {
		if l := strings.TrimSpace(lines[i]); l == "" || strings.HasPrefix(l, "#") {
			i++
			continue
		}
		b := scriptBlock{line: i + 1}
		for ; i < len(lines) && lines[i] != "----"; i++ {
			if l := strings.TrimSpace(lines[i]); l != "" && !strings.HasPrefix(l, "#") {
				b.input = append(b.input, l)
			}
		}
		if i == len(lines) {
			t.Fatalf("%s:%d: block without ----", path, b.line)
		}
		i++
		b.start = i
		for ; i < len(lines) && strings.TrimSpace(lines[i]) != ""; i++ {
			b.expected = append(b.expected, lines[i])
		}
		b.end = i
		blocks = append(blocks, b)
	}

	cat := loadTestCatalog(t)
	var out []string
	prev := 0
	for _, b := range blocks {
		s := newScript(t, cat, mode, fmt.Sprintf("%s:%d", path, b.line))
		got := s.run(b.input)
		s.close()
		if *rewrite {
			out = append(out, lines[prev:b.start]...)
			out = append(out, got...)
			prev = b.end
			continue
		}
		if strings.Join(got, "\n") != strings.Join(b.expected, "\n") {
			t.Errorf("%s:%d:\n%s\n----\ngot:\n%s\nwant:\n%s", path, b.line, strings.Join(b.input, "\n"),
				strings.Join(got, "\n"), strings.Join(b.expected, "\n"))
		}
	}
	if *rewrite {
		out = append(out, lines[prev:]...)
		if err := os.WriteFile(path, []byte(strings.Join(out, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

type script struct {
	t     *testing.T
	where string
	cat   *catalog.Catalog
	mode  string
	ids   map[string]string // name -> ID
	names map[string]string // ID -> name
	out   []string

	offerOf  map[string]uint32 // click ID -> its offer, of every click of the block
	clickTS  map[string]int64  // click ID -> its time, of clicks seen
	postback map[string][]byte // name -> record, for replays
	pbTS     map[string]int64  // event ID -> time

	// decide mode
	clicks map[string]*schemas.Click
	slots  mapSlots

	// partition mode
	fs       vfs.FS
	db       *pebble.DB
	p        *partition
	now      time.Time
	caughtUp bool
	offsets  [2]int64
	clickLog [][]byte
	emitted  [][]byte
	registry *prometheus.Registry
}

type mapSlots map[SlotKey]Slot

func (m mapSlots) Slot(k SlotKey) (Slot, bool) {
	s, ok := m[k]
	return s, ok
}

func newScript(t *testing.T, cat *catalog.Catalog, mode, where string) *script {
	s := &script{t: t, where: where, cat: cat, mode: mode, ids: map[string]string{}, names: map[string]string{},
		offerOf: map[string]uint32{}, clickTS: map[string]int64{}, postback: map[string][]byte{}, pbTS: map[string]int64{},
		clicks: map[string]*schemas.Click{}, slots: mapSlots{}, now: scriptT0}
	if mode == "partition" {
		s.fs = vfs.NewMem()
		s.open()
	}
	return s
}

func (s *script) open() {
	db, err := openStore("store", StoreOptions{FS: s.fs, CacheSize: 1 << 20, MemTableSize: 1 << 20})
	if err != nil {
		s.t.Fatalf("%s: %v", s.where, err)
	}
	s.db = db
	s.registry = prometheus.NewRegistry()
	s.p = newPartition(db, 0, scriptGrace, newMetrics(s.registry))
	if _, err := s.p.load(); err != nil {
		s.t.Fatalf("%s: %v", s.where, err)
	}
}

func (s *script) close() {
	if s.db != nil {
		s.p.close()
		if err := s.db.Close(); err != nil {
			s.t.Fatalf("%s: %v", s.where, err)
		}
		s.db = nil
	}
}

func (s *script) fatalf(format string, args ...any) {
	s.t.Helper()
	s.t.Fatalf("%s: "+format, append([]any{s.where}, args...)...)
}

func (s *script) name(id string) string {
	if n, ok := s.names[normalizeID(id)]; ok {
		return n
	}
	return id
}

func (s *script) run(input []string) []string {
	// Clicks get their IDs first, so a postback may name a click that
	// comes after it.
	for _, line := range input {
		cmd, name, args := parseScriptLine(line)
		if cmd == "click" {
			s.setID(name, makeID(s.at(args), name))
			s.offerOf[s.ids[name]] = s.uintArg(args, "offer", 1)
		}
	}
	for _, line := range input {
		cmd, name, args := parseScriptLine(line)
		switch cmd {
		case "click":
			s.click(name, args)
		case "postback":
			s.postbackCmd(name, args)
		case "replay", "tick", "expire", "restart", "rebuild":
			if s.mode != "partition" {
				s.fatalf("%s: only in partition scripts", cmd)
			}
			s.partitionCmd(cmd, name, args)
		default:
			s.fatalf("unknown command %q", cmd)
		}
	}
	return s.out
}

func parseScriptLine(line string) (cmd, name string, args map[string]string) {
	f := strings.Fields(line)
	args = map[string]string{}
	cmd = f[0]
	for i, a := range f[1:] {
		k, v, ok := strings.Cut(a, "=")
		switch {
		case ok:
			args[k] = v
		case i == 0 && cmd != "tick":
			name = a
		default:
			args[a] = "true"
		}
	}
	return cmd, name, args
}

func (s *script) setID(name, id string) {
	s.ids[name] = id
	s.names[id] = name
}

func (s *script) at(args map[string]string) time.Time {
	return s.durArg(args, "at", scriptT0)
}

func (s *script) durArg(args map[string]string, key string, def time.Time) time.Time {
	v, ok := args[key]
	if !ok {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		s.fatalf("%s=%s: %v", key, v, err)
	}
	return scriptT0.Add(d)
}

func (s *script) uintArg(args map[string]string, key string, def uint32) uint32 {
	v, ok := args[key]
	if !ok {
		return def
	}
	n, err := strconv.ParseUint(v, 10, 32)
	if err != nil {
		s.fatalf("%s=%s: %v", key, v, err)
	}
	return uint32(n)
}

func (s *script) click(name string, args map[string]string) {
	at := s.at(args)
	offer := s.uintArg(args, "offer", 1)
	adv := uint32(0)
	if o := s.cat.Offer(offer); o != nil {
		adv = o.AdvertiserID
	}
	c := schemas.Click{V: schemas.Version, ClickID: s.ids[name], TS: at.UnixMilli(), OfferID: offer,
		AdvertiserID: s.uintArg(args, "adv", adv), AffID: s.uintArg(args, "aff", 7),
		Source: args["source"], Sub1: args["sub1"]}
	s.clickTS[c.ClickID] = c.TS
	value := c.AppendJSON(nil)
	if s.mode == "decide" {
		s.clicks[c.ClickID] = &c
		return
	}
	s.clickLog = append(s.clickLog, value)
	s.now = maxTime(s.now, at)
	s.batch(func(w *work) error {
		s.offsets[0]++
		if err := s.p.addClick(w, s.cat, s.offsets[0], value); err != nil {
			return err
		}
		s.p.clicksCaughtUp = s.caughtUp
		return s.p.resolveDue(w, s.cat, s.now)
	})
}

func (s *script) postbackCmd(name string, args map[string]string) {
	at := s.at(args)
	clickName := args["click"]
	clickID, ok := s.ids[clickName]
	if !ok {
		clickID = makeID(s.durArg(args, "clickat", at), clickName)
		s.setID(clickName, clickID)
	}
	adv := uint32(1)
	if o := s.cat.Offer(s.offerOf[clickID]); o != nil {
		adv = o.AdvertiserID
	}
	s.setID(name, makeID(at, name))
	pb := schemas.Postback{V: schemas.Version, EventID: s.ids[name], ClickID: clickID, TS: at.UnixMilli(), TSNanos: at.UnixNano(),
		AdvertiserID: s.uintArg(args, "adv", adv), Goal: args["goal"], Amount: args["amount"],
		Currency: args["currency"], TxnID: args["txn"], Status: args["status"], IP: "203.0.113.1"}
	if args["upper"] != "" {
		pb.ClickID = strings.ToUpper(pb.ClickID)
	}
	pb.Spooled = args["spooled"] != ""
	s.pbTS[pb.EventID] = pb.TS
	value := pb.AppendJSON(nil)
	s.postback[name] = value
	if s.mode == "decide" {
		d := Decide(s.cat, s.slots, s.clicks[pb.ClickID], &pb)
		for _, save := range d.Saves {
			s.slots[save.Key] = save.Slot
		}
		s.print(d.Conversion)
		return
	}
	s.now = maxTime(s.now, at)
	s.addPostback(name, value)
}

func (s *script) addPostback(name string, value []byte) {
	held := s.p.heldCount
	s.batch(func(w *work) error {
		s.offsets[1]++
		s.p.clicksCaughtUp = s.caughtUp
		if err := s.p.resolveDue(w, s.cat, s.now); err != nil {
			return err
		}
		return s.p.addPostback(w, s.cat, s.offsets[1], nil, value, s.now)
	})
	if s.p.heldCount > held {
		s.out = append(s.out, "held "+name)
	}
}

func (s *script) partitionCmd(cmd, name string, args map[string]string) {
	switch cmd {
	case "replay":
		v, ok := s.postback[name]
		if !ok {
			s.fatalf("replay of unknown postback %s", name)
		}
		s.addPostback(name, v)
	case "tick":
		s.now = maxTime(s.now, s.at(args))
		s.caughtUp = args["caught-up"] != ""
		s.batch(func(w *work) error {
			s.p.clicksCaughtUp = s.caughtUp
			return s.p.resolveDue(w, s.cat, s.now)
		})
	case "expire":
		s.now = maxTime(s.now, s.at(args))
		s.p.postbacksCaughtUp = true
		if err := s.p.expire(s.cat, s.now); err != nil {
			s.fatalf("expire: %v", err)
		}
	case "restart":
		s.close()
		s.open()
	case "rebuild":
		// The worker counts the state to restore back from the postbacks'
		// position (postbacksClock): the last postback read while they
		// are behind, the clock once they are caught up.
		clock := s.now
		if last := s.p.lastPostbackTS; last != 0 && !s.p.postbacksCaughtUp {
			clock = minTime(s.now, time.UnixMilli(last))
		}
		s.close()
		s.fs = vfs.NewMem()
		s.open()
		w := s.p.begin()
		since := restoreSince(s.cat, s.p.grace, clock)
		for _, v := range s.emitted {
			if err := s.p.restore(w, s.cat, v, since); err != nil {
				s.fatalf("restore: %v", err)
			}
		}
		s.p.setCut(minIDAt(since))
		for i, v := range s.clickLog {
			if err := s.p.addClick(w, s.cat, int64(i), v); err != nil {
				s.fatalf("rebuild: %v", err)
			}
		}
		if err := s.p.commit(w); err != nil {
			s.fatalf("rebuild: %v", err)
		}
	}
}

// batch runs f in one batch, commits it, prints what it emitted and
// clears the outbox as the worker does once Kafka has the records.
func (s *script) batch(f func(w *work) error) {
	w := s.p.begin()
	if err := f(w); err != nil {
		s.fatalf("%v", err)
	}
	out := w.out
	if err := s.p.commit(w); err != nil {
		s.fatalf("commit: %v", err)
	}
	pending, err := s.p.pendingOutbox()
	if err != nil || len(pending) != len(out) {
		s.fatalf("outbox holds %d records (%v), want the %d just decided", len(pending), err, len(out))
	}
	for _, r := range out {
		c, err := schemas.DecodeConversion(r.value)
		if err != nil {
			s.fatalf("emitted %s: %v", r.value, err)
		}
		if string(r.key) != c.ClickID {
			s.fatalf("emitted with key %s, click %s", r.key, c.ClickID)
		}
		s.emitted = append(s.emitted, r.value)
		s.print(c)
	}
	if err := s.p.acked(out); err != nil {
		s.fatalf("acked: %v", err)
	}
}

func (s *script) print(c schemas.Conversion) {
	if want := s.pbTS[c.PostbackEventID]; c.TS != want {
		s.fatalf("conversion %s has ts %d, want its postback's %d", s.name(c.ConversionID), c.TS, want)
	}
	if want := s.clickTS[normalizeID(c.ClickID)]; c.ClickTS != want && c.ClickTS != 0 {
		s.fatalf("conversion %s has click_ts %d, want its click's %d", s.name(c.ConversionID), c.ClickTS, want)
	}
	status := c.Status
	if c.RejectReason != "" {
		status += "/" + c.RejectReason
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s v%d %s pb=%s click=%s offer=%d aff=%d goal=%s", s.name(c.ConversionID), c.Version, status,
		s.name(c.PostbackEventID), s.name(c.ClickID), c.OfferID, c.AffID, c.Goal)
	if c.TxnID != "" {
		fmt.Fprintf(&b, " txn=%s", c.TxnID)
	}
	fmt.Fprintf(&b, " sale=%s revenue=%s payout=%s currency=%s ctit=%d", c.SaleAmount, c.Revenue, c.Payout, c.Currency, c.CTITSeconds)
	if c.Sub1 != "" {
		fmt.Fprintf(&b, " sub1=%s", c.Sub1)
	}
	s.out = append(s.out, b.String())
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}
