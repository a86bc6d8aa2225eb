"""Run folders: the record contract and its one writer, provenance, discovery, and the sweep protocol.

Torch-free at import, so the analysis can read run folders with it.
"""
