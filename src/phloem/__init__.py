"""phloem: long-running serverless HTTP functions that branch with their Postgres database.

This file is also copied into every Python isolate's runtime (so that user code can
``from phloem.functions import wait_until``); keep it free of imports.
"""

__version__ = "0.1.0"
