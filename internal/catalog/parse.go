package catalog

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/trackstar/trackstar/schemas"
)

// Load reads and validates the config file at path.
func Load(path string) (*Catalog, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("cannot read config: %w", err)
	}
	return Parse(data, path)
}

// Parse validates a config file's contents; name is the file name errors
// start with. When the file has problems, the error joins all of them (one
// per line, in file order), each as "name:line: field.path: message".
func Parse(data []byte, name string) (*Catalog, error) {
	p := &parser{name: name}
	c := p.file(data)
	if len(p.problems) > 0 {
		slices.SortStableFunc(p.problems, func(a, b problem) int { return cmp.Compare(a.line, b.line) })
		errs := make([]error, len(p.problems))
		for i, pr := range p.problems {
			errs[i] = errors.New(pr.msg)
		}
		return nil, errors.Join(errs...)
	}
	return c, nil
}

// parser walks the YAML node tree by hand rather than decoding into
// structs: that is what lets every error carry both the line and the field
// path, and lets one pass collect every error.
type parser struct {
	name     string
	problems []problem
}

type problem struct {
	line int
	msg  string
}

func (p *parser) errorf(n *yaml.Node, path, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if path != "" {
		msg = path + ": " + msg
	}
	p.problems = append(p.problems, problem{n.Line, fmt.Sprintf("%s:%d: %s", p.name, n.Line, msg)})
}

var yamlLineError = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

func (p *parser) file(data []byte) *Catalog {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	err := dec.Decode(&doc)
	if err == io.EOF {
		p.problems = append(p.problems, problem{0, p.name + ": the file is empty"})
		return nil
	}
	if err == nil {
		var extra yaml.Node
		if err = dec.Decode(&extra); err == io.EOF {
			err = nil
		} else if err == nil {
			p.errorf(&extra, "", "the file must hold exactly one YAML document")
			return nil
		}
	}
	if err != nil {
		line := 0
		msg := err.Error()
		if m := yamlLineError.FindStringSubmatch(msg); m != nil {
			line, _ = strconv.Atoi(m[1])
			msg = m[2]
		}
		p.problems = append(p.problems, problem{line, fmt.Sprintf("%s:%d: invalid YAML: %s", p.name, line, msg)})
		return nil
	}
	if len(doc.Content) == 0 || isNull(doc.Content[0]) {
		p.problems = append(p.problems, problem{0, p.name + ": the file is empty"})
		return nil
	}
	root := doc.Content[0]
	top, ok := p.mapping(root, "", "allow_private_partner_urls", "advertisers", "offers", "delivery", "affiliates")
	if !ok {
		return nil
	}

	c := &Catalog{
		Delivery:    Delivery{Timeout: DefaultDeliveryTimeout, Retries: slices.Clone(DefaultRetries)},
		advertisers: map[uint32]*Advertiser{},
		tokens:      map[[sha256.Size]byte]*Advertiser{},
		offers:      map[uint32]*Offer{},
		affiliates:  map[uint32]*Affiliate{},
	}
	if n := top["allow_private_partner_urls"]; n != nil {
		c.AllowPrivatePartnerURLs, _ = p.boolean(n, "allow_private_partner_urls")
	}

	advertiserLines := map[uint32]int{}
	tokenLines := map[[sha256.Size]byte]int{}
	for i, n := range p.list(top["advertisers"], "advertisers") {
		path := fmt.Sprintf("advertisers[%d]", i)
		a, idNode, tokenNode := p.advertiser(n, path)
		if a == nil {
			continue
		}
		c.Advertisers = append(c.Advertisers, a)
		if idNode != nil {
			if line, dup := advertiserLines[a.ID]; dup {
				p.errorf(idNode, path+".id", "duplicate advertiser id %d (first defined at line %d)", a.ID, line)
			} else {
				advertiserLines[a.ID] = idNode.Line
				c.advertisers[a.ID] = a
			}
		}
		if tokenNode != nil {
			// The token is a secret: errors never repeat it.
			h := sha256.Sum256([]byte(a.Token))
			if line, dup := tokenLines[h]; dup {
				p.errorf(tokenNode, path+".token", "duplicate token (already used at line %d)", line)
			} else {
				tokenLines[h] = tokenNode.Line
				c.tokens[h] = a
			}
		}
	}

	offerLines := map[uint32]int{}
	for i, n := range p.list(top["offers"], "offers") {
		path := fmt.Sprintf("offers[%d]", i)
		o, idNode, advNode := p.offer(n, path)
		if o == nil {
			continue
		}
		c.Offers = append(c.Offers, o)
		c.maxWindow = max(c.maxWindow, o.AttributionWindow)
		if idNode != nil {
			if line, dup := offerLines[o.ID]; dup {
				p.errorf(idNode, path+".id", "duplicate offer id %d (first defined at line %d)", o.ID, line)
			} else {
				offerLines[o.ID] = idNode.Line
				c.offers[o.ID] = o
			}
		}
		if advNode != nil && c.advertisers[o.AdvertiserID] == nil {
			p.errorf(advNode, path+".advertiser_id", "advertiser %d is not defined", o.AdvertiserID)
		}
	}

	if n := top["delivery"]; n != nil && !isNull(n) {
		p.delivery(n, "delivery", &c.Delivery)
	}

	affiliateLines := map[uint32]int{}
	for i, n := range p.list(top["affiliates"], "affiliates") {
		path := fmt.Sprintf("affiliates[%d]", i)
		a, idNode := p.affiliate(n, path, c.AllowPrivatePartnerURLs)
		if a == nil {
			continue
		}
		c.Affiliates = append(c.Affiliates, a)
		if idNode != nil {
			if line, dup := affiliateLines[a.ID]; dup {
				p.errorf(idNode, path+".id", "duplicate affiliate id %d (first defined at line %d)", a.ID, line)
			} else {
				affiliateLines[a.ID] = idNode.Line
				c.affiliates[a.ID] = a
			}
		}
	}
	return c
}

// advertiser returns the advertiser at n, and the nodes of its id and token
// when they are valid (for the duplicate checks).
func (p *parser) advertiser(n *yaml.Node, path string) (*Advertiser, *yaml.Node, *yaml.Node) {
	m, ok := p.mapping(n, path, "id", "name", "token", "allowed_ips")
	if !ok {
		return nil, nil, nil
	}
	a := &Advertiser{}
	idNode := p.id(m, n, path, "id", &a.ID)
	if v := m["name"]; v != nil && !isNull(v) {
		a.Name, _ = p.str(v, path+".name")
	}
	var tokenNode *yaml.Node
	if v := p.required(m, n, path, "token"); v != nil {
		if tok, ok := p.str(v, path+".token"); ok {
			if strings.TrimSpace(tok) == "" {
				p.errorf(v, path+".token", "must not be empty")
			} else {
				a.Token = tok
				tokenNode = v
			}
		}
	}
	for i, v := range p.list(m["allowed_ips"], path+".allowed_ips") {
		ipPath := fmt.Sprintf("%s.allowed_ips[%d]", path, i)
		s, ok := p.str(v, ipPath)
		if !ok {
			continue
		}
		var prefix netip.Prefix
		var err error
		if strings.Contains(s, "/") {
			prefix, err = netip.ParsePrefix(s)
		} else {
			var addr netip.Addr
			addr, err = netip.ParseAddr(s)
			if err == nil && addr.Zone() != "" {
				err = errors.New("zone")
			}
			prefix = netip.PrefixFrom(addr, addr.BitLen())
		}
		if err != nil {
			p.errorf(v, ipPath, "%q is not a CIDR (like 203.0.113.0/24) or an IP address", s)
			continue
		}
		// Client addresses are compared as IPv4 when they are IPv4-mapped
		// (AllowsIP), and a prefix never matches the other family: keep
		// an IPv4-mapped entry as the IPv4 prefix it means.
		if prefix.Addr().Is4In6() {
			if prefix.Bits() < 96 {
				p.errorf(v, ipPath, "%q mixes IPv4-mapped and other IPv6 addresses; write the IPv4 range (like 203.0.113.0/24)", s)
				continue
			}
			prefix = netip.PrefixFrom(prefix.Addr().Unmap(), prefix.Bits()-96)
		}
		a.AllowedIPs = append(a.AllowedIPs, prefix.Masked())
	}
	return a, idNode, tokenNode
}

// offer returns the offer at n, and the nodes of its id and advertiser_id
// when they are valid.
func (p *parser) offer(n *yaml.Node, path string) (*Offer, *yaml.Node, *yaml.Node) {
	m, ok := p.mapping(n, path, "id", "advertiser_id", "name", "url", "attribution_window", "min_ctit", "currency", "goals")
	if !ok {
		return nil, nil, nil
	}
	o := &Offer{AttributionWindow: DefaultAttributionWindow, Currency: DefaultCurrency}
	idNode := p.id(m, n, path, "id", &o.ID)
	advNode := p.id(m, n, path, "advertiser_id", &o.AdvertiserID)
	if v := m["name"]; v != nil && !isNull(v) {
		o.Name, _ = p.str(v, path+".name")
	}
	if v := p.required(m, n, path, "url"); v != nil {
		o.URL, _ = p.template(v, path+".url", false)
		o.RawURL = v.Value
	}
	windowOK, ctitOK := true, true
	if v := m["attribution_window"]; v != nil && !isNull(v) {
		o.AttributionWindow, windowOK = p.duration(v, path+".attribution_window")
		if windowOK && o.AttributionWindow == 0 {
			p.errorf(v, path+".attribution_window", "must be longer than 0")
			windowOK = false
		}
	}
	ctitNode := m["min_ctit"]
	if ctitNode != nil && !isNull(ctitNode) {
		o.MinCTIT, ctitOK = p.duration(ctitNode, path+".min_ctit")
	}
	if windowOK && ctitOK && o.MinCTIT >= o.AttributionWindow {
		p.errorf(ctitNode, path+".min_ctit", "%v is not shorter than attribution_window %v: every conversion would be rejected", o.MinCTIT, o.AttributionWindow)
	}
	if v := m["currency"]; v != nil && !isNull(v) {
		if s, ok := p.str(v, path+".currency"); ok {
			if !isCurrencyCode(s) {
				p.errorf(v, path+".currency", "%q is not an ISO 4217 code of three capital letters (like USD)", s)
			}
			o.Currency = s
		}
	}
	goalsNode := p.required(m, n, path, "goals")
	goalLines := map[string]int{}
	for i, v := range p.list(goalsNode, path+".goals") {
		goalPath := fmt.Sprintf("%s.goals[%d]", path, i)
		g, idNode := p.goal(v, goalPath)
		if g == nil {
			continue
		}
		o.Goals = append(o.Goals, g)
		if idNode != nil {
			if line, dup := goalLines[g.ID]; dup {
				p.errorf(idNode, goalPath+".id", "duplicate goal id %q (first defined at line %d)", g.ID, line)
			} else {
				goalLines[g.ID] = idNode.Line
			}
		}
	}
	if goalsNode != nil && goalsNode.Kind == yaml.SequenceNode && len(goalsNode.Content) == 0 {
		p.errorf(goalsNode, path+".goals", "an offer needs at least one goal")
	}
	return o, idNode, advNode
}

func isCurrencyCode(s string) bool {
	if len(s) != 3 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 'A' || s[i] > 'Z' {
			return false
		}
	}
	return true
}

// goal returns the goal at n and the node of its id when it is valid.
func (p *parser) goal(n *yaml.Node, path string) (*Goal, *yaml.Node) {
	m, ok := p.mapping(n, path, "id", "multiple", "revenue", "payout")
	if !ok {
		return nil, nil
	}
	g := &Goal{}
	var idNode *yaml.Node
	if v := p.required(m, n, path, "id"); v != nil {
		if s, ok := p.str(v, path+".id"); ok {
			if s == "" {
				p.errorf(v, path+".id", "must not be empty")
			} else {
				g.ID = s
				idNode = v
			}
		}
	}
	if v := m["multiple"]; v != nil && !isNull(v) {
		g.Multiple, _ = p.boolean(v, path+".multiple")
	}
	if v := p.required(m, n, path, "revenue"); v != nil {
		g.Revenue = p.rule(v, path+".revenue")
	}
	if v := p.required(m, n, path, "payout"); v != nil {
		g.Payout = p.rule(v, path+".payout")
	}
	return g, idNode
}

func (p *parser) rule(n *yaml.Node, path string) Rule {
	m, ok := p.mapping(n, path, "fixed", "percent")
	if !ok {
		return Rule{}
	}
	fixed, percent := m["fixed"], m["percent"]
	if fixed != nil && isNull(fixed) {
		fixed = nil
	}
	if percent != nil && isNull(percent) {
		percent = nil
	}
	var r Rule
	switch {
	case fixed != nil && percent != nil:
		p.errorf(n, path, "set one of fixed or percent, not both")
	case fixed != nil:
		r.Fixed, _ = p.amount(fixed, path+".fixed", false)
	case percent != nil:
		r.IsPercent = true
		r.Percent, _ = p.amount(percent, path+".percent", true)
	default:
		p.errorf(n, path, "set one of fixed (an amount) or percent (of the sale amount)")
	}
	return r
}

func (p *parser) amount(n *yaml.Node, path string, isPercent bool) (schemas.Amount, bool) {
	s, ok := p.str(n, path)
	if !ok {
		return 0, false
	}
	a, err := schemas.ParseAmount(s)
	switch {
	case err != nil:
		p.errorf(n, path, "%q is not a decimal number with at most 4 decimal places", s)
		return 0, false
	case a < 0:
		p.errorf(n, path, "must not be negative")
		return 0, false
	case isPercent && a > schemas.AmountFromUnits(100*10000):
		p.errorf(n, path, "%s%% is more than the whole sale amount (at most 100)", s)
		return 0, false
	case a > schemas.MaxAmount:
		p.errorf(n, path, "%s is more than the warehouse holds (at most %s)", s, schemas.MaxAmount)
		return 0, false
	}
	return a, true
}

func (p *parser) delivery(n *yaml.Node, path string, d *Delivery) {
	m, ok := p.mapping(n, path, "timeout", "retries")
	if !ok {
		return
	}
	if v := m["timeout"]; v != nil && !isNull(v) {
		if t, ok := p.duration(v, path+".timeout"); ok {
			if t == 0 {
				p.errorf(v, path+".timeout", "must be longer than 0")
			}
			d.Timeout = t
		}
	}
	if v := m["retries"]; v != nil && !isNull(v) {
		d.Retries = []time.Duration{}
		for i, r := range p.list(v, path+".retries") {
			rPath := fmt.Sprintf("%s.retries[%d]", path, i)
			if t, ok := p.duration(r, rPath); ok {
				if t == 0 {
					p.errorf(r, rPath, "must be longer than 0")
				}
				d.Retries = append(d.Retries, t)
			}
		}
	}
}

// affiliate returns the affiliate at n and the node of its id when valid.
func (p *parser) affiliate(n *yaml.Node, path string, allowPrivate bool) (*Affiliate, *yaml.Node) {
	m, ok := p.mapping(n, path, "id", "name", "postback")
	if !ok {
		return nil, nil
	}
	a := &Affiliate{}
	idNode := p.id(m, n, path, "id", &a.ID)
	if v := m["name"]; v != nil && !isNull(v) {
		a.Name, _ = p.str(v, path+".name")
	}
	if v := m["postback"]; v != nil && !isNull(v) {
		a.Postback = p.partnerPostback(v, path+".postback", allowPrivate)
	}
	return a, idNode
}

var statuses = []string{schemas.StatusApproved, schemas.StatusPending, schemas.StatusRejected}

func (p *parser) partnerPostback(n *yaml.Node, path string, allowPrivate bool) *PartnerPostback {
	m, ok := p.mapping(n, path, "url", "method", "goals", "statuses", "secret")
	if !ok {
		return nil
	}
	pb := &PartnerPostback{Method: DefaultPostbackMethod, Statuses: []string{schemas.StatusApproved}}
	if v := p.required(m, n, path, "url"); v != nil {
		var host string
		pb.URL, host = p.template(v, path+".url", true)
		pb.RawURL = v.Value
		// Checked even when the template has problems: a config's errors
		// are all reported at once (docs/operator.md).
		if host != "" && !allowPrivate {
			if why := privateHostReason(host); why != "" {
				p.errorf(v, path+".url", "host %q is %s; partner postbacks go to public hosts only (allow_private_partner_urls: true allows it for local testing)", host, why)
			}
		}
	}
	if v := m["method"]; v != nil && !isNull(v) {
		if s, ok := p.str(v, path+".method"); ok {
			if s != "GET" && s != "POST" {
				p.errorf(v, path+".method", "method %q is neither GET nor POST", s)
			}
			pb.Method = s
		}
	}
	for i, v := range p.list(m["goals"], path+".goals") {
		gPath := fmt.Sprintf("%s.goals[%d]", path, i)
		s, ok := p.str(v, gPath)
		switch {
		case !ok:
		case s == "":
			p.errorf(v, gPath, "goal id must not be empty")
		case slices.Contains(pb.Goals, s):
			p.errorf(v, gPath, "goal %q is listed twice", s)
		default:
			pb.Goals = append(pb.Goals, s)
		}
	}
	if v := m["statuses"]; v != nil && !isNull(v) {
		items := p.list(v, path+".statuses")
		if v.Kind == yaml.SequenceNode && len(items) == 0 {
			p.errorf(v, path+".statuses", "an empty list would send nothing; leave statuses out for the default [approved]")
		}
		pb.Statuses = nil
		for i, item := range items {
			sPath := fmt.Sprintf("%s.statuses[%d]", path, i)
			s, ok := p.str(item, sPath)
			switch {
			case !ok:
			case !slices.Contains(statuses, s):
				p.errorf(item, sPath, "unknown status %q (want approved, pending or rejected)", s)
			case slices.Contains(pb.Statuses, s):
				p.errorf(item, sPath, "status %q is listed twice", s)
			default:
				pb.Statuses = append(pb.Statuses, s)
			}
		}
	}
	if v := m["secret"]; v != nil && !isNull(v) {
		pb.Secret, _ = p.str(v, path+".secret")
	}
	return pb
}

// template parses the URL template at n, reporting its problems, and
// returns it (nil with problems) and its host ("" when it names none).
func (p *parser) template(n *yaml.Node, path string, partner bool) (*Template, string) {
	s, ok := p.str(n, path)
	if !ok {
		return nil, ""
	}
	t, problems := parseTemplate(s, partner)
	for _, pr := range problems {
		p.errorf(n, path, "%s", pr)
	}
	if len(problems) > 0 {
		return nil, t.host
	}
	return t, t.host
}

// Node helpers. Each reports its own errors and says whether the value is
// usable.

func resolve(n *yaml.Node) *yaml.Node {
	for n != nil && n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	return n
}

func isNull(n *yaml.Node) bool {
	n = resolve(n)
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		if n.ShortTag() == "!!null" {
			return "nothing"
		}
		return fmt.Sprintf("the value %q", n.Value)
	}
	return "something else"
}

// mapping returns the values of the mapping n by key, after checking that
// every key is known and appears once.
func (p *parser) mapping(n *yaml.Node, path string, known ...string) (map[string]*yaml.Node, bool) {
	n = resolve(n)
	if n.Kind != yaml.MappingNode {
		p.errorf(n, path, "expected a mapping, got %s", kindName(n))
		return nil, false
	}
	m := make(map[string]*yaml.Node, len(n.Content)/2)
	keyLines := make(map[string]int, len(n.Content)/2)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := resolve(n.Content[i]), resolve(n.Content[i+1])
		if k.Kind != yaml.ScalarNode {
			p.errorf(k, path, "expected a key, got %s", kindName(k))
			continue
		}
		if !slices.Contains(known, k.Value) {
			p.errorf(k, path, "unknown key %q (want one of: %s)", k.Value, strings.Join(known, ", "))
			continue
		}
		if line, dup := keyLines[k.Value]; dup {
			p.errorf(k, path, "duplicate key %q (first at line %d)", k.Value, line)
			continue
		}
		keyLines[k.Value] = k.Line
		m[k.Value] = v
	}
	return m, true
}

// required returns the value of key, or nil after an error when it is
// absent or null; parent is the mapping holding it.
func (p *parser) required(m map[string]*yaml.Node, parent *yaml.Node, path, key string) *yaml.Node {
	v := m[key]
	if v == nil || isNull(v) {
		if m != nil {
			p.errorf(resolve(parent), path, "missing required key %q", key)
		}
		return nil
	}
	return v
}

// list returns the items of the list n; nil or null n is an empty list.
func (p *parser) list(n *yaml.Node, path string) []*yaml.Node {
	if n == nil || isNull(n) {
		return nil
	}
	n = resolve(n)
	if n.Kind != yaml.SequenceNode {
		p.errorf(n, path, "expected a list, got %s", kindName(n))
		return nil
	}
	items := make([]*yaml.Node, len(n.Content))
	for i, v := range n.Content {
		items[i] = resolve(v)
	}
	return items
}

// str returns the text of a scalar as written, whatever YAML type it
// resolves to, so that `token: 0123` keeps its leading zero.
func (p *parser) str(n *yaml.Node, path string) (string, bool) {
	n = resolve(n)
	if n.Kind != yaml.ScalarNode || n.ShortTag() == "!!null" {
		p.errorf(n, path, "expected a single value, got %s", kindName(n))
		return "", false
	}
	return n.Value, true
}

func (p *parser) boolean(n *yaml.Node, path string) (bool, bool) {
	n = resolve(n)
	if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!bool" {
		p.errorf(n, path, "expected true or false, got %s", kindName(n))
		return false, false
	}
	return strings.EqualFold(n.Value, "true"), true
}

// id reads the required ID key of m into *dst and returns its node, or nil
// when it is missing or invalid.
func (p *parser) id(m map[string]*yaml.Node, parent *yaml.Node, path, key string, dst *uint32) *yaml.Node {
	v := p.required(m, parent, path, key)
	if v == nil {
		return nil
	}
	s, ok := p.str(v, path+"."+key)
	if !ok {
		return nil
	}
	id, err := strconv.ParseUint(s, 10, 32)
	if err != nil || id == 0 {
		p.errorf(v, path+"."+key, "%q is not an ID (a whole number from 1 to 4294967295)", s)
		return nil
	}
	*dst = uint32(id)
	return v
}

func (p *parser) duration(n *yaml.Node, path string) (time.Duration, bool) {
	s, ok := p.str(n, path)
	if !ok {
		return 0, false
	}
	d, err := time.ParseDuration(s)
	switch {
	case err != nil:
		p.errorf(n, path, "malformed duration %q (write it like 90s, 15m or 720h)", s)
		return 0, false
	case d < 0:
		p.errorf(n, path, "duration %q must not be negative", s)
		return 0, false
	}
	return d, true
}
