"""A FastAPI app shaped like the one in issue #10, adopting hyperion_lock by changing one import.

A separate project with its own pinned requirements (``requirements.txt``: redis-py 5.0.8 because arq 0.26.3
needs redis < 6, uvicorn 0.30.6) and its own pytest suite (``tests/``, run with ``pytest -n 4``). It is not part
of this repository's test run: ``tests/integration/test_adoption.py`` installs it into a venv of its own, runs its suite
there, and starts it with ``uvicorn sample_app.main:app --workers 4``.
"""
