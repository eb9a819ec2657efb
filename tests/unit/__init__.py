"""Unit tier: no servers, no subprocesses of the library; the whole tier runs in under a minute."""
