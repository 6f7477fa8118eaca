"""affseg's compiled kernels (numba), in one place.

Each replaces a library or numpy routine that was the measured bottleneck,
and each is tested against a slow reference:

- `lut`: union-find and edge bucketing for the look-up tables;
- `rag`: voxel pairs between labels and per-edge affinity sums;
- `waterz`: waterz's watershed and hierarchical region merging, tested
  against waterz itself;
- `graph_mutex`: the mutex watershed over a region graph, tested against
  `mwatershed.cluster`.

Python-level callers live in pipeline/kernels/{lut,rag,watershed,graph_mutex}.py.
`cache=True` keeps the machine code beside these files, so a new process
does not compile again.
"""
