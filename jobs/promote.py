"""Move the registered model's aliases: candidate -> champion through the gate, forced, rolled back; history.

    python jobs/promote.py [--version N]                     gate the candidate (or version N) against the champion
    python jobs/promote.py --version N --force --reason "…"  promote without the gate; the reason is recorded
    python jobs/promote.py --rollback [--reason "…"]         restore the previous champion
    python jobs/promote.py --history                         list every alias move
Common: --config configs/promote.yaml, --set gate.metrics.val_loss_lm.tolerance=0.1, --who NAME
(gate.metrics from YAML or --set replaces the embedded set: start from configs/promote.yaml).
Exit status 1 when the gate refuses (the failing metrics, NaN or missing ones, or held-out set digests are
printed), when `champion` moved while the promotion ran (compare-and-set: nothing moves; run it again), or on
an error. Every move is recorded on the version (who, when, from/to, metrics, digests, gate) before it happens.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout or a Ray working dir

from dreamllm_platform.config import job_parser, parse_job  # noqa: E402
from dreamllm_platform.registry import RegistryConfig, history, promote, rollback  # noqa: E402


def main(argv=None) -> int:
    parser = job_parser(__doc__)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--rollback", action="store_true", help="point champion back at the previous champion")
    what.add_argument("--history", action="store_true", help="list the alias moves")
    parser.add_argument("--version", default="@candidate", help="version number or @ALIAS (default: @candidate)")
    parser.add_argument("--force", action="store_true", help="promote even if the gate refuses (needs --reason)")
    parser.add_argument("--reason", help="why (required with --force; recorded on the version)")
    parser.add_argument("--who", help="who moves the alias (default: the current user)")
    cfg, args = parse_job(parser, RegistryConfig, argv)
    if args.force and not (args.reason and args.reason.strip()):
        parser.exit(2, "promote: --force needs --reason \"why the gate is overridden\"\n")
    try:
        name = cfg.tracking.registered_model
        if args.history:
            moves = history(cfg)
            print(f"alias moves of {name!r} ({len(moves)})")
            for m in moves:
                print("  " + m.line())
            return 0
        if args.rollback:
            m = rollback(cfg, args.who, args.reason)
            print(f"rolled back {name!r}: champion -> v{m.version} (was v{m.previous})")
            return 0
        r = promote(cfg, args.version, args.who, args.reason if args.force else None)
    except ValueError as e:
        print(f"promote failed: {e}", file=sys.stderr)
        return 1
    was = f"v{r.champion_before}" if r.champion_before else "none"
    if not r.promoted:
        print(f"promotion of {name!r} v{r.version} refused by the gate (champion stays {was}; "
              f"v{r.version} is the candidate):", file=sys.stderr)
        for f in r.failures:
            print(f"  - {f}", file=sys.stderr)
        return 1
    for f in r.failures:
        print(f"  gate would have refused: {f}")
    print(f"promoted {name!r}: champion -> v{r.version} (was {was})" + (" [forced]" if args.force else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
