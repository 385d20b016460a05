"""Make the repository root importable (components/, cloud_init/, tests/)."""
