"""`python -m voicetune.tools.publish`: the command line of voicetune.export.publish."""
from voicetune.core.errors import run_stage
from voicetune.export.publish import main

if __name__ == "__main__":
    run_stage("publish", main)
