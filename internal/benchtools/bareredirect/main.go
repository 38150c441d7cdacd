// Command bareredirect is the baseline of `scripts/bench.sh edge`: a bare
// fasthttp server that answers every request with a 302 to a fixed URL of
// the length a Trackstar click redirect has, doing nothing else. The edge's
// throughput is reported as a ratio of this one's on the same machine.
package main

import (
	"flag"
	"log"
	"net"

	"github.com/valyala/fasthttp"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8081", "address to serve on")
	flag.Parse()

	// A click ID (26 characters) and the macros of examples/trackstar.yaml's
	// first offer, so that both servers write responses of the same size.
	location := []byte("https://shop.example/land?click_id=01jb3q4v2c8mx9k7t6r5p4n3m2&aff=7&s1=bench")
	srv := &fasthttp.Server{
		Handler: func(ctx *fasthttp.RequestCtx) {
			ctx.Response.Header.SetBytesV("Location", location)
			ctx.SetStatusCode(fasthttp.StatusFound)
		},
		Name: "bareredirect",
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("cannot listen on %s: %v", *listen, err)
	}
	log.Printf("bareredirect listening on %s", ln.Addr())
	if err := srv.Serve(ln); err != nil {
		log.Fatalf("serve: %v", err)
	}
}
