"""Model-family knowledge: how Flux and Wan embed, position and de-embed tokens."""
