package catalog

import (
	"strings"
	"testing"
)

func BenchmarkTemplateAppend(b *testing.B) {
	tpl, err := ParseTemplate("https://shop.example/land?click_id={click_id}&aff={aff_id}&offer={offer_id}&s1={sub1}&s2={sub2}&src={source}", false)
	if err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		name string
		sub  string
	}{
		{"plain-sub", "campaign42"},
		{"escaped-sub", "a&b c/é"},
		{"long-sub", strings.Repeat("x y", 100)},
	} {
		b.Run(c.name, func(b *testing.B) {
			v := &Values{
				ClickID: "0190b5c3f2a07c1d9e4b2a6f8c3d1e5a",
				OfferID: 12, AffID: 7,
				Sub:    [5]string{c.sub, "s2"},
				Source: "feed",
			}
			dst := make([]byte, 0, 1024)
			b.SetBytes(int64(len(tpl.Append(dst[:0], v))))
			b.ReportAllocs()
			for b.Loop() {
				dst = tpl.Append(dst[:0], v)
			}
		})
	}
}
