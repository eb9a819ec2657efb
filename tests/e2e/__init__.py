"""End-to-end tier: whole deployments (gunicorn masters, several hosts, Sentinel) of the reference app."""
