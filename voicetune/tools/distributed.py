"""`python -m voicetune.tools.distributed`: the command line of voicetune.train.distributed."""
import sys

from voicetune.train.distributed import main

if __name__ == "__main__":
    sys.exit(main())
