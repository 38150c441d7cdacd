package dispatcher

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/schemas"
)

// Request headers of the external contract.
const (
	headerConversionID = "X-Trackstar-Conversion-Id"
	headerSignature    = "X-Trackstar-Signature"
)

// verdict is what an attempt says about the partner host, for its breaker.
type verdict int

const (
	verdictNone      verdict = iota // nothing: no request was made
	verdictOK                       // the host answered (2xx, 3xx, 4xx other than 429)
	verdictRetryable                // network error, timeout, 5xx, 429
)

// attempt makes one attempt of j under the config cat and returns its
// result for the finalizer.
func (e *engine) attempt(j *job, cat *catalog.Catalog) (result, verdict) {
	pb := postbackFor(cat, &j.conv)
	if pb == nil {
		return e.notWanted(j), verdictNone
	}
	c := &j.conv
	start := e.now()
	rec := schemas.Delivery{
		V: schemas.Version, ConversionID: c.ConversionID, Version: c.Version, Status: c.Status,
		AffID: c.AffID, Attempt: j.attempt, TS: start.UnixMilli(), Method: pb.Method,
	}
	latest, err := e.store.latestVersion(c.ConversionID, start)
	if err != nil {
		e.fatal(err) // the store is broken: stop; this attempt is still made and recorded
	}
	if latest > c.Version {
		// A newer status went to the partner's queue meanwhile: this one is
		// stale, and must not arrive after it.
		rec.Outcome = schemas.OutcomeFailed
		rec.Error = fmt.Sprintf("not sent: superseded by version %d of the conversion", latest)
		e.metrics.conversions.WithLabelValues("superseded").Inc()
		e.log.Info("not sending a status superseded by a newer one", "conversion_id", c.ConversionID, "aff_id", c.AffID,
			"version", c.Version, "newer_version", latest)
		return result{kind: resAttempt, job: j, rec: rec}, verdictNone
	}

	req := fasthttp.AcquireRequest()
	resp := fasthttp.AcquireResponse()
	defer fasthttp.ReleaseRequest(req)
	defer fasthttp.ReleaseResponse(resp)
	url := pb.URL.Append(nil, valuesOf(c))
	rec.URL = string(url)
	req.SetRequestURIBytes(url)
	req.URI().DisablePathNormalizing = true
	req.Header.SetMethod(pb.Method)
	req.Header.Set(headerConversionID, c.ConversionID)
	payload := req.URI().RequestURI()
	if pb.Method == fasthttp.MethodPost {
		payload = partnerBody(c)
		req.Header.SetContentType("application/json")
		req.SetBodyRaw(payload)
	}
	if pb.Secret != "" {
		req.Header.Set(headerSignature, sign(pb.Secret, start.Unix(), payload))
	}

	timeout := cat.Delivery.Timeout
	t0 := time.Now()
	client := e.clients[0]
	if cat.AllowPrivatePartnerURLs {
		client = e.clients[1]
	}
	err = client.DoTimeout(req, resp, timeout)
	var body []byte
	if err == nil {
		body = readBodyPrefix(resp, bodyCap)
	}
	took := time.Since(t0)
	e.metrics.latency.Observe(took.Seconds())
	rec.DurationMS = uint32(min(took.Milliseconds(), int64(^uint32(0))))

	retryable := false
	var retryAfter time.Duration
	var refused *refusedError
	switch {
	case errors.As(err, &refused):
		e.metrics.refused.Inc()
		e.log.Warn("partner postback refused by the SSRF guard", "conversion_id", c.ConversionID, "aff_id", c.AffID, "host", j.host, "err", err)
		rec.Outcome, rec.Error = schemas.OutcomeFailed, err.Error()
		return result{kind: resAttempt, job: j, rec: rec}, verdictNone
	case err != nil && isTimeout(err):
		retryable, rec.Error = true, fmt.Sprintf("timeout after %s", timeout)
	case err != nil:
		retryable, rec.Error = true, "network error: "+err.Error()
	default:
		code := resp.StatusCode()
		rec.StatusCode = uint16(code)
		switch {
		case code >= 200 && code < 300:
			rec.Outcome = schemas.OutcomeDelivered
		case code == http.StatusTooManyRequests || code >= 500:
			retryable = true
			if d, ok := parseRetryAfter(resp.Header.Peek(fasthttp.HeaderRetryAfter), e.now()); ok {
				retryAfter = d
				rec.Error = fmt.Sprintf("HTTP %d (Retry-After %s)", code, d)
			} else {
				rec.Error = fmt.Sprintf("HTTP %d", code)
			}
		case code >= 300 && code < 400:
			rec.Outcome = schemas.OutcomeFailed
			rec.Error = fmt.Sprintf("HTTP %d: redirects are not followed (Location: %s)", code, resp.Header.Peek(fasthttp.HeaderLocation))
		default:
			rec.Outcome = schemas.OutcomeFailed
			rec.Error = fmt.Sprintf("HTTP %d", code)
		}
		if rec.Outcome != schemas.OutcomeDelivered && len(body) > 0 {
			rec.Error += ": " + strings.ToValidUTF8(string(bytes.TrimSpace(body)), "\uFFFD")
		}
	}
	if !retryable {
		return result{kind: resAttempt, job: j, rec: rec}, verdictOK
	}

	retries := cat.Delivery.Retries
	if int(j.attempt) > len(retries) {
		rec.Outcome = schemas.OutcomeDead
		return result{kind: resAttempt, job: j, rec: rec}, verdictRetryable
	}
	rec.Outcome = schemas.OutcomeRetrying
	wait := max(retries[j.attempt-1], retryAfter)
	return result{kind: resAttempt, job: j, rec: rec, due: e.now().Add(wait)}, verdictRetryable
}

// readBodyPrefix reads at most limit bytes of the streamed response body
// and closes the stream; a longer body closes the connection instead of
// being drained.
func readBodyPrefix(resp *fasthttp.Response, limit int) []byte {
	stream := resp.BodyStream()
	if stream == nil {
		return resp.Body()
	}
	body, err := io.ReadAll(io.LimitReader(stream, int64(limit)+1))
	closer, _ := stream.(fasthttp.ReadCloserWithError)
	switch {
	case err == nil && len(body) <= limit:
		_ = resp.CloseBodyStream()
	case closer != nil:
		_ = closer.CloseWithError(fasthttp.ErrBodyTooLarge)
	default:
		_ = resp.CloseBodyStream()
	}
	if len(body) > limit {
		body = append(body[:limit], "…"...)
	}
	return body
}

func isTimeout(err error) bool {
	if errors.Is(err, fasthttp.ErrTimeout) || errors.Is(err, fasthttp.ErrDialTimeout) || errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// retryStaleConn lets fasthttp retry a request once, at once, only when a
// kept-alive connection turned out to be closed by the partner before it
// answered: that is a property of the pool, not of the partner, and not
// worth a scheduled retry. Every other error is the attempt's.
func retryStaleConn(_ *fasthttp.Request, attempts int, err error) (resetTimeout, retry bool) {
	return false, attempts < 2 && (errors.Is(err, fasthttp.ErrConnectionClosed) || errors.Is(err, io.EOF))
}

// sign returns the X-Trackstar-Signature value: t=<unix seconds>,v1=<hex
// HMAC-SHA256(secret, "<t>." + payload)>.
func sign(secret string, t int64, payload []byte) string {
	ts := strconv.FormatInt(t, 10)
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(ts))
	mac.Write([]byte{'.'})
	mac.Write(payload)
	return "t=" + ts + ",v1=" + hex.EncodeToString(mac.Sum(nil))
}

// parseRetryAfter reads a Retry-After value: delay seconds or an HTTP date.
// The result is capped at maxRetryAfter; a date in the past is 0.
func parseRetryAfter(v []byte, now time.Time) (time.Duration, bool) {
	s := strings.TrimSpace(string(v))
	if s == "" {
		return 0, false
	}
	if n, err := strconv.ParseUint(s, 10, 64); err == nil {
		if n > uint64(maxRetryAfter/time.Second) {
			return maxRetryAfter, true
		}
		return time.Duration(n) * time.Second, true
	}
	if t, err := http.ParseTime(s); err == nil {
		return min(max(t.Sub(now), 0), maxRetryAfter), true
	}
	return 0, false
}

// valuesOf returns the macro values of a conversion. {revenue} is not
// among them: what the advertiser pays us is not the partner's business.
func valuesOf(c *schemas.Conversion) *catalog.Values {
	goal := c.Goal
	if goal == "" {
		goal = catalog.DefaultGoal
	}
	return &catalog.Values{
		ClickID: c.ClickID, OfferID: c.OfferID, AffID: c.AffID,
		Sub:    [5]string{c.Sub1, c.Sub2, c.Sub3, c.Sub4, c.Sub5},
		Source: c.Source, ConversionID: c.ConversionID, Goal: goal,
		Payout: c.Payout.String(), SaleAmount: c.SaleAmount.String(), Currency: c.Currency,
		Status: c.Status, TxnID: c.TxnID, ClickTS: c.ClickTS, ConversionTS: c.TS,
	}
}

// partnerConversion is the JSON body of a POST postback: the conversion
// without its revenue, which the partner must not see (the macros never
// offer it either).
type partnerConversion struct {
	schemas.Conversion
	// Revenue shadows the embedded field of the same JSON name (the
	// shallower field wins) and, always nil, is left out; so does TSNanos,
	// Trackstar's own ordering of status updates.
	Revenue *struct{} `json:"revenue,omitempty"`
	TSNanos *struct{} `json:"ts_ns,omitempty"`
}

func partnerBody(c *schemas.Conversion) []byte {
	pc := partnerConversion{Conversion: *c}
	pc.V = schemas.Version
	b, err := json.Marshal(&pc)
	if err != nil {
		panic("BUG: cannot encode partner postback body: " + err.Error())
	}
	return b
}

// hostOf returns the host[:port] of a rendered absolute URL, lower case.
func hostOf(url []byte) string {
	s := string(url)
	if i := strings.Index(s, "://"); i >= 0 {
		s = s[i+3:]
	}
	if i := strings.IndexAny(s, "/?#"); i >= 0 {
		s = s[:i]
	}
	if i := strings.LastIndexByte(s, '@'); i >= 0 {
		s = s[i+1:]
	}
	return strings.ToLower(s)
}

// refusedError is the SSRF guard's refusal: the partner host resolved to
// no address a postback may go to.
type refusedError struct {
	host  string
	addrs []netip.Addr
}

func (e *refusedError) Error() string {
	return fmt.Sprintf("refused: %s resolves to no public address (%v); partner postbacks go to public hosts only (allow_private_partner_urls: true allows it for local testing)", e.host, e.addrs)
}

// dial is the fasthttp dialer: the SSRF guard at send time. It resolves the
// host itself, keeps only the addresses a postback may go to, and connects
// to one of exactly those, so a DNS answer that changes between the check
// and the connection (DNS rebinding) cannot slip a private address in.
// allowPrivate is fixed per client (see engine.clients), not read from the
// config, so that no pooled connection outlives the setting it was made
// under.
func (e *engine) dial(addr string, timeout time.Duration, allowPrivate bool) (net.Conn, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("cannot parse partner address %q: %w", addr, err)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return nil, fmt.Errorf("cannot parse port of partner address %q: %w", addr, err)
	}
	if timeout <= 0 {
		timeout = e.cfg.Catalog.Current().Delivery.Timeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()

	var addrs []netip.Addr
	if a, err := netip.ParseAddr(host); err == nil {
		addrs = []netip.Addr{a}
	} else if addrs, err = e.cfg.LookupNetIP(ctx, host); err != nil {
		return nil, fmt.Errorf("cannot resolve partner host %s: %w", host, err)
	}
	var allowed []netip.Addr
	for _, a := range addrs {
		if allowPrivate || catalog.IsPublicAddr(a) {
			allowed = append(allowed, a.Unmap())
		}
	}
	if len(allowed) == 0 {
		return nil, &refusedError{host: host, addrs: addrs}
	}
	var d net.Dialer
	for _, a := range allowed {
		var conn net.Conn
		conn, err = d.DialContext(ctx, "tcp", netip.AddrPortFrom(a, uint16(port)).String())
		if err == nil {
			return conn, nil
		}
		if ctx.Err() != nil {
			break
		}
	}
	return nil, err
}
