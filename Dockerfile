# Sage Router: one file, standard library only.
FROM python:3.12-slim

RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin sage \
    && mkdir -p /data && chown sage:sage /data && chmod 700 /data
WORKDIR /app
COPY router.py providers.json /app/
RUN python3 -m compileall -q /app

USER sage
# The port inside the container: set SAGE_ROUTER_PORT (docker run -e) to change it; the
# HEALTHCHECK below follows it.
ENV PYTHONUNBUFFERED=1 SAGE_ROUTER_PORT=8790
VOLUME ["/data"]
STOPSIGNAL SIGTERM
EXPOSE 8790

HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SAGE_ROUTER_PORT', '8790'), timeout=3)"]

# Listens on all interfaces, so SAGE_ROUTER_API_KEY must be set (docker run -e / --env-file):
# without it the router refuses to start. A SIGTERM lets requests in flight finish for up to
# shutdown_grace_seconds (30): run with --stop-timeout 40 (compose: stop_grace_period: 40s).
CMD ["python3", "-m", "router", "--host", "0.0.0.0", "--data-dir", "/data"]
