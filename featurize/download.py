"""``python -m featurize.download``: the old name of ``python -m lesionlab.download``."""
from lesionlab.cli import run_main
from lesionlab.download import DownloadConfig, build_parser, main  # noqa: F401

if __name__ == "__main__":
    run_main(main)
