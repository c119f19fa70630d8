"""The analyses, each a view over the engine: patching sweeps and interventions, attribution,
head scores. Import the core only."""
