"""`python -m voicetune.tools.recipe`: the command line of voicetune.project.recipe."""
import sys

from voicetune.project.recipe import main

if __name__ == "__main__":
    sys.exit(main())
