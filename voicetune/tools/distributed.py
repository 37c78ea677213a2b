"""Run the train stage data-parallel on several processes or machines (``mlx.launch``; see
``voicetune.train.distributed``).

    python -m voicetune.tools.distributed --np 2                  # 2 processes on this machine
    python -m voicetune.tools.distributed --hostfile hosts.json   # one process per host in the file
    python -m voicetune.tools.distributed --np 2 -- stages/train.py --params other.yaml
"""
import argparse
import sys

from voicetune.train.distributed import launch_command, run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--np", type=int, help="processes on this machine")
    where.add_argument("--hostfile", help="mlx.launch hostfile (JSON): one process per host")
    ap.add_argument("--backend", default="ring", help="mlx.launch backend (ring, mpi, ...)")
    ap.add_argument("script", nargs="*", default=["stages/train.py"],
                    help="script and its arguments (default: stages/train.py)")
    args = ap.parse_args(argv)
    if args.np is not None and args.np < 1:
        ap.error("--np must be at least 1")
    return run(launch_command(args.script, args.np, args.hostfile, args.backend))


if __name__ == "__main__":
    sys.exit(main())
