-- Scoped API keys (the remote control API): what a key may do (`scopes`: read, deploy,
-- branches, admin, metrics; keys made before this migration could do everything, so they
-- are admin), the branches it is limited to (NULL: all), when it stops working
-- (`expires_at`, NULL: never) or was revoked (`revoked_at`: kept, so `keys list` shows it),
-- and when it was last used (written at most once a minute per key, not per request).
ALTER TABLE api_keys ADD COLUMN scopes text[] NOT NULL DEFAULT '{admin}';
ALTER TABLE api_keys ADD COLUMN branch_ids text[];
ALTER TABLE api_keys ADD COLUMN expires_at timestamptz;
ALTER TABLE api_keys ADD COLUMN revoked_at timestamptz;
ALTER TABLE api_keys ADD COLUMN last_used_at timestamptz;
