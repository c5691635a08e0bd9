"""A project on the developer's disk: its config (``phloemfile.py`` or ``neon.ts``), the
plan that turns it into deployments, source packing, and the API client that applies it.
It reaches a platform only over HTTP."""
