package dispatcher_test

import (
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/trackstar/trackstar/dispatcher"
	"github.com/trackstar/trackstar/internal/ops"
	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/schemas"
)

// BenchmarkDeliveries measures deliveries per second to one local partner
// (a fasthttp server on loopback), from conversions on Kafka to delivery
// records acknowledged by Kafka, with the embedded broker in the same
// process. Run it with a fixed count, e.g. -benchtime 20000x.
func BenchmarkDeliveries(b *testing.B) {
	f := func(name, method, secret string) {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			var got atomic.Int64
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			srv := &fasthttp.Server{Handler: func(ctx *fasthttp.RequestCtx) { got.Add(1) }}
			go srv.Serve(ln)
			b.Cleanup(func() { srv.Shutdown() })

			addr := testenv.KafkaTopics(b, 4)
			extra := []string{"method: " + method}
			if secret != "" {
				extra = append(extra, "secret: "+secret)
			}
			health := &ops.Health{}
			reg := startDispatcher(b, dispatcher.Config{
				Brokers: []string{addr},
				Catalog: holder(b, true, "5s", "[1s]",
					affiliate(7, "http://"+ln.Addr().String()+"/pb?cid={sub1}&p={payout}&tx={conversion_id}&st={status}", extra...)),
				Health: health,
				Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
			})
			waitFor(b, "the dispatcher to join its group", func() bool { return health.Ready() == nil })

			convs := make([]schemas.Conversion, b.N)
			for i := range convs {
				convs[i] = newConversion(7)
			}
			b.ResetTimer()
			start := time.Now()
			var wg sync.WaitGroup
			const chunk = 5000
			for i := 0; i < len(convs); i += chunk {
				wg.Add(1)
				go func() {
					defer wg.Done()
					produce(b, addr, convs[i:min(i+chunk, len(convs))]...)
				}()
			}
			wg.Wait()
			deadline := time.Now().Add(5 * time.Minute)
			for metric(b, reg, "trackstar_dispatcher_deliveries_total", "outcome", "delivered") < float64(b.N) {
				if time.Now().After(deadline) {
					b.Fatalf("only %d of %d delivered", got.Load(), b.N)
				}
				time.Sleep(5 * time.Millisecond)
			}
			elapsed := time.Since(start)
			b.StopTimer()
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "deliveries/s")
			if n := got.Load(); n != int64(b.N) {
				b.Fatalf("partner got %d requests, want %d", n, b.N)
			}
		})
	}
	f("get", "GET", "")
	f("post-signed", "POST", "bench-secret")
}
