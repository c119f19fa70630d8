"""Root conftest: the mechtests plugin is registered through its pytest11 entry point."""
