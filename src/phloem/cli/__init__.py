"""The ``phloem`` command line: a thin layer that builds settings and calls the library
(``up``) or the API (everything else)."""
