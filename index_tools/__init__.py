"""Index-side tools: turn a training manifest into a fastattr vector index bundle."""
