# Multi-stage build of the one trackstar binary: static, run as non-root.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/trackstar ./cmd/trackstar

FROM alpine:3.22
# wget (busybox) is what the compose health checks call.
RUN adduser -D -u 10001 -h /var/lib/trackstar trackstar && mkdir -p /etc/trackstar && chown trackstar /var/lib/trackstar
COPY --from=build /out/trackstar /usr/local/bin/trackstar
USER trackstar
WORKDIR /var/lib/trackstar
ENV TRACKSTAR_DATA=/var/lib/trackstar TRACKSTAR_CONFIG=/etc/trackstar/trackstar.yaml
EXPOSE 8080 9100
ENTRYPOINT ["trackstar"]
CMD ["--help"]
