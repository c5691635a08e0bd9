"""Backups of a whole platform: ``phloem backup create|list|restore``.

``create`` (through the API, the platform keeps serving) writes the metadata and every
branch as base backups plus the files that make them usable; ``restore`` (offline) lays
them out as a new data dir that ``phloem up`` starts as it was. Modules: ``manifest``
(layout and manifest), ``files`` (tree copies keeping owners and modes), ``create``,
``jobs`` (backups the API runs and lists), ``restore``.
"""
