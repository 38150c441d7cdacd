package catalog

import (
	"net/netip"
	"strings"
)

// IsPublicAddr reports whether a partner postback may be sent to a: it is
// false for loopback, private (RFC 1918, fc00::/7, fec0::/10),
// link-local, unspecified and multicast addresses, and also for 0.0.0.0/8,
// the carrier-grade NAT range 100.64.0.0/10 (where some clouds keep their
// metadata service), 192.0.0.0/24, 198.18.0.0/15, 240.0.0.0/4 and the
// broadcast address, the deprecated IPv4-compatible ::/96, the local-use
// NAT64 prefix 64:ff9b:1::/48, Teredo tunnels (2001::/32, whose client
// address is hidden behind a relay) and 2001:2::/48 (benchmarking). An
// IPv4-mapped IPv6 address, an IPv4-translated (SIIT, ::ffff:0:0:0/96)
// address, a NAT64 (64:ff9b::/96) address or a 6to4 (2002::/16) address is
// judged by the IPv4 address inside it. The dispatcher checks resolved host names with it at
// send time; Parse checks IP-literal hosts with it at load.
func IsPublicAddr(a netip.Addr) bool {
	return addrClass(a) == ""
}

var (
	reservedPrefixes = []struct {
		prefix netip.Prefix
		class  string
	}{
		{netip.MustParsePrefix("0.0.0.0/8"), "unspecified"},
		{netip.MustParsePrefix("100.64.0.0/10"), "shared (carrier-grade NAT)"},
		{netip.MustParsePrefix("192.0.0.0/24"), "reserved"},
		{netip.MustParsePrefix("198.18.0.0/15"), "reserved (benchmarking)"},
		{netip.MustParsePrefix("240.0.0.0/4"), "reserved"},
		{netip.MustParsePrefix("fec0::/10"), "private"},
		{netip.MustParsePrefix("::/96"), "IPv4-compatible (deprecated)"},
		{netip.MustParsePrefix("64:ff9b:1::/48"), "local-use NAT64"},
		{netip.MustParsePrefix("2001::/32"), "Teredo tunnel"},
		{netip.MustParsePrefix("2001:2::/48"), "reserved (benchmarking)"},
	}
	// Prefixes whose last 32 bits are an IPv4 address, judged as that.
	embedsIPv4Last = []netip.Prefix{
		netip.MustParsePrefix("64:ff9b::/96"),    // NAT64
		netip.MustParsePrefix("::ffff:0:0:0/96"), // IPv4-translated (SIIT)
	}
	sixToFour = netip.MustParsePrefix("2002::/16")
)

// addrClass names why a is not public, or returns "" when it is.
func addrClass(a netip.Addr) string {
	a = a.Unmap().WithZone("")
	switch {
	case !a.IsValid():
		return "invalid"
	case a.IsLoopback():
		return "loopback"
	case a.IsUnspecified():
		return "unspecified"
	case a.IsPrivate():
		return "private"
	case a.IsLinkLocalUnicast(), a.IsLinkLocalMulticast():
		return "link-local"
	case a.IsMulticast(), a.IsInterfaceLocalMulticast():
		return "multicast"
	}
	for _, r := range reservedPrefixes {
		if r.prefix.Contains(a) {
			return r.class
		}
	}
	for _, p := range embedsIPv4Last {
		if p.Contains(a) {
			b := a.As16()
			return addrClass(netip.AddrFrom4([4]byte(b[12:])))
		}
	}
	if sixToFour.Contains(a) {
		b := a.As16()
		return addrClass(netip.AddrFrom4([4]byte(b[2:6])))
	}
	return ""
}

// privateHostReason says why a URL host must not receive partner postbacks
// ("a loopback address"), or returns "" when it may. Host names other than
// localhost are left to the dispatcher, which checks what they resolve to.
func privateHostReason(host string) string {
	h := strings.TrimSuffix(strings.ToLower(host), ".")
	if h == "localhost" || strings.HasSuffix(h, ".localhost") {
		return "a loopback name"
	}
	if a, err := netip.ParseAddr(h); err == nil {
		switch class := addrClass(a); {
		case class == "":
		case strings.ContainsRune("aeiouAEIOU", rune(class[0])):
			return "an " + class + " address"
		default:
			return "a " + class + " address"
		}
		return ""
	}
	if numericHost(h) {
		// 127.1, 0x7f.0.0.1 and 2130706433 are not valid IP literals for Go,
		// but some resolvers (inet_aton) read them as 127.0.0.1.
		return "a non-canonical IP address"
	}
	return ""
}

// numericHost reports whether every dot-separated label of h is a decimal,
// octal or hexadecimal number, as no real host name's top label is.
func numericHost(h string) bool {
	for label := range strings.SplitSeq(h, ".") {
		digits := label
		if len(label) > 2 && (label[:2] == "0x" || label[:2] == "0X") {
			digits = label[2:]
		}
		if digits == "" {
			return false
		}
		for i := 0; i < len(digits); i++ {
			c := digits[i]
			hexDigit := c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
			if !(c >= '0' && c <= '9' || hexDigit && len(digits) != len(label)) {
				return false
			}
		}
	}
	return true
}
