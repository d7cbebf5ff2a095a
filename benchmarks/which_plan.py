"""Which candidate plan our knapsack keeps at a budget, at `headalloc compress`'s default settings, and whether it
is the plain-sum plan (p = 1, every layer keeps attention): when it is, the plan and so every result fitted from it
are what they were before the exponents were measured. Planning only (calibration and plan, no fitting).

    python benchmarks/which_plan.py --budget-kind kv --budget 0.5 [--strategy measured-latent] [--quick] [any compress flag]
"""

import argparse
import time

from headalloc.assets import load_model
from headalloc.compression.pipeline import calibration, plan_settings
from headalloc.compression.settings import add_config_args, config_from_args
from headalloc.compression.strategies import STRATEGIES, auto_strategy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the quick preset's settings (else the defaults)")
    add_config_args(ap)
    cfg = config_from_args(ap.parse_args()).validate()
    teacher, tok = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    name = auto_strategy(teacher, cfg.budget_kind, cfg.target) if cfg.strategy == "auto" else cfg.strategy
    if name not in ("measured-latent", "measured-lowrank"):  # before any loading of text or fitting
        raise SystemExit(f"strategy {name!r} does not choose among exponents (measured-latent, measured-lowrank do)")
    fn = STRATEGIES[name].fn
    t = time.time()
    cal = plan_settings(calibration(teacher, tok, cfg), cfg)  # (--plan-select, --plan-error, --output-groups)
    print(f"calibration: {time.time() - t:.0f} s", flush=True)
    t = time.time()
    plan, info = fn(teacher, cfg.budget, cfg.budget_kind, cfg.step, calibration=cal)
    print(f"{name}, {cfg.budget_kind} budget {cfg.budget}, plan_select {cfg.plan_select}, plan_error "
          f"{cfg.plan_error}: plan {time.time() - t:.0f} s; kept p={info['exponent']}, "
          f"layers without attention {info['empty_layers'] or 'none'}; calibration loss before fitting:")
    worst = info.get("worst_part_increase_by_candidate", {})
    for k, v in info["calibration_loss_by_candidate"].items():
        print(f"  {k}: {v:.4f}" + (f" (largest increase {worst[k][1]:.4f} nats, on '{worst[k][0]}')" if k in worst else ""))
    plain, _ = fn(teacher, cfg.budget, cfg.budget_kind, cfg.step, calibration=cal, exponents=(1.0,))
    print(f"the plain-sum plan (p = 1): {'the same' if plain == plan else 'a different plan'}")


if __name__ == "__main__":
    main()
