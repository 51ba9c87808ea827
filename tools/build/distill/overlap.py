"""Near-duplicate check between the evaluation splits and the prompts the teacher answered for training.

The split is by source-text hash, but /usr/share/doc repeats boilerplate with small edits, so two
different hashes can still be the same passage. For every validation and test prompt this reports
the highest Jaccard similarity of its word 5-gram set to any training prompt actually used.

    python -m tools.build.distill.overlap [--out docs/results/student/overlap.json]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

from tools.build.distill import prompts as pr
from tools.build.distill import teacher_data as td

ROOT = Path(__file__).resolve().parents[3]


def shingles(text: str, n: int = 5) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def max_similarity(queries: list[str], corpus: list[str]) -> list[float]:
    """Per query, the best Jaccard similarity of word 5-gram sets to any corpus text."""
    sets = [shingles(t) for t in corpus]
    index: dict[str, set[int]] = defaultdict(set)
    for j, s in enumerate(sets):
        for g in s:
            index[g].add(j)
    out = []
    for q in queries:
        s, shared = shingles(q), Counter()
        for g in s:
            shared.update(index.get(g, ()))
        out.append(max((c / len(s | sets[j]) for j, c in shared.items()), default=0.0))
    return out


def used_training_prompts(student_dir: Path, teacher_dir: Path, seed: int = 0) -> list[pr.Prompt]:
    """The training prompts with a teacher answer in `teacher_dir` (same order rule as `train_student data`)."""
    val = pr.read_jsonl(student_dir / "heldout_prompts.jsonl")
    test = pr.read_jsonl(student_dir / "test_prompts.jsonl")
    train, _ = pr.split_prompts(pr.build_prompts(), n_heldout=len(val), seed=seed)
    held = {p.text_hash for p in val + test}
    train = [p for p in train if p.text_hash not in held]
    return [train[i] for i in sorted(td.done_indices(teacher_dir))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", type=Path, default=ROOT / "models/student")
    ap.add_argument("--teacher", type=Path, default=ROOT / "models/student/work/teacher")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/student/overlap.json")
    a = ap.parse_args()
    used = [p.prompt for p in used_training_prompts(a.student, a.teacher)]
    report = {"training_prompts": len(used), "measure": "max Jaccard of word 5-gram sets to any training prompt"}
    for name in ("heldout_prompts", "test_prompts"):
        ps = pr.read_jsonl(a.student / f"{name}.jsonl")
        sim = max_similarity([p.prompt for p in ps], used)
        report[name] = dict(prompts=len(ps), sources=dict(Counter(p.source for p in ps)),
                            max_similarity=round(max(sim), 3), at_least_0_3=sum(s >= 0.3 for s in sim),
                            at_least_0_5=sum(s >= 0.5 for s in sim), at_least_0_8=sum(s >= 0.8 for s in sim))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
