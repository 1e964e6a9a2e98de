# relayd in a container. Build: docker build -t relayd .
# Run and compose examples: README.md, "Docker".
#
# Inside a container the listener must listen on 0.0.0.0 (loopback would be the
# container's own), so allowed_clients is what keeps relayd from being an open relay:
# set it to the Docker network that your applications use (RELAYD_LISTEN_ALLOWED_CLIENTS
# or listen.allowed_clients in the mounted file). Its default admits loopback only.

#
# The base image is pinned by patch version and by digest (of the multi-architecture
# index), so a rebuild starts from the same bytes. To move to a new patch release:
#   docker buildx imagetools inspect python:3.11.N-slim-bookworm    # prints "Digest: sha256:…"
# and put the tag and that digest in both FROM lines. (The digest below was taken from
# public build files, not pulled here: verify it with the command above once.)
#
# Dependencies come from requirements.lock (exact versions and hashes) in a layer of
# their own, before the source is copied: a change to relayd reinstalls only relayd.
# Regenerate the lock after changing pyproject.toml's dependencies (README, "Docker").

FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/relayd
COPY requirements.lock /src/requirements.lock
RUN /opt/relayd/bin/pip install --no-cache-dir --require-hashes -r /src/requirements.lock
COPY pyproject.toml README.md /src/
COPY share /src/share
COPY relayd /src/relayd
# --no-deps: everything it needs is installed above, from the lock; --no-build-isolation:
# built with the lock's setuptools, not whatever the index offers today.
RUN /opt/relayd/bin/pip install --no-cache-dir --no-deps --no-build-isolation /src

FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
LABEL org.opencontainers.image.title="relayd" \
      org.opencontainers.image.description="Local SMTP relay that queues durably and forwards to Microsoft 365 with OAuth 2.0"

RUN groupadd --system --gid 10001 relayd \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/relayd \
        --shell /usr/sbin/nologin relayd \
    && mkdir -p /var/lib/relayd /etc/relayd \
    && chown relayd:relayd /var/lib/relayd \
    && chmod 0700 /var/lib/relayd
COPY --from=build /opt/relayd /opt/relayd

ENV PATH=/opt/relayd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RELAYD_LISTEN_ADDRESS=0.0.0.0 \
    RELAYD_METRICS_ADDRESS=0.0.0.0

# Spool, token cache and (sandbox) Maildir: keep them on a volume so mail and the
# sign-in survive a new container.
VOLUME ["/var/lib/relayd"]
USER 10001:10001
WORKDIR /var/lib/relayd
EXPOSE 2525 2526

# relayd stops gracefully on SIGTERM: no new mail, open transactions finish.
# Give it listen.shutdown_grace: docker stop --time 40 (the default 10s may cut it short).
STOPSIGNAL SIGTERM
# No curl in slim images: Python's standard library asks /healthz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RELAYD_METRICS_PORT', '2526'), timeout=4)"]

# The configuration file is mounted here; RELAYD_<SECTION>_<KEY> variables override it.
CMD ["relayd", "serve", "-c", "/etc/relayd/relayd.yaml"]
