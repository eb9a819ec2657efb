"""The ``hyperion-lock`` command (``main``: the entry point; ``status``, ``reset``, ``run`` (run and
wait): one module per command, ``common``: what they share) and the guard process that keeps a
``run`` command from outliving its runner (``guard``, run by path: standard library only). Nothing
imports this package.
"""
