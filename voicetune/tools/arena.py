"""`python -m voicetune.tools.arena`: the command line of voicetune.serve.arena."""
from voicetune.core.errors import run_stage
from voicetune.serve.arena import main

if __name__ == "__main__":
    run_stage("arena", main)
