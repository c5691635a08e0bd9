"""The ``phloem`` command line: a thin layer that builds settings and calls the library
(``up``) or the API (everything else).

``main.py`` holds the app, its shared options and helpers, and the core commands; the
functions, project and backup command groups live in their own modules, which import ``main`` and
add their commands to its app. Importing this package imports them, so every entry point
(``phloem``, ``python -m phloem``, ``phloem.cli.main.main``) sees every command, and
``main`` never imports the modules that import it.
"""

from phloem.cli import (  # noqa: F401  (register their commands)
    ai_cmds,
    backup_cmds,
    domains_cmds,
    functions_cmds,
    keys_cmds,
    project_cmds,
    triggers_cmds,
)
