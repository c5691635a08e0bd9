-- The Neon API v2 face (/api/v2) shows a platform as one Neon project. Its id must stay
-- the same across restarts (the Neon CLI writes it into .neon context files), so it is
-- made once, here, and kept; default_branch_id is what `neon branches set-default` sets
-- (NULL: the root branch).
CREATE TABLE neon_project (
    singleton          boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    id                 text NOT NULL,
    name               text NOT NULL,
    default_branch_id  text REFERENCES branches (id) ON DELETE SET NULL,
    created_at         timestamptz NOT NULL DEFAULT now()
);

INSERT INTO neon_project (id, name)
VALUES ('phloem-' || substr(md5(random()::text || clock_timestamp()::text), 1, 12), 'phloem');
