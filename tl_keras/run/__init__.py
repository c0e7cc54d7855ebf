"""The drivers, one per command (train image/text, pretrain, predict, evaluate),
and what they share (setup, the run manifest).
"""
