"""Database branches: one PostgreSQL cluster per branch."""
