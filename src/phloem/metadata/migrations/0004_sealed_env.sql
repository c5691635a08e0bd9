-- Env values are sealed (AES-GCM) by the application; only names and a keyed digest are
-- stored in the clear.
ALTER TABLE deployments ADD COLUMN env_sealed text;
ALTER TABLE deployments ADD COLUMN env_keys text[] NOT NULL DEFAULT '{}';
ALTER TABLE deployments ADD COLUMN env_digest text;
