"""Pipeline overhead of ``sapiens2 predict``: end-to-end images/s against forward-only images/s.

Both measurements use the same model file, batch size, device and precision:

* forward-only: the :class:`~sapiens2_cli.predict.Predictor` step (upload, normalisation,
  forward, cast) on model inputs prepared beforehand, nothing else;
* end-to-end: the real run (:func:`~sapiens2_cli.predict.run_predict`, what the command line
  calls) on a folder of JPEG files: reading, decoding, pre-processing, forward,
  post-processing to image size and atomic writes; model loading excluded.

With ``--video N`` the input is one H.264 video of N frames (``--image-size``, ``--fps``) instead
of a folder of photos: end-to-end then includes streamed decoding and per-frame writes, and the
speeds are frames per second.

``overhead = forward_ips / e2e_ips - 1`` (0.05 means the pipeline runs 5% slower than the model).
``model_idle_fraction = (processing - forward) / forward`` of the end-to-end runs: the time the
model waited for the pipeline. On a CPU the pipeline's threads also slow the forward itself
(they share the cores); on a GPU they do not, and this is what the pipeline would cost there.
The two are measured in interleaved rounds; the reported speeds are the medians over rounds and
the overhead the median of the per-round ratios (each round's two runs see about the same
machine load, which matters on a shared machine).
The model has random weights (the numbers depend on shapes only), built from an architecture
name, saved to a temporary safetensors file with its input size.

Example (the numbers in BENCHMARKS.md)::

    python benchmarks/predict_overhead.py --task seg      # small model, 384x288, 16 photos, batch 2, 5 rounds
    python benchmarks/predict_overhead.py --task seg --video 48 --image-size 1280x720
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from sapiens2_cli.models.arch import ARCHS, make_arch
from sapiens2_cli.models.heads import HeadConfig, official_head
from sapiens2_cli.models.sapiens2 import ModelInfo, Sapiens2Model
from sapiens2_cli.plan import PredictOptions
from sapiens2_cli.predict import Predictor, resolve_device, run_predict
from sapiens2_cli.readers import read_image
from sapiens2_cli.tasks import TASKS
from sapiens2_cli.weights import load_model, save_model

PHOTO = Path(__file__).resolve().parents[1] / "tests" / "data" / "grace_hopper.jpg"


def small_head(task: str, dims: int) -> HeadConfig:
    """The released head topology with narrow channels (the 0.1b-4x-smaller benchmark model)."""
    if task == "seg":
        return HeadConfig("seg", dims, 29, deconv_out_channels=(128, 64, 32, 32), deconv_kernel_sizes=(4, 4, 4, 4),
                          conv_out_channels=(32, 32), conv_kernel_sizes=(1, 1))  # fmt: skip
    return HeadConfig(task, dims, 3, input_conv_channels=dims, upsample_channels=(192, 96, 48, 32),
                      conv_out_channels=(32, 16, 16), conv_kernel_sizes=(3, 3, 3))  # fmt: skip


def build_model_file(arch_name: str, task: str, input_hw: tuple[int, int], folder: Path) -> Path:
    if task == "pointmap":
        raise SystemExit("pointmap heads are tied to their input size; benchmark seg, normal or albedo")
    if arch_name == "small":
        arch, head = make_arch(384, 12, 6), small_head(task, 384)
    else:
        arch = ARCHS[arch_name]
        head = official_head(task, arch_name, arch.embed_dims)
    torch.manual_seed(0)
    model = Sapiens2Model(task, arch, head).eval()
    model.info = ModelInfo(task=task, arch=arch, head=head, input_size=input_hw)
    return save_model(model, folder / f"{arch_name}-{task}.safetensors")


def make_images(folder: Path, n: int, size_wh: tuple[int, int]) -> Path:
    """``n`` JPEG photos of ``size_wh``, each a different crop so that no two files are equal."""
    photo = cv2.imread(str(PHOTO))
    big = cv2.resize(photo, (size_wh[0] + n, size_wh[1] + n), interpolation=cv2.INTER_CUBIC)
    images = folder / "images"
    images.mkdir()
    for i in range(n):
        crop = big[i : i + size_wh[1], i : i + size_wh[0]]
        cv2.imwrite(str(images / f"img{i:04d}.jpg"), crop, [cv2.IMWRITE_JPEG_QUALITY, 92])
    return images


def make_video(folder: Path, n: int, size_wh: tuple[int, int], fps: int) -> Path:
    """An H.264 MP4 of ``n`` frames of ``size_wh``: the photo panning by one pixel a frame."""
    import av

    photo = cv2.imread(str(PHOTO))
    big = cv2.resize(photo, (size_wh[0] + n, size_wh[1] + n), interpolation=cv2.INTER_CUBIC)
    path = folder / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = size_wh
        stream.pix_fmt = "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(big[i : i + size_wh[1], i : i + size_wh[0]]),
                                               format="bgr24")  # fmt: skip
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def source_images(source: Path) -> list[np.ndarray]:
    """The BGR pictures of a photo folder or of every frame of a video."""
    if source.is_dir():
        return [read_image(p) for p in sorted(source.iterdir())]
    from sapiens2_cli.video import VideoFrame, iter_frames

    return [f.image for f in iter_frames(source) if isinstance(f, VideoFrame)]


class ForwardOnly:
    """The Predictor step alone on model inputs prepared beforehand."""

    def __init__(self, model_file: Path, source: Path, *, task: str, input_hw, batch_size: int, device,
                 precision: str) -> None:  # fmt: skip
        model = load_model(model_file, task=task, device=device)
        self.device = device
        self.predictor = Predictor(model, TASKS[task], device=device, precision=precision, batch_size=batch_size)
        pixels = [TASKS[task].prepare(image, input_hw)[0].pixels for image in source_images(source)]
        self.count = len(pixels)
        self.batches = [torch.from_numpy(np.stack(pixels[i : i + batch_size])) for i in range(0, len(pixels), batch_size)]
        self.predictor(self.batches[0])  # warm-up

    def images_per_second(self) -> float:
        t0 = time.perf_counter()
        for batch in self.batches:
            self.predictor(batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.count / (time.perf_counter() - t0)


def end_to_end(model_file: Path, source: Path, out: Path, *, task: str, batch_size: int, device: str,
               precision: str, fmt: str, workers: int | None, count: int) -> tuple[float, dict]:  # fmt: skip
    """Images (frames) per second of one whole run (model loading excluded) and its run.json."""
    options = PredictOptions(
        inputs=(str(source),), output=out, checkpoints=(f"{task}={model_file}",), tasks=(task,),
        batch_size=batch_size, device=device, precision=precision, fmt=fmt, workers=workers,
        overwrite=True, quiet=True, command=tuple(sys.argv),
    )  # fmt: skip
    record = run_predict(options)
    assert record.failed == 0 and record.ok == count, record.failures
    return record.images_per_second(), json.loads((out / "run.json").read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="small", choices=["small", *ARCHS], help="backbone (small: 384 wide, 12 layers)")
    parser.add_argument("--task", default="seg", choices=["seg", "normal", "albedo"])
    parser.add_argument("--input-size", default="384x288", help="model input HxW")
    parser.add_argument("--image-size", default="1200x900", help="photo WxH")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--video", type=int, default=0, metavar="N",
                        help="one H.264 video of N frames instead of --images photos")
    parser.add_argument("--fps", type=int, default=30, help="frame rate of the --video")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--format", default="exr", choices=["exr", "npy"])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved measurements (medians are reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: the model on one core, the pipeline on the others)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    input_hw = tuple(int(v) for v in args.input_size.split("x"))
    size_wh = tuple(int(v) for v in args.image_size.split("x"))
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_file = build_model_file(args.arch, args.task, input_hw, folder)
        if args.video:
            source, count = make_video(folder, args.video, size_wh, args.fps), args.video
        else:
            source, count = make_images(folder, args.images, size_wh), args.images
        forward = ForwardOnly(model_file, source, task=args.task, input_hw=input_hw, batch_size=args.batch_size,
                              device=device, precision=args.precision)  # fmt: skip
        e2e_args = dict(task=args.task, batch_size=args.batch_size, device=args.device,
                        precision=args.precision, fmt=args.format, workers=args.workers, count=count)  # fmt: skip
        end_to_end(model_file, source, folder / "out", **e2e_args)  # warm-up: kernels, page cache
        fwd_runs, e2e_runs, records = [], [], []
        for _ in range(args.rounds):  # interleaved, so that both see the same machine load
            fwd_runs.append(forward.images_per_second())
            ips, record = end_to_end(model_file, source, folder / "out", **e2e_args)
            e2e_runs.append(ips)
            records.append(record)
    run = records[e2e_runs.index(statistics.median_high(e2e_runs))]
    fwd, e2e = statistics.median(fwd_runs), statistics.median(e2e_runs)
    paired = statistics.median(f / e - 1 for f, e in zip(fwd_runs, e2e_runs, strict=True))
    # Time the model waited on the pipeline: what a GPU run would lose, whatever the CPU load.
    idle = statistics.median((r["timings_s"]["processing"] - r["timings_s"]["forward"]) / r["timings_s"]["forward"]
                             for r in records)  # fmt: skip
    result = {
        "config": {**vars(args), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "forward_only_images_per_second": round(fwd, 4),
        "end_to_end_images_per_second": round(e2e, 4),
        "overhead": round(paired, 4),
        "model_idle_fraction": round(idle, 4),
        "rounds": {"forward_only": [round(v, 4) for v in fwd_runs], "end_to_end": [round(v, 4) for v in e2e_runs]},
        "end_to_end_stage_seconds": run.get("timings_s"),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
