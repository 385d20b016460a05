"""Pure rendering of each host's user-data from plain values (no Pulumi imports)."""
