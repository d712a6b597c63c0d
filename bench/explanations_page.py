#!/usr/bin/env python
"""Size of explanations.html, the time to write it and the time to open it in headless Chromium.

Writes synthetic train and test datasets (conversations of about `--chars` characters) and
`--methods` score directories of n_test x n_train random scores, with topk.jsonl at `--top_k`,
as `gradproj score` writes them; then builds the page from them (`write_explanations`, timed),
and opens it `--repeat` times in a fresh headless Chromium (the Debian packages, through
selenium, as the browser test does), reporting the page's own time from navigation start to its
first test example rendered (`performance.now()` when it marks itself ready), the wall time of
`driver.get` until then, and the time to switch to another test example.

  python bench/explanations_page.py --n_test 1000 --n_train 10000 --methods 2
  python bench/explanations_page.py --screenshot PAGE.html docs/explanations.png

With --screenshot it only takes a screenshot of an existing page (the README's picture).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gradproj import influence, scoredir  # noqa: E402
from gradproj.analysis.explanations import write_explanations  # noqa: E402
from tests.browser import missing_browser, start_chromium  # noqa: E402

WORDS = "the model explains answers by gradients of train examples with projections".split()


def conversation(i: int, chars: int, generator: torch.Generator) -> list[dict]:
    picks = torch.randint(len(WORDS), (chars // 6,), generator=generator).tolist()
    text = " ".join(WORDS[p] for p in picks)
    return [{"role": "user", "content": f"question {i}: {text[: chars // 4]}"},
            {"role": "assistant", "content": text[chars // 4 :]}]  # fmt: skip


def write_dataset(path: Path, prefix: str, n: int, chars: int, sources: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(len(prefix) + n)
    ids = [f"{prefix}_{i:05d}" for i in range(n)]
    with open(path, "w") as f:
        for i, example_id in enumerate(ids):
            row = {"id": example_id, "messages": conversation(i, chars, generator)}
            if sources:
                row["source_id"] = f"train_{(i * 7) % sources:05d}"
            f.write(json.dumps(row) + "\n")
    return ids


def write_score_dir(folder: Path, seed: int, train: tuple, test: tuple, top_k: int) -> Path:
    (train_ids, train_file), (test_ids, test_file) = train, test
    dot = torch.randn(len(test_ids), len(train_ids), generator=torch.Generator().manual_seed(seed))
    matrices = {"dot": dot, "cosine": dot / dot.abs().max()}
    rows = (list(range(len(train_ids))), list(range(len(test_ids))))
    scores = influence.Scores(
        matrices, train_ids, rows[0], test_ids, rows[1], {"train": [], "test": []}, {}
    )
    folder.mkdir(parents=True)
    scoredir.write_scores(folder, matrices, train_ids, test_ids, train_file, test_file)
    positions = influence.topk_positions(scores, top_k)
    lines = scoredir.topk_lines(matrices, train_ids, test_ids, scores.test_index, positions)
    scoredir.write_topk(folder, lines)
    manifest = {"kind": "projected", "target": "embeddings", "split": "train",
                "projection": {"type": "rademacher", "dim": 4096 * (seed + 1)}}  # fmt: skip
    scoredir.write_summary(folder, {
        "functions": ["dot", "cosine"],
        "counts": {"train": len(train_ids), "test": len(test_ids)},
        "train_manifest": manifest | {"dataset": str(train_file)},
        "test_manifest": manifest | {"dataset": str(test_file)},
    })  # fmt: skip
    return folder


def open_times(page: Path, repeat: int) -> list[dict]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    results = []
    for _ in range(repeat):
        driver = start_chromium()
        try:
            began = time.perf_counter()
            driver.get(page.as_uri())
            body = WebDriverWait(driver, 120).until(
                lambda d: d.find_element(By.CSS_SELECTOR, "body[data-ready='1']")
            )
            wall = time.perf_counter() - began
            ready_ms = float(body.get_attribute("data-ready-ms"))
            items = driver.find_elements(By.CSS_SELECTOR, "#tests li")
            began = time.perf_counter()
            items[len(items) // 2].click()
            driver.find_element(By.CSS_SELECTOR, ".entry")
            switch = time.perf_counter() - began
            results.append({"ready_ms": ready_ms, "get_to_ready_s": wall, "switch_s": switch})
        finally:
            driver.quit()
    return results


def screenshot(page: Path, png: Path, test_id: str | None) -> None:
    from PIL import Image
    from selenium.webdriver.common.by import By

    driver = start_chromium(1400, 860)
    try:
        driver.get(page.as_uri() + (f"#{test_id}" if test_id else ""))
        driver.find_element(By.CSS_SELECTOR, "body[data-ready='1']")
        raw = png.with_suffix(".raw.png")
        driver.save_screenshot(str(raw))
    finally:
        driver.quit()
    # a 64-colour palette keeps the picture small enough for the repository
    Image.open(raw).convert("RGB").quantize(64).save(png, optimize=True)
    raw.unlink()
    print(f"wrote {png} ({png.stat().st_size / 1024:.0f} KiB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n_test", type=int, default=1000)
    p.add_argument("--n_train", type=int, default=10000)
    p.add_argument("--methods", type=int, default=2, help="score directories side by side")
    p.add_argument("--top_k", type=int, default=10, help="topk.jsonl's k (the page shows 10)")
    p.add_argument("--chars", type=int, default=800, help="characters per conversation")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--screenshot", nargs=2, type=Path, metavar=("PAGE", "PNG"))
    p.add_argument("--test_id", help="with --screenshot: the test example shown")
    args = p.parse_args()
    reason = missing_browser()
    if reason:
        sys.exit(f"no browser: {reason}")
    if args.screenshot:
        screenshot(*args.screenshot, args.test_id)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_file, test_file = root / "train.jsonl", root / "test.jsonl"
        train = (write_dataset(train_file, "train", args.n_train, args.chars), train_file)
        test = (write_dataset(test_file, "test", args.n_test, args.chars, args.n_train), test_file)
        dirs = [
            write_score_dir(root / f"scores_{m}", m, train, test, args.top_k)
            for m in range(args.methods)
        ]
        began = time.perf_counter()
        page = write_explanations(root, dirs)
        written = time.perf_counter() - began
        size = page.stat().st_size
        times = open_times(page, args.repeat)
    print(f"{args.n_test} test x {args.n_train} train, {args.methods} score directories, "
          f"top_k {args.top_k}, {args.chars} characters per conversation")  # fmt: skip
    print(f"page: {size / 2**20:.2f} MiB, written in {written:.2f} s")
    for t in times:
        print(f"open: first test example shown {t['ready_ms'] / 1000:.2f} s after navigation "
              f"start (driver.get to ready {t['get_to_ready_s']:.2f} s); switching to another "
              f"test example {t['switch_s'] * 1000:.0f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
