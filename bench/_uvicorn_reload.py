"""``uvicorn`` with its watchfiles reloader set to a given debounce and step, for
bench/dev_reload.py (uvicorn's ``watch()`` call takes watchfiles' defaults, 1600 / 50 ms,
and has no option for them).

    python bench/_uvicorn_reload.py --debounce 50 --step 10 -- main:app --reload ...
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit("usage: _uvicorn_reload.py --debounce MS --step MS -- UVICORN_ARGS")
    cut = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--debounce", type=int, required=True)
    parser.add_argument("--step", type=int, required=True)
    args = parser.parse_args(argv[:cut])

    import uvicorn.main
    import uvicorn.supervisors.watchfilesreload as reload
    import watchfiles

    def watch(*paths: Any, **kwargs: Any) -> Any:
        kwargs.update(debounce=args.debounce, step=args.step)
        # On stdout, so bench/dev_reload.py can check that the reloader took these.
        print(f"reloader: watchfiles.watch(debounce={args.debounce}, step={args.step})",
              flush=True)
        return watchfiles.watch(*paths, **kwargs)

    # The module looks ``watch`` up when the reloader starts: it gets ours.
    setattr(reload, "watch", watch)  # noqa: B010
    sys.argv = ["uvicorn", *argv[cut + 1:]]
    uvicorn.main.main()


if __name__ == "__main__":  # the reloader's worker (spawned) imports this file too
    main()
