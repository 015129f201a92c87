"""lesionlab core: HAM10000 data layer, lesion-grouped splits, metrics and artifact I/O.

Shared by ``featurize``, ``models`` and ``benchmarks``; imports none of them.
"""

__version__ = "0.1.0"
