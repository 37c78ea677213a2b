"""Stage ingest: the author's posts -> grounded question/answer pairs with provenance.

    python stages/ingest.py        # reads params.yaml (ingest.*, data.system_prompt, kernels.fast_cpu)

Reads the posts of ingest.source (.md, .html, RSS/Atom feeds), cuts them into passages, asks
the generator (the base model in-process, or ingest.endpoint) for reader questions and
first-person answers grounded in each passage, validates them, and writes
data/ingested/pairs.jsonl (prepare's conversation format plus post_id, passage_id, generator,
prompt_version) and metrics/ingest.json (counts, rejections by reason, pairs/minute).
Replies are cached per passage in cache/ingest/: a rerun generates only new or changed
passages, and a killed run resumes where it stopped.
"""
import argparse
import sys

from voicetune.core.errors import run_stage
from voicetune.data import ingest
from voicetune.core.files import write_json_atomic
from voicetune.core.jsonl import write_jsonl
from voicetune.core.params import load_params
from voicetune.data.posts import read_passages
from voicetune.models import generators

from tqdm import tqdm  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="models/base", help="the in-process generator")
    ap.add_argument("--cache", default="cache/ingest", help="per-passage replies (not a DVC output)")
    ap.add_argument("--out", default="data/ingested/pairs.jsonl")
    ap.add_argument("--metrics", default="metrics/ingest.json")
    args = ap.parse_args()
    params = load_params(args.params)  # validates all of params.yaml, before any work
    p = params["ingest"]

    posts, passages, problems = read_passages(p["source"], p["max_words"], p["min_words"],
                                              keep_code=p["keep_code"], on_error=p["on_error"])
    for problem in problems:
        print(f"warning: skipped {problem}", file=sys.stderr)
    in_source = {"posts_in_source": len(posts), "passages_in_source": len(passages)}
    limited = p["limit"] is not None and p["limit"] < len(passages)
    print(f"ingest: {len(posts)} posts, {len(passages)} passages from {p['source']}"
          + (f"; the first {p['limit']} ingested (ingest.limit)" if limited else ""))
    posts, passages = ingest.limited(posts, passages, p["limit"])

    generator = generators.stage_generator(p, args.model, "ingest", params["kernels"]["fast_cpu"])
    # replies: each passage's questions, then an answer per question
    with tqdm(total=len(passages) * (1 + p["questions"]), desc="ingest", unit="reply") as bar:
        rows, metrics = ingest.run(posts, passages, params["data"]["system_prompt"], generator, p,
                                   args.cache, progress=bar.update)
    metrics = {"source": p["source"], **in_source, "problems": [str(x) for x in problems], **metrics}
    write_jsonl(args.out, rows)
    write_json_atomic(args.metrics, metrics)

    rejected = ", ".join(f"{k} {v}" for k, v in metrics["rejected"].items() if v) or "none"
    speed = f", {metrics['pairs_per_minute']} pairs/min" if metrics["pairs_per_minute"] else ""
    print(f"ingest: {metrics['pairs']} pairs from {metrics['questions_parsed']} questions "
          f"({metrics['cache_hits']} of {len(passages)} passages cached; "
          f"{metrics['generation_seconds']} s{speed}); rejected: {rejected}")
    if not rows:
        print(f"WARNING: no pair passed validation (see {args.metrics}); a model this small may "
              "need other ingest.* thresholds, or a stronger generator via ingest.endpoint",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_stage("ingest", main)
