"""Reading a run: metrics, the Markdown report, plots, TensorBoard, multi-label
thresholds, comparison of runs.
"""
