"""`python -m voicetune.tools.bench`: the command line of voicetune.bench.training."""
from voicetune.bench.training import main

if __name__ == "__main__":
    main()
