"""Component resources and the pure models they are built from."""
