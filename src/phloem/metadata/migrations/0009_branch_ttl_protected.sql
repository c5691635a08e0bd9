-- neon.ts `branch` closures may set a branch's `ttl` and `protected` (as Neon's do).
-- expires_at: when the platform's sweeper deletes the branch with its functions (NULL:
-- never). protected: delete and reset are refused, and a deploy needs --allow-protected.
ALTER TABLE branches ADD COLUMN expires_at timestamptz;
ALTER TABLE branches ADD COLUMN protected boolean NOT NULL DEFAULT false;
CREATE INDEX branches_expires_at ON branches (expires_at) WHERE expires_at IS NOT NULL;
