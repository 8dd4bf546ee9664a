"""Benchmarks of the segmentation HPO tool: ``python bench/run.py [--quick] [--only NAME]`` (see README.md)."""
