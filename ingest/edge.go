package ingest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/valyala/fasthttp"
	"github.com/valyala/fasthttp/fasthttpadaptor"

	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/internal/ops"
	"github.com/trackstar/trackstar/schemas"
)

// Edge is a configured edge: its listener is open and its spool loaded.
// Call Serve once.
type Edge struct {
	cfg  Config
	log  *slog.Logger
	ln   net.Listener
	srv  *fasthttp.Server
	sp   *spool
	prod *producer
	m    *metrics
	ops  fasthttp.RequestHandler

	inflight atomic.Int64 // handlers running, so shutdown can wait for them
	// closing is set once shutdown stops waiting for connections: the
	// producer closes next, so requests from then on are turned away.
	closing atomic.Bool
}

// Run runs an edge until ctx ends, then shuts it down: it stops accepting,
// answers the requests under way, and returns nil.
func Run(ctx context.Context, cfg Config) error {
	e, err := New(cfg)
	if err != nil {
		return err
	}
	return e.Serve(ctx)
}

// New opens the edge's spool and listener and registers its metrics and
// readiness check.
func New(cfg Config) (*Edge, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	e := &Edge{cfg: cfg, log: cfg.Logger}
	dir := filepath.Join(cfg.DataDir, spoolDirName)
	sp, err := openSpool(dir, cfg.SpoolMaxBytes, cfg.Logger)
	if err != nil {
		return nil, err
	}
	e.sp = sp
	if e.m, err = newMetrics(cfg.Registry, sp); err != nil {
		sp.close()
		return nil, err
	}
	if n := sp.count.Load(); n > 0 {
		e.log.Warn("the spool holds events from a previous run; draining them once Kafka answers", "events", n, "dir", dir)
	}
	e.prod = newProducer(&e.cfg, sp, e.m)
	cfg.Health.Register("edge", func() error {
		if n := sp.count.Load(); n > 0 || sp.active.Load() {
			return fmt.Errorf("degraded: %d events spooled, oldest %.0fs old (Kafka unreachable or slower than %s)",
				n, sp.ageSeconds(time.Now()), cfg.ProduceTimeout)
		}
		return nil
	})
	e.ops = fasthttpadaptor.NewFastHTTPHandler(ops.Handler(cfg.Registry, cfg.Health, "edge"))
	e.srv = &fasthttp.Server{
		Handler:                      e.guard(e.handle),
		ErrorHandler:                 e.handleBadRequest,
		Name:                         "trackstar",
		ReadTimeout:                  cfg.ReadTimeout,
		WriteTimeout:                 cfg.WriteTimeout,
		IdleTimeout:                  cfg.IdleTimeout,
		MaxRequestBodySize:           cfg.MaxRequestBodyBytes,
		ReadBufferSize:               cfg.MaxHeaderBytes,
		DisablePreParseMultipartForm: true,
		CloseOnShutdown:              true,
		TCPKeepalive:                 true,
		Logger:                       fasthttpLogger{cfg.Logger},
	}
	if e.ln, err = net.Listen("tcp", cfg.Listen); err != nil {
		sp.close()
		return nil, fmt.Errorf("cannot listen on %s: %w", cfg.Listen, err)
	}
	return e, nil
}

// Addr is the address the edge listens on.
func (e *Edge) Addr() net.Addr { return e.ln.Addr() }

// Serve serves until ctx ends, then shuts down: it stops accepting, waits
// up to WriteTimeout for the requests under way, stops producing and closes
// the spool. Events answered for are in Kafka or in the spool by then.
func (e *Edge) Serve(ctx context.Context) error {
	e.prod.start()
	served := make(chan error, 1)
	go func() { served <- e.srv.Serve(e.ln) }()
	e.log.Info("edge listening", "addr", e.ln.Addr().String(), "spooled", e.sp.count.Load())

	var err error
	select {
	case err = <-served:
		err = fmt.Errorf("edge server on %s: %w", e.ln.Addr(), err)
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), e.cfg.WriteTimeout)
		if serr := e.srv.ShutdownWithContext(sctx); serr != nil {
			e.log.Warn("edge shutdown did not finish in time", "err", serr)
		}
		cancel()
		<-served
	}
	// A connection shutdown did not wait out (a client still sending its
	// request when WriteTimeout passed) can still deliver a request. From
	// here on it gets a 503, before it can reach the producer. guard
	// counts itself in flight before it looks at closing, so every
	// handler either sees closing or is waited for below.
	e.closing.Store(true)
	// A handler still running owns an answer the client may yet get, so
	// its event must still reach Kafka or the spool; each takes at most the
	// produce timeout plus a spool write.
	deadline := time.Now().Add(e.cfg.ProduceTimeout + 10*time.Second)
	for e.inflight.Load() > 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if n := e.inflight.Load(); n > 0 {
		e.log.Error("requests still running at shutdown; stopping without them", "requests", n)
	}
	e.prod.close()
	if cerr := e.sp.close(); cerr != nil && err == nil {
		err = cerr
	}
	return err
}

func routeOf(path []byte) route {
	switch string(path) {
	case "/click":
		return routeClick
	case "/aff_c":
		return routeAffC
	case "/postback":
		return routePostback
	case "/aff_lsr":
		return routeAffLsr
	case "/aff_goal":
		return routeAffGoal
	case "/healthz":
		return routeHealthz
	case "/readyz":
		return routeReadyz
	case "/metrics":
		return routeMetrics
	}
	return routeUnknown
}

// guard counts every request by route and code and turns a panic into a
// 500: no input may take the edge down, and a panic is a bug worth a
// metric and a stack trace.
func (e *Edge) guard(next fasthttp.RequestHandler) fasthttp.RequestHandler {
	return func(ctx *fasthttp.RequestCtx) {
		e.inflight.Add(1)
		defer e.inflight.Add(-1)
		defer e.finish(ctx, routeOf(ctx.Path()))
		if e.closing.Load() {
			ctx.Error("shutting down; try again\n", fasthttp.StatusServiceUnavailable)
			ctx.SetConnectionClose()
			return
		}
		next(ctx)
	}
}

func (e *Edge) handle(ctx *fasthttp.RequestCtx) {
	switch r := routeOf(ctx.Path()); r {
	case routeClick, routeAffC:
		if !ctx.IsGet() {
			methodNotAllowed(ctx, "GET")
			return
		}
		e.click(ctx, r == routeAffC)
	case routePostback, routeAffLsr, routeAffGoal:
		if !ctx.IsGet() && !ctx.IsPost() {
			jsonError(ctx, &requestError{status: fasthttp.StatusMethodNotAllowed, field: "method",
				msg: "method not allowed; use GET, POST"})
			ctx.Response.Header.Set("Allow", "GET, POST")
			return
		}
		e.postback(ctx, r == routeAffGoal)
	case routeHealthz, routeReadyz, routeMetrics:
		e.ops(ctx)
	default:
		ctx.Error("not found; the edge serves /click, /aff_c, /postback, /aff_lsr, /aff_goal, /healthz, /readyz and /metrics\n", fasthttp.StatusNotFound)
	}
}

func (e *Edge) finish(ctx *fasthttp.RequestCtx, r route) {
	if v := recover(); v != nil {
		e.m.panics.Inc()
		e.log.Error("BUG: edge handler panicked", "panic", fmt.Sprint(v), "uri", string(ctx.RequestURI()), "stack", string(debug.Stack()))
		ctx.Response.Reset()
		ctx.Error("internal error\n", fasthttp.StatusInternalServerError)
	}
	e.m.count(r, ctx.Response.StatusCode())
}

// handleBadRequest answers what fasthttp could not parse.
func (e *Edge) handleBadRequest(ctx *fasthttp.RequestCtx, err error) {
	var small *fasthttp.ErrSmallBuffer
	var nerr net.Error
	switch {
	case errors.As(err, &small):
		ctx.Error("request line and headers are larger than "+strconv.Itoa(e.cfg.MaxHeaderBytes)+" bytes\n", fasthttp.StatusRequestHeaderFieldsTooLarge)
	case errors.Is(err, fasthttp.ErrBodyTooLarge):
		ctx.Error("request body is larger than "+strconv.Itoa(e.cfg.MaxRequestBodyBytes)+" bytes\n", fasthttp.StatusRequestEntityTooLarge)
	case errors.As(err, &nerr) && nerr.Timeout():
		ctx.Error("request not received within "+e.cfg.ReadTimeout.String()+"\n", fasthttp.StatusRequestTimeout)
	default:
		ctx.Error("malformed HTTP request\n", fasthttp.StatusBadRequest)
	}
	e.m.count(routeInvalid, ctx.Response.StatusCode())
}

func methodNotAllowed(ctx *fasthttp.RequestCtx, allow string) {
	ctx.Error("method not allowed; use "+allow+"\n", fasthttp.StatusMethodNotAllowed)
	ctx.Response.Header.Set("Allow", allow) // after Error, which resets the headers
}

// clientIP is the TCP peer, or with TrustProxy the last address in
// X-Forwarded-For: the one the proxy in front of the edge appended, which
// a client cannot forge (entries to its left are the client's word).
func (e *Edge) clientIP(ctx *fasthttp.RequestCtx) netip.Addr {
	if e.cfg.TrustProxy {
		if xff := lastForwardedFor(&ctx.Request.Header); len(xff) > 0 {
			if i := bytes.LastIndexByte(xff, ','); i >= 0 {
				xff = xff[i+1:]
			}
			if a, err := netip.ParseAddr(b2s(bytes.TrimSpace(xff))); err == nil {
				return a.Unmap().WithZone("")
			}
		}
	}
	if tcp, ok := ctx.RemoteAddr().(*net.TCPAddr); ok {
		if a, ok := netip.AddrFromSlice(tcp.IP); ok {
			return a.Unmap()
		}
	}
	return netip.Addr{}
}

var xffKey = []byte("X-Forwarded-For")

// lastForwardedFor returns the value of the last X-Forwarded-For header
// line: some proxies (HAProxy) add a line of their own after the client's
// rather than appending to it. Trailers are not looked at: a client could
// send them after its body.
func lastForwardedFor(h *fasthttp.RequestHeader) []byte {
	var last []byte
	for k, v := range h.All() {
		if bytes.EqualFold(k, xffKey) {
			last = v
		}
	}
	return last
}

func (e *Edge) click(ctx *fasthttp.RequestCtx, hasOffers bool) {
	req, rerr := parseClick(ctx.QueryArgs(), hasOffers, e.cfg.MaxParamBytes)
	if rerr != nil {
		textError(ctx, rerr)
		return
	}
	cat := e.cfg.Catalog.Current()
	offer := cat.Offer(req.offerID)
	if offer == nil {
		textError(ctx, &requestError{status: fasthttp.StatusNotFound, field: "offer_id", msg: "unknown offer " + strconv.FormatUint(uint64(req.offerID), 10)})
		return
	}
	if cat.Affiliate(req.affID) == nil {
		textError(ctx, &requestError{status: fasthttp.StatusNotFound, field: "aff_id", msg: "unknown affiliate " + strconv.FormatUint(uint64(req.affID), 10)})
		return
	}

	ev := e.prod.get(topicClicks)
	defer e.prod.put(ev)
	buildClick(ev, &req, offer, e.clientIP(ctx), ctx.UserAgent(), ctx.Referer(), time.Now())
	if err := e.prod.send(ev); err != nil {
		ctx.Error("the click could not be recorded; try again\n", fasthttp.StatusServiceUnavailable)
		return
	}
	ctx.Response.Header.SetBytesV("Location", ev.text)
	ctx.SetStatusCode(fasthttp.StatusFound)
}

// buildClick mints the click ID and fills ev with the click's key, its JSON
// record, and (in ev.text) the offer URL to redirect to.
func buildClick(ev *event, req *clickRequest, offer *catalog.Offer, ip netip.Addr, ua, referer []byte, now time.Time) {
	ev.key = schemas.AppendNewID(ev.key[:0], now)
	// ev.text holds the IP until the record is encoded, then the URL.
	ev.text = ip.AppendTo(ev.text[:0])
	c := schemas.Click{
		ClickID:      b2s(ev.key),
		TS:           now.UnixMilli(),
		OfferID:      req.offerID,
		AdvertiserID: offer.AdvertiserID,
		AffID:        req.affID,
		Source:       b2s(req.source),
		Sub1:         b2s(req.sub[0]),
		Sub2:         b2s(req.sub[1]),
		Sub3:         b2s(req.sub[2]),
		Sub4:         b2s(req.sub[3]),
		Sub5:         b2s(req.sub[4]),
		IP:           b2s(ev.text),
		UserAgent:    b2s(ua),
		Referer:      b2s(referer),
	}
	ev.value = c.AppendJSON(ev.value[:0])
	v := catalog.Values{
		ClickID: c.ClickID,
		OfferID: c.OfferID,
		AffID:   c.AffID,
		Sub:     [5]string{c.Sub1, c.Sub2, c.Sub3, c.Sub4, c.Sub5},
		Source:  c.Source,
	}
	ev.text = offer.URL.Append(ev.text[:0], &v)
}

func (e *Edge) postback(ctx *fasthttp.RequestCtx, goalRoute bool) {
	var form *fasthttp.Args
	if body := ctx.PostBody(); len(body) > 0 {
		ct := ctx.Request.Header.ContentType()
		switch {
		case hasPrefixFold(ct, "application/x-www-form-urlencoded"):
			form = ctx.PostArgs()
		case len(ct) == 0 || hasPrefixFold(ct, "text/plain"):
			form = fasthttp.AcquireArgs()
			defer fasthttp.ReleaseArgs(form)
			form.ParseBytes(body)
		default:
			jsonError(ctx, &requestError{status: fasthttp.StatusUnsupportedMediaType, field: "content-type",
				msg: "send the parameters in the query string or as an application/x-www-form-urlencoded body, not " + quoteShort(ct)})
			return
		}
	}
	req, rerr := parsePostback(ctx.QueryArgs(), form, goalRoute, e.cfg.MaxParamBytes)
	if rerr != nil {
		jsonError(ctx, rerr)
		return
	}
	if len(req.token) == 0 {
		jsonError(ctx, &requestError{status: fasthttp.StatusForbidden, field: "token", msg: "missing; send token (or security_token, verification_token)"})
		return
	}
	adv := e.cfg.Catalog.Current().AdvertiserByToken(b2s(req.token))
	if adv == nil {
		jsonError(ctx, &requestError{status: fasthttp.StatusForbidden, field: "token", msg: "unknown token"})
		return
	}
	ip := e.clientIP(ctx)
	if !adv.AllowsIP(ip) {
		jsonError(ctx, &requestError{status: fasthttp.StatusForbidden, field: "ip",
			msg: "postbacks of this advertiser are not accepted from " + ip.String()})
		return
	}

	ev := e.prod.get(topicPostbacks)
	defer e.prod.put(ev)
	buildPostback(ev, &req, adv.ID, ip, time.Now())
	if err := e.prod.send(ev); err != nil {
		jsonError(ctx, &requestError{status: fasthttp.StatusServiceUnavailable, msg: "the postback could not be recorded; try again"})
		return
	}
	body := append(ev.text[:0], `{"status":"accepted","event_id":"`...)
	body = append(body, ev.id...)
	ev.text = append(body, "\"}\n"...)
	ctx.SetContentType("application/json")
	ctx.SetBody(ev.text)
}

// buildPostback mints the event ID and fills ev with the postback's key
// (its click ID) and JSON record.
func buildPostback(ev *event, req *postbackRequest, advertiserID uint32, ip netip.Addr, now time.Time) {
	ev.key = appendLower(ev.key[:0], req.clickID)
	ev.id = schemas.AppendNewID(ev.id[:0], now)
	// ev.text holds the IP, the amount and the currency, side by side.
	t := ip.AppendTo(ev.text[:0])
	ipEnd := len(t)
	t = req.amount.Append(t)
	amountEnd := len(t)
	if req.currency[0] != 0 {
		t = append(t, req.currency[:]...)
	}
	ev.text = t
	p := schemas.Postback{
		EventID:      b2s(ev.id),
		ClickID:      b2s(ev.key),
		TS:           now.UnixMilli(),
		TSNanos:      now.UnixNano(),
		AdvertiserID: advertiserID,
		Goal:         b2s(req.goal),
		Amount:       b2s(t[ipEnd:amountEnd]),
		Currency:     b2s(t[amountEnd:]),
		TxnID:        b2s(req.txnID),
		Status:       req.status,
		IP:           b2s(t[:ipEnd]),
	}
	ev.value = p.AppendJSON(ev.value[:0])
}

func hasPrefixFold(b []byte, prefix string) bool {
	return len(b) >= len(prefix) && bytes.EqualFold(b[:len(prefix)], []byte(prefix))
}

// textError answers a browser-facing route (a click) in plain text.
func textError(ctx *fasthttp.RequestCtx, err *requestError) {
	ctx.Error(err.Error()+"\n", err.status)
}

// jsonError answers a postback route: {"status":"error","field":...,"error":...}.
func jsonError(ctx *fasthttp.RequestCtx, err *requestError) {
	b := make([]byte, 0, 128)
	b = append(b, `{"status":"error"`...)
	if err.field != "" {
		b = append(b, `,"field":`...)
		b = schemas.AppendJSONString(b, err.field)
	}
	b = append(b, `,"error":`...)
	b = schemas.AppendJSONString(b, err.msg)
	b = append(b, "}\n"...)
	ctx.SetStatusCode(err.status)
	ctx.SetContentType("application/json")
	ctx.SetBody(b)
}

// fasthttpLogger sends fasthttp's own messages (connection errors) to slog.
type fasthttpLogger struct{ log *slog.Logger }

func (l fasthttpLogger) Printf(format string, args ...any) {
	l.log.Debug("fasthttp: " + fmt.Sprintf(format, args...))
}
