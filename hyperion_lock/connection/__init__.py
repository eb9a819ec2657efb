"""The Redis layer both products share: URLs (plain, Sentinel, Cluster, TLS) and their redaction, clients,
retries within a time budget, and the classification of Redis errors into the library's exceptions.

Internal; nothing here knows about run-once jobs or cache entries.
"""
