"""Serving: the SavedModel, TFLite variants and the parity gate between them and Keras.
"""
