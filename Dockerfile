# One Floodgate binary in a small non-root image; the same file builds both images:
#
#   docker build --build-arg BIN=floodgate-proxy    -t ghcr.io/floodgate-dev/floodgate-proxy:0.1.0 .
#   docker build --build-arg BIN=floodgate-operator -t ghcr.io/floodgate-dev/floodgate-operator:0.1.0 .
#
# The tag is the chart's appVersion (charts/floodgate/Chart.yaml), which the chart uses when
# `gateway.image.tag` / `operator.image.tag` are empty. Not built or published by CI yet.

FROM rust:1.95.0-bookworm AS build
ARG BIN
WORKDIR /src
COPY . .
RUN test -n "$BIN" || { echo "--build-arg BIN=floodgate-proxy or BIN=floodgate-operator" >&2; exit 1; }
RUN cargo build --release --locked --bin "$BIN" && cp "target/release/$BIN" /floodgate

# glibc and CA certificates, no shell; runs as 65532 like the chart's securityContext.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /floodgate /usr/local/bin/floodgate
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/floodgate"]
