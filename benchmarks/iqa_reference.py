"""Reference BRISQUE / NIQE values, and how qsched's ``brisque`` / ``niqe`` scorers agree with them.

Step 1 runs the reference packages in a scratch venv (not qsched's):

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install brisque==0.2.0 opencv-python-headless scikit-image scikit-video==1.1.11 \
        pillow "numpy<2.4"      # brisque 0.2.0 calls float() on 1-element arrays: an error from numpy 2.4
    /tmp/refvenv/bin/python benchmarks/iqa_reference.py reference --out /tmp/iqa_ref.json [--set tests]

scikit-video 1.1.11 does not run on current numpy / scipy; this script patches the two
things its NIQE needs at run time, nothing else: ``np.int`` (removed from numpy) and
``scipy.misc.imresize`` (removed from scipy), replaced by what it did for ``mode='F'``:
a PIL float image resized with ``Image.BICUBIC``.

Step 2 runs qsched's scorers on the same pictures (qsched's venv) and prints the differences:

    .venv/bin/python benchmarks/iqa_reference.py compare /tmp/iqa_ref.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from iqa_images import checksum, picture  # noqa: E402

#: The pictures of the golden tests (small, so the tests stay fast).
TEST_BRISQUE = ["coffee/4", "coffee/4+blur1", "coffee/4+blur2", "coffee/4+noise10", "camera/4", "camera/4+blur1",
                "camera/4+blur2", "camera/4+noise10", "astronaut/4", "astronaut/4+noise10", "chelsea/2+crop97x131"]
TEST_NIQE = ["astronaut", "astronaut+blur1", "astronaut+blur2", "astronaut+noise15", "camera/2",
             "chelsea+crop250x333", "coffee/2"]
DEGRADATIONS = ["", "+blur1", "+blur2", "+blur4", "+noise5", "+noise15", "+noise30", "+jpeg10", "+jpeg30"]
REPORT = [f"{p}{d}" for p in ("astronaut", "camera", "chelsea", "coffee") for d in DEGRADATIONS]


def spec_sets(which: str) -> tuple[list[str], list[str]]:
    """(BRISQUE specs, NIQE specs) of a set."""
    if which == "tests":
        return TEST_BRISQUE, TEST_NIQE
    return TEST_BRISQUE + REPORT, TEST_NIQE + REPORT


def _load_nss():
    spec = importlib.util.spec_from_file_location("nss", ROOT / "qsched" / "score" / "nss.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["nss"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def reference(out: Path, which: str) -> None:
    import cv2
    import scipy.misc
    import skimage.color
    from brisque import BRISQUE
    from PIL import Image

    def imresize(arr, size, interp="bilinear", mode=None):  # scipy.misc.imresize, as NIQE calls it
        assert mode == "F" and interp == "bicubic" and isinstance(size, float)
        im = Image.fromarray(np.asarray(arr, dtype=np.float32))
        return np.asarray(im.resize(tuple((np.array(im.size) * size).astype(int)), Image.BICUBIC))

    np.int = int  # removed in numpy 1.24; skvideo.measure.niqe uses it
    scipy.misc.imresize = imresize  # removed in scipy 1.3
    import skvideo
    import skvideo.measure
    import skvideo.utils

    nss = _load_nss()
    model = BRISQUE(url=False)
    brisque_specs, niqe_specs = spec_sets(which)
    results: dict[str, dict] = {}
    for spec in dict.fromkeys(brisque_specs + niqe_specs):
        image = picture(spec)
        rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
        entry: dict = {"shape": list(image.shape), "crc32": checksum(image)}
        if spec in brisque_specs:
            start = time.perf_counter()
            entry["brisque"] = float(model.score(rgb))
            entry["brisque_s"] = time.perf_counter() - start
            gray = skimage.color.rgb2gray(rgb)
            reference_half = cv2.resize(gray, None, fx=1 / 2, fy=1 / 2, interpolation=cv2.INTER_CUBIC)
            ours = nss.half_size_cubic(gray)
            same = ours.shape == reference_half.shape
            entry["resize_max_abs_diff"] = float(np.abs(reference_half - ours).max()) if same else None
        if spec in niqe_specs:
            luma = image[..., 0] if image.shape[-1] == 1 else skvideo.utils.rgb2gray(image)
            start = time.perf_counter()
            entry["niqe"] = float(skvideo.measure.niqe(luma)[0])
            entry["niqe_s"] = time.perf_counter() - start
        results[spec] = entry
        print(spec, {k: v for k, v in entry.items() if k in ("brisque", "niqe", "resize_max_abs_diff")}, flush=True)
    versions = {name: __import__(name).__version__ for name in ("numpy", "scipy", "skimage", "cv2", "PIL")}
    versions["brisque"], versions["skvideo"] = "0.2.0", skvideo.__version__
    out.write_text(json.dumps({"versions": versions, "images": results}, indent=1))


def compare(path: Path) -> None:
    import torch

    from qsched.score import brisque as qb
    from qsched.score import niqe as qn
    from qsched.score import nss

    data = json.loads(path.read_text())
    brisque_scorer, niqe_scorer = qb.brisque_factory(), qn.niqe_factory()
    rows = {"brisque": [], "niqe": [], "brisque_pil_half": []}
    for spec, entry in data["images"].items():
        image = picture(spec)
        assert checksum(image) == entry["crc32"], f"{spec}: the picture differs from the reference run's"
        tensor = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255
        if "brisque" in entry:
            start = time.perf_counter()
            ours = -float(brisque_scorer(tensor)[0])
            seconds = time.perf_counter() - start
            rows["brisque"].append((spec, entry["brisque"], ours, seconds, entry["brisque_s"]))
            gray = qb.gray_image(image)  # the effect of a low-pass resize in place of OpenCV's
            pil = _pil_half(gray)
            window = nss.gaussian_kernel_2d(7, 7 / 6)
            features = np.array(qb._scale_features(gray, window) + qb._scale_features(pil, window))
            scaled = -1.0 + 2.0 / (brisque_scorer.high - brisque_scorer.low) * (features - brisque_scorer.low)
            rows["brisque_pil_half"].append((spec, entry["brisque"], float(brisque_scorer.svr.predict(scaled)[0]), 0, 0))
        if "niqe" in entry:
            start = time.perf_counter()
            ours = -float(niqe_scorer(tensor)[0])
            seconds = time.perf_counter() - start
            rows["niqe"].append((spec, entry["niqe"], ours, seconds, entry["niqe_s"]))
    print("reference versions:", data["versions"])
    for name, table in rows.items():
        if not table:
            continue
        print(f"\n{name}: {len(table)} images   spec / reference / qsched / abs diff / rel diff / qsched s / reference s")
        for spec, ref, ours, s, rs in table:
            print(f"  {spec:28s} {ref:12.6f} {ours:12.6f} {abs(ours - ref):10.3e} {abs(ours - ref) / abs(ref):10.3e}"
                  f" {s:7.3f} {rs:7.3f}")
        diffs = np.array([abs(o - r) for _, r, o, _, _ in table])
        rel = np.array([abs(o - r) / abs(r) for _, r, o, _, _ in table])
        print(f"  max abs diff {diffs.max():.3e}, max rel diff {rel.max():.3e}, median abs diff {np.median(diffs):.3e}")
    resize = [e["resize_max_abs_diff"] for e in data["images"].values() if e.get("resize_max_abs_diff") is not None]
    print(f"\nhalf_size_cubic vs cv2.resize INTER_CUBIC, max abs pixel diff over {len(resize)} images: {max(resize):.3e}")


def _pil_half(gray: np.ndarray) -> np.ndarray:
    from PIL import Image

    h, w = gray.shape
    im = Image.fromarray(gray.astype(np.float32))
    return np.asarray(im.resize((int(np.rint(w / 2)), int(np.rint(h / 2))), Image.BICUBIC), dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("reference", help="run the reference packages (scratch venv)")
    ref.add_argument("--out", type=Path, required=True)
    ref.add_argument("--set", choices=("tests", "report"), default="report")
    cmp_ = sub.add_parser("compare", help="run qsched's scorers and print the differences (qsched venv)")
    cmp_.add_argument("path", type=Path)
    args = parser.parse_args()
    if args.command == "reference":
        reference(args.out, args.set)
    else:
        compare(args.path)


if __name__ == "__main__":
    main()
