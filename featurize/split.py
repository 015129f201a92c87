"""``python -m featurize.split``: the old name of ``python -m lesionlab.splits``, kept working."""
from lesionlab.cli import run_main
from lesionlab.splits import build_parser, main  # noqa: F401

if __name__ == "__main__":
    run_main(main)
