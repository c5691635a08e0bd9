"""Runtime hosts: the small programs that serve user code inside an isolate.

Files under this package that isolates run are copied into the isolate runtime; keep
this file free of imports.
"""
