-- storage_object_created triggers (neon.ts `triggers: { name: { type:
-- "storage_object_created", function, bucket, prefix?, functionPath?, enabled? } }`): a
-- trigger fires when an object is created in a bucket of its branch under `key_prefix`.
-- Schedule triggers keep kind 'schedule'; a storage trigger has no cron (''), a schedule
-- trigger no bucket.
ALTER TABLE triggers ADD COLUMN kind text NOT NULL DEFAULT 'schedule'
    CHECK (kind IN ('schedule', 'storage_object_created'));
ALTER TABLE triggers ADD COLUMN bucket text;
ALTER TABLE triggers ADD COLUMN key_prefix text NOT NULL DEFAULT '';

-- The object a storage run is about (bucket, key, size, ETag, ...), so a run left
-- unfinished by a stop is delivered again with the same payload.
ALTER TABLE trigger_runs ADD COLUMN event jsonb;
