# Build: docker build -t nudge .   Run: docker run -e NUDGE_DATABASE_URL=... -e NUDGE_JWT_SECRET=... -p 8080:8080 nudge
#
# The build stage copies exactly what `cargo build --bin nudge` reads, nothing else (no .dockerignore needed).
# tests/image.rs builds the binary from these COPY lines alone, so a new include_str! outside them fails CI,
# not the next image build.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY sql ./sql
# The demo page serves the client library (src/demo/api.rs includes it).
COPY clients/js/src/index.js ./clients/js/src/index.js
# The workspace's other package, the benchmark tools: cargo reads its manifest and compiles none of it.
COPY bench/Cargo.toml ./bench/Cargo.toml
COPY bench/src ./bench/src
RUN cargo build --release --locked --package nudge --bin nudge

FROM debian:bookworm-slim
# The platform's trust store: TLS to managed PostgreSQL (sslrootcert=system) and an https JWKS verify against it.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
# A fixed numeric id, so that Kubernetes' runAsNonRoot can check it and mounted secrets can be made readable.
RUN groupadd --system --gid 10001 nudge && useradd --system --uid 10001 --gid 10001 --no-create-home nudge
COPY --from=build /src/target/release/nudge /usr/local/bin/nudge
USER 10001:10001
ENV NUDGE_LISTEN=0.0.0.0:8080
EXPOSE 8080
# Ready = GET /readyz answers 200, asked over bash's /dev/tcp (the image has no curl or wget): port from
# NUDGE_LISTEN, plain HTTP only (with NUDGE_TLS_CERT set, use your orchestrator's probes instead).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${NUDGE_LISTEN##*:} && printf 'GET /readyz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && read -r _ status _ <&3 && [ \"$status\" = 200 ]"]
ENTRYPOINT ["nudge"]
CMD ["serve"]
