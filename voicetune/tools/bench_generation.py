"""`python -m voicetune.tools.bench_generation`: the command line of voicetune.bench.generation."""
from voicetune.bench.generation import main

if __name__ == "__main__":
    main()
