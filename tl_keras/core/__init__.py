"""Plumbing every layer uses: atomic outputs, the array cache, untrusted paths,
determinism and mixed precision. Imports only `tl_keras.errors` and `tl_keras.config`.
"""
