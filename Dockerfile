# gptbalance: a small runtime image that runs as a non-root user.
#   docker build -t gptbalance .
#   docker run -p 8000:8000 --stop-timeout 40 \
#              -v $PWD/gptbalance:/etc/gptbalance:ro \
#              -v gptbalance-usage:/var/lib/gptbalance -e OPENAI_API_KEY gptbalance
# Mount the config's directory, not the file: an editor's rename-save
# replaces the file, which a single-file mount never sees.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
# Dependencies first, in a layer of their own: a change to src/ rebuilds
# gptbalance only, not the hundred crates below it.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin gptbalance \
 && rm -rf src
COPY src src
# The real sources must look newer than the placeholders built above.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin gptbalance \
 && strip target/release/gptbalance

FROM debian:bookworm-slim
# TLS roots are compiled in (webpki-roots); the image needs no packages.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/gptbalance --shell /usr/sbin/nologin gptbalance \
 && mkdir -p /etc/gptbalance /var/lib/gptbalance \
 && chown gptbalance:gptbalance /var/lib/gptbalance
COPY --from=build /src/target/release/gptbalance /usr/local/bin/gptbalance
COPY examples/docker/config.yaml /etc/gptbalance/config.yaml
USER gptbalance:gptbalance
ENV GPTBALANCE_CONFIG=/etc/gptbalance/config.yaml
VOLUME ["/etc/gptbalance", "/var/lib/gptbalance"]
EXPOSE 8000
# SIGTERM drains for server.shutdown_grace (30s by default): give the
# container at least that long with `docker run --stop-timeout` (Docker's
# default is 10s), or compose's `stop_grace_period`.
STOPSIGNAL SIGTERM
# Healthy while /readyz answers 200 (some key is not cooling down). A
# config that listens on another port needs its own --url here.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["gptbalance", "health", "--url", "http://127.0.0.1:8000/readyz", "--timeout", "3s"]
ENTRYPOINT ["gptbalance"]
CMD ["serve"]
