"""Text classification with word vectors: sources, vectors, the model, its export.
"""
