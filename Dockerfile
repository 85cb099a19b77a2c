# gptbalance: a small runtime image that runs as a non-root user.
#   docker build -t gptbalance .
#   docker run -p 8000:8000 -v $PWD/config.yaml:/etc/gptbalance/config.yaml \
#              -v gptbalance-usage:/var/lib/gptbalance -e OPENAI_API_KEY gptbalance
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
RUN cargo build --release --locked --bin gptbalance && strip target/release/gptbalance

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
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=3s CMD ["gptbalance", "--version"]
ENTRYPOINT ["gptbalance"]
CMD ["serve"]
