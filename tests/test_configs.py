"""The shipped configs are valid, and docker-compose matches its config."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import pytest

from benchmarks.accuracy import AccuracyConfig
from benchmarks.latent_masks_table import TableConfig
from benchmarks.sparse_nuclei import SparseNucleiConfig
from pipeline.config import RunConfig
from pipeline.training.config import TrainConfig
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_validates(path: Path):
    data = json.loads(path.read_text())
    if "experiments" in data:
        model = AccuracyConfig
    elif "fractions" in data:
        model = SparseNucleiConfig
    elif "rows" in data:
        table = TableConfig(**data)
        # each cell's training config with the cell's changes
        for cells in table.rows.values():
            for cell in cells.values():
                if cell.train is not None:
                    TrainConfig(**{**json.loads(Path(cell.train).read_text()), **cell.changes})
        return
    else:
        model = TrainConfig if "experiment_dir" in data else RunConfig
    model(**data)


def test_compose_runs_the_mongodb_config_against_its_mongo_service():
    compose = (REPO / "docker-compose.yml").read_text()
    config = RunConfig(**json.loads((REPO / "configs/cluster_mongodb.json").read_text()))
    uri = urlparse(config.store)
    assert "configs/cluster_mongodb.json" in compose
    assert f"\n  {uri.hostname}:\n" in compose, "the store's host must be a compose service"
    assert f'"{uri.port}:27017"' in compose
    assert config.launcher.kind == "local"
