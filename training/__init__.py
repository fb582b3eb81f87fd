"""Training and evaluation of the registered segmentation networks (``python -m training``).

No Qt or napari here: the GUI runs this package as a child process and tails its metrics log.
"""

__all__ = ["main"]


def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)
