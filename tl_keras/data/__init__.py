"""Data in: sources and splits, pre-flight scan, image decoding, tf.data pipelines, augmentation.
"""
