"""The main job: raw EM volume in, (evaluated) segmentation out, block by block.

    python pipeline/predict.py CONFIG

Steps: predict -> fragments -> agglomerate (daisy, pipelined block by block),
segments (look-up tables), relabel (daisy), evaluate (with ground truth).
A config with `affinities` (made elsewhere) in place of `model` starts at
fragments.
A 2D model (in-plane offsets only) runs predict -> mutex (mutex watershed
per section, then small-segment merging) -> evaluate instead.
Everything lands in the config's run_dir. Re-running the same command after
a crash or Ctrl-C resumes: finished blocks are skipped. `status.py CONFIG`
shows progress from another terminal.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python pipeline/predict.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import cli_main
from pipeline.config import RunConfig, load_json
from pipeline.errors import EXIT_FAILED, RunFailed
from pipeline.orchestration.supervisor import supervise
from pipeline.storage.credentials import move_inline_password


def main() -> int:
    parser = argparse.ArgumentParser(prog="python pipeline/predict.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run config JSON (see configs/demo.json and the README's config reference)")
    args = parser.parse_args()
    config = RunConfig(**load_json(args.config))
    # before anything is written or printed: see pipeline/storage/credentials.py
    config = config.model_copy(update={"store": move_inline_password(config.store)})
    supervisor_exit = supervise(Path(config.run_dir))
    if supervisor_exit is not None:
        return supervisor_exit
    # only the master needs the job (torch, zarr, daisy: seconds to import);
    # the supervisor and a refused config stay quick
    from pipeline.evaluate import format_table
    from pipeline.orchestration.job import run
    from pipeline.orchestration.run_layout import RunDir

    try:
        report = run(config, str(Path(args.config).absolute()))
    except RunFailed as e:
        print(f"affseg: run failed: {e}\nworker logs: {Path(config.run_dir) / 'logs'}; "
              "re-run the same command to retry the unfinished blocks", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\naffseg: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    run_dir = RunDir(Path(config.run_dir))
    chosen = run_dir.read_layout().partitioner.chosen(config)
    print(f"\nsegmentation: {run_dir.volumes / 'segmentation'} ({chosen}); report: {run_dir.report}")
    if "scores" in report:
        print(format_table(report["scores"]))
    return 0


if __name__ == "__main__":
    cli_main(main)
