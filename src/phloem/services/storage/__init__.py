"""Object storage per branch: an S3-compatible endpoint whose objects live in the
branch's own directory, copied (reflinks where the filesystem has them) with the branch.
See docs/architecture.md, "Object storage"."""
