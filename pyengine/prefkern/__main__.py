"""``python -m prefkern info``: which backends can run on this machine, and why not."""

import sys

from .dispatch import format_info


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in ([], ["info"]):
        print(format_info())
        return 0
    print("usage: python -m prefkern info", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
