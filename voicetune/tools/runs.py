"""`python -m voicetune.tools.runs`: the command line of voicetune.evaluate.runs."""
import sys

from voicetune.core.errors import run_stage
from voicetune.evaluate.runs import main

if __name__ == "__main__":
    run_stage("runs", lambda: main(sys.argv[1:]))
