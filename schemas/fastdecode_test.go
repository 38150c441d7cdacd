package schemas

import (
	"encoding/json"
	"testing"
)

func FuzzDecodeClickFast(f *testing.F) {
	c := Click{ClickID: "01JD0000000000000000000000", TS: 1732780800000, OfferID: 1, AdvertiserID: 2, AffID: 4294967295,
		Source: "src", Sub1: "a b", Sub2: "ü€", Sub3: "\x00\"\\", Sub4: "\xff", Sub5: "<&>", IP: "1.2.3.4", UserAgent: "UA", Referer: "http://x/?a=b"}
	f.Add(c.AppendJSON(nil))
	f.Add((&Click{}).AppendJSON(nil))
	f.Add([]byte(`{"v":1,"click_id":"x","ts":-0,"offer_id":-0,"advertiser_id":01,"aff_id":1e2,"source":"","sub1":"","sub2":"","sub3":"","sub4":"","sub5":"","ip":"","user_agent":"","referer":""}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var fast Click
		if !decodeClickFast(b, &fast) {
			return
		}
		var slow Click
		if err := json.Unmarshal(b, &slow); err != nil {
			t.Fatalf("fast accepted %q, encoding/json refused: %v", b, err)
		}
		if fast != slow {
			t.Fatalf("%q: fast %+v, encoding/json %+v", b, fast, slow)
		}
	})
}

func BenchmarkDecodeClick(b *testing.B) {
	c := Click{V: Version, ClickID: "01JD0000000000000000000000", TS: 1732780800000, OfferID: 1, AdvertiserID: 2, AffID: 7,
		Sub1: "bench", IP: "127.0.0.1", UserAgent: "wrk"}
	v := c.AppendJSON(nil)
	b.Run("fast", func(b *testing.B) {
		for b.Loop() {
			DecodeClick(v)
		}
	})
	b.Run("encoding/json", func(b *testing.B) {
		for b.Loop() {
			var e Click
			decode(v, &e, "click")
		}
	})
}
