"""The endpoint and function cache: one worker computes an entry, the others wait for it or serve it stale.

Internal; applications import from :mod:`hyperion_lock`. Where a change goes:

- ``facade``: ``Cache``, the public object: its API, turning arguments into a ``Spec`` and an identity;
- ``engine``: what ``Cache`` runs on: per-event-loop stores, flights, the breaker's I/O, and the lookup's
  I/O (read, wait, lead, renew, serve, refresh, finish, fail) around the pure decisions;
- ``lookup``: the pure decisions of one lookup (``LookupPolicy``: serve, lead, listen, wait, compute
  directly or raise) and of keeping its lease (``LeaseRenewal``), tested with a fake clock;
- ``types``: what callers pass and get back (``Spec``, ``Result``, ``CacheSettings``, ``CacheStatus``);
- ``policy``: the pure one-shot decisions: freshness of an entry, how long to wait, the circuit breaker;
- ``keys`` and ``codec``: entry keys (never holding a secret) and value encodings;
- ``store``: the Lua scripts and the two stores (Redis, in-process memory) behind one protocol;
- ``near``: the per-worker near cache; ``http``: ``Cache.endpoint`` for FastAPI; ``errors``: cache exceptions.
"""
