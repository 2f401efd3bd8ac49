"""Datasets, splits and preprocessing, augmentation of training batches."""
