"""A MongoDB password reaches the server and nothing else: no message, no
file of the run directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import quote

import pytest

from pipeline.errors import UserError
from pipeline.storage.credentials import masked, read_password_file, split_password, with_password
from tests.conftest import BASELINE, MONGODB_PASSWORD, MONGODB_USER, run_cli


def test_the_password_comes_out_of_the_uri_and_goes_back_in():
    uri = f"mongodb://{MONGODB_USER}:{quote(MONGODB_PASSWORD, safe='')}@h1:27017,h2:27017/db?authSource=admin"
    bare, secret = split_password(uri)
    assert secret == MONGODB_PASSWORD
    assert bare == f"mongodb://{MONGODB_USER}@h1:27017,h2:27017/db?authSource=admin"
    assert with_password(bare, secret) == uri
    assert masked(uri) == f"mongodb://{MONGODB_USER}:***@h1:27017,h2:27017/db?authSource=admin"
    assert split_password("mongodb://h1/db") == ("mongodb://h1/db", None)


def test_a_password_file_must_be_private(tmp_path):
    path = tmp_path / "password"
    path.write_text("secret\n")
    path.chmod(0o644)
    with pytest.raises(UserError, match="is readable by others; chmod 600 it"):
        read_password_file(path)
    path.chmod(0o600)
    assert read_password_file(path) == "secret"


def _files(run_dir: Path):
    return [p for p in run_dir.rglob("*") if p.is_file()]


def test_a_password_is_never_printed_or_written(tmp_path, run_config, mongodb_with_password):
    host = mongodb_with_password.removeprefix("mongodb://").rstrip("/")
    secrets = (MONGODB_PASSWORD, quote(MONGODB_PASSWORD, safe=""))

    def leaks(text: str) -> bool:
        return any(s in text for s in secrets)

    # in the URI
    inline = f"mongodb://{MONGODB_USER}:{quote(MONGODB_PASSWORD, safe='')}@{host}/"
    config = run_config(tmp_path / "config.json", store=inline, **BASELINE)
    result = run_cli("pipeline/predict.py", str(config))
    assert result.returncode == 0, masked(result.stderr[-3000:])
    assert not leaks(result.stdout + result.stderr)
    run_dir = tmp_path / "run"
    files = _files(run_dir)
    assert len(files) > 20
    for path in files:
        assert not leaks(path.read_bytes().decode("latin-1")), path
    assert json.loads((run_dir / "layout.json").read_text())["store"] == f"mongodb://{MONGODB_USER}@{host}/"

    # from a private file: the same run, resumed (the store URI it records is the same)
    secret_file = tmp_path / "mongo_password"
    secret_file.write_text(MONGODB_PASSWORD + "\n")
    secret_file.chmod(0o600)
    config = run_config(tmp_path / "config.json", store=f"mongodb://{MONGODB_USER}@{host}/",
                        store_password_file=str(secret_file), **BASELINE)
    environment = {k: v for k, v in os.environ.items() if k != "AFFSEG_MONGODB_PASSWORD"}
    result = run_cli("pipeline/predict.py", str(config), env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"]["agglomerate"]["skipped"] == report["steps"]["agglomerate"]["blocks"]

    # a wrong password: one line, and the password it tried is masked too
    wrong = f"mongodb://{MONGODB_USER}:not-{quote(MONGODB_PASSWORD, safe='')}@{host}/"
    result = run_cli("pipeline/predict.py", str(run_config(tmp_path / "config.json", store=wrong, **BASELINE)), env=environment)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"affseg: error: store: cannot reach MongoDB at mongodb://{MONGODB_USER}:***@{host}/: authentication failed"
    )
