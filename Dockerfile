# Image of the reference app: gunicorn + UvicornWorker serving demo.app (see compose.yaml; demo/ is not in the wheel).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HYPERION_DEMO_MIGRATIONS_DIR=/app/migrations \
    HOST=0.0.0.0 \
    PORT=8000

WORKDIR /app
COPY pyproject.toml README.md ./
COPY hyperion_lock ./hyperion_lock
RUN pip install ".[app]"
COPY demo ./demo
COPY migrations ./migrations
COPY alembic.ini gunicorn.conf.py ./

RUN useradd --system --uid 10001 --home-dir /app app && mkdir -p /app/var && chown app /app/var
USER app

EXPOSE 8000
CMD ["gunicorn", "-c", "gunicorn.conf.py"]
