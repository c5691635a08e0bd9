"""The Python (ASGI) runtime. Copied into isolates; keep this file free of imports."""
