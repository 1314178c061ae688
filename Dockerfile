# Sage Router: one file, standard library only.
FROM python:3.12-slim

RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin sage \
    && mkdir -p /data && chown sage:sage /data
WORKDIR /app
COPY router.py providers.json /app/
RUN python3 -m compileall -q /app

USER sage
ENV PYTHONUNBUFFERED=1
VOLUME ["/data"]
STOPSIGNAL SIGTERM
EXPOSE 8790

HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8790/health', timeout=3)"]

# Listens on all interfaces, so SAGE_ROUTER_API_KEY must be set (docker run -e / --env-file):
# without it the router refuses to start.
CMD ["python3", "/app/router.py", "--host", "0.0.0.0", "--port", "8790", "--data-dir", "/data"]
