-- The project that created a function with `phloem deploy` (the project_id of its link
-- file); NULL: made by `phloem functions deploy`, or before owners were recorded. A
-- project deploy deletes only functions it owns.
ALTER TABLE functions ADD COLUMN owner text;
-- Deployment history: false when the entry was uploaded as a prebuilt bundle
-- (--no-bundle); when it last became active (a deploy or a rollback); when retention
-- removed its built files (from then on it cannot be rolled back to).
ALTER TABLE deployments ADD COLUMN bundle boolean NOT NULL DEFAULT true;
ALTER TABLE deployments ADD COLUMN activated_at timestamptz;
ALTER TABLE deployments ADD COLUMN pruned_at timestamptz;
