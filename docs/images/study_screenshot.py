"""Make docs/images/study-page.png: the study page in headless Chromium (the README's screenshot).

    qsched --threads 1 evaluate --num 16 --configs fp,w4a8,w4a4 --metrics mse --out out/eval-study
    python docs/images/study_screenshot.py out/eval-study [--out docs/images/study-page.png]

Serves the study in-process (votes in a temporary folder, never in the evaluation) and
photographs the first question at a laptop-sized and a phone-sized viewport, side by side.
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

from qsched.study.app import create_app
from qsched.study.server import serve_in_thread
from qsched.study.service import StudyService, StudySettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_dir")
    parser.add_argument("--out", default=str(Path(__file__).with_name("study-page.png")))
    args = parser.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="study-shot-"))
    service = StudyService(StudySettings(eval_dir=args.eval_dir, cache_dir=str(cache)))
    with serve_in_thread(create_app(service, organiser_token="screenshot")) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        shots = []
        for viewport, mobile in (({"width": 860, "height": 600}, False), ({"width": 390, "height": 600}, True)):
            page = browser.new_page(viewport=viewport, is_mobile=mobile, device_scale_factor=1)
            page.goto(url + "?a=screenshot")
            page.get_by_role("button", name="left image is better").wait_for()
            page.wait_for_function("document.getElementById('right').complete")
            shots.append(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))
            page.close()
        browser.close()
    gap = 24
    canvas = Image.new("RGB", (sum(s.width for s in shots) + gap, max(s.height for s in shots)), (255, 255, 255))
    canvas.paste(shots[0], (0, 0))
    canvas.paste(shots[1], (shots[0].width + gap, 0))
    canvas.save(args.out, optimize=True)
    shutil.rmtree(cache, ignore_errors=True)
    print(f"wrote {args.out} ({canvas.width}x{canvas.height})")


if __name__ == "__main__":
    main()
