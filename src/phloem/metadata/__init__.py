"""The system database: its typed store, schema migrations, connection pool, and the
sealing of secrets stored in it. The bottom of the control plane: branches, the deployer
and backups use it; it imports nothing of phloem."""
