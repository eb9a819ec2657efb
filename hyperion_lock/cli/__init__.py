"""The ``hyperion-lock`` command (``main``: status, reset, run, wait) and the guard process that keeps a ``run``
command from outliving its runner (``guard``, run by path: standard library only). Nothing imports this package.
"""
