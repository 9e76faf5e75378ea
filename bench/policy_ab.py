"""Paired A/B of policy settings in simulation: the SLO capacity of each spec at every noise seed, over
bench/simulate.py's traces, against the first spec on the same trace and draws.

    .venv/bin/python bench/policy_ab.py --slo-ms 2000 --family english --arrivals bursts \\
        --host-ms 1.74,0.27,0.82 --noise 0 --jitter 0.0125 --spells 0.082:0.37,0.115:40 \\
        dp dp:margin_averaging=0.5 token_budget

A spec is a policy name and PolicyConfig fields to change, `name[:field=value;field=value]`, from the table's
settings (bench/simulate.py: fixed batches of 32, preferred 8/16/32, 5 ms delay and wait, late grace 4 SLOs).
`--plan-ms dp=7,fifo=0.3` charges each policy's planning a batch as device idle time (HostLoad.per_batch; live dp
planned 4-17 ms a batch on 2-vCPU VMs, the baselines 0.1-0.9 ms); a spec with plan_ahead=1 hides it.
Per trace: each spec's median capacity (requests/s) and its mean paired gap to the first spec with the standard
error over the seeds (slo_capacity.paired_gap).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.simulate import host_ms, length_families, policy_config, spells  # noqa: E402
from bench.slo_capacity import full_batch_rate, paired_gap, slo_capacity  # noqa: E402
from scheduler.cost_model import DEFAULT_ALPHA, CostModel  # noqa: E402
from scheduler.planner import Limits, PolicyConfig  # noqa: E402
from scheduler.simulator import Scatter, make_trace  # noqa: E402

DEFAULT_COST = Path(__file__).resolve().parent / "results" / "s21" / "cost_amd.json"  # the 2-vCPU VM's profile


def spec_config(spec: str) -> PolicyConfig:
    """`name[:field=value;...]` as a PolicyConfig with the table's settings."""
    name, _, options = spec.partition(":")
    config = policy_config(name)
    fields = {f.name for f in dataclasses.fields(PolicyConfig)}
    for item in filter(None, options.split(";")):
        key, sep, value = item.partition("=")
        if not sep or key not in fields or key == "name":
            raise argparse.ArgumentTypeError(f"{item!r} in {spec!r}: not field=value for a PolicyConfig field")
        current = getattr(config, key)
        try:
            typed = value if isinstance(current, str) else (value.lower() in ("1", "true") if isinstance(current, bool)
                                                            else type(current)(float(value)))
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{item!r} in {spec!r}: {value!r} is not a {type(current).__name__}") from None
        config = dataclasses.replace(config, **{key: typed})
    return config


def plan_ms(text: str) -> dict[str, float]:
    """POLICY=MS[,POLICY=MS...] (--plan-ms) as seconds by policy name."""
    try:
        pairs = [part.split("=") for part in text.split(",") if part]
        out = {name: float(ms) / 1000 for name, ms in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not POLICY=MS[,POLICY=MS...]") from None
    if min(out.values(), default=0.0) < 0:
        raise argparse.ArgumentTypeError(f"planning times must be >= 0, got {text!r}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+", type=spec_config, help="name[:field=value;...]; the first is the reference")
    ap.add_argument("--slo-ms", type=float, default=2000.0)
    ap.add_argument("--seeds", type=int, default=7, help="noise seeds 1..N, paired across specs")
    ap.add_argument("--family", default="", help="only the length families whose name starts with this")
    ap.add_argument("--arrivals", choices=("poisson", "bursts", "both"), default="both")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--bisect-steps", type=int, default=8)
    ap.add_argument("--cost", type=Path, default=DEFAULT_COST)
    ap.add_argument("--host-ms", type=host_ms, default="1.74,0.27,0.82", help="as bench/simulate.py's")
    ap.add_argument("--noise", type=float, default=0.06)
    ap.add_argument("--jitter", type=float, default=0.0125)
    ap.add_argument("--spells", type=spells, default="", help="as bench/simulate.py's")
    ap.add_argument("--plan-ms", type=plan_ms, default="", help="POLICY=MS,...: planning a batch, device idle (default 0)")
    args = ap.parse_args()
    cost = CostModel.load(args.cost).measured()
    cost.alpha = DEFAULT_ALPHA
    limits, slo = Limits(16384, 64), args.slo_ms / 1000
    noise = Scatter(args.noise, args.jitter, args.spells)
    names = [f"{c.name}" + "".join(f" {f.name}={getattr(c, f.name)}" for f in dataclasses.fields(c)
                                   if getattr(c, f.name) != getattr(spec_config(c.name), f.name)) for c in args.specs]
    print(f"SLO {slo} s, seeds 1-{args.seeds}, {args.host_ms}, {noise}, planning {args.plan_ms or 'none'}")
    for family, (draw, mean_len) in length_families().items():
        if not family.startswith(args.family):
            continue
        unit = full_batch_rate(mean_len, limits, cost)
        for bursty in {"poisson": (False,), "bursts": (True,), "both": (False, True)}[args.arrivals]:
            t0 = time.time()
            hosts = [dataclasses.replace(args.host_ms, per_batch=args.plan_ms.get(c.name, 0.0)) for c in args.specs]
            caps = [[slo_capacity(lambda x: make_trace(x * unit, args.requests, draw, seed=1, bursty=bursty), config,
                                  limits, cost, slo, args.bisect_steps, host=host, refine=True, noise=noise, seed=seed)
                     for seed in range(1, args.seeds + 1)] for config, host in zip(args.specs, hosts)]
            parts = []
            for name, mine in zip(names, caps):
                gap = "" if mine is caps[0] else " ({:+.1%} se {:.1%})".format(*paired_gap(mine, caps[0]))
                parts.append(f"{name} {statistics.median(mine) * unit:.2f}{gap}")
            print(f"{family[:20]:20} {'bursts' if bursty else 'poisson':7} " + " | ".join(parts)
                  + f" ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
