"""The core: one forward pass with every site addressable (engine), model loading, prompts,
metrics and results. Imports nothing else from mechtests."""
