package dispatcher_test

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// partnerDocVerify is the Go verifier of docs/partner.md, word for word
// (TestPartnerDocVerifierIsThisOne checks that): what a partner copies
// must accept what the dispatcher sends.
func partnerDocVerify(secret []byte, r *http.Request, body []byte) bool {
	var ts, sig string
	for _, kv := range strings.Split(r.Header.Get("X-Trackstar-Signature"), ",") {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "t":
			ts = v
		case "v1":
			sig = v
		}
	}
	payload := body
	if r.Method == http.MethodGet {
		// The request target exactly as received: r.URL.RequestURI()
		// re-encodes it and may differ.
		payload = []byte(r.RequestURI)
	}
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(ts + "."))
	mac.Write(payload)
	want := hex.EncodeToString(mac.Sum(nil))
	sec, err := strconv.ParseInt(ts, 10, 64)
	return err == nil && time.Since(time.Unix(sec, 0)).Abs() < 5*time.Minute &&
		hmac.Equal([]byte(sig), []byte(want))
}

// TestPartnerDocVerifierIsThisOne: the Go block of docs/partner.md is
// partnerDocVerify, so the signature tests check the documented code.
func TestPartnerDocVerifierIsThisOne(t *testing.T) {
	doc, err := os.ReadFile("../docs/partner.md")
	if err != nil {
		t.Fatal(err)
	}
	src, err := os.ReadFile("partnerdoc_test.go")
	if err != nil {
		t.Fatal(err)
	}
	block := regexp.MustCompile("(?s)```go\n(func verify\\(.*?\n})\n```").FindSubmatch(doc)
	fn := regexp.MustCompile("(?s)\n(func partnerDocVerify\\(.*?\n})\n").FindSubmatch(src)
	if block == nil || fn == nil {
		t.Fatalf("no Go verifier found in docs/partner.md (%v) or in this file (%v)", block != nil, fn != nil)
	}
	want := strings.Replace(string(fn[1]), "func partnerDocVerify(", "func verify(", 1)
	if string(block[1]) != want {
		t.Fatalf("docs/partner.md's verifier:\n%s\nis not the one tested:\n%s", block[1], want)
	}
}
