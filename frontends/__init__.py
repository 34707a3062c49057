"""Front ends: the orchestrators a node serves, each over the same core (docs/architecture.md)."""
