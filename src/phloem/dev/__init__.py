"""`phloem dev`: serve a project's working tree through a gateway and supervisor of its own,
reloading a function when its files change (see server.py)."""
