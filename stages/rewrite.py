"""Stage rewrite: the author's posts -> (plain draft, the author's original) pairs for the rewrite task.

    python stages/rewrite.py       # reads params.yaml (rewrite.*, ingest.source, data.task, ...)

Cuts the posts of ingest.source into passages of rewrite.max_words, asks the generator (the
base model in-process, or rewrite.endpoint) to rewrite each plainly, validates every
paraphrase (content kept, length, no copy, voice lost) and writes data/rewrite/pairs.jsonl
(prepare's conversation format: the instruction and the draft, then the original; with
task, post_id, passage_id, generator, prompt_version and the measures) and
metrics/rewrite.json (counts, rejections by reason). With data.task: qa nothing is
generated and the pairs file is empty. Replies are cached in cache/rewrite/.
"""
import argparse
import sys

from voicetune.core.errors import run_stage
from voicetune.core.files import write_json_atomic
from voicetune.core.jsonl import write_jsonl
from voicetune.core.params import load_params
from voicetune.data import paraphrase
from voicetune.data.posts import read_passages
from voicetune.models import generators

from tqdm import tqdm  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="models/base", help="the in-process generator")
    ap.add_argument("--cache", default="cache/rewrite", help="the generator's replies (not a DVC output)")
    ap.add_argument("--out", default="data/rewrite/pairs.jsonl")
    ap.add_argument("--metrics", default="metrics/rewrite.json")
    args = ap.parse_args()
    params = load_params(args.params)  # validates all of params.yaml, before any work
    p, source = params["rewrite"], params["ingest"]

    if params["data"]["task"] == "qa":
        write_jsonl(args.out, [])
        write_json_atomic(args.metrics, {"task": "qa", "pairs": 0})
        print("rewrite: data.task is qa: no rewrite pairs made")
        return 0
    posts, passages, problems = read_passages(source["source"], p["max_words"], p["min_words"],
                                              keep_code=source["keep_code"], on_error=source["on_error"])
    for problem in problems:
        print(f"warning: skipped {problem}", file=sys.stderr)
    print(f"rewrite: {len(posts)} posts, {len(passages)} passages from {source['source']}"
          + (f"; the first {p['limit']} rewritten (rewrite.limit)"
             if p["limit"] is not None and p["limit"] < len(passages) else ""))
    passages = passages[:p["limit"]]

    generator = generators.stage_generator(p, args.model, "rewrite", params["kernels"]["fast_cpu"])
    with tqdm(total=len(passages), desc="rewrite", unit="passage") as bar:
        rows, metrics = paraphrase.run(passages, generator, p, args.cache, progress=bar.update)
    metrics = {"task": params["data"]["task"], "source": source["source"],
               "posts_in_source": len(posts), "problems": [str(x) for x in problems], **metrics}
    write_jsonl(args.out, rows)
    write_json_atomic(args.metrics, metrics)

    rejected = ", ".join(f"{k} {v}" for k, v in metrics["rejected"].items() if v) or "none"
    print(f"rewrite: {metrics['pairs']} pairs from {len(passages)} passages in "
          f"{len({r['post_id'] for r in rows})} posts ({metrics['cache_hits']} cached; "
          f"{metrics['generation_seconds']} s); rejected: {rejected}")
    if not rows:
        print(f"WARNING: no paraphrase passed validation (see {args.metrics}); a model this small "
              "may need other rewrite.* thresholds, or a stronger generator via rewrite.endpoint",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_stage("rewrite", main)
