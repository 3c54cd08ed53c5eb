"""Rebuild the packaged quickstart tasks from ../shared/data/cl_benchmark (seed 0, 400 train / 200 test)."""

import argparse
import json
import random
from pathlib import Path

TASKS = ["sst2", "cb", "qqp", "imdb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default="../shared/data/cl_benchmark")
    parser.add_argument("--out", default="src/loracl/resources/quickstart")
    args = parser.parse_args()
    for task in TASKS:
        source, out = Path(args.source) / task, Path(args.out) / task
        train = json.loads((source / "train.json").read_text())
        test = json.loads((source / "test.json").read_text())
        rng = random.Random(0)
        rng.shuffle(train)
        rng.shuffle(test)
        out.mkdir(parents=True, exist_ok=True)
        (out / "labels.json").write_text(json.dumps(json.loads((source / "labels.json").read_text())))
        (out / "train.json").write_text(json.dumps(train[:400], ensure_ascii=False))
        (out / "test.json").write_text(json.dumps(test[:200], ensure_ascii=False))
        print(task, min(400, len(train)), min(200, len(test)))


if __name__ == "__main__":
    main()
