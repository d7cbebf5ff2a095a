"""Which candidate plan our knapsack keeps at a budget, at `headalloc compress`'s default settings, and whether it
is the plain-sum plan (p = 1, every layer keeps attention): when it is, the plan and so every result fitted from it
are what they were before the exponents were measured. Planning only (calibration and plan, no fitting).

    python studies/which_plan.py --budget-kind kv --budget 0.5 [--strategy measured-latent] [--quick] [any compress flag]
"""

import argparse
import time
from dataclasses import replace

from headalloc.assets import load_model
from headalloc.compression.pipeline import plan_options, prepare
from headalloc.compression.planning import STRATEGIES, PlanRequest, auto_strategy
from headalloc.compression.settings import add_config_args, config_from_args
from headalloc.reports.ledger import append


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the quick preset's settings (else the defaults)")
    add_config_args(ap)
    cfg = config_from_args(ap.parse_args()).validate()
    teacher, tok = load_model(cfg.model, dtype=cfg.runtime.dtype, device=cfg.runtime.device)
    name = auto_strategy(teacher, cfg.plan.budget_kind, cfg.plan.target) if cfg.plan.strategy == "auto" else cfg.plan.strategy
    if name not in ("measured-latent", "measured-lowrank"):  # before any loading of text or fitting
        raise SystemExit(f"strategy {name!r} does not choose among exponents (measured-latent, measured-lowrank do)")
    fn = STRATEGIES[name].fn
    t = time.time()
    ws = prepare(teacher, tok, cfg)
    options = plan_options(ws, cfg)  # (--plan-select, --plan-error, --output-groups)
    print(f"calibration: {time.time() - t:.0f} s", flush=True)
    t = time.time()
    p = cfg.plan
    req = PlanRequest(teacher, p.budget, p.budget_kind, p.step, calibration=ws.calibration, options=options,
                      measurements=ws.measurements)
    plan, info = fn(req)
    print(f"{name}, {cfg.plan.budget_kind} budget {cfg.plan.budget}, plan_select {cfg.plan.select}, plan_error "
          f"{cfg.plan.error}: plan {time.time() - t:.0f} s; kept p={info['exponent']}, "
          f"layers without attention {info['empty_layers'] or 'none'}; calibration loss before fitting:")
    worst = info.get("worst_part_increase_by_candidate", {})
    for k, v in info["calibration_loss_by_candidate"].items():
        print(f"  {k}: {v:.4f}" + (f" (largest increase {worst[k][1]:.4f} nats, on '{worst[k][0]}')" if k in worst else ""))
    plain, _ = fn(replace(req, options=replace(options, exponents=(1.0,))))
    print(f"the plain-sum plan (p = 1): {'the same' if plain == plan else 'a different plan'}")
    append("study", "which_plan", settings=cfg.to_dict(),
           metrics={"strategy": name, "exponent": info["exponent"], "empty_layers": info["empty_layers"],
                    "calibration_loss_by_candidate": info["calibration_loss_by_candidate"],
                    "plain_sum_plan_kept": plain == plan})


if __name__ == "__main__":
    main()
