"""Pure algorithms of Deep Compression (layer 4): no Lightning, no models, only tensors/arrays in and out.

- ``pruning``: magnitude and std-threshold masks, pruning schedules (Han 2015 §3).
- ``kmeans``: 1-D k-means with the paper's initialisations (Han 2016 §3).
- ``huffman``: canonical Huffman coding (Han 2016 §4).
- ``sparse_index``: relative-index sparse positions with filler entries (Han 2016 §2, Fig. 2).
- ``container``: the ``.dcz`` file container (magic, version, JSON header, CRC32-checked sections).
"""
