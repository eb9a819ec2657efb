"""Reference app: FastAPI + SQLAlchemy 2 + Alembic, initialised exactly once per deploy through the Coordinator.

Run it with ``gunicorn -c gunicorn.conf.py`` from the repository root (see ``demo.app``).
"""
