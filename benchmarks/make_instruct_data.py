"""Rebuild the packaged instruction-tuning stream from ../shared/data/cl_benchmark (seed 0, 48 train / 24 test per
task), each task with the instruction.txt a user would write."""

import argparse
import json
import random
from pathlib import Path

TASKS = {
    "sst2": "Is the sentiment of this movie review Good or Bad?",
    "qqp": "Do the two questions ask the same thing? Answer True or False.",
    "cb": "Does the premise entail the hypothesis, contradict it, or neither (neutral)?",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default="../shared/data/cl_benchmark")
    parser.add_argument("--out", default="src/loracl/resources/instruct")
    args = parser.parse_args()
    for task, instruction in TASKS.items():
        source, out = Path(args.source) / task, Path(args.out) / task
        train = json.loads((source / "train.json").read_text())
        test = json.loads((source / "test.json").read_text())
        rng = random.Random(0)
        rng.shuffle(train)
        rng.shuffle(test)
        # short inputs keep the packaged stream to a few minutes on 2 cores
        train = [example for example in train if len(example["sentence"]) <= 400][:48]
        test = [example for example in test if len(example["sentence"]) <= 400][:24]
        out.mkdir(parents=True, exist_ok=True)
        (out / "labels.json").write_text(json.dumps(json.loads((source / "labels.json").read_text())))
        (out / "train.json").write_text(json.dumps(train, ensure_ascii=False))
        (out / "test.json").write_text(json.dumps(test, ensure_ascii=False))
        (out / "instruction.txt").write_text(instruction + "\n")
        print(task, len(train), len(test))


if __name__ == "__main__":
    main()
