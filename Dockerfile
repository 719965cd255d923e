# Build: docker build -t nudge .   Run: docker run -e NUDGE_DATABASE_URL=... -e NUDGE_JWT_SECRET=... -p 8080:8080 nudge
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY sql ./sql
RUN cargo build --release --locked --bin nudge

FROM debian:bookworm-slim
RUN useradd --system --no-create-home nudge
COPY --from=build /src/target/release/nudge /usr/local/bin/nudge
USER nudge
ENV NUDGE_LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["nudge"]
CMD ["serve"]
