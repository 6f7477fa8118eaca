"""affseg's compiled kernels (numba), in one place.

Each replaces a library or numpy routine that was the measured bottleneck,
and each is tested against a slow reference:

- `lut`: union-find and edge bucketing for the look-up tables;
- `rag`: voxel pairs between labels and per-edge affinity sums;
- `waterz`: waterz's watershed and hierarchical region merging, tested
  against waterz itself;
- `graph_mutex`: the mutex watershed over a region graph, tested against
  `mwatershed.cluster`;
- `grid_mutex`: an image's mutex-watershed edges dealt into the graph
  kernel's buckets (in place of `mwatershed.agglom`), tested against
  `mwatershed.agglom` and `mwatershed.cluster`;
- `flood`: a seeded watershed over the nearest-neighbour affinity graph
  (growing segments over removed ones), tested against a heap-based loop;
- `mask_aggregation`: MaskAggr's updates on a CPU, one pass over the
  voxels per level (in place of whole-array torch updates), tested against
  the torch form and a loop over the masks;
- `prefetch`: a cache prefetch hint (LLVM's), which the graph kernel issues
  for the edges it takes next.

Python-level callers live in pipeline/kernels/{lut,rag,watershed,graph_mutex,mutex}.py and
pipeline/methods/mask_aggregation.py.
`cache=True` keeps the machine code beside these files, so a new process
does not compile again. numba's cache notices a change to a kernel's own
file only: a kernel that calls one of another file (grid_mutex calls
graph_mutex's `bucket_of`, graph_mutex calls lut's `_find`) keeps the old
code compiled in until its own file changes. After editing a kernel, clear
the caches (`find pipeline -name '*.nbi' -delete`) or set NUMBA_CACHE_DIR.
"""
