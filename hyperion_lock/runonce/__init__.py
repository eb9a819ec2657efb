"""Run-once: one worker runs a startup job per generation, the others wait for its outcome.

Internal; applications import from :mod:`hyperion_lock`. Where a change goes:

- ``coordinator``: ``Coordinator.run_once`` and the waiter around the pure policy;
- ``policy``: ``WaitPolicy``, the pure decisions (wait, take over, give up) of a waiting worker;
- ``leadership``: the leader's renewals and its fencing of a lost lease; ``call``: one call's budget;
- ``model``: the values (``Lease``, ``Outcome``, ``Status``) and typed script replies;
- ``keys`` and ``scripts``: the Redis key layout and the Lua compare-and-set scripts;
- ``redis_backend`` / ``file_backend``: the two stores of the lease and outcome;
- ``signals``: ``stop_requested``; ``dropin``: ``use_lock_for_workers``.
"""
