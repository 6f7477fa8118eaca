"""Look at a run in neuroglancer: the raw volume and every dataset of the run
(affinities, fragments, segmentation, and what a method adds, such as
foreground, embedding or uncertainty), served from this machine; for a
model with an uncertainty, the top of its proofreading list as a layer of
points (a click goes to the next doubtful place).

    python pipeline/view.py CONFIG [--port 8080] [--bind 127.0.0.1]

Prints the viewer's URL and one line per layer (with the address of its
data, for scripts), then serves until Ctrl-C. Data is read on demand, chunk
by chunk, so any volume size works.

On a remote node (a cluster's login or GPU node), start it there with a fixed
port and forward that port over SSH from your own machine:

    node$  python pipeline/view.py CONFIG --port 8080
    here$  ssh -N -L 8080:localhost:8080 USER@NODE

and open the printed URL (http://127.0.0.1:8080/v/...) in a browser here.
The server listens on 127.0.0.1 only unless --bind says otherwise.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
import threading
from pathlib import Path

if __package__ in (None, ""):  # run as `python pipeline/view.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import neuroglancer
import numpy as np
import zarr

from pipeline.cli import cli_main
from pipeline.config import RunConfig, load_json
from pipeline.errors import UserError
from pipeline.orchestration.run_layout import RunDir
from pipeline.storage.volumes import open_volume, split_path

# an RGB view of three channels: affinities (z, y, x neighbours) or the
# first three embedding dimensions
RGB_SHADER = """
#uicontrol invlerp normalized
void main() {
  emitRGB(vec3(toNormalized(getDataValue(0)), toNormalized(getDataValue(1)), toNormalized(getDataValue(2))));
}
"""


class AsFloat32:
    """A float16 or float64 zarr array as neuroglancer reads it (it has neither)."""

    def __init__(self, array):
        self.array, self.shape, self.dtype = array, array.shape, np.dtype(np.float32)

    def __getitem__(self, index):
        return np.asarray(self.array[index], dtype=np.float32)


def layer(name: str, path: Path, units: str) -> tuple[neuroglancer.Layer, neuroglancer.LocalVolume]:
    """One dataset as a layer: uint64 labels as segmentation, the rest as
    images; a leading channel axis (C, z, y, x) becomes neuroglancer's
    channel dimension."""
    array = open_volume(*split_path(path), field=name)
    data = zarr.open_array(str(path), mode="r")
    if data.dtype in (np.float16, np.float64):  # neither is a neuroglancer data type
        data = AsFloat32(data)
    scales = list(array.voxel_size)
    offset = [o // v for o, v in zip(array.roi.offset, array.voxel_size)]
    names = ["z", "y", "x"]
    if len(data.shape) == 4:
        names, scales, offset = ["c^", *names], [1, *scales], [0, *offset]
    dimensions = neuroglancer.CoordinateSpace(names=names, units=["", *[units] * 3][-len(names):], scales=scales)
    segmentation = data.dtype == np.uint64
    volume = neuroglancer.LocalVolume(data, dimensions=dimensions, voxel_offset=offset,
                                      volume_type="segmentation" if segmentation else "image")
    if segmentation:
        return neuroglancer.SegmentationLayer(source=volume), volume
    if len(data.shape) == 4 and data.shape[0] >= 3:
        return neuroglancer.ImageLayer(source=volume, shader=RGB_SHADER), volume
    return neuroglancer.ImageLayer(source=volume), volume


# points of the proofreading list shown: the most uncertain segments and contacts
PROOFREADING_POINTS = 50


def proofreading_points(run_dir: RunDir, top: int = PROOFREADING_POINTS) -> list[neuroglancer.PointAnnotation]:
    """The top of the run's proofreading list (pipeline/proofreading.py) as
    points in world units: the most uncertain segments at their centres,
    then the most uncertain contacts; none for a run without one."""
    points = []
    for name, describe in (("segments", lambda r: (f"segment {r['segment']}", f"{r['voxels']} voxels")),
                           ("edges", lambda r: (f"contact {r['segment_a']} / {r['segment_b']}", f"{r['pairs']} pairs"))):
        path = run_dir.proofreading / f"{name}.csv"
        if not path.exists():
            continue
        with open(path, newline="") as f:
            for row in itertools.islice(csv.DictReader(f), top):
                what, size = describe(row)
                points.append(neuroglancer.PointAnnotation(
                    id=f"{name} {len(points)}", point=[float(row[k]) for k in ("z", "y", "x")],
                    description=f"{what}: uncertainty {float(row['uncertainty']):.3g}, {size}"))
    return points


def run_datasets(run_dir: RunDir) -> list[tuple[str, Path]]:
    """The run's datasets, in the order of the job's steps."""
    order = ["affs", "uncertainty", "foreground", "embedding", "fragments", "segmentation"]
    found = [p for p in run_dir.volumes.iterdir() if (p / ".zarray").exists()] if run_dir.volumes.exists() else []
    return sorted(((p.name, p) for p in found), key=lambda item: (order.index(item[0]) if item[0] in order else len(order), item[0]))


def serve(config: RunConfig, bind: str, port: int) -> tuple[neuroglancer.Viewer, list[str]]:
    """The viewer with the run's layers, and one line per layer."""
    run_dir = RunDir(Path(config.run_dir))
    if not run_dir.layout.exists():
        raise UserError(f"run_dir: {config.run_dir} holds no run; run pipeline/predict.py first")
    neuroglancer.set_server_bind_address(bind, port)
    viewer = neuroglancer.Viewer()
    lines = []
    base = viewer.get_viewer_url().split("/v/")[0]
    volumes = {}
    with viewer.txn() as state:
        given = [] if config.affinities is None else [
            ("affs", Path(config.affinities.dataset)),
            *((name, Path(path)) for name, path in sorted(config.affinities.outputs.items()))]
        for name, path in [("raw", Path(config.raw)), *given, *run_datasets(run_dir)]:
            state.layers[name], volumes[name] = layer(name, path, units="nm")
        points = proofreading_points(run_dir)
        if points:
            # world units (nm), so a click on a point goes to the place
            state.layers["proofreading"] = neuroglancer.LocalAnnotationLayer(
                dimensions=neuroglancer.CoordinateSpace(names=["z", "y", "x"], units="nm", scales=[1, 1, 1]),
                annotations=points)
        state.layout = "xy"
    for name, volume in volumes.items():
        # the layer's source names the volume as the server knows it
        token = viewer.state.layers[name].source[0].url.removeprefix("python://volume/")
        lines.append(f"  {name:<13} {volume.data_type:<8} {tuple(volume.shape)}  {base}/neuroglancer/info/{token}")
    if points:
        lines.append(f"  proofreading  {len(points)} points: the most uncertain segments and contacts "
                     f"({run_dir.proofreading}/segments.csv, edges.csv)")
    return viewer, lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python pipeline/view.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the run's config JSON (the one given to predict.py)")
    parser.add_argument("--port", type=int, default=0, help="port to serve on (default: any free one)")
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    args = parser.parse_args()
    config = RunConfig(**load_json(args.config))
    viewer, lines = serve(config, args.bind, args.port)
    print(f"neuroglancer: {viewer.get_viewer_url()}", flush=True)
    print("\n".join(lines), flush=True)
    print("serving until Ctrl-C", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    cli_main(main)
