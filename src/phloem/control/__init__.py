"""The control plane: metadata in the system database, the REST API, API keys."""
