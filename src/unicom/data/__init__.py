"""Inputs of the pipeline: image lists (folders, CSV/parquet), webdataset shards,
benchmark folders in their official layouts, and image transforms.

Readers return plain records (paths, keys, labels, captions); they never decode images
eagerly, so listing a million files is cheap.
"""
