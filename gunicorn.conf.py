"""gunicorn configuration of the reference app:  gunicorn -c gunicorn.conf.py

Environment: WEB_CONCURRENCY (workers, default 4), HOST (default 127.0.0.1) and PORT (default 8000),
DATABASE_URL (default SQLite ./var/demo.sqlite3), HYPERION_LOCK_REDIS_URL (unset: file locks on this host),
HYPERION_LOCK_GENERATION (default: new per master start), LOG_LEVEL (default INFO), PROMETHEUS_MULTIPROC_DIR
(default: a new directory per master start, removed at its exit, when prometheus_client is installed).
"""

from pathlib import Path

from hyperion_lock import (
    gunicorn_bind,
    gunicorn_child_exit,
    gunicorn_logconfig_dict,
    gunicorn_metrics_dir,
    gunicorn_on_starting,
    gunicorn_post_fork,
    gunicorn_workers,
)

# Before any worker imports prometheus_client: the workers' metrics meet in this directory, and /metrics sums them.
gunicorn_metrics_dir()
wsgi_app = "demo.app:app"
# The reference app is the demo/ package next to this file (it is not installed with the library).
pythonpath = str(Path(__file__).resolve().parent)
worker_class = "uvicorn_worker.UvicornWorker"
workers = gunicorn_workers()
bind = [gunicorn_bind()]
# Applies only after a worker's first heartbeat (gunicorn >= 22), i.e. after startup: migrations may be long.
timeout = 30
graceful_timeout = 30
# Never preload: Redis clients and SQLAlchemy engines must be created in each worker, after the fork.
preload_app = False
# gunicorn >= 25.1 opens a control socket at one fixed path per user: several masters would collide.
control_socket_disable = True
on_starting = gunicorn_on_starting
post_fork = gunicorn_post_fork
child_exit = gunicorn_child_exit
logconfig_dict = gunicorn_logconfig_dict()
