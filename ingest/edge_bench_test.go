package ingest

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/schemas"
)

// BenchmarkBuild measures the per-request work before the produce call:
// parsing the query, minting the ID, encoding the record and rendering the
// redirect. It should not allocate.
func BenchmarkBuild(b *testing.B) {
	cat, err := catalog.Parse([]byte(testConfig), "test.yaml")
	if err != nil {
		b.Fatal(err)
	}
	ip := netip.MustParseAddr("198.51.100.7")
	ua := []byte("Mozilla/5.0 (Linux; Android 14) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Mobile Safari/537.36")
	ref := []byte("https://news.example/story?id=1")
	p := newProducer(&Config{Brokers: []string{"127.0.0.1:1"}}, nil, nil)

	b.Run("click", func(b *testing.B) {
		query := []byte("offer_id=1&aff_id=7&sub1=campaign%20one&sub2=ad-42&sub3=&source=newsletter")
		var args fasthttp.Args
		b.ReportAllocs()
		for b.Loop() {
			args.ParseBytes(query)
			req, rerr := parseClick(&args, false, 500)
			if rerr != nil {
				b.Fatal(rerr)
			}
			ev := p.get(topicClicks)
			buildClick(ev, &req, cat.Offer(req.offerID), ip, ua, ref, time.Now())
			b.SetBytes(int64(len(ev.value)))
			p.put(ev)
		}
	})
	b.Run("forwarded_for", func(b *testing.B) {
		var h fasthttp.RequestHeader
		h.Set("User-Agent", string(ua))
		h.Add("X-Forwarded-For", "203.0.113.5")
		h.Add("X-Forwarded-For", "198.51.100.7")
		h.Set("Accept", "*/*")
		b.ReportAllocs()
		for b.Loop() {
			if len(lastForwardedFor(&h)) != len("198.51.100.7") {
				b.Fatal("wrong X-Forwarded-For")
			}
		}
	})
	b.Run("postback", func(b *testing.B) {
		query := []byte("click_id=" + schemas.NewID(time.Now()) + "&goal=sale&amount=19.99&currency=usd&txn_id=order-1&token=shop-token")
		var args fasthttp.Args
		b.ReportAllocs()
		for b.Loop() {
			args.ParseBytes(query)
			req, rerr := parsePostback(&args, nil, false, 500)
			if rerr != nil {
				b.Fatal(rerr)
			}
			if cat.AdvertiserByToken(b2s(req.token)) == nil {
				b.Fatal("unknown token")
			}
			ev := p.get(topicPostbacks)
			buildPostback(ev, &req, 1, ip, time.Now())
			b.SetBytes(int64(len(ev.value)))
			p.put(ev)
		}
	})
}

// BenchmarkHandler runs whole requests through the edge's handler, Kafka
// acks included (the embedded broker, in memory), from many goroutines at
// once as real traffic arrives, so that produce calls batch.
func BenchmarkHandler(b *testing.B) {
	broker := testenv.KafkaTopics(b, testPartitions)
	te := startEdge(b, broker, b.TempDir(), nil)
	h := te.edge.guard(te.edge.handle)
	remote := &net.TCPAddr{IP: net.IPv4(198, 51, 100, 7), Port: 40000}
	f := func(name, uri string, want int) {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetParallelism(64)
			b.RunParallel(func(pb *testing.PB) {
				var req fasthttp.Request
				var ctx fasthttp.RequestCtx
				ctx.Init(&req, remote, nil)
				for pb.Next() {
					ctx.Request.SetRequestURI(uri) // parsed afresh each time
					ctx.Response.Reset()
					h(&ctx)
					if code := ctx.Response.StatusCode(); code != want {
						b.Errorf("%s: %d %s", uri, code, ctx.Response.Body())
						return
					}
				}
			})
			if n := te.edge.sp.count.Load(); n > 0 {
				b.Logf("%d events spooled: Kafka was slower than the produce timeout", n)
			}
		})
	}
	f("click", "/click?offer_id=1&aff_id=7&sub1=campaign%20one&sub2=ad-42&source=newsletter", 302)
	f("postback", "/postback?click_id="+schemas.NewID(time.Now())+"&goal=sale&amount=19.99&currency=usd&token=shop-token", 200)
}
