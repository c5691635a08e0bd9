"""Branch database passwords sealed at rest, like deployment env.

The owner's and the superuser's passwords move from the plaintext columns
``role_password``/``superuser_password`` to ``*_sealed`` columns holding AES-256-GCM tokens
whose associated data is the branch id and the column (see
:func:`phloem.metadata.store.branch_secret_context`), so a token copied to another branch
or column does not open. Existing rows are sealed here, in the migration's transaction.

The plaintext is cleared in the same UPDATE (``DROP COLUMN`` alone leaves the bytes in
every tuple), and ``VACUUM FULL`` then rewrites the table's file without the dead tuple
versions that still held it. Older WAL segments of the system database may keep the old
values until PostgreSQL recycles and overwrites them.
"""

from __future__ import annotations

from typing import Any

import psycopg

from phloem.metadata.secrets import SecretBox
from phloem.metadata.store import branch_secret_context

AFTER_COMMIT = ["VACUUM FULL branches"]


def migrate(conn: psycopg.Connection[Any], box: SecretBox) -> None:
    conn.execute(
        "ALTER TABLE branches ADD COLUMN role_password_sealed text,"
        " ADD COLUMN superuser_password_sealed text,"
        " ALTER COLUMN role_password DROP NOT NULL,"
        " ALTER COLUMN superuser_password DROP NOT NULL"
    )
    rows = conn.execute(
        "SELECT id, role_password, superuser_password FROM branches").fetchall()
    for branch_id, role_password, superuser_password in rows:
        conn.execute(
            "UPDATE branches SET role_password_sealed = %s, superuser_password_sealed = %s,"
            " role_password = NULL, superuser_password = NULL WHERE id = %s",
            (box.seal_text(role_password, branch_secret_context(branch_id, "role_password")),
             box.seal_text(superuser_password,
                           branch_secret_context(branch_id, "superuser_password")),
             branch_id),
        )
    conn.execute(
        "ALTER TABLE branches DROP COLUMN role_password, DROP COLUMN superuser_password,"
        " ALTER COLUMN role_password_sealed SET NOT NULL,"
        " ALTER COLUMN superuser_password_sealed SET NOT NULL"
    )
