"""Output safety: names, temporaries, input protection, limits and signals (see each module)."""
