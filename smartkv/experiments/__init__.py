"""Experiments kept runnable as `python -m smartkv.experiments.<name>` (see README.md in this folder)."""
