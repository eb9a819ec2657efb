"""Integration tier: real redis-server / PostgreSQL / processes, one area per module."""
