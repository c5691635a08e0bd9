ALTER TABLE branches ADD COLUMN pooler_port integer UNIQUE;
ALTER TABLE branches ADD COLUMN copy_method text;
ALTER TABLE branches ADD COLUMN copy_bytes bigint;
ALTER TABLE branches ADD COLUMN copy_ms double precision;
ALTER TABLE branches ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
