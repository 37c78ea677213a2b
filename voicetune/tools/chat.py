"""`python -m voicetune.tools.chat`: the command line of voicetune.serve.chat."""
import sys

from voicetune.core.errors import run_stage
from voicetune.serve.chat import main

if __name__ == "__main__":
    try:
        run_stage("chat", main)
    except KeyboardInterrupt:  # Ctrl-C while loading: leave quietly
        sys.exit(130)
