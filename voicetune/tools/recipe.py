"""`python -m voicetune.tools.recipe recipes/x.yaml`: apply a recipe to params.yaml and say
what changed (voicetune.project.recipe); exit status 1, nothing written, when it does not fit.

    python -m voicetune.tools.recipe recipes/phi3-blog.yaml      # or: make recipe R=phi3-blog
"""
import argparse
import sys

from voicetune.project import recipe
from voicetune.project.recipe import RecipeError, apply, missing_posts


def _show(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=recipe.__doc__.splitlines()[0])
    ap.add_argument("recipe", help="a recipes/*.yaml file")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    try:
        changes = apply(args.recipe, args.params)
    except RecipeError as err:
        print(f"recipe: {err}", file=sys.stderr)
        return 1
    missing = missing_posts(args.params)
    if not changes:
        print(f"{args.params} already matches {args.recipe}: nothing changed")
    else:
        print(f"{args.recipe} -> {args.params}: {len(changes)} change{'s' * (len(changes) > 1)}")
        for name, old, new in changes:
            print(f"  {name}: {_show(old)} -> {_show(new)}")
    if missing:
        print(f"to do: {missing}")
    if changes:
        print("next: " + ("add your posts, then " if missing else "") +
              "`dvc params diff` to review, `dvc repro` to run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
