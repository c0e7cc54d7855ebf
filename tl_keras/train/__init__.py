"""Training: the two stages, stage-1 features and stage-2 activations caches, the
distribution strategy and its training loop, resume and guards.
"""
