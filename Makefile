# Two set-up commands on a fresh clone: `make demo` and `make test`.
# Both create .venv and install; torch comes first, on its own, because the
# CPU wheel is on local disk here and any other resolution of it pulls
# gigabytes of CUDA packages.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
GROUNDTRUTH := data/fib25_medulla/groundtruth.h5
LABELS := runs/fib25.zarr/labels

.PHONY: demo test bench accuracy accuracy-mutex nuclei nuclei-crac nuclei-latent accuracy-nuclei sparse-nuclei latent-masks-table clean

$(INSTALLED): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

# the bundled ground truth is FlyEM supervoxels plus a supervoxel -> body
# table; ingest applies the table and writes zarr
$(LABELS)/.zarray: $(INSTALLED) $(GROUNDTRUTH)
	$(BIN)/python pipeline/ingest.py $(GROUNDTRUTH):/stack --body-map $(GROUNDTRUTH):/transforms \
		--out $(LABELS) --voxel-size 10 10 10

# the main job on the held-out sections 120..159: bundled model, SQLite,
# local workers, CPU. Re-running resumes (and re-prints the scores).
demo: $(INSTALLED) $(LABELS)/.zarray
	$(BIN)/python pipeline/predict.py configs/demo.json

# one pytest worker per core: most tests run whole jobs, whose set-up
# (processes, imports) leaves a core idle much of the time
test: $(INSTALLED)
	$(BIN)/python -m pytest -n auto

bench: $(INSTALLED) $(LABELS)/.zarray
	$(BIN)/python benchmarks/postprocess.py

# the second bundled volume of the accuracy benchmark (gala FIB-SEM crop)
GALA := data/gala_fibsem
runs/gala.zarr/raw/.zarray: $(INSTALLED)
	$(BIN)/python pipeline/ingest.py $(GALA)/train-image.h5:/stack --out runs/gala.zarr/raw --voxel-size 10 10 10
runs/gala.zarr/labels/.zarray: $(INSTALLED)
	$(BIN)/python pipeline/ingest.py $(GALA)/train-gt.lzf.h5:/stack --labels --out runs/gala.zarr/labels --voxel-size 10 10 10

# ISBI 2012 sections (4 x 4 x 50 nm); labels = each section's interior components
runs/isbi2012.zarr/raw/.zarray: $(INSTALLED)
	$(BIN)/python pipeline/ingest.py data/isbi2012/image --out runs/isbi2012.zarr/raw --voxel-size 50 4 4 --chunk-shape 1 512 512
runs/isbi2012.zarr/labels/.zarray: $(INSTALLED)
	$(BIN)/python pipeline/ingest.py data/isbi2012/label --out runs/isbi2012.zarr/labels --voxel-size 50 4 4 --chunk-shape 1 512 512 --components

accuracy: $(INSTALLED) $(LABELS)/.zarray runs/gala.zarr/raw/.zarray runs/gala.zarr/labels/.zarray \
		runs/isbi2012.zarr/raw/.zarray runs/isbi2012.zarr/labels/.zarray
	$(BIN)/python benchmarks/accuracy.py configs/accuracy_cpu.json

# the 3D mutex watershed beside waterz on the bundled model's affinities:
# bias chosen on sections 100..119, scored on 120..159
accuracy-mutex: $(INSTALLED) $(LABELS)/.zarray
	$(BIN)/python benchmarks/accuracy.py configs/accuracy_mutex3d.json

# U2OS nuclei (60 independent 2D images, 0 = background), voxel size 1 1 1
NUCLEI := data/nuclei_u2os
runs/nuclei.zarr/raw/.zarray: $(INSTALLED)
	$(BIN)/python pipeline/ingest.py $(NUCLEI)/image.tif --out runs/nuclei.zarr/raw --voxel-size 1 1 1 --chunk-shape 1 520 696
runs/nuclei.zarr/labels/.zarray: $(INSTALLED)
	$(BIN)/python pipeline/ingest.py $(NUCLEI)/labels.tif --labels --out runs/nuclei.zarr/labels --voxel-size 1 1 1 --chunk-shape 1 520 696

# the bundled PEA nuclei model on the test pages 50..59: 2D scores
nuclei: $(INSTALLED) runs/nuclei.zarr/raw/.zarray runs/nuclei.zarr/labels/.zarray
	$(BIN)/python pipeline/predict.py configs/nuclei_pea.json

# the bundled CRAC model (trained on 10% of the nuclei) on the test pages
nuclei-crac: $(INSTALLED) runs/nuclei.zarr/raw/.zarray runs/nuclei.zarr/labels/.zarray
	$(BIN)/python pipeline/predict.py configs/nuclei_crac.json

# the bundled latent-mask model on the test pages: scores, the uncertainty
# dataset and the proofreading list (RUN_DIR/proofreading/*.csv)
nuclei-latent: $(INSTALLED) runs/nuclei.zarr/raw/.zarray runs/nuclei.zarr/labels/.zarray
	$(BIN)/python pipeline/predict.py configs/nuclei_latent.json

# the nuclei table: classical, affinity, PEA ablation (trains 3 models)
accuracy-nuclei: $(INSTALLED) runs/nuclei.zarr/raw/.zarray runs/nuclei.zarr/labels/.zarray
	$(BIN)/python benchmarks/accuracy.py configs/accuracy_nuclei.json

# sparse nuclei: masked-loss affinity, PEA and CRAC from 5, 10, 25% of the
# nuclei (trains 17 models; resumes, `--only 10%` for one row)
runs/nuclei_sparse.zarr/mask_10/.zarray: $(INSTALLED)
	$(BIN)/python pipeline/ingest.py $(NUCLEI)/labels.tif --labels --keep-instances 0.1 --ids-per-section --seed 0 \
		--out runs/nuclei_sparse.zarr/labels_10 --annotation-mask runs/nuclei_sparse.zarr/mask_10 \
		--voxel-size 1 1 1 --chunk-shape 1 520 696 --overwrite
sparse-nuclei: $(INSTALLED) runs/nuclei.zarr/raw/.zarray runs/nuclei.zarr/labels/.zarray
	$(BIN)/python benchmarks/sparse_nuclei.py configs/sparse_nuclei.json

# latent masks + MaskAggr against affinity heads, nuclei and fib25, and the
# uncertainty's AUCs (trains 5 models; resumes, `--only nuclei` for one column)
latent-masks-table: $(INSTALLED) runs/nuclei.zarr/raw/.zarray runs/nuclei.zarr/labels/.zarray $(LABELS)/.zarray
	$(BIN)/python benchmarks/latent_masks_table.py configs/latent_masks_table.json

clean:
	rm -rf runs
