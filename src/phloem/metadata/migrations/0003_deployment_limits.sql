ALTER TABLE deployments ADD COLUMN limits jsonb NOT NULL DEFAULT '{}';
