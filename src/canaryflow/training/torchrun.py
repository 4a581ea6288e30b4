"""torchrun, with a failed rank told in one line instead of torchrun's traceback and failure table.

launch.data_parallel runs `python -m canaryflow.training.torchrun REPORT <torchrun's own arguments>`. What
torchrun does is unchanged; when a rank fails, why (per rank) goes to the file REPORT, for the step's one error
line, and the exit status is 2 where a rank refused bad input, as the CLI's is, and 1 for any other failure.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _reason(failure) -> str:
    """Why one rank (a ProcessFailure of torch elastic) failed, in a few words."""
    if failure.exitcode < 0:
        return f" killed by {failure.signal_name()}"
    # Without an error file torch elastic fills in a placeholder ("<NONE>"), which says nothing.
    said = failure.error_file_data.get("message") if Path(failure.error_file).is_file() else None
    # launch.main leaves a string there; a dict is torch's own record of an uncaught exception, with its traceback.
    if isinstance(said, str) and said:
        return f": {said}"
    return f" exited {failure.exitcode}"


def describe(failures: dict) -> str:
    """The failed ranks, those that failed alike together: every rank that did not learn says so."""
    # When one rank fails, torchrun stops the others with SIGTERM (torch/distributed/elastic/multiprocessing/
    # api.py, "Sending process N closing signal SIGTERM"): those are not why the step failed.
    cause = {rank: f for rank, f in failures.items() if f.signal_name() != "SIGTERM"} or failures
    ranks_by_reason: dict[str, list[int]] = {}
    for rank, failure in sorted(cause.items()):
        ranks_by_reason.setdefault(_reason(failure), []).append(rank)
    return "; ".join(
        f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}{reason}"
        for reason, ranks in ranks_by_reason.items()
    )


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = sys.argv[1:] if argv is None else argv
    report, torchrun_args = Path(argv[0]), argv[1:]
    try:
        run(parse_args(torchrun_args))
    except ChildFailedError as exc:
        report.write_text(describe(exc.failures), encoding="utf-8")
        return 2 if any(failure.exitcode == 2 for failure in exc.failures.values()) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
