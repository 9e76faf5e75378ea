"""Simulate every batching policy over the same traces with the cost model measured on this machine,
sweep the offered load, print a table, and plot p99 latency and SLO attainment vs load (PNG).

    .venv/bin/python bench/simulate.py                      # uses the saved cost model of `turboserve profile`
    .venv/bin/python bench/simulate.py --cost FILE --slo-ms 2000 --out bench/out

Length distributions: uniform 8-256 tokens, log-normal (median 64), and the token lengths of real
English paragraphs (standard-library docstrings, tokenized with the served model's tokenizer).
Arrivals: Poisson, and Poisson bursts of 16.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.slo_capacity import full_batch_rate, paired_gap, seed_capacities, throughput_ceiling  # noqa: E402
from scheduler.cost_model import DEFAULT_ALPHA, CostModel  # noqa: E402
from scheduler.planner import Limits, PolicyConfig  # noqa: E402
from scheduler.simulator import (  # noqa: E402
    HostLoad,
    Scatter,
    Spells,
    lengths_empirical,
    lengths_lognormal,
    lengths_uniform,
    make_trace,
    simulate,
)

POLICIES = ("dp", "token_budget", "fifo", "triton", "sort_slice")


def corpus_lengths(max_tokens: int = 256) -> list[int]:
    """Token counts (with [CLS]/[SEP]) of the paragraphs of standard-library docstrings."""
    from bench.workload import corpus_paragraphs, load_tokenizer  # noqa: PLC0415

    return [min(len(e.ids), max_tokens) for e in load_tokenizer().encode_batch(list(corpus_paragraphs()))]


def length_families() -> dict[str, tuple[Callable[[random.Random], int], float]]:
    """The table's length distributions: name -> (draw(rng), mean length)."""
    corpus = corpus_lengths()
    lognormal = lengths_lognormal(64, 0.7, 4, 256)
    rng = random.Random(0)
    sample = [lognormal(rng) for _ in range(5000)]
    return {"uniform 8-256": (lengths_uniform(8, 256), 132),
            "lognormal median 64": (lognormal, sum(sample) / len(sample)),
            f"english paragraphs ({len(corpus)})": (lengths_empirical(corpus), sum(corpus) / len(corpus))}


# The table's own policy settings (its command line's defaults; bench/policy_ab.py starts from them too).
TABLE_SETTINGS = argparse.Namespace(fixed_batch_size=32, delay_ms=5.0, late_grace=4.0)


def policy_config(name: str, args=TABLE_SETTINGS) -> PolicyConfig:
    return PolicyConfig(name, fixed_batch_size=args.fixed_batch_size, preferred_batch_sizes=(8, 16, 32),
                        max_queue_delay=args.delay_ms / 1000, max_wait=args.delay_ms / 1000, late_grace=args.late_grace)


def _loads(text: str) -> list[float]:
    try:
        loads = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(0 < x < float("inf") for x in loads):
        raise argparse.ArgumentTypeError(f"every load must be > 0, got {text!r}")
    return loads


def host_ms(text: str) -> HostLoad:
    """ARRIVAL,COMPLETION[,FORWARD] in ms (--host-ms)."""
    try:
        ms = [float(x) / 1000 for x in text.split(",")]
    except ValueError:
        ms = []
    if len(ms) not in (2, 3) or min(ms) < 0:
        raise argparse.ArgumentTypeError(f"two or three numbers >= 0, ARRIVAL,COMPLETION[,FORWARD], got {text!r}")
    return HostLoad(ms[0], ms[1], per_forward=ms[2] if len(ms) == 3 else 0.0)


def spells(text: str) -> Spells:
    """SIGMA:TAU[,SIGMA:TAU...] (empty: none)."""
    try:
        pairs = [tuple(float(x) for x in part.split(":")) for part in text.split(",") if part]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError
        return Spells(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not SIGMA:TAU[,SIGMA:TAU] with sigma >= 0 and tau > 0") from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cost", help="saved cost model JSON (default: the newest in ~/.cache/turboserve)")
    ap.add_argument("--slo-ms", type=float, default=2000.0)
    ap.add_argument("--requests", type=int, default=3000,
                    help="requests per trace (1,500 hid how policies hold up over a long spell past capacity)")
    ap.add_argument("--loads", default="0.3,0.5,0.7,0.8,0.85,0.9,0.95,1.0,1.05,1.1,1.2", type=_loads,
                    help="offered load / capacity, comma-separated, each > 0")
    ap.add_argument("--inputs", type=int, default=1,
                    help="sequences per request (a request of several inputs is answered when its last one is)")
    ap.add_argument("--max-batch-tokens", type=int, default=16384)
    ap.add_argument("--max-batch-requests", type=int, default=64)
    ap.add_argument("--fixed-batch-size", type=int, default=TABLE_SETTINGS.fixed_batch_size)
    ap.add_argument("--delay-ms", type=float, default=TABLE_SETTINGS.delay_ms, help="fifo/triton max queue delay and dp max wait")
    ap.add_argument("--late-grace", type=float, default=TABLE_SETTINGS.late_grace, help="dp: SLOs past its deadline a hopeless request stays demoted")
    ap.add_argument("--out", default="bench/out", help="folder for the PNG and the JSON")
    ap.add_argument("--refined", action="store_true",
                    help="use the saved model as refined by live batches (default: as measured by `turboserve profile`)")
    ap.add_argument("--bisect-steps", type=int, default=10, help="bisection steps per policy for the SLO capacity (0: skip)")
    ap.add_argument("--capacity-requests", type=int, default=5000,
                    help="requests per trace when bisecting the SLO capacity (long enough that an unstable queue shows)")
    ap.add_argument("--host-ms", default="0,0", type=host_ms, metavar="ARRIVAL,COMPLETION[,FORWARD]",
                    help="the host's request handling, ms added to the running batch per arrival and to the next batch "
                         "per answer, and to every batch (HostLoad; bench/sim_fidelity.py fits them over a live_capacity "
                         "run's batches on a CPU host; 0,0: a GPU host)")
    ap.add_argument("--refine", action="store_true",
                    help="the planners' model learns from every simulated batch time (host work included), as the "
                         "server's does from live batches; without it a planner never sees the host's share")
    ap.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                    help="with --refine: the planners' EWMA weight of one batch (the server's scheduler.cost_model_alpha; "
                         "a saved model carries the one it was saved with)")
    ap.add_argument("--noise", type=float, default=0.0, metavar="SIGMA",
                    help="each simulated batch takes its time times a log-normal factor of this sigma (live batches "
                         "scatter about the calibrated fit by 0.11-0.17 on a 2-vCPU VM: HostFit.scatter); SLO capacities "
                         "are then the median over noise seeds 1-7. Use with --refine, as the server learns")
    ap.add_argument("--jitter", type=float, default=0.0, metavar="J",
                    help="with --noise as the floor: sigma(t)^2 = noise^2 + J^2 / t for a batch of t seconds (Scatter: "
                         "short batches scatter more; fitted live 0.012-0.03 with a floor of 0.055-0.085)")
    ap.add_argument("--spells", default="", type=spells, metavar="SIGMA:TAU[,SIGMA:TAU]",
                    help="and the machine's speed moves in spells (Spells: Ornstein-Uhlenbeck processes of that sd and "
                         "correlation time in seconds in the log of every batch's time; bench/spell_fit.py fits them on "
                         "live runs: 0.082:0.37,0.115:40 on the 2-vCPU VM, with --noise 0 for the floor left)")
    args = ap.parse_args()
    if not 0 < args.alpha <= 1:
        ap.error(f"--alpha must be in (0, 1], got {args.alpha}")
    if args.noise < 0 or args.jitter < 0:
        ap.error(f"--noise and --jitter must be >= 0, got {args.noise} and {args.jitter}")
    if args.inputs < 1:
        ap.error(f"--inputs must be at least 1, got {args.inputs}")
    host = args.host_ms
    noise = Scatter(args.noise, args.jitter, args.spells)

    saved = glob.glob(os.path.expanduser("~/.cache/turboserve/cost-*.json"))
    if not args.cost and not saved:
        ap.error("no saved cost model in ~/.cache/turboserve: run `turboserve profile` first, or pass --cost")
    path = args.cost or max(saved, key=os.path.getmtime)
    try:
        cost = CostModel.load(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        ap.error(f"--cost {path}: not a saved cost model ({type(exc).__name__}: {exc})")
    cost = cost if args.refined else cost.measured()
    cost.alpha = args.alpha
    print(f"cost model {path} ({'refined' if args.refined else 'as measured'}; drift {cost.drift():.2f}x)")
    limits = Limits(args.max_batch_tokens, args.max_batch_requests)
    slo = args.slo_ms / 1000
    rows, capacities = [], []
    for dist_name, (draw, mean_len) in length_families().items():
        capacity = full_batch_rate(mean_len, limits, cost) / args.inputs
        for bursty in (False, True):
            for load in args.loads:
                trace = make_trace(load * capacity, args.requests, draw, seed=1, bursty=bursty, inputs=args.inputs)
                for name in POLICIES:
                    r = simulate(trace, policy_config(name, args), limits, cost, slo, host=host, refine=args.refine,
                                 noise=noise, seed=1)
                    rows.append({"distribution": dist_name, "arrivals": "bursts of 16" if bursty else "poisson",
                                 "load": load, "offered_rps": round(load * capacity, 3), **r.row()})
                    print(f"{dist_name:28} {'burst' if bursty else 'poiss'} load {load:4.2f} {name:12} "
                          f"thr {r.throughput:6.2f}/s good {r.goodput:6.2f}/s p50 {r.p50:7.3f}s p99 {r.p99:8.3f}s "
                          f"slo {r.slo_attainment:6.1%} batch {r.mean_batch:5.1f} pad {r.padding_ratio:5.1%}", flush=True)
            if args.bisect_steps:
                lengths = make_trace(capacity, args.capacity_requests, draw, seed=1, bursty=bursty, inputs=args.inputs).lengths
                ceiling = throughput_ceiling(lengths, limits, cost, host) / args.inputs  # the bisection's traces share these lengths
                for name in POLICIES:
                    loads = seed_capacities(lambda x: make_trace(x * capacity, args.capacity_requests, draw, seed=1,
                                                                 bursty=bursty, inputs=args.inputs),
                                            policy_config(name, args), limits, cost, slo, args.bisect_steps, host=host,
                                            refine=args.refine, noise=noise)
                    load = statistics.median(loads)
                    capacities.append({"distribution": dist_name, "arrivals": "bursts of 16" if bursty else "poisson",
                                       "policy": name, "load": round(load, 4), "rps": round(load * capacity, 3),
                                       "ceiling_rps": round(ceiling, 3), "seed_loads": [round(x, 4) for x in loads]})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"cost_model": path, "refined": args.refined, "slo_s": slo, "inputs": args.inputs, "host": host.__dict__,
               "refine": args.refine, "noise": args.noise, "jitter": args.jitter,
               "spells": {"sigma": list(args.spells.sigma), "tau": list(args.spells.tau)}, "rows": rows, "slo_capacity": capacities}
    (out / "simulation.json").write_text(json.dumps(summary, indent=1))
    summarize(rows, slo)
    summarize_capacity(capacities)
    plot(rows, out / "simulation.png", slo)
    if capacities:
        plot_capacity(capacities, out / "slo_capacity.png", slo)
    print(f"wrote {out / 'simulation.json'} and the PNGs in {out}")
    return 0


def summarize_capacity(capacities: list[dict]) -> None:
    """Per trace family: the most requests/s each policy serves with p99 within the SLO, as a ratio to fifo,
    and as a share of the throughput ceiling."""
    if not capacities:
        return
    print("\nThroughput within the SLO (highest load with p99 <= SLO), ratio to fifo, share of the ceiling:")
    for dist, arrivals in sorted({(c["distribution"], c["arrivals"]) for c in capacities}):
        fam = {c["policy"]: c for c in capacities if c["distribution"] == dist and c["arrivals"] == arrivals}
        fifo = fam["fifo"]["rps"] or 1e-9
        ceiling = fam["fifo"]["ceiling_rps"]
        parts = " ".join(f"{p} {fam[p]['rps']:.2f} ({fam[p]['rps'] / fifo:.2f}x, {fam[p]['rps'] / ceiling:.0%})" for p in POLICIES)
        print(f"  {dist:28} {arrivals:12} ceiling {ceiling:.2f}/s: {parts}")
    if len(capacities[0].get("seed_loads", [])) < 2:
        return
    # A median over 7 seeds of a bisected load moves by a bisection step or two with the draws: "dp below a
    # baseline" needs the pairs (session 24: 0.976x by the medians, -0.26% +- 0.38% paired over 15 seeds).
    print("\ndp against each baseline, paired over the noise seeds (mean of dp - baseline, +- its standard error, as shares of the baseline):")
    behind = 0
    families = sorted({(c["distribution"], c["arrivals"]) for c in capacities})
    for dist, arrivals in families:
        fam = {c["policy"]: c["seed_loads"] for c in capacities if c["distribution"] == dist and c["arrivals"] == arrivals}
        gaps = {p: paired_gap(fam["dp"], fam[p]) for p in POLICIES if p != "dp"}
        worse = [p for p, (mean, se) in gaps.items() if mean + 2 * se < 0]
        behind += bool(worse)
        parts = " ".join(f"{p} {mean:+.1%} +- {se:.1%}" for p, (mean, se) in gaps.items())
        print(f"  {dist:28} {arrivals:12} {parts}" + (f"  BEHIND {', '.join(worse)}" if worse else ""))
    print(f"  dp behind a baseline by more than two standard errors on {behind} of {len(families)} traces")


def summarize(rows: list[dict], slo: float) -> None:
    """Per trace family: the load where FIFO's p99 first crosses the SLO, and each policy's goodput there
    and at the highest load (ratios to FIFO)."""
    print("\nAt the load where fifo's p99 crosses the SLO, and at the highest load:")
    families = sorted({(r["distribution"], r["arrivals"]) for r in rows})
    for dist, arrivals in families:
        fam = [r for r in rows if r["distribution"] == dist and r["arrivals"] == arrivals]
        loads = sorted({r["load"] for r in fam})
        crossing = next((ld for ld in loads if next(r for r in fam if r["load"] == ld and r["policy"] == "fifo")["p99"] > slo), None)
        for label, ld in (("fifo crosses", crossing), ("highest", loads[-1])):
            if ld is None:
                continue
            at = {r["policy"]: r for r in fam if r["load"] == ld}
            fifo = at["fifo"]["goodput"] or 1e-9
            parts = " ".join(f"{p} {at[p]['goodput']:.2f} ({at[p]['goodput'] / fifo:.2f}x)" for p in POLICIES)
            print(f"  {dist:28} {arrivals:12} {label:12} load {ld:4.2f}: goodput/s {parts}")


def plot(rows: list[dict], path: Path, slo: float) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    families = sorted({(r["distribution"], r["arrivals"]) for r in rows})
    fig, axes = plt.subplots(2, len(families), figsize=(4.2 * len(families), 7.5), squeeze=False)
    for col, (dist, arrivals) in enumerate(families):
        fam = [r for r in rows if r["distribution"] == dist and r["arrivals"] == arrivals]
        for name in POLICIES:
            pts = sorted((r["load"], r["p99"], r["slo_attainment"]) for r in fam if r["policy"] == name)
            axes[0][col].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
            axes[1][col].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", ms=3, label=name)
        axes[0][col].axhline(slo, color="grey", ls="--", lw=0.8)
        axes[0][col].set_yscale("log")
        axes[0][col].set_title(f"{dist}\n{arrivals}", fontsize=9)
        axes[0][col].set_ylabel("p99 latency (s)")
        axes[1][col].set_ylabel("SLO attainment")
        axes[1][col].set_xlabel("offered load / capacity")
        axes[1][col].set_ylim(0, 1.02)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Simulated with the cost model measured on this machine (SLO {slo:g}s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_capacity(capacities: list[dict], path: Path, slo: float) -> None:
    """Bars: requests/s within the SLO per policy, one group per trace family, the ceiling as a tick."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    families = sorted({(c["distribution"], c["arrivals"]) for c in capacities})
    fig, ax = plt.subplots(figsize=(2.2 * len(families) + 2, 4.5))
    width = 0.8 / len(POLICIES)
    for k, name in enumerate(POLICIES):
        values = []
        for dist, arrivals in families:
            fam = {c["policy"]: c for c in capacities if c["distribution"] == dist and c["arrivals"] == arrivals}
            values.append(fam[name]["rps"] / fam[name]["ceiling_rps"])
        ax.bar([i + (k - len(POLICIES) / 2 + 0.5) * width for i in range(len(families))], values, width, label=name)
    ax.axhline(1.0, color="grey", ls="--", lw=0.8)
    ax.set_xticks(range(len(families)), [f"{d}\n{a}" for d, a in families], fontsize=8)
    ax.set_ylabel("requests/s with p99 within the SLO\n(share of the throughput ceiling)")
    ax.set_title(f"Throughput within the SLO ({slo:g}s), simulated with the cost model measured on this machine", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
