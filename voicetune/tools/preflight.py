"""`python -m voicetune.tools.preflight`: the command line of voicetune.project.preflight."""
from voicetune.core.errors import run_stage
from voicetune.project.preflight import main

if __name__ == "__main__":
    run_stage("preflight", main)
