"""Speed benchmarks of the captioner against the alternatives users would pick.

    python -m benchmarks.run [--quick] [--model SRC] [--threads N] [--json PATH]

See benchmarks/README.md for what each section measures and benchmarks/run.py for the options.
"""
