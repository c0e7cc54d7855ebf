"""The model: backbone families and their blocks, `.keras` source models, the
classifier built on a backbone, and its custom layers.
"""
