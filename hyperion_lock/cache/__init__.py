"""The endpoint and function cache: one worker computes an entry, the others wait for it or serve it stale.

Internal; applications import from :mod:`hyperion_lock`. Where a change goes:

- ``facade``: ``Cache``, the public object, and the lookup around the pure decisions;
- ``types``: what callers pass and get back (``Spec``, ``Result``, ``CacheSettings``, ``CacheStatus``);
- ``policy``: the pure decisions: freshness of an entry, how long to wait, the circuit breaker;
- ``keys`` and ``codec``: entry keys (never holding a secret) and value encodings;
- ``store``: the Lua scripts and the two stores (Redis, in-process memory) behind one protocol;
- ``near``: the per-worker near cache; ``http``: ``Cache.endpoint`` for FastAPI; ``errors``: cache exceptions.
"""
