"""The pytest side: the plugin (options and hooks), the claim API, snapshots, the report and its
renderers, mutation runs."""
